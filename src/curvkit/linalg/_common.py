"""Helpers shared by the solvers, estimators and spectral methods (private)."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import Tensor

from curvkit.linalg.operator import LinearOperator, Operand, _as_block

T = TypeVar("T")


def require_operator(A, caller: str) -> LinearOperator:
    """Return ``A`` if it is a ``LinearOperator``, else raise a ``TypeError`` naming the caller."""
    if not isinstance(A, LinearOperator):
        raise TypeError(
            f"{caller}: expected a curvkit.linalg.LinearOperator; got {type(A).__name__}."
        )
    return A


def require_square(A: LinearOperator, caller: str) -> int:
    """Return ``n`` for a square operator of shape ``(n, n)``; raise otherwise."""
    require_operator(A, caller)
    m, n = A.shape
    if m != n:
        raise ValueError(f"{caller}: needs a square operator; got shape {A.shape}.")
    return n


def require_symmetric(A: LinearOperator, caller: str) -> int:
    """Return ``n`` for a square operator declared symmetric; raise otherwise."""
    n = require_square(A, caller)
    if A.dtype.is_complex:
        # the symmetric solvers and eigensolvers use real inner products (no conjugation)
        raise TypeError(
            f"{caller}: needs a real floating-point operator; got {A.dtype} (split a complex "
            "system into its real and imaginary parts)."
        )
    if not A.is_symmetric:
        raise ValueError(
            f"{caller}: needs an operator declared symmetric (is_symmetric=True); got "
            f"{type(A).__name__}, which is not (e.g. build Dense(M, symmetric=True))."
        )
    return n


def lookup(registry: Mapping[str, T], key: str, what: str, caller: str) -> T:
    """``registry[key]`` with an error that lists the valid keys."""
    try:
        return registry[key]
    except (KeyError, TypeError):
        raise ValueError(
            f"{caller}: unknown {what} {key!r}; expected one of {sorted(registry)}."
        ) from None


def positive_int(value, name: str, caller: str, *, minimum: int = 1) -> int:
    """Validate an integer option ``>= minimum``."""
    # numbers.Integral: NumPy integers (e.g. from a config array) are integers too
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{caller}: {name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def check_on_failure(value, caller: str) -> None:
    """Validate an ``on_failure`` option (``"raise"`` or ``"warn"``)."""
    if value not in ("raise", "warn"):
        raise ValueError(f"{caller}: on_failure must be 'raise' or 'warn'; got {value!r}.")


def as_rhs(
    b: Operand, A: LinearOperator, caller: str
) -> tuple[Tensor, Callable[[Tensor], object], bool]:
    """Parse a right-hand side ``b`` in the output space of ``A``.

    Returns ``(B, unflatten, is_vector)``: ``B`` of shape ``(m, k)``, and the map that turns an
    ``(n, k)`` solution back into the caller's form (flat vector, block, or parameter list).
    """
    try:
        B, unflatten = _as_block(b, A, transpose=True)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{caller}: right-hand side: {err}") from None
    if not bool(torch.isfinite(B).all()):
        # a NaN norm compares False with every tolerance: the solvers would report convergence
        raise ValueError(f"{caller}: right-hand side has non-finite entries (NaN or inf).")
    is_vector = isinstance(b, Tensor) and b.ndim == 1
    return B, unflatten, is_vector


def probes(
    n: int,
    k: int,
    *,
    distribution: str,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
    caller: str,
) -> Tensor:
    """``(n, k)`` random probes with ``E[v vᵀ] = I``: Rademacher signs or standard normal.

    They are drawn on the generator's device (CPU for the default generator) and moved to
    ``device``, so that a CPU generator gives the same probes on every device.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{caller}: generator must be a torch.Generator or None; got "
                        f"{type(generator).__name__} (seed one: "
                        "torch.Generator().manual_seed(s)).")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if distribution == "rademacher":
        V = torch.randint(0, 2, (n, k), generator=generator, device=gen_device).to(dtype) * 2 - 1
    elif distribution == "normal":
        V = torch.randn(n, k, generator=generator, device=gen_device, dtype=dtype)
    else:
        raise ValueError(
            f"{caller}: unknown probe distribution {distribution!r}; "
            "expected 'rademacher' or 'normal'."
        )
    return V.to(device)


def orthonormalize(X: Tensor, against: Tensor | None = None) -> Tensor:
    """Orthonormal basis of ``range(X)`` orthogonal to the orthonormal columns of ``against``.

    Classical Gram–Schmidt twice ("twice is enough") against ``against``, then a thin QR.
    """
    if against is not None and against.shape[1] > 0:
        for _ in range(2):
            X = X - against @ (against.T @ X)
    Q, _ = torch.linalg.qr(X)
    return Q
