"""Iterative solvers on ``LinearOperator``: CG, MINRES and the Neumann series (LSMR: ``lsmr.py``).

Every Krylov solver here is batched over right-hand-side columns: ``b`` of shape ``(n, k)`` is
solved with one ``A @ X`` product per iteration on the columns that have not yet converged, so
operators whose ``_matmat`` is batched (curvature operators via ``vmap``) pay for one pass, not
``k``. Right-hand sides may also be flat vectors ``(n,)`` or lists of tensors shaped like the
operator's parameters; the solution comes back in the same form.

A solver that does not reach its tolerance raises ``ConvergenceError`` (``on_failure="raise"``,
the default) or warns with ``ConvergenceWarning`` (``on_failure="warn"``).
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from curvkit.linalg._common import (
    as_rhs,
    check_on_failure,
    lookup,
    positive_int,
    require_operator,
    require_square,
    require_symmetric,
)
from curvkit.linalg.operator import LinearOperator, Operand
from curvkit.linalg.structured import _check_damping

__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "SolveResult",
    "SolveOperator",
    "cg",
    "minres",
    "neumann",
]

OnFailure = Literal["raise", "warn"]


class ConvergenceError(RuntimeError):
    """An iterative method stopped before reaching its tolerance."""


class ConvergenceWarning(UserWarning):
    """An iterative method stopped before reaching its tolerance (``on_failure="warn"``)."""


@dataclass(frozen=True)
class SolveResult:
    """Solution and diagnostics of an iterative solve (``return_info=True``).

    Attributes:
        x: Solution, in the form of the right-hand side (``(n,)``, ``(n, k)`` or a list).
        iterations: Iterations run (the most over all columns).
        residual_norm: Final residual norm per column, shape ``()`` for a vector right-hand
            side, else ``(k,)``. For CG, MINRES and Neumann it is ``‖b − (A + λI) x‖``; for LSMR
            ``‖Aᵀ r − λ x‖`` (the normal-equation residual). CG and MINRES compute it afresh
            for every column whose recursively updated residual met the tolerance (so
            ``converged`` never rests on a value that drifted by rounding); for a column stopped
            by ``max_iter``, and for LSMR, it is the recurrence's value.
        converged: Whether every column reached the tolerance.
    """

    x: object
    iterations: int
    residual_norm: Tensor
    converged: bool


# --------------------------------------------------------------------------- shared plumbing
def _check_tolerances(rtol: float, atol: float, caller: str) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{caller}: {name} must be a finite number >= 0; got {value!r}.")
    if rtol == 0 and atol == 0:
        raise ValueError(f"{caller}: rtol and atol are both 0; the solver could never stop.")


def _max_iter(max_iter: int | None, default: int, caller: str) -> int:
    return default if max_iter is None else positive_int(max_iter, "max_iter", caller)


def _apply_active(A: LinearOperator, P: Tensor, active: Tensor, damping: float = 0.0) -> Tensor:
    """``A @ P`` on the active columns only (zeros elsewhere), one batched product; plus ``λ P``."""
    if bool(active.all()):
        out = A._matmat(P)
    else:
        out = torch.zeros(A.shape[0], P.shape[1], dtype=P.dtype, device=P.device)
        idx = active.nonzero().squeeze(1)
        if idx.numel():
            out[:, idx] = A._matmat(P[:, idx])
    return out + damping * P if damping else out


def _check_claims(residual: Tensor, pending: Tensor, thresh: Tensor, last_true: Tensor,
                  can_continue: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Test the columns that claim convergence against their true residual ``(n, k)``.

    The recursively updated residual drifts from ``b − (A + λI) x`` in low precision (below the
    true one), so a claim is only accepted on the true residual. A column that misses restarts
    on it if that lowers the true residual below the one at its last restart (``last_true``)
    and iterations remain; otherwise it has reached the dtype's attainable accuracy and fails.

    Returns:
        ``(norms, restart, failed)``: the true residual norms ``(k,)`` and two masks of
        ``pending`` columns.
    """
    norms = residual.norm(dim=0)
    missed = pending & ~(norms <= thresh)  # (a NaN from an overflow misses too)
    restart = missed & (norms < last_true) & can_continue
    return norms, restart, missed & ~restart


