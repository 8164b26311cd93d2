"""Randomized Nyström approximation of PSD operators and Nyström-preconditioned CG."""

from __future__ import annotations

import math
from typing import Literal

import torch

from curvkit.linalg._common import as_rhs, positive_int, probes, require_symmetric
from curvkit.linalg.eigen import LowRank, SymmetricEigen
from curvkit.linalg.operator import LinearOperator, Operand
from curvkit.linalg.solve import OnFailure, cg
from curvkit.linalg.structured import _check_damping

__all__ = ["nystrom", "nystrom_pcg"]


class _UnfactorableSketch(ValueError):
    """The shifted sketch ``Ωᵀ(A + νI)Ω`` has no Cholesky factor (callers may explain why)."""


def nystrom(
    A: LinearOperator,
    rank: int,
    *,
    method: Literal["stable", "fast"] = "stable",
    shift: float | None = None,
    generator: torch.Generator | None = None,
) -> LowRank:
    """Randomized Nyström approximation ``Â = A Ω (Ωᵀ A Ω)^{-1} Ωᵀ A`` of a PSD operator.

    One batched product ``A @ Ω`` with a Gaussian sketch ``Ω: (n, rank)``. A small shift ``ν``
    is added before the Cholesky factorisation of ``Ωᵀ (A + νI) Ω`` so that it succeeds in
    floating point (Tropp et al. 2017); ``method="stable"`` removes it again afterwards.

    Args:
        A: Symmetric positive semi-definite operator ``(n, n)`` (declared ``is_symmetric``).
        rank: Sketch size ``l``, ``1 <= l <= n``.
        method: ``"stable"``: orthonormalised sketch, thin SVD, eigenvalues ``max(σ² − ν, 0)``;
            returns ``LowRank(U, λ)`` with orthonormal ``U: (n, l)``. ``"fast"``: no QR and no
            SVD (the GPU-friendly variant of the ENGD-W paper), returns ``LowRank(B, 1)`` with
            ``Â + νI ≈ B Bᵀ`` restricted to the sketch; ``ν`` is not removed.
        shift: ``ν``; default ``sqrt(n) · eps · ‖A Ω‖_F``.
        generator: Source of the sketch.

    Returns:
        A symmetric ``LowRank`` operator ``(n, n)`` of rank ``<= l``; its ``inverse(damping)``
        is the exact Woodbury inverse of ``Â + λI``.

    Raises:
        ValueError: ``rank`` out of range, an operator not declared symmetric, or a sketch
            ``Ωᵀ A Ω`` that is not positive definite (``A`` is not PSD).

    References:
        Tropp, J. A., Yurtsever, A., Udell, M. & Cevher, V. (2017). Fixed-rank approximation of
        a positive-semidefinite matrix from streaming data. NeurIPS.
    """
    caller = "nystrom"
    n = require_symmetric(A, caller)
    rank = positive_int(rank, "rank", caller)
    if rank > n:
        raise ValueError(f"nystrom: rank must be <= n = {n}; got {rank}.")
    if method not in ("stable", "fast"):
        raise ValueError(f"nystrom: method must be 'stable' or 'fast'; got {method!r}.")
    Omega = probes(
        n,
        rank,
        distribution="normal",
        dtype=A.dtype,
        device=A.device,
        generator=generator,
        caller=caller,
    )
    if method == "stable":
        Omega, _ = torch.linalg.qr(Omega)
    Y = A._matmat(Omega)  # (n, l), the only products
    if shift is None:
        nu = math.sqrt(n) * torch.finfo(A.dtype).eps * Y.norm().item()
    else:
        nu = _check_damping(shift, "nystrom (shift)")
    Y = Y + nu * Omega
    core = Omega.T @ Y
    core = (core + core.T) / 2
    L, info = torch.linalg.cholesky_ex(core)
    if info.any():
        raise _UnfactorableSketch(
            "nystrom: the sketch Ωᵀ(A + νI)Ω is not positive definite, so A is not PSD "
            f"(shift ν = {nu:.3e}); pass a larger shift, or use eigsh for indefinite operators."
        )
    # B = Y L^{-T}, so that B Bᵀ = Y (Ωᵀ Y)^{-1} Yᵀ.
    B = torch.linalg.solve_triangular(L, Y.T, upper=False).T
    if method == "fast":
        return LowRank(B, torch.ones(rank, dtype=A.dtype, device=A.device))
    U, sigma, _ = torch.linalg.svd(B, full_matrices=False)
    return LowRank(U, torch.clamp(sigma**2 - nu, min=0.0))


def nystrom_pcg(
    A: LinearOperator,
    b: Operand,
    *,
    rank: int,
    damping: float = 0.0,
    method: Literal["stable", "fast"] = "stable",
    shift: float | None = None,
    rtol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int | None = None,
    generator: torch.Generator | None = None,
    on_failure: OnFailure = "raise",
    return_info: bool = False,
):
    """Solve ``(A + μI) x = b`` by CG preconditioned with a randomized Nyström approximation.

    With ``Â = U diag(λ̂) Uᵀ`` of rank ``l`` the preconditioner is
    ``P^{-1} = (λ̂_l + μ) U (diag(λ̂) + μI)^{-1} Uᵀ + (I − U Uᵀ)`` (Frangella et al.), which
    flattens the top of the spectrum: CG then converges at a rate set by the ``l``-th eigenvalue
    instead of the largest.

    Args:
        A: Symmetric PSD operator ``(n, n)``.
        b: Right-hand side ``(n,)``, ``(n, k)`` or a parameter list.
        rank: Nyström sketch size ``l``.
        damping: ``μ >= 0``; with ``μ = 0`` the smallest retained Nyström eigenvalue must be
            positive.
        method: Nyström variant (see ``nystrom``).
        shift: The sketch's shift ``ν`` (see ``nystrom``; None: a multiple of the rounding).
        rtol: As in ``cg``.
        atol: As in ``cg``.
        max_iter: As in ``cg``.
        generator: Source of the sketch.
        on_failure: As in ``cg``.
        return_info: As in ``cg``.

    Returns:
        The solution in the form of ``b``, or a ``SolveResult``.

    References:
        Frangella, Z., Tropp, J. A. & Udell, M. (2023). Randomized Nyström preconditioning.
        SIAM J. Matrix Anal. Appl. 44(2).
    """
    caller = "nystrom_pcg"
    require_symmetric(A, caller)
    damping = _check_damping(damping, caller)
    as_rhs(b, A, caller)  # validate b before paying for the sketch
    lam, U = nystrom(A, rank, method=method, shift=shift, generator=generator).eigh()
    lam_min = lam.min().item()
    if lam_min + damping <= 0:
        raise ValueError(
            "nystrom_pcg: the smallest Nyström eigenvalue plus damping is "
            f"{lam_min + damping:.3e}; the preconditioner needs it positive: add damping or "
            "lower the rank."
        )
    # P^{-1} acts as (λ̂_l + μ)/(λ̂ + μ) on range(U) and as the identity on its complement.
    P_inv = SymmetricEigen(U, (lam_min + damping) / (lam + damping), complement=1.0)
    return cg(
        A,
        b,
        damping=damping,
        preconditioner=P_inv,
        rtol=rtol,
        atol=atol,
        max_iter=max_iter,
        on_failure=on_failure,
        return_info=return_info,
    )
