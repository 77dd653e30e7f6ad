"""Greedy output of the whole engine equals transformers' token for token (float32).

The reference is transformers' own ``generate`` on the same checkpoint (the default GGUF, which
transformers dequantizes itself, and small random Llama-3/Qwen2/Mistral safetensors checkpoints).
Where the two disagree, the reference's top two candidates at that position must be a near tie
(log-probability gap below ``TIE_GAP``); comparison stops there, since the continuations then differ.
On the common prefix, our per-token log-probabilities must match the reference within ``LOGPROB_TOL``.
"""

from __future__ import annotations

import os

import pytest
import torch

from kvferry.engine.llm import LLM
from kvferry.engine.sampling import SamplingParams

NEW_TOKENS = 64
TIE_GAP = 0.02  # nats between the reference's top-2 candidates that count as a near tie in float32
LOGPROB_TOL = 2e-3  # nats, per position, on the shared greedy prefix

_TOPICS = [
    "the history of the printing press", "how vaccines train the immune system", "why the sky is blue",
    "the rules of chess", "photosynthesis in plants", "the causes of the first world war",
    "how a compiler works", "the water cycle", "the life of Marie Curie", "black holes",
]
_LONG_PARAGRAPH = (
    "In the early morning the harbour was quiet, the fishing boats rocking gently on the grey water while "
    "gulls circled overhead and called to one another. The old lighthouse keeper walked along the pier, "
    "checking the ropes and nodding to the few sailors who were already awake, as he had done every day "
    "for forty years. {n} "
)


def _prompts(tokenizer) -> list[str]:
    raw = [f"Write a short paragraph about {t}." for t in _TOPICS[:5]]
    raw += ["def fibonacci(n):", "The capital of France is", "1, 2, 3, 5, 8, 13,",
            "Translate to French: Good morning, my friend.", "Q: What is the boiling point of water?\nA:",
            "<html>\n  <head>\n    <title>", "Les misérables est un roman de", "Ingredients for pancakes:\n-"]
    chat = [
        tokenizer.apply_chat_template([{"role": "user", "content": f"Explain {t} in two sentences."}])
        for t in _TOPICS[5:]
    ]
    chat.append(tokenizer.apply_chat_template([
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 17 times 3?"},
    ]))
    story = "".join(_LONG_PARAGRAPH.format(n=f"(Day {i}.)") for i in range(27))
    long_prompts = [
        story + "Summarise the story above in one sentence:",
        tokenizer.apply_chat_template([{"role": "user", "content": story + "\nWho is the main character?"}]),
    ]
    return raw + chat + long_prompts


def _load_reference(path: str):
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def _reference_greedy(model, prompts: list[list[int]], eos_ids: tuple[int, ...]):
    """transformers' greedy tokens and per-step log-probabilities, all prompts in one left-padded batch."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[eos_ids[0]] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
        eos_token_id=list(eos_ids), pad_token_id=eos_ids[0], output_logits=True, return_dict_in_generate=True,
    )
    results = []
    for row in range(len(prompts)):
        tokens = out.sequences[row, width:].tolist()
        for i, t in enumerate(tokens):  # finished rows are padded after their EOS
            if t in eos_ids:
                tokens = tokens[: i + 1]
                break
        logprobs = [step[row].float().log_softmax(-1) for step in out.logits[: len(tokens)]]
        results.append((tokens, logprobs))
    return results


def assert_greedy_matches(llm: LLM, reference, prompts: list[str]) -> int:
    """Returns how many prompts matched all the way (the rest stopped at a documented near tie)."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=1)
    ours = llm.generate(prompts, params)  # one continuous batch, chunked prefill included
    full_matches = 0
    references = _reference_greedy(reference, [c.prompt_token_ids for c in ours], llm.tokenizer.eos_token_ids)
    for prompt, got, (want, ref_logprobs) in zip(prompts, ours, references):
        n = min(len(want), len(got.token_ids))
        for i in range(n):
            ref = ref_logprobs[i]
            assert abs(got.logprobs[i].logprob - ref[got.token_ids[i]].item()) < LOGPROB_TOL, (
                f"logprob mismatch at position {i} of prompt {prompt[:40]!r}"
            )
            if got.token_ids[i] != want[i]:
                top2 = ref.topk(2).values
                gap = (top2[0] - top2[1]).item()
                assert gap < TIE_GAP, (
                    f"prompt {prompt[:40]!r}: token {i} is {got.token_ids[i]}, transformers says {want[i]} "
                    f"(top-2 gap {gap:.4f} nats is no near tie)"
                )
                break
        else:
            assert len(want) == len(got.token_ids), f"length differs for prompt {prompt[:40]!r}"
            full_matches += 1
    return full_matches


@pytest.mark.slow
def test_default_gguf_model_matches_transformers(default_model_file):
    llm = LLM(model=default_model_file, dtype="float32", max_num_batched_tokens=512, weights="dequantized")
    prompts = _prompts(llm.tokenizer)
    assert len(prompts) >= 20
    lengths = [len(llm.tokenizer.encode(p)) for p in prompts]
    assert max(lengths) >= 1400, "the sweep must include ~1,500-token prompts"
    reference = _load_reference(default_model_file)
    assert assert_greedy_matches(llm, reference, prompts) >= len(prompts) - 3


@pytest.mark.parametrize("variant", ["llama3", "qwen2", "mistral"])
def test_random_checkpoints_match_transformers(make_hf_checkpoint, variant):
    path = make_hf_checkpoint(variant, max_shard_size="200KB" if variant == "llama3" else None)
    llm = LLM(model=path, dtype="float32", max_num_batched_tokens=64, block_size=16)
    prompts = ["Hello there, how are you today?", "The quick brown fox jumps over the lazy dog. " * 4,
               "1 2 3 4 5 6 7 8 9 10 11 12", "A"]
    reference = _load_reference(path)
    assert assert_greedy_matches(llm, reference, prompts) >= len(prompts) - 1