def _finish(
    caller,
    x_block,
    unflatten,
    is_vector,
    iterations,
    res,
    converged,
    thresh,
    on_failure,
    return_info,
):
    check_on_failure(on_failure, caller)
    ok = bool(converged.all())
    if not ok:
        worst = int(torch.argmax(res / thresh.clamp_min(torch.finfo(res.dtype).tiny)))
        msg = (
            f"{caller}: did not converge in {iterations} iterations: residual norm "
            f"{res[worst].item():.3e} > tolerance {thresh[worst].item():.3e} (column {worst}, "
            f"{int((~converged).sum())} of {converged.numel()} columns unconverged). Raise "
            "max_iter, loosen rtol/atol, add damping or a preconditioner."
        )
        if on_failure == "raise":
            raise ConvergenceError(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=3)
    x = unflatten(x_block)
    if not return_info:
        return x
    return SolveResult(
        x=x, iterations=iterations, residual_norm=res[0] if is_vector else res, converged=ok
    )


def _initial(A, b, x0, caller):
    B, unflatten, is_vector = as_rhs(b, A, caller)
    if x0 is None:
        return B, torch.zeros_like(B), unflatten, is_vector
    X0, _, _ = as_rhs(x0, A.T, caller + " (x0)")
    if X0.shape != B.shape:
        raise ValueError(
            f"{caller}: x0 must match b's shape {tuple(B.shape)}; got {tuple(X0.shape)}."
        )
    return B, X0.clone(), unflatten, is_vector


