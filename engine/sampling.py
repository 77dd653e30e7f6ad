"""Sampling: the OpenAI sampling parameters, per-request sampling state, a batched sampler, stop checks.

Owns everything between the model's logits and "which token next, and are we done":

1. ``SamplingParams`` (``kvferry.common.sampling``: frozen, validated once; bad values raise
   ``SamplingParamsError`` naming the field and its range, for HTTP 400 / gRPC INVALID_ARGUMENT).
2. ``SamplingState``: one request's seed and incremental token counts for the penalties. The engine
   calls ``append(token_id)`` for every accepted output token; the sampler never mutates it.
3. ``Sampler.sample(logits, states)``: repetition penalty (prompt + output, HF semantics), frequency and
   presence penalties (output only, OpenAI semantics), temperature, top-k, top-p, min-p, then one draw.
4. ``check_stop`` and ``stop_holdback`` for EOS, stop tokens, stop strings and max_tokens.

Structured output (``SamplingParams.grammar``): the state holds the request's grammar matcher and
``append`` advances it; ``sample`` first sets every token the grammar does not allow next to -inf
(engine/grammar_mask.py), so all that follows (penalties, greedy or random) sees only allowed ones.

Randomness: step ``k`` of a request (its ``k``-th output token, counted from 0) uses one uniform number
from the request's own ``torch.Generator`` reseeded from ``(seed, k)``, and inverse-CDF sampling. So a
token depends only on the logits, the seed and the position: never on the rest of the batch, and a
decode worker that receives a request after its first token (or a migrated request) continues the same
random stream given the seed (``SamplingState.seed``). One uniform per row costs ~5 us; a Gumbel /
exponential race (or torch.multinomial) draws a whole vocabulary per row, ~1 ms at 49k tokens on CPU.
Requests without a seed get one from the sampler's RNG (seeded by the engine) when their state is made.

Logprobs are vLLM's default "raw logprobs": log_softmax of the model's logits before penalties,
temperature and truncation, i.e. the model's own distribution (what OpenAI reports).
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvferry.common.grammar import GrammarError
from kvferry.common.sampling import SamplingParams, SamplingParamsError, TokenLogprobs

if TYPE_CHECKING:
    from kvferry.engine.grammar_mask import GrammarCompiler, GrammarMatcher

_MASK64 = (1 << 64) - 1


def _step_seed(seed: int, step: int) -> int:
    """splitmix64 of (seed, step): a well-mixed 64-bit generator seed for one step of one request."""
    z = (seed + 0x9E3779B97F4A7C15 * (step + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class SamplingState:
    """One request's sampling state: params, seed, and token counts kept incrementally for penalties.

    For a request with penalties: the distinct tokens they apply to (prompt and output with a
    repetition penalty, else output only), each with its count in the output, in growable numpy
    buffers. ``append`` is O(1), a step never rescans the history, and the state is O(distinct tokens),
    not O(vocab). Make states with ``Sampler.new_state``.
    """

    def __init__(self, params: SamplingParams, prompt_token_ids: Sequence[int], seed: int,
                 output_token_ids: Iterable[int] = (), grammar: GrammarMatcher | None = None) -> None:
        self.params = params
        self.seed = seed & _MASK64
        self.num_output_tokens = 0  # the step counter of the random stream
        self.grammar = grammar
        # The hot decode path: a batch of these is one argmax.
        self.plain_greedy = (params.greedy and not params.has_penalties and params.logprobs is None
                             and grammar is None)
        self.generator = None if params.greedy else torch.Generator()
        self._position: dict[int, int] | None = None  # token id -> index in _ids / _counts
        self._ids = np.empty(0, dtype=np.int64)
        self._counts = np.empty(0, dtype=np.float32)  # output occurrences (0: prompt only)
        if params.has_penalties:
            self._position = {}
            if params.repetition_penalty != 1.0:
                self._ids = np.unique(np.asarray(prompt_token_ids, dtype=np.int64))
                self._counts = np.zeros(len(self._ids), dtype=np.float32)
                self._position = {t: i for i, t in enumerate(self._ids.tolist())}
        for token_id in output_token_ids:
            self.append(token_id)

    def append(self, token_id: int) -> None:
        """Record an accepted output token (O(1) amortised)."""
        self.num_output_tokens += 1
        if self.grammar is not None:
            self.grammar.consume(token_id)
        if self._position is None:
            return
        i = self._position.get(token_id)
        if i is None:
            i = self._position[token_id] = len(self._position)
            if i == len(self._ids):  # full: double the buffers
                self._ids = np.concatenate([self._ids, np.empty(max(16, i), dtype=np.int64)])
                self._counts = np.concatenate([self._counts, np.zeros(max(16, i), dtype=np.float32)])
            self._ids[i] = token_id
        self._counts[i] += 1

    def penalty_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """Views of the distinct penalised token ids [t] int64 and their output counts [t] float32."""
        n = 0 if self._position is None else len(self._position)
        return self._ids[:n], self._counts[:n]

    def uniform(self) -> float:
        """This step's one draw, in (0, 1]; the same for the same (seed, step) whatever the batch."""
        assert self.generator is not None, "greedy requests draw no random numbers"
        self.generator.manual_seed(_step_seed(self.seed, self.num_output_tokens))
        return 1.0 - torch.rand((), generator=self.generator).item()


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None for requests that asked for no logprobs


