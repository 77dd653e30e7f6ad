"""The model with GGUF weights kept quantized (``--weights quantized``) against the same file with its
weights dequantized (the dequantize-then-matmul reference, itself held to transformers by
test_exactness.py), on the default model and on a small GGUF that mixes every supported block type.

Prompt tokens multiply by the weight dequantized exactly as the reference's; decode steps (and the
logits of sampled rows) take the quant kernels, which round each token's activations to Q8 blocks
first (as llama.cpp does), so logits differ from the reference by that rounding only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvferry.engine.config import ConfigError
from kvferry.engine.llm import LLM
from kvferry.engine.loader import load_model
from kvferry.engine import model as model_module
from kvferry.engine.model import (
    AMX_DECODE_MIN_TOKENS,
    DENSE_DECODE_MIN_TOKENS,
    DENSE_DECODE_MIN_TOKENS_AMX,
    QuantEmbedding,
    QuantLinear,
)
from kvferry.engine.sampling import SamplingParams
from kvferry.kernels import cpu_features, quant

needs_kernels = pytest.mark.skipif(not quant.available(), reason="quant kernels not built or CPU without AVX2")

NEW_TOKENS = 64
# Decode logits move by the activation rounding: measured on the default model (fp32, 21 prompts x 64
# tokens) up to 0.21 nats per token's log-probability on the shared greedy prefix. A greedy choice can
# flip where the reference's two candidates are within twice that of each other.
LOGPROB_TOL = 0.3
TIE_GAP = 2 * LOGPROB_TOL


@pytest.fixture(scope="module")
def default_pair(default_model_file):
    """(quantized, dequantized) fp32 loads of the default model."""
    return (load_model(default_model_file, torch.float32, weights="quantized"),
            load_model(default_model_file, torch.float32, weights="dequantized"))


def test_default_model_keeps_its_blocks(default_pair):
    q, d = default_pair
    model = q.model
    assert isinstance(model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    # One copy of the tied embedding's blocks serves the lookup and the lm_head.
    assert model.lm_head.qweight.datas[0].data_ptr() == model.embed_tokens.qweight.datas[0].data_ptr()
    layer = model.layers[0]
    for proj in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert isinstance(proj, QuantLinear) and proj.qweight.describe() == "Q4_1"
    assert model.lm_head.qweight.describe() == "Q8_0"
    held = sum(m.qweight.nbytes for m in model.modules() if isinstance(m, QuantLinear))
    held += sum(p.nbytes for p in model.parameters())
    assert held < 100e6 < 500e6 < sum(p.nbytes for p in d.model.parameters())


def test_unpermuted_fused_blocks_dequantize_to_the_reference_weights(default_pair):
    q, d = default_pair
    for i in (0, 29):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            got = quant.dequantize(q.model.layers[i].get_submodule(name).qweight)
            assert torch.equal(got, d.model.layers[i].get_submodule(name).weight), (i, name)
    ids = torch.tensor([[0, 5, 49151], [17, 17, 300]])
    assert torch.equal(q.model.embed_tokens(ids), d.model.embed_tokens(ids))


def assert_same_product(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal weights through the same GEMM: equal but for MKL's alignment-dependent summation order."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def assert_close_at_the_top(got: torch.Tensor, want: torch.Tensor, tol: float = LOGPROB_TOL) -> None:
    """[1, vocab] log-probabilities: the reference's 20 likeliest tokens within ``tol``, the same top one
    (the prompts here have no near tie at the steps checked)."""
    top = want[0].topk(20).indices
    worst = (got[0, top] - want[0, top]).abs().max().item()
    assert worst < tol, f"log-probabilities of the top tokens off by {worst:.3f}"
    assert int(got.argmax()) == int(want.argmax())


@needs_kernels
def test_quantized_logits_are_close_to_the_reference(default_pair, paged_runner):
    q, d = default_pair
    for loaded in (q, d):
        loaded.model.pack_weights()
    ids = q.tokenizer.encode("The capital of France is")
    runs = [paged_runner(loaded.model, len(ids) + 4) for loaded in (q, d)]
    lq, ld = (r.prefill(ids)[-1:].log_softmax(-1) for r in runs)
    assert_close_at_the_top(lq, ld)
    token = int(ld.argmax())
    for step in range(3):
        lq, ld = (r.decode(token, len(ids) + step).log_softmax(-1) for r in runs)
        assert_close_at_the_top(lq, ld)
        token = int(ld.argmax())


def test_the_reference_path_runs_without_kernels(default_pair, paged_runner):
    """Where no quant kernel is built every product dequantizes its weight first: the reference's
    numbers exactly."""
    q, d = default_pair
    ids = q.tokenizer.encode("Hello")
    q.model.pack_weights()
    for m in q.model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = False
    q.model.cpu_decode = None  # the flat decode path was bound to the kernels when the weights were packed
    try:
        runs = [paged_runner(loaded.model, len(ids) + 2) for loaded in (q, d)]
        for r in runs:
            r.prefill(ids)
        assert_same_product(runs[0].decode(42, len(ids)), runs[1].decode(42, len(ids)))
    finally:
        q.model.pack_weights()


def test_weights_flag_is_checked(default_model_file, make_hf_checkpoint):
    with pytest.raises(ConfigError, match="unknown weights"):
        LLM(model=default_model_file, weights="int4")
    with pytest.raises(ConfigError, match="needs a quantized GGUF"):
        load_model(make_hf_checkpoint("qwen2"), torch.float32, weights="quantized")
    with pytest.raises(ConfigError, match="CPU only"):
        load_model(default_model_file, torch.float32, device="cuda", weights="quantized")


# ---- a small GGUF with every block type ------------------------------------------------------------
HIDDEN, INTER, HEADS, KV_HEADS = 256, 512, 4, 2
TYPES = {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q4_0", "ffn_gate": "Q4_1",
         "ffn_up": "Q8_0", "ffn_down": "Q6_K"}


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory, model_path) -> str:
    """Two llama layers, each linear in another block type (q/k/v in three), random blocks; a Q8_0
    embedding and an F16 lm_head (dequantized: a type the kernels do not take)."""
    import gguf
    from gguf_writing import close_gguf, open_gguf
    from quant_blocks import random_blocks

    from kvferry.engine.loader.gguf import read_gguf
    from kvferry.kernels.quant import QTYPES

    by_name = {name: qtype for qtype, (name, _, _) in QTYPES.items()}
    metadata = read_gguf(model_path).metadata
    vocab = len(metadata["tokenizer.ggml.tokens"])
    path = str(tmp_path_factory.mktemp("mixed_gguf") / "mixed.gguf")
    cfg = {"num_hidden_layers": 2, "max_position_embeddings": 512, "hidden_size": HIDDEN, "intermediate_size": INTER,
           "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "rope_theta": 10000.0, "rms_norm_eps": 1e-5}
    w = open_gguf(path, "llama", "mixed tiny", cfg, metadata)
    rng = np.random.default_rng(0)

    def blocks(name: str, qtype: str, rows: int, cols: int, seed: int) -> None:
        w.add_tensor(name, random_blocks(by_name[qtype], rows, cols, seed).numpy(), raw_dtype=gguf.GGMLQuantizationType[qtype])

    blocks("token_embd.weight", "Q8_0", vocab, HIDDEN, 1)
    w.add_tensor("output.weight", rng.normal(0, 0.05, (vocab, HIDDEN)).astype(np.float16))
    w.add_tensor("output_norm.weight", rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32))
    head_dim = HIDDEN // HEADS
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * head_dim, HIDDEN),
              "attn_v": (KV_HEADS * head_dim, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
              "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN), "ffn_down": (HIDDEN, INTER)}
    for layer in range(2):
        for i, (name, (rows, cols)) in enumerate(shapes.items()):
            blocks(f"blk.{layer}.{name}.weight", TYPES[name], rows, cols, 10 * layer + i)
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{layer}.{norm}.weight", rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32))
    close_gguf(w)
    return path


def test_mixed_types_load_quantized_and_match_the_reference(mixed_gguf, paged_runner):
    q = load_model(mixed_gguf, torch.float32, weights="quantized")
    d = load_model(mixed_gguf, torch.float32, weights="dequantized")
    layer = q.model.layers[1]
    assert layer.self_attn.qkv_proj.qweight.describe() == "Q4_K+Q5_K+Q6_K"  # three segments, one module
    assert layer.mlp.gate_up_proj.qweight.describe() == "Q4_1+Q8_0"
    assert layer.self_attn.o_proj.qweight.describe() == "Q4_0"
    assert not isinstance(q.model.lm_head, QuantLinear)  # F16: dequantized
    for i in range(2):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            got = quant.dequantize(q.model.layers[i].get_submodule(name).qweight)
            assert torch.equal(got, d.model.layers[i].get_submodule(name).weight), (i, name)
    if not quant.available():
        return
    ids = list(range(100, 140))
    for loaded in (q, d):
        loaded.model.pack_weights()
    runs = [paged_runner(loaded.model, len(ids) + 4) for loaded in (q, d)]
    lq, ld = (r.prefill(ids)[-1:].log_softmax(-1) for r in runs)
    assert_close_at_the_top(lq, ld)
    lq, ld = (r.decode(7, len(ids)).log_softmax(-1) for r in runs)
    assert_close_at_the_top(lq, ld)


# ---- greedy output: quantized vs the dequantize-then-matmul reference ------------------------------
@pytest.mark.slow
@pytest.mark.timeout(1800)  # two engines x 21 prompts x 64 tokens: ~10 minutes on a busy 2-core box
@needs_kernels
def test_greedy_output_matches_the_dequantized_reference(default_model_file, dtype="float32"):
    from test_exactness import _prompts

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=20)  # to find the flipped token
    reference = LLM(model=default_model_file, dtype=dtype, weights="dequantized", max_num_batched_tokens=2048)
    prompts = _prompts(reference.tokenizer)
    assert len(prompts) >= 20
    want = reference.generate(prompts, params)
    del reference
    got = LLM(model=default_model_file, dtype=dtype, weights="quantized", max_num_batched_tokens=2048).generate(
        prompts, params)
    full = 0
    for prompt, a, b in zip(prompts, got, want):
        for i in range(min(len(a.token_ids), len(b.token_ids))):
            if a.token_ids[i] != b.token_ids[i]:
                ref = b.logprobs[i]
                gap = ref.logprob - ref.top_logprobs.get(a.token_ids[i], float("-inf"))
                assert gap < TIE_GAP, (f"prompt {prompt[:40]!r}: token {i} is {a.token_ids[i]}, the reference "
                                       f"says {b.token_ids[i]} (top-2 gap {gap:.3f} nats is no near tie)")
                break
            assert abs(a.logprobs[i].logprob - b.logprobs[i].logprob) < LOGPROB_TOL, (
                f"logprob off at position {i} of prompt {prompt[:40]!r}")
        else:
            assert len(a.token_ids) == len(b.token_ids), f"length differs for prompt {prompt[:40]!r}"
            full += 1
    assert full >= len(prompts) // 2, f"only {full} of {len(prompts)} prompts matched all the way"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_products_on_the_dense_copy_equal_the_per_call_dequantize(default_pair, dtype):
    """``--prompt-weights dense`` keeps the weight dequantized once (prepacked for oneDNN in bf16 where
    it runs natively): a prompt's numbers are those of dequantizing on every call, bit for bit in fp32
    (the same ``F.linear``). In bf16 the prepacked oneDNN kernel may sum a product in another order
    than ``F.linear``'s: on a CPU with AMX 4 of 113,664 outputs came out one bf16 step apart."""
    q, _ = default_pair
    proj = q.model.layers[3].mlp.gate_up_proj
    x = torch.randn(37, proj.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    proj.pack(None)
    per_call = proj(x, decode_only=False)
    assert proj.dense is None and proj.dense_packed is None
    try:
        proj.pack(dtype)
        assert (proj.dense is not None) != (proj.dense_packed is not None)
        got = proj(x, decode_only=False)
        if proj.dense_packed is None:
            assert torch.equal(got, per_call)
        else:
            torch.testing.assert_close(got, per_call, rtol=2**-7, atol=2**-7)  # a bf16 step or two
            assert (got != per_call).float().mean() < 1e-3, "more than a rare rounding apart"
    finally:
        proj.pack(None)


def test_prompt_weights_mode(monkeypatch):
    from kvferry.engine import config as engine_config

    assert engine_config.dense_prompt_weights("dense", 10**15) and not engine_config.dense_prompt_weights("per-call", 1)
    monkeypatch.setattr(engine_config, "available_memory_bytes", lambda: 4 * 2**30)
    assert engine_config.dense_prompt_weights(None, 2**30)  # a quarter of what is available: kept
    assert not engine_config.dense_prompt_weights("auto", 2**30 + 1)
    with pytest.raises(ConfigError, match="prompt weights"):
        engine_config.EngineConfig(prompt_weights="sparse")


def test_decode_batches_leave_the_kernels_for_the_dense_copy_where_the_cpu_makes_it_faster(default_pair, monkeypatch):
    """With a prepacked bf16 copy and no AMX kernel, decode batches from 16 rows (8 where oneDNN runs
    bf16 on AMX) multiply by the copy instead of the quant kernels; without a copy every batch up to
    quant.MAX_TOKENS takes them."""
    q, _ = default_pair
    proj = q.model.layers[3].mlp.gate_up_proj
    x = torch.randn(DENSE_DECODE_MIN_TOKENS_AMX, proj.in_features, generator=torch.Generator().manual_seed(1))
    x = x.bfloat16()
    monkeypatch.setattr(model_module, "amx_decode_kernel", lambda module, dtype: None)
    try:
        for amx, first_dense in ((True, DENSE_DECODE_MIN_TOKENS_AMX), (False, DENSE_DECODE_MIN_TOKENS)):
            monkeypatch.setattr(cpu_features, "has_amx_bf16", lambda amx=amx: amx)
            proj.pack(torch.bfloat16)
            if proj.dense_packed is None or not proj.kernel:
                pytest.skip("no dense bf16 copy (oneDNN runs no bf16 here) or no built kernels to leave")
            assert proj.kernel_max_tokens == first_dense - 1
            dense = torch.ops.mkldnn._linear_pointwise(x, proj.dense_packed, None, "none", [], "")
            assert torch.equal(proj(x), dense) == amx  # 8 rows: the copy with AMX, the kernel without
        proj.pack(None)
        assert proj.kernel_max_tokens == quant.MAX_TOKENS
    finally:
        proj.pack(None)


def test_bf16_decode_batches_from_five_rows_take_the_amx_kernel_where_there_is_one(default_pair):
    """Where the CPU has AMX-BF16, every bf16 decode batch stays on the quantized weight: 1-4 rows on the
    VNNI kernel, 5-64 on the AMX one (the dense copy is for prompts only)."""
    q, _ = default_pair
    proj = q.model.layers[3].mlp.gate_up_proj
    module = quant.load()
    if model_module.amx_decode_kernel(module, torch.bfloat16) is None:
        pytest.skip("no AMX-BF16 kernel on this CPU")
    g = torch.Generator().manual_seed(2)
    try:
        proj.pack(torch.bfloat16, decode_dtype=torch.bfloat16)
        assert proj.kernel_max_tokens == quant.MAX_TOKENS
        args = (proj.qweight.datas, proj.qweight.qtypes, torch.empty(0))
        for rows in (AMX_DECODE_MIN_TOKENS - 1, AMX_DECODE_MIN_TOKENS, quant.MAX_TOKENS):
            x = torch.randn(rows, proj.in_features, generator=g).bfloat16()
            kernel = module.quant_linear_amx if rows >= AMX_DECODE_MIN_TOKENS else module.quant_linear
            assert torch.equal(proj(x), kernel(x, *args))
        x = torch.randn(quant.MAX_TOKENS + 1, proj.in_features, generator=g).bfloat16()
        dense = torch.ops.mkldnn._linear_pointwise(x, proj.dense_packed, None, "none", [], "")
        assert torch.equal(proj(x), dense)  # past the kernels' batch: the copy
    finally:
        proj.pack(None)