"""Structured output in the engine: grammar specs checked once, the mask as the sampler applies it (it
constrains: without it the same logits pick a token the grammar forbids), a grammar advanced by tokens
sampled elsewhere (a prefill worker's first token, a migrated stream), and the real model constrained
to a JSON schema on a prompt that, unconstrained, gives no JSON."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from kvferry.common.grammar import GrammarError, GrammarSpec
from kvferry.engine.grammar_mask import GrammarCompiler, allowed_tokens, eos_only, masked_logits
from kvferry.engine.sampling import Sampler, SamplingParams, SamplingParamsError

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from kvferry.engine.loader import load_config_and_tokenizer

    config, tokenizer, _ = load_config_and_tokenizer(model_path)
    return tokenizer


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, tokenizer.vocab_size)


@pytest.mark.parametrize("kind, source, words", [
    ("json_schema", '{"type": "strnig"}', "strnig"),
    ("json_schema", "{not json", "invalid json_schema"),
    ("regex", "(unclosed", "unclosed group"),
    ("lark", "start: missing_rule", "missing_rule"),
    ("json_object", "{}", "takes no source"),
    ("regex", "", "needs a source"),
    ("yaml", "a: 1", "kind must be one of"),
])
def test_invalid_grammars_are_refused_naming_the_problem(kind, source, words):
    with pytest.raises(GrammarError, match=words):
        GrammarSpec(kind, source)


def test_a_grammar_cannot_be_combined_with_ignore_eos():
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(grammar=GrammarSpec("json_object"), ignore_eos=True)
    assert err.value.param == "ignore_eos"
    assert SamplingParams(grammar=GrammarSpec.json_schema(PERSON)) == SamplingParams(
        grammar=GrammarSpec("json_schema", json.dumps(PERSON, separators=(",", ":"))))


def _digit_heavy_logits(tokenizer, vocab: int, favourite: str) -> torch.Tensor:
    """Logits whose argmax is ``favourite``'s token, a letter: the mask must move the choice."""
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0))
    logits[0, tokenizer.encode(favourite, add_special_tokens=False)[0]] = 50.0
    return logits


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_mask_constrains_what_the_sampler_picks(tokenizer, compiler, temperature):
    vocab = tokenizer.vocab_size
    params = SamplingParams(temperature=temperature, seed=1, grammar=GrammarSpec("regex", "[0-9]{1,6}"))
    sampler, plain = Sampler(0, compiler), Sampler(0)
    state = sampler.new_state(params, [1, 2, 3])
    logits = _digit_heavy_logits(tokenizer, vocab, "Hello")
    unmasked = plain.sample(logits, [plain.new_state(params.with_(grammar=None), [1, 2, 3])]).token_ids[0]
    assert not tokenizer.decode([unmasked]).strip().isdigit()  # without the mask: the letter wins
    text = ""
    for _ in range(6):
        token = sampler.sample(logits, [state]).token_ids[0]
        if token in tokenizer.eos_token_ids:
            break
        text += tokenizer.decode([token])
        state.append(token)
    assert text.isdigit() and 1 <= len(text) <= 6, text
    assert torch.equal(logits, _digit_heavy_logits(tokenizer, vocab, "Hello"))  # the caller's logits untouched


def test_a_mixed_batch_masks_only_its_grammar_rows(tokenizer, compiler):
    vocab = tokenizer.vocab_size
    sampler = Sampler(0, compiler)
    free = sampler.new_state(SamplingParams(temperature=0), [1])
    digits = sampler.new_state(SamplingParams(temperature=0, grammar=GrammarSpec("regex", "[0-9]+")), [1])
    logits = _digit_heavy_logits(tokenizer, vocab, "Hello").repeat(2, 1)
    free_token, digit_token = sampler.sample(logits, [free, digits]).token_ids
    assert free_token == logits[0].argmax().item()
    assert tokenizer.decode([digit_token]).isdigit()