class Sampler:
    """Samples one token per row of a logits batch; holds the engine's RNG for unseeded requests."""

    def __init__(self, seed: int | None = None, grammars: GrammarCompiler | None = None) -> None:
        """``grammars``: compiles requests' grammars; None: requests with a grammar are refused."""
        self._rng = random.Random(seed)
        self._grammars = grammars

    def new_state(self, params: SamplingParams, prompt_token_ids: Sequence[int],
                  output_token_ids: Iterable[int] = (), seed: int | None = None) -> SamplingState:
        """A request's state. ``seed`` (a peer's ``SamplingState.seed``) continues a stream started elsewhere."""
        if seed is None:
            seed = params.seed if params.seed is not None else self._rng.getrandbits(64)
        matcher = None
        if params.grammar is not None:
            if self._grammars is None:
                raise SamplingParamsError("grammar", "this engine does not serve structured output")
            try:
                matcher = self._grammars.matcher(params.grammar)
            except GrammarError as exc:
                raise SamplingParamsError("grammar", str(exc)) from None
        return SamplingState(params, prompt_token_ids, seed, output_token_ids, matcher)

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SampleResult:
        """``logits``: [num_seqs, vocab] float32, one row per state. Does not modify ``logits`` or the states."""
        num_seqs = logits.shape[0]
        assert logits.dim() == 2 and num_seqs == len(states), (tuple(logits.shape), len(states))
        if all(s.plain_greedy for s in states):
            return SampleResult(greedy_tokens(logits).tolist(), [None] * num_seqs)

        processed = self._apply_penalties(self._apply_grammars(logits, states), states)
        random_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if len(random_rows) == num_seqs:
            token_ids = self._sample_random(processed, states)
        else:
            token_ids = greedy_tokens(processed)
            if random_rows:
                rows = torch.tensor(random_rows, device=logits.device)
                token_ids[rows] = self._sample_random(_take(processed, random_rows),
                                                      [states[i] for i in random_rows])
        return SampleResult(token_ids.tolist(), self._logprobs(logits, token_ids, states))

    def _apply_grammars(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """Rows with a grammar get its mask (disallowed tokens -inf); the caller's logits stay raw."""
        rows = [i for i, s in enumerate(states) if s.grammar is not None]
        if not rows:
            return logits
        from kvferry.engine.grammar_mask import masked_logits

        assert self._grammars is not None  # a state has a matcher only from this sampler's compiler
        bitmask = self._grammars.fill_bitmasks([states[i].grammar for i in rows])  # type: ignore[misc]
        return masked_logits(logits, rows, bitmask)

    def _apply_penalties(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """Penalties touch only each row's penalised tokens: one gather and one scatter for the batch."""
        pen_rows = [i for i, s in enumerate(states) if s.params.has_penalties]
        if not pen_rows:
            return logits
        device = logits.device
        ids, counts = zip(*(states[i].penalty_tokens() for i in pen_rows))
        lengths = torch.tensor([len(t) for t in ids], device=device)

        def per_token(values: list[float]) -> torch.Tensor:  # [t]: each row's value on each of its tokens
            return torch.tensor(values, device=device).repeat_interleave(lengths)

        rows = per_token(pen_rows).long()
        token_ids = torch.from_numpy(np.concatenate(ids)).to(device)  # [t], distinct within a row
        count = torch.from_numpy(np.concatenate(counts)).to(device)  # [t]
        out = logits.clone()  # the caller's logits stay raw for logprobs
        x = out[rows, token_ids]  # [t]
        rep = per_token([states[i].params.repetition_penalty for i in pen_rows])
        x = torch.where(x > 0, x / rep, x * rep)  # HF: every token of prompt or output (1 = unchanged)
        x -= per_token([states[i].params.frequency_penalty for i in pen_rows]) * count
        x -= per_token([states[i].params.presence_penalty for i in pen_rows]) * (count > 0)
        out[rows, token_ids] = x
        return out

    def _sample_random(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then inverse-CDF with each row's own uniform. -> [r] int64"""
        device, vocab = logits.device, logits.shape[1]
        params = [s.params for s in states]
        x = logits / torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)  # [r, vocab]

        top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
        if min(top_k) < vocab:
            k_max = max(k for k in top_k if k < vocab)
            top_vals = x.topk(k_max, dim=-1).values  # [r, k_max], descending
            kth = top_vals.gather(1, torch.tensor([min(k, k_max) - 1 for k in top_k], device=device).unsqueeze(1))
            kth[torch.tensor([k == vocab for k in top_k], device=device)] = -math.inf
            x.masked_fill_(x < kth, -math.inf)  # ties with the k-th value survive

        probs = x.softmax(-1)  # [r, vocab]
        # top-p and min-p are both thresholds on these probabilities, so one mask with the higher of the
        # two equals top-p then min-p (min-p's reference, the top token, always survives top-p).
        threshold = torch.zeros(len(params), device=device)  # [r]
        use_min_p = any(p.min_p > 0.0 for p in params)
        if use_min_p:
            threshold = torch.tensor([p.min_p for p in params], device=device) * probs.amax(-1)
        p_rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
        if p_rows:
            rows = torch.tensor(p_rows, device=device)
            top_p = torch.tensor([params[i].top_p for i in p_rows], device=device)
            tau = _nucleus_threshold(_take(probs, p_rows), top_p, max(top_k[i] for i in p_rows))
            threshold[rows] = torch.maximum(threshold[rows], tau)
        if p_rows or use_min_p:
            probs.masked_fill_(probs < threshold.unsqueeze(1), 0.0)

        # Inverse CDF with u in (0, 1]: the first index whose cumulative mass reaches u * total. Never a
        # zero-probability token: it would share the cumulative value of an earlier token.
        cdf = probs.cumsum(-1)  # [r, vocab], non-decreasing
        u = torch.tensor([s.uniform() for s in states], dtype=cdf.dtype, device=device).unsqueeze(1)
        return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1).clamp_(max=vocab - 1)

    def _logprobs(self, logits: torch.Tensor, token_ids: torch.Tensor,
                  states: Sequence[SamplingState]) -> list[TokenLogprobs | None]:
        out: list[TokenLogprobs | None] = [None] * len(states)
        lp_rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        if not lp_rows:
            return out
        lp = _take(logits, lp_rows).log_softmax(-1)  # [l, vocab] raw logprobs
        chosen_ids = _take(token_ids, lp_rows)
        chosen = lp.gather(1, chosen_ids.unsqueeze(1)).squeeze(1).tolist()
        n_max = max(states[i].params.logprobs or 0 for i in lp_rows)
        top_vals, top_ids = lp.topk(n_max, dim=-1) if n_max else (lp[:, :0], lp[:, :0].long())
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        for j, (i, token_id) in enumerate(zip(lp_rows, chosen_ids.tolist())):
            n = states[i].params.logprobs or 0
            out[i] = TokenLogprobs(token_id, chosen[j], dict(zip(top_ids[j][:n], top_vals[j][:n])))
        return out


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The first index of each row's maximum, as ``argmax(-1)`` gives it: ``max(-1)`` returns the same
    index (both take the first of equal maxima, and a NaN as the maximum) in a third of the time on
    the CPU (64 x 49152 fp32 logits: 1.4 against 3.9 ms on one thread)."""
    return logits.max(-1).indices


def _take(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``t[rows]`` for increasing ``rows``; no copy when they are all the rows (a row copy is ~40 us at 49k)."""
    return t if len(rows) == t.shape[0] else t[torch.tensor(rows, device=t.device)]


def _nucleus_threshold(probs: torch.Tensor, top_p: torch.Tensor, k_max: int) -> torch.Tensor:
    """Per row of ``probs`` [q, vocab], the probability of the nucleus's last token: the nucleus is the
    shortest run of the likeliest tokens whose mass reaches ``top_p`` [q]. Rows have at most ``k_max``
    nonzero tokens (top-k). The nucleus is looked for among the top 256, then 2048 tokens; a full sort
    (~3.5 ms a row at 49k tokens on CPU, 20x a top-256) only for rows whose nucleus is wider still.
    SmolLM2 at temperature 1, top_p 0.95: median nucleus 111 tokens, 98% within 1024. -> [q]"""
    tau = torch.empty_like(top_p)
    todo = torch.arange(len(top_p), device=probs.device)
    for k in (256, 2048, k_max):
        k = min(k, k_max)
        sub, p = (probs, top_p) if len(todo) == len(top_p) else (probs[todo], top_p[todo])
        top = sub.topk(k, dim=-1).values if k < sub.shape[1] else sub.sort(dim=-1, descending=True).values
        done = top.sum(-1) >= p if k < k_max else torch.ones_like(p, dtype=torch.bool)
        num_kept = ((top.cumsum(-1) - top) < p.unsqueeze(1)).sum(-1, keepdim=True)  # a prefix; >= 1
        tau[todo[done]] = top.gather(1, num_kept - 1).squeeze(1)[done]
        todo = todo[~done]
        if len(todo) == 0:
            break
    return tau


@dataclass(frozen=True)
class StopDecision:
    finished: bool
    reason: str | None = None  # 'stop' (EOS, stop token, stop string) or 'length' (max_tokens)
    trim_text_to: int | None = None  # cut the output text to text[:trim_text_to]; None = keep it all
    stop_reason: str | int | None = None  # the stop string or stop token id that matched (not EOS)


_NOT_FINISHED = StopDecision(False)


def check_stop(output_token_ids: Sequence[int], new_token_id: int, text_so_far: str, params: SamplingParams,
               eos_token_ids: Collection[int], num_new_chars: int | None = None) -> StopDecision:
    """Whether the request is done after ``new_token_id``.

    ``output_token_ids`` and ``text_so_far`` (the output text) already include the new token and its text,
    ``num_new_chars`` long; stop strings are searched only where a new match can be (a match ending in the
    new text), or in the whole text when ``num_new_chars`` is None. A stop token's (EOS included) own text
    and a stop string, with anything after it, are cut from the output unless
    ``include_stop_str_in_output``. Stops take precedence over the length limit, as in vLLM.
    """
    keep = params.include_stop_str_in_output
    is_eos = not params.ignore_eos and new_token_id in eos_token_ids
    if is_eos or new_token_id in params.stop_token_ids:
        trim = None if keep or not num_new_chars else len(text_so_far) - num_new_chars
        return StopDecision(True, "stop", trim, None if is_eos else new_token_id)
    if params.stop:
        start = 0
        if num_new_chars is not None:
            start = max(0, len(text_so_far) - num_new_chars - params.max_stop_len + 1)
        match: tuple[int, str] | None = None
        for s in params.stop:
            i = text_so_far.find(s, start)
            if i != -1 and (match is None or i < match[0]):
                match = (i, s)
        if match is not None:
            i, s = match
            return StopDecision(True, "stop", i + len(s) if keep else i, s)
    if len(output_token_ids) >= params.max_tokens:
        return StopDecision(True, "length")
    return _NOT_FINISHED


def stop_holdback(text: str, params: SamplingParams) -> int:
    """How many trailing characters of streamed ``text`` to hold back: the longest tail that is a proper
    prefix of a stop string, so a stream never emits text that a later stop string match removes. 0 when
    stop strings are kept in the output (held or not, that text is emitted either way)."""
    if params.include_stop_str_in_output:
        return 0
    held = 0
    for s in params.stop:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held