# --------------------------------------------------------------------------- CG
def cg(
    A: LinearOperator,
    b: Operand,
    *,
    x0: Operand | None = None,
    damping: float = 0.0,
    preconditioner: LinearOperator | None = None,
    rtol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int | None = None,
    on_failure: OnFailure = "raise",
    return_info: bool = False,
):
    """Solve ``(A + λI) x = b`` by (preconditioned) conjugate gradients, batched over columns.

    The recursively updated residual drifts below the true one in low precision, so a column
    whose updated residual meets the tolerance is checked against ``b − (A + λI) x`` (one
    batched product per solve when the checks pass). A column that misses restarts from its
    ``x`` on the true residual; if a restart does not lower the true residual (the dtype's
    attainable accuracy), the column ends unconverged.

    Args:
        A: Symmetric positive-definite operator ``(n, n)`` (declared ``is_symmetric``;
            definiteness is checked as the iteration runs).
        b: Right-hand side ``(n,)``, ``(n, k)``, or a list of tensors shaped like the operator's
            parameters (each optionally with a trailing ``k``).
        x0: Start, same form as ``b`` (default zero).
        damping: ``λ >= 0`` added to the diagonal.
        preconditioner: Symmetric positive-definite operator ``M ≈ (A + λI)^{-1}``, ``(n, n)``.
        rtol: Relative tolerance: column ``j`` has converged when
            ``‖r_j‖ <= max(rtol ‖b_j‖, atol)``.
        atol: Absolute tolerance (see ``rtol``).
        max_iter: Iteration cap (default ``10 n``).
        on_failure: ``"raise"`` a ``ConvergenceError`` or ``"warn"`` if the tolerance is not
            reached (by ``max_iter``, or within the dtype's attainable accuracy).
        return_info: Return a ``SolveResult`` instead of the bare solution.

    Returns:
        The solution in the form of ``b``, or a ``SolveResult``.

    Raises:
        ValueError: Bad shapes or options, an operator not declared symmetric, or a direction of
            non-positive curvature (``A + λI`` is not positive definite).
        TypeError: A non-operator ``A`` or a right-hand side of the wrong dtype.
        ConvergenceError: The tolerance was not reached (``on_failure="raise"``).

    References:
        Hestenes, M. R. & Stiefel, E. (1952). Methods of conjugate gradients for solving linear
        systems. J. Res. Natl. Bur. Stand. 49(6).
    """
    caller = "cg"
    n = require_symmetric(A, caller)
    damping = _check_damping(damping, caller)
    _check_tolerances(rtol, atol, caller)
    max_iter = _max_iter(max_iter, 10 * max(n, 1), caller)
    if preconditioner is not None:
        require_operator(preconditioner, caller + " (preconditioner)")
        if preconditioner.shape != (n, n):
            raise ValueError(
                f"cg: preconditioner must have shape {(n, n)}; got {preconditioner.shape}."
            )
        # CG's recurrences assume a symmetric M (a non-symmetric one stalls without an error),
        # and M's products must stay in A's dtype and device
        require_symmetric(preconditioner, caller + " (preconditioner)")
        if (preconditioner.dtype, preconditioner.device) != (A.dtype, A.device):
            raise TypeError(
                f"cg: preconditioner must have A's dtype and device ({A.dtype}, {A.device}); "
                f"got ({preconditioner.dtype}, {preconditioner.device})."
            )
    Bm, X, unflatten, is_vector = _initial(A, b, x0, caller)
    # b = 0 has the exact solution x = 0 (A + λI is definite); started from an x0, its relative
    # tolerance 0 could never be met (scipy's cg returns 0 too)
    X = torch.where(Bm.norm(dim=0) == 0, 0.0, X)

    def op(P, active):
        return _apply_active(A, P, active, damping)

    def prec(R, active):
        return R if preconditioner is None else _apply_active(preconditioner, R, active)

    ones = torch.ones(Bm.shape[1], dtype=torch.bool, device=Bm.device)
    R = Bm - op(X, ones) if x0 is not None else Bm.clone()
    thresh = torch.clamp(rtol * Bm.norm(dim=0), min=atol)
    res = R.norm(dim=0)
    active = res > thresh
    Z = prec(R, active)
    P = Z.clone()
    rz = (R * Z).sum(0)
    # Claims of convergence wait in ``pending``; once no column is active one product checks
    # them (``_check_claims``; float32 with κ = 1e4 claimed 1e-4 at a true 3.4e-4), and a column
    # that misses restarts CG from its x on the true residual (residual replacement).
    last_true = torch.full_like(res, math.inf)
    pending = torch.zeros_like(active)
    failed = torch.zeros_like(active)
    it = 0
    while True:
        while bool(active.any()) and it < max_iter:
            it += 1
            AP = op(P, active)
            pAp = (P * AP).sum(0)
            if bool((pAp[active] <= 0).any()):
                raise ValueError(
                    "cg: found a direction of non-positive curvature (pᵀ(A + λI)p <= 0): the "
                    "operator is not positive definite. Add damping, or use minres for "
                    "indefinite systems."
                )
            alpha = torch.where(active, rz / torch.where(active, pAp, 1.0), 0.0)
            X = X + alpha * P
            R = R - alpha * AP
            res = torch.where(active, R.norm(dim=0), res)
            pending = pending | (active & (res <= thresh))
            active = active & (res > thresh)
            Z = prec(R, active)
            rz_new = (R * Z).sum(0)
            beta = torch.where(active, rz_new / torch.where(rz == 0, 1.0, rz), 0.0)
            P = Z + beta * P
            rz = rz_new
        if not bool(pending.any()):
            break
        R_true = Bm - op(X, pending)
        norms, restart, gave_up = _check_claims(R_true, pending, thresh, last_true,
                                                it < max_iter)
        res = torch.where(pending, norms, res)
        failed = failed | gave_up
        pending = torch.zeros_like(pending)
        if not bool(restart.any()):
            break
        last_true = torch.where(restart, norms, last_true)
        R = torch.where(restart, R_true, R)
        Z_new = prec(R, restart)
        P = torch.where(restart, Z_new, P)
        rz = torch.where(restart, (R * Z_new).sum(0), rz)
        active = active | restart
    return _finish(
        caller, X, unflatten, is_vector, it, res, ~active & ~failed, thresh, on_failure,
        return_info,
    )