def test_tokens_sampled_elsewhere_advance_the_grammar(tokenizer, compiler):
    """A decode worker's state starts from the prefill worker's first token (or a migrated stream's
    tokens): its mask continues where those left off."""
    spec = GrammarSpec.json_schema(PERSON)
    prefix = tokenizer.encode('{"name": "Ann", "age"', add_special_tokens=False)
    state = Sampler(0, compiler).new_state(SamplingParams(temperature=0, grammar=spec), [1], output_token_ids=prefix)
    allowed = allowed_tokens(compiler.fill_bitmasks([state.grammar]), tokenizer.vocab_size)[0]
    allowed_ids = allowed.nonzero()[0].tolist()
    # The prefix ends in the key's closing quote: only the key separator ": " may come next.
    assert allowed_ids and all(tokenizer.decode([t]) in (":", ": ") for t in allowed_ids), \
        [tokenizer.decode([t]) for t in allowed_ids[:10]]


def test_a_complete_or_failed_grammar_allows_only_eos(tokenizer, compiler):
    vocab = tokenizer.vocab_size
    state = Sampler(0, compiler).new_state(SamplingParams(grammar=GrammarSpec("regex", "ok")), [1])
    for token in tokenizer.encode("ok", add_special_tokens=False):
        state.append(token)
    eos = set(tokenizer.eos_token_ids)
    allowed = allowed_tokens(compiler.fill_bitmasks([state.grammar]), vocab)[0]
    assert set(allowed.nonzero()[0].tolist()) == eos
    failed = Sampler(0, compiler).new_state(SamplingParams(grammar=GrammarSpec("regex", "ok")), [1])
    failed.append(tokenizer.encode("no", add_special_tokens=False)[0])  # refused: the matcher fails
    assert failed.grammar.failed
    allowed = allowed_tokens(compiler.fill_bitmasks([failed.grammar]), vocab)[0]
    assert set(allowed.nonzero()[0].tolist()) == eos
    bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    eos_only(bitmask, 0, [31, 63])  # bit 31 is an int32's sign bit
    assert allowed_tokens(bitmask, vocab)[0].nonzero()[0].tolist() == [31, 63]


def test_an_engine_without_a_compiler_refuses_grammars():
    with pytest.raises(SamplingParamsError) as err:
        Sampler(0).new_state(SamplingParams(grammar=GrammarSpec("json_object")), [1])
    assert err.value.param == "grammar"


def test_the_model_answers_in_the_schema_where_unconstrained_it_would_not(default_model_file):
    from kvferry.engine.llm import LLM

    llm = LLM(model=default_model_file, max_num_batched_tokens=256)
    prompt = [{"role": "user", "content": "Write a short poem about the sea."}]
    free, constrained = llm.chat([prompt, prompt], [
        SamplingParams(max_tokens=48, temperature=0),
        SamplingParams(max_tokens=48, temperature=0, grammar=GrammarSpec.json_schema(PERSON)),
    ])
    with pytest.raises(ValueError):
        json.loads(free.text)  # the mask, not the prompt, makes the JSON below
    jsonschema.validate(json.loads(constrained.text), PERSON)
    assert constrained.finish_reason == "stop"
    assert llm.engine.block_manager.num_used_blocks == 0


def test_both_mask_paths_agree(tokenizer, compiler):
    """float32 CPU logits take numpy's path; others (bf16 here, CUDA's) torch's: the same tokens survive."""
    state = Sampler(0, compiler).new_state(SamplingParams(grammar=GrammarSpec("regex", "[0-9]+")), [1])
    bitmask = compiler.fill_bitmasks([state.grammar])
    logits = torch.randn(3, tokenizer.vocab_size)
    fast = masked_logits(logits, [1], bitmask)
    other = masked_logits(logits.bfloat16(), [1], bitmask).float()
    assert torch.equal(fast[[0, 2]], logits[[0, 2]])  # rows without a grammar are untouched
    assert torch.equal(torch.isinf(fast), torch.isinf(other)) and torch.isinf(fast[1]).sum() > 40000
