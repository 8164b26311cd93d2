"""Run the benchmark scripts of a source checkout and print their ratio tables."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Scripts that take a plain ``--quick`` smoke-test mode; the order is the layers' order.
_BENCHMARKS = (
    "linalg",
    "gram",
    "curvature",
    "kfac",
    "taylor",
    "optim",
    "pinn",
    "symmetry",
    "spectral_optim",
)


def _benchmark_dir() -> Path:
    """``benchmarks/`` of the working directory, or of the checkout this package runs from."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (root / "benchmarks" / "linalg.py").is_file():
            return root / "benchmarks"
    raise FileNotFoundError(
        "no benchmarks/ folder found: the benchmark scripts live in a source checkout of curvkit "
        "(run `curvkit bench` from its root)."
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``curvkit bench``."""
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all of {', '.join(_BENCHMARKS)})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke-test sizes (seconds, not minutes)"
    )


def run(args: argparse.Namespace) -> int:
    """Run each named benchmark script in turn; its table goes to standard output."""
    unknown = sorted(set(args.names) - set(_BENCHMARKS))
    if unknown:
        raise ValueError(
            f"unknown benchmark(s) {unknown}; expected names from {list(_BENCHMARKS)}."
        )
    folder = _benchmark_dir()
    with tempfile.TemporaryDirectory() as scratch:
        if args.quick:
            # Smoke-test numbers must not replace the recorded results: the scripts write next
            # to themselves (benchmarks/results), so run copies of them in a scratch folder.
            copy = Path(scratch) / "benchmarks"
            shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("results", "__pycache__"))
            (copy / "results").mkdir()
            folder = copy
        failed = []
        for name in args.names or _BENCHMARKS:
            command = [sys.executable, str(folder / f"{name}.py")]
            command += ["--quick"] if args.quick else []
            print(f"== {name}: {' '.join(command[1:])}", flush=True)
            if subprocess.run(command, cwd=folder.parent).returncode != 0:
                failed.append(name)
    if failed:
        print(f"curvkit bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