# --------------------------------------------------------------------------- MINRES
def minres(
    A: LinearOperator,
    b: Operand,
    *,
    damping: float = 0.0,
    rtol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int | None = None,
    on_failure: OnFailure = "raise",
    return_info: bool = False,
):
    """Solve ``(A + λI) x = b`` for symmetric, possibly indefinite ``A`` by MINRES, batched.

    Each column minimises ``‖b − (A + λI) x‖`` over its Krylov space (Paige & Saunders), so the
    residual decreases monotonically. Options as in ``cg`` (no preconditioner); ``damping`` may
    be any finite ``λ >= 0``. As in ``cg``, a column whose residual estimate (the Givens
    recurrence) meets the tolerance is checked against the true residual, and restarted from
    its ``x`` on it if it misses.

    Returns:
        The solution in the form of ``b``, or a ``SolveResult``.

    Raises:
        ValueError: Bad shapes or options, or an operator not declared symmetric.
        ConvergenceError: The tolerance was not reached (``on_failure="raise"``).

    References:
        Paige, C. C. & Saunders, M. A. (1975). Solution of sparse indefinite systems of linear
        equations. SIAM J. Numer. Anal. 12(4).
    """
    caller = "minres"
    n = require_symmetric(A, caller)
    damping = _check_damping(damping, caller)
    _check_tolerances(rtol, atol, caller)
    max_iter = _max_iter(max_iter, 10 * max(n, 1), caller)
    Bm, X, unflatten, is_vector = _as_zero_start(A, b, caller)
    k = Bm.shape[1]
    eps = torch.finfo(Bm.dtype).eps

    def op(P, columns):
        return _apply_active(A, P, columns, damping)

    # Lanczos vectors r1, r2 (unnormalised), y; Givens state per column (Paige–Saunders notation).
    r1 = Bm.clone()
    r2 = Bm.clone()
    y = Bm.clone()
    beta = Bm.norm(dim=0)
    thresh = torch.clamp(rtol * beta, min=atol)
    phibar = beta.clone()
    active = phibar > thresh
    oldb = torch.zeros(k, dtype=Bm.dtype, device=Bm.device)
    dbar = torch.zeros_like(oldb)
    epsln = torch.zeros_like(oldb)
    cs = -torch.ones_like(oldb)
    sn = torch.zeros_like(oldb)
    w = torch.zeros_like(Bm)
    w2 = torch.zeros_like(Bm)
    # The recurrence's residual norm phibar drifts from the true one in low precision (loss of
    # orthogonality: float32 with κ = 1e4 claimed 1e-3 at a true 3e-3, κ = 1e5 at 0.2). As in
    # cg, claims wait in ``pending``, one product checks them once no column is active
    # (``_check_claims``), and a column that misses restarts MINRES from its x on the true
    # residual: one extra product per solve when every claim holds.
    true_res = torch.zeros_like(oldb)  # where ``checked``
    checked = torch.zeros_like(active)
    last_true = torch.full_like(oldb, math.inf)  # at the column's last restart
    pending = torch.zeros_like(active)
    failed = torch.zeros_like(active)
    it = 0
    while True:
        while bool(active.any()) and it < max_iter:
            it += 1
            safe_beta = torch.where(active & (beta > 0), beta, 1.0)
            v = y / safe_beta
            y = op(v, active)
            # oldb = 0 at the first iteration and right after a restart: no previous vector.
            y = y - torch.where(oldb == 0, 0.0, beta / torch.where(oldb == 0, 1.0, oldb)) * r1
            alfa = (v * y).sum(0)
            y = y - (alfa / safe_beta) * r2
            r1, r2 = r2, y
            oldb = beta
            beta = y.norm(dim=0)
            # Apply the previous rotation, then build the new one that annihilates beta.
            oldeps = epsln
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln = sn * beta
            dbar = -cs * beta
            gamma = torch.clamp(torch.hypot(gbar, beta), min=eps)
            cs = gbar / gamma
            sn = beta / gamma
            phi = cs * phibar
            phibar = torch.where(active, sn * phibar, phibar)  # finished columns keep theirs
            w1, w2 = w2, w
            w = (v - oldeps * w1 - delta * w2) / gamma
            # The recurrences of finished columns run on unchecked and may overflow; select
            # (rather than multiply by zero) so that an inf or NaN never reaches their solution.
            X = X + torch.where(active, phi * w, 0.0)
            claimed = active & (phibar <= thresh)
            pending = pending | claimed
            # A zero beta means the Krylov space is exhausted: the solve is exact for that
            # column (the least-squares solution where the system is singular).
            active = active & ~claimed & ~(beta <= eps * gamma)
        if not bool(pending.any()):
            break
        R = Bm - op(X, pending)
        norms, restart, gave_up = _check_claims(R, pending, thresh, last_true, it < max_iter)
        true_res = torch.where(pending, norms, true_res)
        checked = checked | pending
        failed = failed | gave_up
        pending = torch.zeros_like(pending)
        if not bool(restart.any()):
            break
        last_true = torch.where(restart, norms, last_true)
        checked = checked & ~restart  # its true residual is that of the restart's start
        r1, r2, y = (torch.where(restart, R, t) for t in (r1, r2, y))
        beta = torch.where(restart, norms, beta)
        phibar = torch.where(restart, norms, phibar)
        oldb, dbar, epsln, sn = (torch.where(restart, 0.0, t) for t in (oldb, dbar, epsln, sn))
        cs = torch.where(restart, -1.0, cs)
        w, w2 = (torch.where(restart, 0.0, t) for t in (w, w2))
        active = active | restart
    # Columns stopped by max_iter (or an exhausted Krylov space) report phibar: no product is
    # added to a solve truncated on purpose.
    res = torch.where(checked & ~active, true_res, phibar.abs())
    converged = ~failed & ((res <= thresh) | ~active)
    return _finish(
        caller, X, unflatten, is_vector, it, res, converged, thresh, on_failure, return_info
    )


