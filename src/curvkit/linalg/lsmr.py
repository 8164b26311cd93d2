"""LSMR: damped least squares ``min ‖A x − b‖² + λ ‖x‖²`` for any (rectangular) operator.

Batched over right-hand-side columns like the other Krylov solvers of ``curvkit.linalg.solve``,
whose plumbing (tolerances, results, failure handling) it shares.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from curvkit.linalg._common import as_rhs, check_on_failure, require_operator
from curvkit.linalg.operator import LinearOperator, Operand
from curvkit.linalg.solve import (
    ConvergenceError,
    ConvergenceWarning,
    OnFailure,
    SolveResult,
    _apply_active,
    _check_tolerances,
    _max_iter,
)
from curvkit.linalg.structured import _check_damping

__all__ = ["lsmr"]

def _sym_ortho(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Stable Givens rotation ``(c, s, r)`` with ``[c s; -s c] [a; b] = [r; 0]``, elementwise."""
    r = torch.hypot(a, b)
    safe = torch.where(r == 0, 1.0, r)
    c = torch.where(r == 0, 1.0, a / safe)
    s = torch.where(r == 0, 0.0, b / safe)
    return c, s, r


def lsmr(
    A: LinearOperator,
    b: Operand,
    *,
    damping: float = 0.0,
    atol: float = 1e-6,
    btol: float = 1e-6,
    max_iter: int | None = None,
    on_failure: OnFailure = "raise",
    return_info: bool = False,
):
    """Least squares ``min ‖A x − b‖² + λ ‖x‖²`` for any ``(m, n)`` operator, by LSMR, batched.

    LSMR runs Golub–Kahan bidiagonalisation (one ``A @`` and one ``Aᵀ @`` product per
    iteration) and is MINRES on the normal equations ``(AᵀA + λI) x = Aᵀ b`` in exact
    arithmetic, without ever forming ``AᵀA``. ``damping`` is ``λ`` (SciPy's ``damp`` is
    ``sqrt(λ)``). For consistent systems it converges to the minimum-norm solution.

    Args:
        A: Operator ``(m, n)``, with ``_rmatmat`` if it is not symmetric.
        b: Right-hand side ``(m,)`` or ``(m, k)``.
        damping: ``λ >= 0``.
        atol: Stopping tolerance as in SciPy's ``lsmr``: stop when
            ``‖Āᵀ r̄‖ <= atol ‖Ā‖ ‖r̄‖`` (least squares; bars include the damping rows) or
            ``‖r‖ <= btol ‖b‖ + atol ‖A‖ ‖x‖`` (consistent systems).
        btol: See ``atol``.
        max_iter: Iteration cap (default ``min(m, n)`` times 10).
        on_failure: As in ``cg``.
        return_info: As in ``cg``.

    Returns:
        The solution ``(n,)`` or ``(n, k)``, or a ``SolveResult``.

    References:
        Fong, D. C.-L. & Saunders, M. A. (2011). LSMR: An iterative algorithm for sparse
        least-squares problems. SIAM J. Sci. Comput. 33(5).
    """
    caller = "lsmr"
    require_operator(A, caller)
    if A.dtype.is_complex:
        # the bidiagonalisation here uses real inner products and Givens rotations
        raise TypeError(
            f"lsmr: needs a real floating-point operator; got {A.dtype} (split a complex "
            "system into its real and imaginary parts)."
        )
    damping = _check_damping(damping, caller)
    _check_tolerances(atol, btol, caller)
    m, n = A.shape
    max_iter = _max_iter(max_iter, 10 * max(min(m, n), 1), caller)
    damp = math.sqrt(damping)
    Bm, unflatten_b, is_vector = as_rhs(b, A, caller)
    k = Bm.shape[1]
    dt, dev = Bm.dtype, Bm.device
    zeros = torch.zeros(k, dtype=dt, device=dev)

    def nz(t):  # divide-safe copy: 1 where t is 0
        return torch.where(t == 0, 1.0, t)

    u = Bm.clone()
    normb = u.norm(dim=0)
    beta = normb.clone()
    u = u / nz(beta)
    v = A._rmatmat(u)
    alpha = v.norm(dim=0)
    v = v / nz(alpha)
    X = torch.zeros(n, k, dtype=dt, device=dev)

    zetabar = alpha * beta
    alphabar = alpha.clone()
    rho = torch.ones_like(zeros)
    rhobar = torch.ones_like(zeros)
    cbar = torch.ones_like(zeros)
    sbar = zeros.clone()
    h = v.clone()
    hbar = torch.zeros_like(v)
    # State for the estimate of ‖r‖.
    betadd = beta.clone()
    betad = zeros.clone()
    rhodold = torch.ones_like(zeros)
    tautildeold = zeros.clone()
    thetatilde = zeros.clone()
    zeta = zeros.clone()
    d = zeros.clone()
    norm_a2 = alpha**2
    normr = beta.clone()
    normar = alpha * beta
    active = normar > 0  # Aᵀb = 0 means x = 0 is already the solution
    stop = ~active
    norm_a = torch.sqrt(norm_a2)
    it = 0
    while bool(active.any()) and it < max_iter:
        it += 1
        u = _apply_active(A, v, active) - alpha * u
        beta = torch.where(active, u.norm(dim=0), beta)
        u = u / nz(beta)
        Atu = torch.zeros(n, k, dtype=dt, device=dev)
        idx = active.nonzero().squeeze(1)
        Atu[:, idx] = A._rmatmat(u[:, idx])
        v = Atu - beta * v
        alpha = torch.where(active, v.norm(dim=0), alpha)
        v = v / nz(alpha)

        # Rotation that eliminates the damping term, then Q_i turning B_i into R_i.
        chat, shat, alphahat = _sym_ortho(alphabar, torch.full_like(alphabar, damp))
        rhoold = rho
        c, s, rho = _sym_ortho(alphahat, beta)
        thetanew = s * alpha
        alphabar = c * alpha
        # Qbar_i turning R_iᵀ into Rbar_i.
        rhobarold = rhobar
        zetaold = zeta
        thetabar = sbar * rho
        cbar, sbar, rhobar = _sym_ortho(cbar * rho, thetanew)
        zeta = cbar * zetabar
        zetabar = -sbar * zetabar
        # Update h, hbar and x (frozen columns keep their x).
        hbar = h - (thetabar * rho / nz(rhoold * rhobarold)) * hbar
        # Select rather than multiply by zero: the recurrences of finished columns run on and
        # may overflow, and inf · 0 would turn their solution into NaN.
        X = X + torch.where(active, (zeta / nz(rho * rhobar)) * hbar, 0.0)
        h = v - (thetanew / nz(rho)) * h

        # Estimate ‖r‖ (Fong & Saunders, Sec. 5.2).
        betaacute = chat * betadd
        betacheck = -shat * betadd
        betahat = c * betaacute
        betadd = -s * betaacute
        thetatildeold = thetatilde
        ctildeold, stildeold, rhotildeold = _sym_ortho(rhodold, thetabar)
        thetatilde = stildeold * rhobar
        rhodold = ctildeold * rhobar
        betad = -stildeold * betad + ctildeold * betahat
        tautildeold = (zetaold - thetatildeold * tautildeold) / nz(rhotildeold)
        taud = (zeta - thetatilde * tautildeold) / nz(rhodold)
        d = d + betacheck**2
        normr = torch.where(active, torch.sqrt(d + (betad - taud) ** 2 + betadd**2), normr)
        norm_a2 = norm_a2 + beta**2
        norm_a = torch.sqrt(norm_a2)
        norm_a2 = norm_a2 + alpha**2
        normar = torch.where(active, zetabar.abs(), normar)
        normx = X.norm(dim=0)

        test1 = normr / nz(normb)
        test2 = normar / nz(norm_a * normr)
        rtol_eff = btol + atol * norm_a * normx / nz(normb)
        done = (test1 <= rtol_eff) | (test2 <= atol) | (normar == 0) | (alpha == 0)
        stop = stop | (active & done)
        active = active & ~done
    res = normar
    thresh = torch.clamp(atol * norm_a * normr, min=torch.finfo(dt).tiny)
    converged = stop
    x = unflatten_b(X)  # A's input space: flat, block, or A.in_shapes
    check_on_failure(on_failure, "lsmr")
    if not bool(converged.all()):
        msg = (
            f"lsmr: did not converge in {it} iterations: normal-equation residual "
            f"{res.max().item():.3e} (tolerance {thresh.max().item():.3e}); raise max_iter or "
            "loosen atol/btol."
        )
        if on_failure == "raise":
            raise ConvergenceError(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=2)
    if not return_info:
        return x
    return SolveResult(
        x=x,
        iterations=it,
        residual_norm=res[0] if is_vector else res,
        converged=bool(converged.all()),
    )
