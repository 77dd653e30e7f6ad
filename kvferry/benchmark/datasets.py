"""Workloads: the prompts and output lengths a benchmark sends, deterministic from a seed.

- ``synthetic``: prompts of random common English words (about one token each in a BPE vocabulary),
  input and output lengths uniform in ``[len * (1 - range_ratio), len * (1 + range_ratio)]``.
- ``mixed``: the long/short preset — 20% of prompts of 700-1400 words, 80% of 40-200 words, 64 output
  tokens — the mix where a colocated server's long prefills stall every stream's decode.
- ``jsonl``: a file of ``{"prompt": "...", "output_len": N}`` lines (``output_len`` optional).
- ``sharegpt``: a ShareGPT json file (a list of ``{"conversations": [{"from": "human", "value": ...},
  {"from": "gpt", "value": ...}, ...]}``): the first human turn is the prompt and its reply's length
  sets the output length (about 4/3 tokens per word: the bench has no tokenizer of the server's model).

Input lengths are counted in words. Each round (a request rate of a sweep) gets its own prompts, so a
server's prefix cache cannot answer a later rate from an earlier one's prompts; the same seed and round
give the same prompts on every system compared. Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

WORDS = tuple(dict.fromkeys("""
the of and to in is that it for was on are as with his they at be this from have or by one had not but
what all were when we there can an your which their said if do will each about how up out them then she
many some so these would other into has more her two like him see time could no make than first been
its who now people my made over did down only way find use may water long little very after words
called just where most know get through back much go good new write our me man too any day same right
look think also around another came come work three word must because does part even place well such
here take why things help put years different away again off went old number great tell men say small
every found still between name should home big give air line set own under read last never us left end
along while might next sound below saw something thought both few those always looked show large often
together asked house world going want school important until form food keep children feet land side
without boy once animals life enough took sometimes four head above kind began almost live page got
earth need far hand high year mother light parts country father let night following picture being study
second eyes soon times story boys since white days ever paper hard near sentence better best across
during today others sure means knew try told young miles sun ways thing whole hear example heard
several change answer room sea against top turned learn point city play toward five using himself
usually money seen car morning given body family later order music color stand questions fish area
mark horse birds problem complete piece friends easy
""".split()))

LONG_FRACTION = 0.2
MIXED_LONG_WORDS = (700, 1400)
MIXED_SHORT_WORDS = (40, 200)
MIXED_OUTPUT_LEN = 64
DEFAULT_INPUT_LEN = 256
DEFAULT_OUTPUT_LEN = 128
TOKENS_PER_WORD = 4 / 3
DATASETS = ("synthetic", "mixed", "jsonl", "sharegpt")


@dataclass(frozen=True)
class Sample:
    prompt: str
    output_len: int
    prompt_words: int


@dataclass(frozen=True)
class DatasetSpec:
    """What ``--dataset`` and its options ask for; ``output_len=None`` means the dataset's own."""

    name: str = "synthetic"
    path: str | None = None
    input_len: int = DEFAULT_INPUT_LEN
    output_len: int | None = None
    range_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"unknown dataset {self.name!r}; choose one of {', '.join(DATASETS)}")
        if self.name in ("jsonl", "sharegpt") and not self.path:
            raise ValueError(f"--dataset {self.name} needs --dataset-path")
        if self.input_len < 1 or (self.output_len is not None and self.output_len < 1):
            raise ValueError("--input-len and --output-len must be at least 1")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"--range-ratio must be in [0, 1), got {self.range_ratio}")


def make_samples(spec: DatasetSpec, num: int, seed: int, round_index: int = 0) -> list[Sample]:
    """``num`` samples for round ``round_index`` of a sweep; the same arguments give the same samples."""
    rng = np.random.default_rng([seed, round_index])
    if spec.name == "synthetic":
        out_len = spec.output_len or DEFAULT_OUTPUT_LEN
        inputs = _uniform_lengths(rng, spec.input_len, spec.range_ratio, num)
        outputs = _uniform_lengths(rng, out_len, spec.range_ratio, num)
        return [_words_sample(rng, n, o) for n, o in zip(inputs, outputs)]
    if spec.name == "mixed":
        return _mixed(rng, num, spec.output_len or MIXED_OUTPUT_LEN)
    pool = _read_jsonl(spec.path) if spec.name == "jsonl" else _read_sharegpt(spec.path)
    if spec.output_len is not None:
        pool = [Sample(s.prompt, spec.output_len, s.prompt_words) for s in pool]
    # Files are shuffled once per seed; each round takes the next ``num`` (cycling when the file is short).
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[order[(round_index * num + i) % len(pool)]] for i in range(num)]


def _uniform_lengths(rng: np.random.Generator, length: int, ratio: float, num: int) -> list[int]:
    low, high = max(1, round(length * (1 - ratio))), max(1, round(length * (1 + ratio)))
    return rng.integers(low, high + 1, size=num).tolist()


def _words_sample(rng: np.random.Generator, num_words: int, output_len: int) -> Sample:
    words = rng.choice(len(WORDS), size=num_words)
    return Sample(" ".join(WORDS[i] for i in words), int(output_len), num_words)


def _mixed(rng: np.random.Generator, num: int, output_len: int) -> list[Sample]:
    # Exactly round(20%) long prompts at shuffled positions, so even a short run has the intended mix.
    num_long = round(num * LONG_FRACTION)
    is_long = np.zeros(num, dtype=bool)
    is_long[rng.permutation(num)[:num_long]] = True
    samples = []
    for long in is_long:
        low, high = MIXED_LONG_WORDS if long else MIXED_SHORT_WORDS
        samples.append(_words_sample(rng, int(rng.integers(low, high + 1)), output_len))
    return samples


def _read_jsonl(path: str) -> list[Sample]:
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON ({exc})") from None
            prompt, output_len = item.get("prompt"), item.get("output_len", DEFAULT_OUTPUT_LEN)
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{path}:{lineno}: needs a non-empty string \"prompt\"")
            if not isinstance(output_len, int) or isinstance(output_len, bool) or output_len < 1:
                raise ValueError(f"{path}:{lineno}: \"output_len\" must be a positive integer")
            samples.append(Sample(prompt, output_len, len(prompt.split())))
    if not samples:
        raise ValueError(f"{path}: no prompts")
    return samples


def _read_sharegpt(path: str) -> list[Sample]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations")
    samples = []
    for item in data:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, reply = turns[0], turns[1]
        if not (isinstance(first, dict) and isinstance(reply, dict)) or first.get("from") != "human":
            continue
        prompt, answer = first.get("value"), reply.get("value")
        if not isinstance(prompt, str) or not isinstance(answer, str) or not prompt.strip() or not answer.strip():
            continue
        samples.append(Sample(prompt, max(1, round(len(answer.split()) * TOKENS_PER_WORD)), len(prompt.split())))
    if not samples:
        raise ValueError(f"{path}: no conversation starting with a human turn and a reply")
    return samples
