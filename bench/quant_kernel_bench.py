"""Quant kernel throughput: ``quant_linear`` on a 4096 x K weight of each GGUF block type, per build.

    python bench/quant_kernel_bench.py [--threads 1] [--tokens 1,8,64]

Reports weights (x tokens) per second and GB/s of quantized bytes, by CPU time of this process (with
``--threads 1`` a loaded machine still gives usable figures) and by wall time. Weights are random
blocks (tests/quant_blocks.py); the rows (1-2 MB) sit in L2/L3, so this measures the kernel, not DRAM.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from quant_blocks import NAMES, weight  # noqa: E402

from kvferry.kernels import quant  # noqa: E402

CASES = [("Q4_1", 576), ("Q8_0", 576), ("Q4_0", 576), ("Q4_K", 1536), ("Q5_K", 1536), ("Q6_K", 1536)]


def timed(fn, repeats: int) -> tuple[float, float]:  # seconds per call: CPU, wall
    fn()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.process_time() - cpu) / repeats, (time.perf_counter() - wall) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", default="1,8,64")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for ext in quant.EXTENSIONS:
        module = ext.load()
        if module is None:
            print(f"{ext.name}: not available here")
            continue
        print(f"{ext.name} ({module.isa}), {args.threads} thread(s)")
        for name, cols in CASES:
            qw = weight(NAMES[name], 4096, cols)
            for tokens in map(int, args.tokens.split(",")):
                x = torch.randn(tokens, cols).bfloat16()
                cpu, wall = timed(lambda: module.quant_linear(x, qw.datas, qw.qtypes, torch.empty(0)),
                                  20 if tokens <= 8 else 3)
                work = 4096 * cols * tokens
                print(f"  {name} K={cols:<5} {tokens:>3} tokens: {work / cpu / 1e9:6.1f} G weight-tokens/s "
                      f"({qw.nbytes / cpu / 1e9:5.1f} GB/s) by CPU time, {work / wall / 1e9:6.1f} by wall time")


if __name__ == "__main__":
    main()
