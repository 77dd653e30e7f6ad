"""``python -m kvferry.kernels.build``: compile every C++ extension this CPU can run, once, ahead of serving.

``make setup`` runs it; after a plain ``pip install``, run it (or ``kvferry build-kernels``) once: kvferry
never compiles while it serves (``cpu_extension.py``). An extension the CPU cannot run is skipped with the reason; one that fails to build
is reported and its torch fallback runs. Exit status 0 unless ``--strict`` and a build failed.
"""

from __future__ import annotations

import argparse
import sys
import time

from kvferry.kernels import cpu_features, cpu_kernels, cpu_kv_copy, quant
from kvferry.kernels.cpu_extension import LazyExtension, cache_root

# Every extension kvferry has, explicitly.
EXTENSIONS: list[LazyExtension] = [cpu_kernels.AVX512, cpu_kernels.AVX2, cpu_kv_copy.EXTENSION, quant.AVX512, quant.AVX2]


def build_all(force: bool = False, out=sys.stdout) -> bool:
    """Build what is missing (everything with ``force``); True if nothing failed."""
    print(f"kvferry kernels: CPU {cpu_features.describe() or 'without AVX2'}; cache {cache_root()}", file=out)
    ok = True
    for ext in EXTENSIONS:
        reason = ext.unavailable_reason()
        if reason is not None:
            print(f"  {ext.name}: skipped ({reason}; {ext.fallback} run instead)", file=out)
            continue
        if ext.is_built() and not force:
            print(f"  {ext.name}: built already", file=out)
            continue
        start = time.monotonic()
        try:
            path = ext.build()
        except Exception as e:  # no compiler, ninja or a build error: the torch fallback still runs
            ok = False
            print(f"  {ext.name}: FAILED ({type(e).__name__}: {e}); {ext.fallback} run instead", file=out)
            continue
        print(f"  {ext.name}: built in {time.monotonic() - start:.0f} s ({path})", file=out)
    return ok


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="rebuild even what is built already")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a build failed")


def run(args: argparse.Namespace) -> int:
    ok = build_all(force=args.force)
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":  # also `kvferry build-kernels`
    parser = argparse.ArgumentParser(prog="python -m kvferry.kernels.build", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
