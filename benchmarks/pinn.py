"""PINN benchmark: L2 error against wall-clock time for ENGD, ENGD-Woodbury, SPRING, Adam, HF.

Default (issue 7): 5-d Poisson -Δu = π² Σ cos(π x_i) on [0,1]^5, tanh MLP 5→64→64→48→48→1
(P = 10,065), 3000 interior + 500 boundary points resampled every step, float64, the same time
budget for every method; plus the 2-d Poisson problem (sin·sin) for SPRING and ENGD-Woodbury.

Baseline for the ratio: ENGD (parameter-space Gramian). "speedup" is
time(ENGD reaches its final L2 error) / time(method reaches that error).

    python benchmarks/pinn.py                 # the issue's sizes, --budget seconds per method
    python benchmarks/pinn.py --quick         # smoke test (tiny sizes, seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from curvkit.pinn import poisson
from curvkit.pinn.history import plot_histories
from curvkit.pinn.train import train

RESULTS = Path(__file__).parent / "results"

# Hyperparameters: damping / momentum in the ranges of the spec's sweeps (5-d best runs use
# λ ~ 1e-10..1e-12, μ small with line search); Adam's lr is the usual 1e-3.
OPTIONS = {
    "engd": {"damping": 1e-10},
    "engd_woodbury": {"damping": 1e-10},
    "spring": {"damping": 1e-10, "momentum": 0.1},
    "hessian_free": {"damping": 1e-8, "max_iter": 350},
    "adam": {"lr": 1e-3},
}


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
    except Exception:  # noqa: BLE001  (not a repository: record that)
        return "unknown"


def _run(problem, method, args, budget, n_in, n_bd, seed):
    t0 = time.perf_counter()
    h = train(
        problem,
        method=method,
        time_budget=budget,
        options=OPTIONS[method],
        num_interior=n_in,
        num_boundary=n_bd,
        num_eval=args.num_eval,
        seed=seed,
        eval_every=1,
        progress=args.progress,
    )
    wall = time.perf_counter() - t0
    print(
        f"  {problem.name:10s} {method:14s} steps={h.step[-1]:5d} train_time={h.time[-1]:7.1f}s "
        f"wall={wall:7.1f}s final_l2={h.l2_error[-1]:.3e} best_l2={min(h.l2_error):.3e}",
        flush=True,
    )
    return h


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=5)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 48, 48])
    parser.add_argument("--num-interior", type=int, default=3000)
    parser.add_argument("--num-boundary", type=int, default=500)
    parser.add_argument("--num-eval", type=int, default=30000)
    parser.add_argument("--budget", type=float, default=180.0, help="seconds per method (5-d)")
    parser.add_argument(
        "--methods", nargs="+", default=["engd", "engd_woodbury", "spring", "hessian_free", "adam"]
    )
    parser.add_argument(
        "--budget-2d", type=float, default=120.0, help="seconds per method (2-d); 0 skips"
    )
    parser.add_argument("--methods-2d", nargs="+", default=["spring", "engd_woodbury"])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is fastest on the shared, oversubscribed 2-core box)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.num_interior, args.num_boundary = [16, 16], 200, 50
        args.num_eval, args.budget, args.budget_2d = 2000, 4.0, 4.0
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""

    problem = poisson(args.dim, hidden=args.hidden)
    print(
        f"{problem.name}: hidden={args.hidden}, N={args.num_interior}+{args.num_boundary}, "
        f"budget={args.budget}s per method, threads={args.threads}",
        flush=True,
    )
    histories = {
        m: _run(problem, m, args, args.budget, args.num_interior, args.num_boundary, args.seed)
        for m in args.methods
    }
    plot_histories(
        histories,
        args.out / f"pinn_poisson{args.dim}d{suffix}.png",
        title=f"Poisson {args.dim}-d, {args.num_interior}+{args.num_boundary} points, float64",
    )

    rows = []
    engd = histories.get("engd")
    target = engd.l2_error[-1] if engd is not None else math.nan
    t_engd = engd.time_to_reach(target) if engd is not None else math.nan
    for m, h in histories.items():
        t_reach = h.time_to_reach(target) if engd is not None else math.nan
        rows.append(
            {
                "problem": problem.name,
                "method": m,
                "steps": h.step[-1],
                "train_time_s": h.time[-1],
                "s_per_step": h.time[-1] / max(h.step[-1], 1),
                "final_l2": h.l2_error[-1],
                "best_l2": min(h.l2_error),
                "time_to_engd_final_l2_s": t_reach,
                "speedup_vs_engd": t_engd / t_reach if t_reach > 0 else math.inf,
                "time_to_1e-4_s": h.time_to_reach(1e-4),
                "options": OPTIONS[m],
            }
        )

    histories_2d = {}
    if args.budget_2d > 0:
        p2 = poisson(2, hidden=[16, 16] if args.quick else None)
        n2 = (100, 40) if args.quick else (p2.num_interior, p2.num_boundary)
        print(
            f"{p2.name}: hidden={p2.hidden}, N={n2[0]}+{n2[1]}, budget={args.budget_2d}s",
            flush=True,
        )
        for m in args.methods_2d:
            histories_2d[m] = _run(p2, m, args, args.budget_2d, *n2, args.seed)
            h = histories_2d[m]
            rows.append(
                {
                    "problem": p2.name,
                    "method": m,
                    "steps": h.step[-1],
                    "train_time_s": h.time[-1],
                    "s_per_step": h.time[-1] / max(h.step[-1], 1),
                    "final_l2": h.l2_error[-1],
                    "best_l2": min(h.l2_error),
                    "time_to_1e-5_s": h.time_to_reach(1e-5),
                    "options": OPTIONS[m],
                }
            )
        plot_histories(
            histories_2d,
            args.out / f"pinn_poisson2d{suffix}.png",
            title=f"Poisson 2-d, {n2[0]}+{n2[1]} points, float64",
        )

    print(
        "\n| problem | method | steps | s/step | final L2 | best L2 "
        "| t(ENGD final L2) [s] | speedup vs ENGD |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r.get("time_to_engd_final_l2_s", math.nan)
        sp = r.get("speedup_vs_engd", math.nan)
        print(
            f"| {r['problem']} | {r['method']} | {r['steps']} | {r['s_per_step']:.2f} | "
            f"{r['final_l2']:.2e} | {r['best_l2']:.2e} | {t:.1f} | {sp:.1f} |"
        )
    record = {
        "benchmark": "pinn",
        "device": f"cpu ({platform.processor() or platform.machine()}, 2 shared cores), "
        f"{args.threads} torch thread(s)",
        "torch": torch.__version__,
        "git_commit": _git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "baseline": "engd",
        "rows": rows,
        "histories": {f"{problem.name}/{m}": h.to_dict() for m, h in histories.items()}
        | {f"poisson2d/{m}": h.to_dict() for m, h in histories_2d.items()},
    }
    clean = json.loads(
        json.dumps(record, default=str).replace("Infinity", "null").replace("NaN", "null")
    )
    (args.out / f"pinn{suffix}.json").write_text(json.dumps(clean, indent=1))
    print(f"wrote {args.out / f'pinn{suffix}.json'}")


if __name__ == "__main__":
    main()