def _as_zero_start(A, b, caller):
    B, unflatten, is_vector = as_rhs(b, A, caller)
    return (
        B,
        torch.zeros(A.shape[1], B.shape[1], dtype=B.dtype, device=B.device),
        unflatten,
        is_vector,
    )


# --------------------------------------------------------------------------- Neumann
def neumann(
    A: LinearOperator,
    b: Operand,
    *,
    num_terms: int = 100,
    alpha: float = 1.0,
    damping: float = 0.0,
    rtol: float | None = None,
    on_failure: OnFailure = "raise",
    return_info: bool = False,
):
    """Truncated Neumann series ``x = α Σ_{j=0}^{K} (I − α(A + λI))^j b``.

    Converges to ``(A + λI)^{-1} b`` when every eigenvalue of ``α(A + λI)`` lies in ``(0, 2)``,
    i.e. ``α < 2 / λ_max``. It costs one product per term and no inner products, which is why it
    is used in implicit differentiation.

    Args:
        A: Square operator ``(n, n)``.
        b: Right-hand side ``(n,)``, ``(n, k)`` or a parameter list.
        num_terms: ``K``; the sum has ``K + 1`` terms and costs ``K + 1`` products (the last
            one gives the exact residual of the returned ``x``).
        alpha: Step ``α > 0``.
        damping: ``λ >= 0``.
        rtol: If given, stop early once ``‖r_j‖ <= rtol ‖b_j‖`` for every column and treat not
            reaching it within ``num_terms`` as a failure (``on_failure``). ``None`` (default)
            runs all ``K + 1`` terms and reports the residual.
        on_failure: As in ``cg``.
        return_info: As in ``cg``.

    Returns:
        The solution in the form of ``b``, or a ``SolveResult``.

    Raises:
        ValueError: Bad options, or the series diverged to non-finite values.
    """
    caller = "neumann"
    require_square(A, caller)
    num_terms = positive_int(num_terms, "num_terms", caller, minimum=0)
    damping = _check_damping(damping, caller)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"neumann: alpha must be a finite number > 0; got {alpha!r}.")
    if rtol is not None:
        _check_tolerances(rtol, 0.0, caller)
    Bm, X, unflatten, is_vector = _as_zero_start(A, b, caller)
    # x_{j+1} = x_j + α r_j with r_j = b − (A + λI) x_j reproduces the partial sums of the
    # series; r_{j+1} = r_j − α (A + λI) r_j, so each term costs one product and the residual
    # of the returned x is exact, not estimated.
    R = Bm.clone()
    thresh = (rtol if rtol is not None else 0.0) * Bm.norm(dim=0)
    it = 0
    for it in range(1, num_terms + 2):
        X = X + alpha * R
        R = R - alpha * (A._matmat(R) + damping * R)
        if not bool(torch.isfinite(R).all()):
            raise ValueError(
                f"neumann: the series diverged after {it} terms; alpha={alpha} must be below "
                "2 / λ_max(A + λI), and A + λI must be positive definite."
            )
        if rtol is not None and bool((R.norm(dim=0) <= thresh).all()):
            break
    res = R.norm(dim=0)
    if rtol is None:  # no tolerance asked for: report the residual, never fail
        converged, thresh = torch.ones_like(res, dtype=torch.bool), res
    else:
        converged = res <= thresh
    return _finish(
        caller, X, unflatten, is_vector, it, res, converged, thresh, on_failure, return_info
    )


