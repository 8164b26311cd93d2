"""Train a physics-informed network on a named PDE problem with a named method."""

from __future__ import annotations

import argparse
from pathlib import Path

_PROBLEMS = ("poisson", "heat", "log_fokker_planck")
_METHODS = ("spring", "engd_woodbury", "engd", "hessian_free", "adam")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``curvkit pinn``."""
    parser.add_argument("problem", choices=_PROBLEMS)
    parser.add_argument("--dim", type=int, default=None, help="spatial dimension (problem default)")
    parser.add_argument("--method", choices=_METHODS, default="spring")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds of training")
    parser.add_argument("--num-interior", type=int, default=None)
    parser.add_argument("--num-boundary", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="e.g. cuda (the same run up to rounding)")
    parser.add_argument(
        "--out", default="curvkit-pinn", help="folder for history.json and history.png"
    )
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Train, print the L2-error history, write ``history.json`` and ``history.png``."""
    from curvkit import pinn
    from curvkit.cli._load import resolve_device

    if args.steps is None and args.time_budget is None:
        args.steps = 100
    factory = getattr(pinn, args.problem)
    problem = factory() if args.dim is None else factory(dim=args.dim)
    history = pinn.train(
        problem,
        method=args.method,
        steps=args.steps,
        time_budget=args.time_budget,
        num_interior=args.num_interior,
        num_boundary=args.num_boundary,
        seed=args.seed,
        progress=not args.no_progress,
        device=resolve_device(args.device),
    )
    print(f"{'step':>6} {'time (s)':>9} {'loss':>11} {'L2 error':>11}")
    for step, t, loss, err in zip(history.step, history.time, history.loss, history.l2_error):
        print(f"{step:>6} {t:>9.2f} {loss:>11.3e} {err:>11.3e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    history.save(out / "history.json")
    history.plot(out / "history.png", label=f"{args.problem} / {args.method}")
    print(f"wrote {out / 'history.json'} and {out / 'history.png'}")
    return 0
