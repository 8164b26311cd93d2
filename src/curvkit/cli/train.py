"""Compare optimizers on the built-in byte-level language model; write loss curves (PNG, CSV)."""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _optimizers() -> dict:
    """Name → ``(model, lr) -> optimizer`` for the methods ``curvkit train`` compares."""
    from curvkit.optim import KLSOAP, SOAP, KLShampoo, Muon, Shampoo, muon_param_groups

    betas = (0.9, 0.95)
    return {
        "adamw": lambda m, lr: torch.optim.AdamW(
            m.parameters(), lr=lr, betas=betas, weight_decay=0.01
        ),
        "shampoo": lambda m, lr: Shampoo(
            m.parameters(), lr=lr, betas=betas, precondition_frequency=10
        ),
        "soap": lambda m, lr: SOAP(m.parameters(), lr=lr, betas=betas, precondition_frequency=10),
        "klshampoo": lambda m, lr: KLShampoo(
            m.parameters(), lr=lr, betas=betas, precondition_frequency=10
        ),
        "klsoap": lambda m, lr: KLSOAP(
            m.parameters(), lr=lr, betas=betas, precondition_frequency=10
        ),
        "muon": lambda m, lr: Muon(
            muon_param_groups(m), lr=lr, adamw_lr=lr, adjust_lr="match_rms_adamw"
        ),
    }


_METHODS = ("adamw", "shampoo", "soap", "klshampoo", "klsoap", "muon")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``curvkit train``."""
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(_METHODS),
        metavar="METHOD",
        help=f"optimizers to compare (default: all of {', '.join(_METHODS)})",
    )
    parser.add_argument(
        "--data",
        help="'pkg.module:factory' returning (train, validation) 1-d token tensors "
        "(default: bytes of the Python standard library)",
    )
    parser.add_argument("--vocab", type=int, default=256, help="vocabulary size of --data")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default="curvkit-train", help="folder for curves.csv and curves.png"
    )


def _validation_loss(model, batches) -> float:
    with torch.no_grad():
        return sum(
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in batches
        ) / len(batches)


def run(args: argparse.Namespace) -> int:
    """Train one model per method from the same start and data; print and write the curves."""
    from curvkit.apps.lm import ByteLM, load_stdlib_bytes, sample_batch
    from curvkit.cli._load import load_factory

    unknown = sorted(set(args.methods) - set(_METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; expected names from {list(_METHODS)}.")
    repeated = sorted({m for m in args.methods if args.methods.count(m) > 1})
    if repeated:  # their rows would be indistinguishable in curves.csv and the plot's legend
        raise ValueError(f"--methods names {repeated} more than once; name each method once.")
    for option in ("steps", "eval_every", "layers", "width", "heads", "context", "batch", "vocab"):
        if getattr(args, option) < 1:
            raise ValueError(
                f"--{option.replace('_', '-')} must be >= 1; got {getattr(args, option)}."
            )
    if args.width % args.heads:
        raise ValueError(
            f"--width ({args.width}) must be a multiple of --heads ({args.heads})."
        )
    if args.data is None:
        train, val, _ = load_stdlib_bytes(max_bytes=4_000_000)
    else:
        streams = load_factory(args.data, "--data")()
        if not isinstance(streams, (tuple, list)) or len(streams) != 2:
            raise ValueError(
                f"--data {args.data} must return a (train, validation) pair of 1-d token "
                f"tensors; got {type(streams).__name__}."
            )
        train, val = streams
    for name, stream in (("train", train), ("validation", val)):
        if (
            not isinstance(stream, torch.Tensor)
            or stream.ndim != 1
            or stream.numel() < args.context + 1
        ):
            raise ValueError(
                f"--data: the {name} stream must be a 1-d tensor of at least context + 1 "
                f"({args.context + 1}) tokens; got {getattr(stream, 'shape', type(stream).__name__)}."
            )
        if stream.is_floating_point() or stream.is_complex() or (
            stream.numel() and not 0 <= int(stream.min()) <= int(stream.max()) < args.vocab
        ):
            raise ValueError(
                f"--data: the {name} stream must hold integer token ids in [0, --vocab "
                f"{args.vocab}); got {stream.dtype} values in "
                f"[{stream.min().item()}, {stream.max().item()}]."
            )
    val_gen = torch.Generator().manual_seed(args.seed + 12345)
    val_batches = [sample_batch(val, args.batch, args.context, val_gen) for _ in range(4)]
    factories = _optimizers()
    rows = []
    for method in args.methods:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)  # the same initial model for every method
            model = ByteLM(args.layers, args.width, args.heads, args.context, vocab=args.vocab)
        optimizer = factories[method](model, args.lr)
        gen = torch.Generator().manual_seed(args.seed + 1)  # the same batches for every method
        elapsed = 0.0
        for step in range(1, args.steps + 1):
            x, y = sample_batch(train, args.batch, args.context, gen)
            start = time.perf_counter()
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            elapsed += time.perf_counter() - start
            if not math.isfinite(loss.item()):
                raise RuntimeError(
                    f"{method}: the training loss became {loss.item()} at step {step}; lower --lr."
                )
            if step % args.eval_every == 0 or step == args.steps:
                rows.append(
                    dict(
                        method=method,
                        step=step,
                        time=elapsed,
                        train_loss=loss.item(),
                        val_loss=_validation_loss(model, val_batches),
                    )
                )
        print(
            f"{method:>10}: validation loss {rows[-1]['val_loss']:.4f} after {args.steps} steps, "
            f"{elapsed / args.steps * 1e3:.1f} ms/step"
        )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, args.methods, out / "curves.png")
    print(f"wrote {out / 'curves.csv'} and {out / 'curves.png'}")
    return 0


def _plot(rows, methods, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_steps, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        ax_steps.plot([r["step"] for r in mine], [r["val_loss"] for r in mine], label=method)
        ax_time.plot([r["time"] for r in mine], [r["val_loss"] for r in mine], label=method)
    ax_steps.set(xlabel="step", ylabel="validation loss (nats/byte)")
    ax_time.set(xlabel="training time (s)", ylabel="validation loss (nats/byte)")
    ax_steps.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
