"""The comparisons catch real kernel bugs: each production kernel file is copied with one deliberate
bug (an off-by-one causal mask, the newest key dropped, the last tile of keys skipped), imported as a module
of its own, and the same check that passes on the real kernel must fail on the copy."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from kernel_cases import AttnCase  # noqa: E402
from test_decode_attention import check_decode  # noqa: E402
from test_prefill_attention import check_prefill  # noqa: E402

import kvferry.kernels.decode_attention  # noqa: E402
import kvferry.kernels.prefill_attention  # noqa: E402

CASE = AttnCase(64, 3, 16, torch.float32)


def mutant(module, original: str, broken: str, tmp_path: Path):
    """``module``'s source with the one occurrence of ``original`` replaced, imported from a file
    (Triton reads a kernel's source from its file)."""
    source = Path(module.__file__).read_text()
    assert source.count(original) == 1, f"mutation target {original!r} not found exactly once"
    path = tmp_path / f"broken_{Path(module.__file__).name}"
    path.write_text(source.replace(original, broken))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    broken_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(broken_module)
    return broken_module


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # a broken kernel may divide 0 by 0
@pytest.mark.parametrize(
    "original,broken",
    [
        # drops the newest key
        ("split_end = tl.minimum(context_len,", "split_end = tl.minimum(context_len - 1,"),
        # skips the last tile of keys (one tile is one cache block here)
        ("range(split_start, split_end, BLOCK_N)", "range(split_start, split_end - BLOCK_N, BLOCK_N)"),
    ],
    ids=["drops-last-key", "skips-last-block"],
)
def test_broken_decode_kernel_is_caught(original, broken, tmp_path, device):
    check_decode(kvferry.kernels.decode_attention.decode_attention, CASE, device, seed=3)
    broken_module = mutant(kvferry.kernels.decode_attention, original, broken, tmp_path)
    with pytest.raises(AssertionError, match="not close"):
        check_decode(broken_module.decode_attention, CASE, device, seed=3)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_off_by_one_causal_mask_is_caught(tmp_path, device):
    check_prefill(kvferry.kernels.prefill_attention.prefill_attention, CASE, device, seed=3)
    original = "visible = (n[None, :] <= q_pos[:, None])"
    broken_module = mutant(kvferry.kernels.prefill_attention, original, original.replace("<=", "<"), tmp_path)
    with pytest.raises(AssertionError, match="not close"):
        check_prefill(broken_module.prefill_attention, CASE, device, seed=3)
