"""Self-check: multiply, solve, estimate a trace and find eigenvalues on a built-in operator."""

from __future__ import annotations

import argparse

import torch

from curvkit.linalg import Diagonal, Kronecker, LowRank, cg, eigsh, trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``curvkit check``."""
    parser.add_argument(
        "--size", type=int, default=24, help="side of each Kronecker factor (n = size^2)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")


def _built_in_operator(size: int, dtype: torch.dtype, g: torch.Generator):
    """An SPD operator ``A ⊗ B + U diag(s) Uᵀ + diag(d)`` and its dense matrix, built independently."""

    def spd(n):
        M = torch.randn(n, n, generator=g, dtype=dtype)
        return M @ M.T / n + 0.1 * torch.eye(n, dtype=dtype)

    A, B = spd(size), spd(size)
    U = torch.randn(size * size, 5, generator=g, dtype=dtype)
    s = torch.rand(5, generator=g, dtype=dtype) * 10
    d = torch.rand(size * size, generator=g, dtype=dtype) + 0.5
    op = Kronecker(A, B, psd=True) + LowRank(U, s) + Diagonal(d)
    dense = torch.kron(A, B) + U @ torch.diag(s) @ U.T + torch.diag(d)
    return op, dense


def run(args: argparse.Namespace) -> int:
    """Print the errors of a product, a CG solve, trace estimates and top eigenvalues against dense."""
    if args.size < 3:
        raise ValueError(
            f"--size must be >= 3 (the check finds 5 eigenvalues of a size^2 operator); "
            f"got {args.size}."
        )
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(args.seed)
    op, dense = _built_in_operator(args.size, dtype, g)
    n = op.shape[0]
    x = torch.randn(n, generator=g, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-4

    def rel(a, b):
        return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()

    rows = [("matvec A @ x", rel(op @ x, dense @ x))]
    b = dense @ x
    # CG controls the residual; the error in z is up to cond(A) times larger, and cond(A) grows
    # with --size (beyond 1e4 at the default size): in float32 it cannot stay below 1e-3. Check
    # what the solver guarantees, the relative residual against the dense matrix.
    z = cg(op, b, rtol=tol, max_iter=10 * n)
    rows.append(("cg solve A z = b (residual)", rel(dense @ z, b)))
    true_trace = dense.trace()
    for method in ("hutchinson", "hutch++", "xtrace"):
        est = trace(
            op, method=method, num_matvecs=60, generator=torch.Generator().manual_seed(args.seed)
        )
        rows.append(
            (
                f"trace ({method}, 60 matvecs)",
                abs(est.item() - true_trace.item()) / abs(true_trace.item()),
            )
        )
    evals, _ = eigsh(op, 5, which="LA")
    top = torch.linalg.eigvalsh(dense)[-5:]
    rows.append(("eigsh top-5 eigenvalues", rel(evals.sort().values, top)))

    print(
        f"curvkit {__import__('curvkit').__version__} self-check on a {n}x{n} operator "
        f"(Kronecker + low-rank + diagonal, {args.dtype}); relative error against dense:"
    )
    for name, err in rows:
        print(f"  {name:<34s} {err:.2e}")
    exact = [err for name, err in rows if not name.startswith("trace")]
    ok = max(exact) < (1e-6 if dtype == torch.float64 else 1e-3)
    print("all exact results agree with dense" if ok else "MISMATCH against dense")
    return 0 if ok else 1
