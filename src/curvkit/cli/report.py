"""Curvature report: spectra, traces, diagonals and KFAC/EKFAC quality, as PNG and JSON."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from curvkit.cli._load import load_factory, resolve_device

_LOSSES = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``curvkit report``."""
    parser.add_argument(
        "--out", default="curvkit-report", help="output folder (default ./curvkit-report/)"
    )
    parser.add_argument(
        "--model", help="'pkg.module:factory' returning an nn.Module (default: a digits CNN)"
    )
    parser.add_argument(
        "--data", help="'pkg.module:factory' returning an iterable of (X, y) batches"
    )
    parser.add_argument("--loss", choices=sorted(_LOSSES), default="cross_entropy")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=8, help="extreme eigenpairs to compute")
    parser.add_argument(
        "--num-matvecs", type=int, default=40, help="products per trace/diagonal estimate"
    )
    parser.add_argument("--train-epochs", type=int, default=40, help="training epochs of the default model")
    parser.add_argument(
        "--limit", type=int, default=None, help="use only the first N digits (default model)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress output")


def _problem(args, dtype, device):
    """Model, loss and data: the built-in digits CNN, or the user's factories."""
    from curvkit.apps.digits import digits_cnn, digits_data, train_briefly

    loss_fn = _LOSSES[args.loss]()
    if (args.model is None) != (args.data is None):
        raise ValueError("--model and --data go together: name both factories or neither.")
    if args.model is None and args.loss != "cross_entropy":
        raise ValueError(
            f"--loss {args.loss} needs --model and --data: the built-in digits problem is a "
            "classification task (--loss cross_entropy)."
        )
    if args.model is None:
        data = digits_data(dtype=dtype, device=device, limit=args.limit)
        model = digits_cnn(seed=args.seed).to(device=device, dtype=dtype)
        model = train_briefly(model, data, loss_fn, epochs=args.train_epochs)
        return model.eval(), loss_fn, data
    model_factory = load_factory(args.model, "--model")
    data_factory = load_factory(args.data, "--data")
    # --seed covers the user's factories too: a model initialised from the global RNG would
    # otherwise give a different report on every run of the same command.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = model_factory()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"--model {args.model} must return an nn.Module; got {type(model).__name__}."
            )
        data = data_factory()
        if isinstance(data, (torch.Tensor, Mapping)) or not isinstance(data, Iterable):
            raise TypeError(
                f"--data {args.data} must return an iterable of (X, y) batches; "
                f"got {type(data).__name__}."
            )
        data = list(data)
    if not data:
        raise ValueError(f"--data {args.data} returned no batches.")
    for i, batch in enumerate(data):
        if (
            not isinstance(batch, (tuple, list))
            or len(batch) != 2
            or not isinstance(batch[0], (torch.Tensor, Mapping))
            or not isinstance(batch[1], torch.Tensor)
        ):
            raise TypeError(
                f"--data {args.data}: batch {i} must be an (X, y) pair with X a tensor (or a "
                f"mapping of tensors) and y a tensor; got {_describe(batch)}."
            )
    model = model.to(device=device, dtype=dtype).eval()

    def cast(t):
        if isinstance(t, Mapping):  # mapping inputs (as Hugging Face models take)
            return {key: cast(value) for key, value in t.items()}
        if not isinstance(t, torch.Tensor):
            return t  # a non-tensor model option (a flag, a string) passes through
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    return model, loss_fn, [(cast(X), cast(y)) for X, y in data]


def _describe(batch) -> str:
    if isinstance(batch, (tuple, list)):
        return f"{type(batch).__name__} of ({', '.join(type(b).__name__ for b in batch)})"
    return type(batch).__name__


def _finite(value):
    """``value`` with NaN and ±inf replaced by ``None``: JSON has no such numbers."""
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run(args: argparse.Namespace) -> int:
    """Compute the report, print it, and write ``report.json`` and ``report.png`` into ``--out``."""
    from curvkit.apps.report import ReportOptions, curvature_report, plot_report

    for option, low in (("top_k", 1), ("num_matvecs", 1), ("train_epochs", 0), ("limit", 1)):
        value = getattr(args, option)
        if value is not None and value < low:
            raise ValueError(f"--{option.replace('_', '-')} must be >= {low}; got {value}.")
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    log = (lambda *a: None) if args.no_progress else print  # noqa: E731
    log("training the model..." if args.model is None else "loading the model...")
    model, loss_fn, data = _problem(args, dtype, device)
    options = ReportOptions(
        top_k=args.top_k,
        num_matvecs=args.num_matvecs,
        seed=args.seed,
        progress=not args.no_progress,
    )
    report = curvature_report(model, loss_fn, data, options, log=log)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_report(report, out / "report.png")
    numbers = {k: v for k, v in report.items() if not k.startswith("_")}
    # Strict JSON (allow_nan=False): an undefined number is written as null, not as NaN.
    (out / "report.json").write_text(json.dumps(_finite(numbers), indent=2, allow_nan=False))
    _print_summary(numbers)
    print(f"wrote {out / 'report.json'} and {out / 'report.png'}")
    return 0


def _print_summary(r: dict) -> None:
    print(
        f"\nparameters {r['num_params']}   loss {r['loss']:.4g}   gradient norm {r['gradient_norm']:.3g}"
    )
    fmt = lambda xs: " ".join(f"{x:.3g}" for x in xs)  # noqa: E731
    print(f"Hessian top eigenvalues: {fmt(r['hessian_top_eigenvalues'])}")
    print(f"GGN top eigenvalues:     {fmt(r['ggn_top_eigenvalues'])}")
    print(f"top-eigenspace overlap (Hessian, GGN): {r['top_eigenspace_overlap_hessian_ggn']:.3f}")
    for name, t in r["trace"].items():
        print(f"{name} trace: " + "  ".join(f"{m} {v:.4g}" for m, v in t.items()))
    print(
        "GGN diagonal relative error: "
        + "  ".join(f"{m} {v:.3f}" for m, v in r["ggn_diagonal_rel_error"].items())
    )
    for name, q in r["kfac_vs_ggn"].items():
        print(
            f"{name.upper()} vs GGN relative error: top eigenspace {q['top_eigenspace_rel_error']:.3f}, "
            f"random directions {q['random_directions_rel_error']:.3f}"
        )
    density = r.get("ggn_density") or {}
    fraction = density.get("near_zero_fraction")
    if isinstance(fraction, float) and math.isfinite(fraction):
        print(f"GGN spectrum near zero (λ <= {density['near_zero_threshold']:.1e}): {fraction:.1%}")
