"""engine/tokenizer: encode/decode and chat templates equal transformers' (AutoTokenizer, its own GGUF
and directory paths), and streaming detokenization never emits half a character."""

from __future__ import annotations

import os

import pytest

from kvferry.engine.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world!",
    "  leading spaces and 12345 digits\n\nnew lines\t tab",
    "emoji 🌈🚀 and CJK 世界你好, accents: héllo naïve",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 🌈?"}],
]


@pytest.fixture(scope="module")
def auto_gguf(default_model_file: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        os.path.dirname(default_model_file),
        gguf_file=os.path.basename(default_model_file),
        local_files_only=True,
    )


@pytest.fixture(scope="module")
def ours_gguf(default_model_file: str) -> Tokenizer:
    return Tokenizer.from_gguf(default_model_file)


def test_gguf_special_ids(ours_gguf: Tokenizer, auto_gguf) -> None:
    assert ours_gguf.eos_token_ids == (2,) and ours_gguf.bos_token_id == 1
    assert ours_gguf.eos_token_ids[0] == auto_gguf.eos_token_id
    assert ours_gguf.bos_token_id == auto_gguf.bos_token_id
    assert ours_gguf.vocab_size == len(auto_gguf) == 49152


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_decode_match_transformers(ours_gguf: Tokenizer, auto_gguf, text: str) -> None:
    ids = ours_gguf.encode(text)
    assert ids == auto_gguf(text).input_ids
    assert ours_gguf.decode(ids) == auto_gguf.decode(ids) == text
    assert ours_gguf.decode(ids, skip_special_tokens=True) == auto_gguf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_template_matches_transformers(
    ours_gguf, auto_gguf, messages, add_generation_prompt
) -> None:
    ours = ours_gguf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    ref = auto_gguf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == ref
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_hf_directory_tokenizer_matches_transformers(make_hf_checkpoint) -> None:
    """tokenizer.json + tokenizer_config.json + chat_template.jinja, as save_pretrained writes them."""
    from transformers import AutoTokenizer

    path = make_hf_checkpoint("llama3")
    assert os.path.isfile(os.path.join(path, "chat_template.jinja"))
    ours = Tokenizer.from_dir(path, eos_token_ids=[2, 0])
    ref = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert ours.eos_token_ids == (2, 0) and ours.bos_token_id == ref.bos_token_id
    for text in TEXTS:
        assert ours.encode(text) == ref(text).input_ids
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids
    for messages in CONVERSATIONS:
        assert ours.apply_chat_template(messages) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def _stream(tok: Tokenizer, prompt: str, text: str) -> tuple[list[str], list[int]]:
    prompt_ids = tok.encode(prompt)
    out_ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas = [detok.add(t) for t in out_ids]
    assert detok.text == "".join(deltas)
    return deltas, out_ids


@pytest.mark.parametrize("text", [
    "Rainbow 🌈 and rocket 🚀🚀, 世界你好！ Ünïcödé façade — “quotes” ½ ∑ 👩‍👩‍👧‍👦 end",
    "🌈",
    "中文文本测试，包含标点。日本語のテキスト。한국어 텍스트.",
])
def test_incremental_detokenizer_multibyte(ours_gguf: Tokenizer, text: str) -> None:
    deltas, out_ids = _stream(ours_gguf, "Say something:", text)
    assert "".join(deltas) == ours_gguf.decode(out_ids) == text
    assert not any("\ufffd" in d for d in deltas)
    # The byte-level vocabulary splits some characters across tokens: those steps emit nothing.
    if len(out_ids) > len(text):
        assert "" in deltas


def test_incremental_detokenizer_skips_special_tokens(ours_gguf: Tokenizer) -> None:
    detok = IncrementalDetokenizer(ours_gguf, ours_gguf.encode("<|im_start|>assistant\n"))
    ids = ours_gguf.encode("Paris.", add_special_tokens=False) + list(ours_gguf.eos_token_ids)
    assert "".join(detok.add(t) for t in ids) == "Paris."


def test_incremental_detokenizer_empty_prompt(ours_gguf: Tokenizer) -> None:
    deltas, out_ids = _stream(ours_gguf, "", " leading space kept 🌈")
    assert "".join(deltas) == " leading space kept 🌈"


def test_missing_chat_template_and_tokenizer_json(make_hf_checkpoint, tmp_path) -> None:
    import shutil

    from kvferry.engine.config import ConfigError

    path = tmp_path / "tok"
    shutil.copytree(make_hf_checkpoint("mistral"), path)
    os.remove(path / "chat_template.jinja")
    tok = Tokenizer.from_dir(str(path))
    with pytest.raises(ConfigError, match="no chat template"):
        tok.apply_chat_template(CONVERSATIONS[0])
    os.remove(path / "tokenizer.json")
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        Tokenizer.from_dir(str(path))
