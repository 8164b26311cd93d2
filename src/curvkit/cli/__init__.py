"""The ``curvkit`` command: ``report`` (the main job), ``train``, ``pinn``, ``bench``, ``check``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import curvkit
from curvkit.cli import bench, check, pinn, report, train

# Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
_COMMANDS = {
    "report": report,
    "train": train,
    "pinn": pinn,
    "bench": bench,
    "check": check,
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``curvkit`` command, one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="curvkit",
        description="Curvature of neural-network losses as fast matrix-free linear operators.",
    )
    parser.add_argument("--version", action="version", version=f"curvkit {curvkit.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _COMMANDS.items():
        doc = (module.__doc__ or "").strip().splitlines()[0]
        module.add_arguments(sub.add_parser(name, help=doc, description=doc))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvkit`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        out = getattr(args, "out", None)
        if out is not None and Path(out).exists() and not Path(out).is_dir():
            # Checked before the work: the outputs are written last, after minutes of compute.
            raise ValueError(f"--out {out}: exists and is not a folder.")
        return _COMMANDS[args.command].run(args)
    except (ValueError, TypeError, RuntimeError, OSError, ImportError) as err:
        print(f"curvkit {args.command}: error: {err}", file=sys.stderr)
        return 2
