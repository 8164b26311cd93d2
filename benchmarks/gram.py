"""Benchmark ``curvkit.linalg.gram``'s host ``syrk`` path against ``m.T @ m``, by rows and width.

``gram`` sends one-thread CPU Grams to NumPy's symmetric rank-k update, which does half the
multiply-adds of a GEMM but then copies the mirror half. This sweep measures where that pays
(ratio syrk / GEMM; below 1 means the syrk path is faster), which sets ``gram``'s row threshold.
Timings are process CPU time (one thread: robust to other jobs on the machine), interleaved,
medians of repeats.

Usage:
    python benchmarks/gram.py                 # the default sweep, writes results/gram.json
    python benchmarks/gram.py --quick         # a smoke test in seconds, writes nothing
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from curvkit.linalg.gram import _MIN_ROWS, _host_syrk

RESULTS = Path(__file__).resolve().parent / "results"


def _medians(fns, repeats: int) -> list[float]:
    times = [[] for _ in fns]
    for fn in fns:  # warm-up
        fn()
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.process_time()
            fn()
            times[i].append(time.process_time() - t)
    return [statistics.median(t) for t in times]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+",
                   default=[128, 256, 384, 512, 768, 784, 1000, 1024, 1536, 2048])
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64, 128, 256, 512, 1024])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.rows, args.repeats = [64, 256], [16, 256], 2
    torch.set_num_threads(1)  # the syrk path is the one-thread path
    rows = []
    print("ratio syrk / GEMM; width \\ rows", *args.rows)
    for d in args.widths:
        line = []
        for N in args.rows:
            m = torch.randn(N, d)
            syrk, gemm = _medians([lambda m=m: _host_syrk(m), lambda m=m: m.T @ m], args.repeats)
            rows.append({"rows": N, "width": d, "syrk_s": syrk, "gemm_s": gemm,
                         "ratio": syrk / gemm})
            line.append(f"{syrk / gemm:.2f}")
        print(d, *line, flush=True)
    if args.quick:
        return
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    out = {"device": f"CPU ({platform.machine()}, 1 torch thread)", "torch": torch.__version__,
           "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "min_rows": _MIN_ROWS, "rows": rows}
    (RESULTS / "gram.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
