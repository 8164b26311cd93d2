"""Benchmark curvkit.linalg against named baselines, in the same run.

1. ``Kronecker(A, B) @ X`` against the dense ``torch.kron(A, B) @ X`` at sizes where the dense
   matrix still fits (ratio ours / dense; below 1 means Kronecker is faster).
2. ``A @ X`` with 32 columns against 32 single matvecs ``A @ x_j`` on operators whose
   ``_matmat`` is batched (ratio block / loop).

Timings interleave ours and the baseline, repeat, and report medians (the CPU is shared).

Usage:
    python benchmarks/linalg.py                  # the default sizes
    python benchmarks/linalg.py --quick          # a smoke test in seconds
    python benchmarks/linalg.py --kron-sizes 32 64 --columns 32 --repeats 15
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

from curvkit.linalg import Dense, Kronecker, LinearOperator

RESULTS = Path(__file__).resolve().parent / "results"


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, calls interleaved so load spikes hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name] += _time(fn, 1)
    return {k: statistics.median(v) for k, v in times.items()}


class MLPJacobianGram(LinearOperator):
    """``Jᵀ J`` of a random two-layer network's Jacobian, products by ``torch.func``.

    A stand-in for a curvature operator: ``_matmat`` runs one ``vmap``-ed jvp/vjp pass for all
    columns, so a block of ``k`` columns costs far less than ``k`` passes.
    """

    is_symmetric = True
    is_psd = True

    def __init__(self, n_in: int, width: int, n_data: int, g: torch.Generator):
        self.W1 = torch.randn(width, n_in, generator=g, dtype=torch.float64) / n_in**0.5
        self.W2 = torch.randn(1, width, generator=g, dtype=torch.float64) / width**0.5
        self.X = torch.randn(n_data, n_in, generator=g, dtype=torch.float64)
        self.sizes = [self.W1.numel(), self.W2.numel()]
        super().__init__((sum(self.sizes),) * 2, dtype=torch.float64, device="cpu")

    def _f(self, theta):
        w1, w2 = theta.split(self.sizes)
        h = torch.tanh(self.X @ w1.reshape(self.W1.shape).T)
        return (h @ w2.reshape(self.W2.shape).T).squeeze(1)

    def _matmat(self, V):
        theta = torch.cat([self.W1.flatten(), self.W2.flatten()])
        _, vjp = torch.func.vjp(self._f, theta)

        def gram(v):
            Jv = torch.func.jvp(self._f, (theta,), (v,))[1]
            return vjp(Jv)[0]

        return torch.func.vmap(gram, in_dims=1, out_dims=1)(V)


def bench_kronecker(sizes: list[int], columns: list[int], repeats: int, g) -> list[dict]:
    rows = []
    for p in sizes:
        A = torch.randn(p, p, generator=g, dtype=torch.float64)
        B = torch.randn(p, p, generator=g, dtype=torch.float64)
        kron, dense = Kronecker(A, B), Dense(torch.kron(A, B))
        n = p * p
        for k in columns:
            X = torch.randn(n, k, generator=g, dtype=torch.float64)
            torch.testing.assert_close(kron @ X, dense @ X)  # same result before timing
            fns = {
                "ours": lambda kron=kron, X=X: kron @ X,
                "baseline": lambda dense=dense, X=X: dense @ X,
            }
            t = interleaved(fns, repeats)
            rows.append(
                dict(
                    benchmark="kronecker_matvec",
                    size=f"({p}x{p}) kron ({p}x{p}), n={n}",
                    columns=k,
                    ours_s=t["ours"],
                    baseline="dense torch.kron(A, B) @ X",
                    baseline_s=t["baseline"],
                    ratio=t["ours"] / t["baseline"],
                )
            )
    return rows


def bench_block(ops: dict[str, LinearOperator], k: int, repeats: int, g) -> list[dict]:
    rows = []
    for name, op in ops.items():
        X = torch.randn(op.shape[1], k, generator=g, dtype=op.dtype)

        def loop(op=op, X=X):
            return torch.stack([op @ X[:, j] for j in range(k)], 1)

        torch.testing.assert_close(op @ X, loop())
        t = interleaved({"ours": lambda op=op, X=X: op @ X, "baseline": loop}, repeats)
        rows.append(
            dict(
                benchmark="block_matmat",
                size=f"{name}, n={op.shape[1]}",
                columns=k,
                ours_s=t["ours"],
                baseline=f"{k} single matvecs",
                baseline_s=t["baseline"],
                ratio=t["ours"] / t["baseline"],
            )
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--kron-sizes",
        type=int,
        nargs="+",
        default=[16, 32, 64, 80],
        help="factor size p: Kronecker of two p x p factors, n = p^2",
    )
    parser.add_argument("--kron-columns", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--columns", type=int, default=32, help="k for the block benchmark")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: stable timings on a shared 2-core machine)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats")
    parser.add_argument("--out", type=Path, default=RESULTS / "linalg.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.kron_sizes, args.repeats = [8, 16], 3
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)

    rows = bench_kronecker(args.kron_sizes, args.kron_columns, args.repeats, g)
    block_ops = {
        "Dense 2000x2000": Dense(torch.randn(2000, 2000, generator=g, dtype=torch.float64)),
        "Kronecker (45x45) kron (45x45)": Kronecker(
            torch.randn(45, 45, generator=g, dtype=torch.float64),
            torch.randn(45, 45, generator=g, dtype=torch.float64),
        ),
        "MLP Jacobian Gram (vmap jvp/vjp), 10-64-1, 256 data": MLPJacobianGram(10, 64, 256, g),
    }
    if args.quick:
        block_ops = {
            "Dense 200x200": Dense(torch.randn(200, 200, generator=g, dtype=torch.float64))
        }
    rows += bench_block(block_ops, args.columns, args.repeats, g)

    print(f"{'benchmark':<18} {'size':<55} {'k':>3} {'ours ms':>9} {'base ms':>9} {'ratio':>7}")
    for r in rows:
        print(
            f"{r['benchmark']:<18} {r['size']:<55} {r['columns']:>3} {1e3 * r['ours_s']:>9.3f} "
            f"{1e3 * r['baseline_s']:>9.3f} {r['ratio']:>7.3f}"
        )
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    meta = dict(
        device="cpu",
        processor=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        commit=commit,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        quick=args.quick,
        repeats=args.repeats,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
