"""Store K/V through a slot mapping: the Triton kernel against ``store_kv_ref`` (exact copies)."""

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from kernel_cases import AttnCase, paged_cache, randn  # noqa: E402

from kvferry.kernels.store_kv import store_kv, store_kv_ref  # noqa: E402

CASES = [
    AttnCase(64, 1, 16, torch.float32, num_kv_heads=3),
    AttnCase(128, 1, 32, torch.bfloat16, num_kv_heads=8),
    AttnCase(64, 1, 32, torch.bfloat16, num_kv_heads=1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c}-kvh{c.num_kv_heads}")
def test_store_kv_matches_reference(case, device):
    cache, _ = paged_cache(case, [4 * case.block_size], device, seed=case.seed)
    num_tokens = 37
    # Scattered distinct slots; key/value as strided views of one fused projection, as the model has.
    slots = torch.randperm(cache.shape[1] * case.block_size, generator=torch.Generator().manual_seed(1))
    slots = slots[:num_tokens].to(device)
    kv = randn(num_tokens, 2 * case.num_kv_heads + 1, case.head_dim, dtype=case.dtype, device=device, seed=2)
    key, value = kv[:, 1 : 1 + case.num_kv_heads], kv[:, 1 + case.num_kv_heads :]
    expected = cache.clone()
    store_kv_ref(key, value, expected, slots)
    store_kv(key, value, cache, slots)
    assert torch.equal(cache, expected)


def test_store_kv_rejects_int32_slots(device):
    case = AttnCase(64, 1, 16, torch.float32)
    cache, _ = paged_cache(case, [16], device, seed=0)
    key = randn(2, case.num_kv_heads, case.head_dim, dtype=case.dtype, device=device, seed=1)
    with pytest.raises(AssertionError):
        store_kv(key, key, cache, torch.tensor([0, 1], dtype=torch.int32, device=device))