# --------------------------------------------------------------------------- solve operator
_SOLVERS = {"cg": cg, "minres": minres}


class SolveOperator(LinearOperator):
    """``(A + λI)^{-1}`` applied by an iterative solver.

    This is what ``A.inverse(damping, method=...)`` returns for operators without an exact
    inverse.

    Each product ``S @ X`` runs one batched solve over the columns of ``X``. The operator is
    symmetric (and PSD) when ``A`` is declared so; products carry the solver's tolerance.

    Args:
        A: Square symmetric operator ``(n, n)``.
        damping: ``λ >= 0``.
        method: ``"cg"`` (positive definite ``A + λI``) or ``"minres"`` (indefinite).
        **solver_options: Passed to the solver (``rtol``, ``atol``, ``max_iter``,
            ``on_failure``, and ``preconditioner`` for CG).
    """

    def __init__(
        self, A: LinearOperator, damping: float = 0.0, *, method: str = "cg", **solver_options
    ):
        caller = f"{type(A).__name__}.inverse"
        require_symmetric(A, caller)
        self.solver = lookup(_SOLVERS, method, "solver method", caller)
        if "return_info" in solver_options or "x0" in solver_options:
            raise TypeError(f"{caller}: return_info and x0 are not options of an inverse operator.")
        unknown = sorted(set(solver_options) - set(inspect.signature(self.solver).parameters))
        if unknown:  # (else the TypeError would come from the first product, far from here)
            raise TypeError(f"{caller}: {unknown} are not options of {method}.")
        self.A, self.damping, self.method = A, _check_damping(damping, caller), method
        self.solver_options = solver_options
        super().__init__(
            A.shape, dtype=A.dtype, device=A.device, in_shapes=A.out_shapes, out_shapes=A.in_shapes
        )
        self.is_symmetric = True
        self.is_psd = A.is_psd

    def _matmat(self, X):
        return self.solver(self.A, X, damping=self.damping, **self.solver_options)

    def _to(self, dtype, device):
        return SolveOperator(
            self.A._to(dtype, device), self.damping, method=self.method, **self.solver_options
        )

    def inverse(self, damping: float = 0.0, **kwargs):
        """``A + λI`` itself for ``damping=0`` (no solve); else an iterative solve of it."""
        if damping == 0.0 and not kwargs:  # ((A + λI)^{-1})^{-1} = A + λI, exactly
            from curvkit.linalg.structured import Identity

            if self.damping == 0.0:
                return self.A
            return self.A + Identity(
                self.shape[0],
                self.damping,
                dtype=self.dtype,
                device=self.device,
                in_shapes=self.A.in_shapes,
            )
        return super().inverse(damping, **kwargs)
