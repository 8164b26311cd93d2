"""Spectra of symmetric operators: Lanczos, eigenpairs, and the spectral density.

Extreme eigenpairs come from thick-restarted block Lanczos (``eigsh``) or power iteration; the
spectral density from stochastic Lanczos quadrature, on a linear or a logarithmic scale.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from curvkit.linalg._common import (
    check_on_failure,
    orthonormalize,
    positive_int,
    probes,
    require_symmetric,
)
from curvkit.linalg.operator import LinearOperator
from curvkit.linalg.solve import ConvergenceError, ConvergenceWarning, OnFailure

__all__ = ["LanczosResult", "lanczos", "eigsh", "power_iteration", "spectral_density"]


# --------------------------------------------------------------------------- Lanczos
@dataclass(frozen=True)
class LanczosResult:
    """A Lanczos tridiagonalisation ``Qᵀ A Q = T`` with ``T = tridiag(beta, alpha, beta)``.

    Attributes:
        Q: Orthonormal Krylov basis, shape ``(n, k)``.
        alpha: Diagonal of ``T``, shape ``(k,)``.
        beta: Off-diagonal of ``T``, shape ``(k - 1,)``.
    """

    Q: Tensor
    alpha: Tensor
    beta: Tensor

    def tridiagonal(self) -> Tensor:
        """The ``(k, k)`` tridiagonal matrix ``T``."""
        return torch.diag(self.alpha) + torch.diag(self.beta, 1) + torch.diag(self.beta, -1)

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Ritz values ``(k,)`` (ascending) and Ritz vectors ``(n, k)`` of ``A`` on ``range(Q)``."""
        theta, S = torch.linalg.eigh(self.tridiagonal())
        return theta, self.Q @ S


def _lanczos_batch(
    A: LinearOperator, V0: Tensor, num_steps: int, reorthogonalize: bool, keep_basis: bool
):
    """Run ``b`` independent Lanczos processes in parallel (one ``A @`` block per step).

    Returns ``(alpha (b, s), beta (b, s - 1), basis (b, s, n) or None, steps)``. A column whose
    Krylov space is exhausted (``beta`` at rounding level) continues with zero vectors, so its
    tridiagonal matrix decouples into the exact part and a zero block that carries no weight in
    the quadrature; ``steps`` is the depth reached before the first column broke down.
    """
    n, b = V0.shape
    eps = torch.finfo(V0.dtype).eps
    V = V0 / V0.norm(dim=0)
    V_prev = torch.zeros_like(V)
    beta_prev = torch.zeros(b, dtype=V.dtype, device=V.device)
    store = keep_basis or reorthogonalize
    # Preallocated basis (b, steps, n): re-orthogonalisation reads a prefix, never copies it,
    # and runs as batched matrix products (one per probe).
    basis = torch.empty(b, num_steps if store else 1, n, dtype=V.dtype, device=V.device)
    basis[:, 0] = V.T
    alphas, betas = [], []
    norm_est = torch.zeros_like(beta_prev)
    steps = num_steps
    for j in range(num_steps):
        W = A._matmat(V)
        a = (V * W).sum(0)
        W = W - a * V - beta_prev * V_prev
        if reorthogonalize:  # full re-orthogonalisation, twice ("twice is enough")
            Qs = basis[:, : j + 1]  # (b, j + 1, n)
            for _ in range(2):
                coef = torch.bmm(Qs, W.T.unsqueeze(2))  # (b, j + 1, 1)
                W = W - torch.bmm(Qs.transpose(1, 2), coef).squeeze(2).T
        alphas.append(a)
        if j == num_steps - 1:
            break
        bnext = W.norm(dim=0)
        norm_est = torch.maximum(norm_est, torch.sqrt(a**2 + bnext**2 + beta_prev**2))
        broken = bnext <= 10 * math.sqrt(n) * eps * norm_est
        if bool(broken.any()) and steps == num_steps:
            steps = j + 1
        bnext = torch.where(broken, 0.0, bnext)
        V_prev, V = V, torch.where(broken, 0.0, W / torch.where(broken, 1.0, bnext))
        beta_prev = bnext
        betas.append(bnext)
        if store:
            basis[:, j + 1] = V.T
    alpha = torch.stack(alphas, 1)
    beta = torch.stack(betas, 1) if betas else alpha.new_zeros(b, 0)
    return alpha, beta, (basis if keep_basis else None), steps


def lanczos(
    A: LinearOperator, v0: Tensor, num_matvecs: int, *, reorthogonalize: bool = True
) -> LanczosResult:
    """Tridiagonalise a symmetric operator by the Lanczos iteration.

    Args:
        A: Symmetric operator ``(n, n)`` (declared ``is_symmetric``).
        v0: Start vector ``(n,)``, non-zero; it is normalised internally.
        num_matvecs: Krylov depth ``k``, ``1 <= k <= n``.
        reorthogonalize: Re-orthogonalise against all previous vectors. It costs ``O(n k²)``
            and keeps Ritz values from repeating (without it, they do in floating point).

    Returns:
        ``LanczosResult`` with ``Q: (n, k')``, ``alpha: (k',)``, ``beta: (k' - 1,)``, where
        ``k' = k`` unless the Krylov space of ``v0`` is invariant after ``k' < k`` steps (then
        ``T`` holds exact eigenvalues of ``A``).

    Raises:
        ValueError: A non-symmetric operator, a bad ``v0`` or ``num_matvecs`` out of range.

    References:
        Lanczos, C. (1950). J. Res. Natl. Bur. Stand. 45(4).
    """
    n = require_symmetric(A, "lanczos")
    k = positive_int(num_matvecs, "num_matvecs", "lanczos")
    if k > n:
        raise ValueError(f"lanczos: num_matvecs must be <= n = {n}; got {k}.")
    if not isinstance(v0, Tensor) or v0.shape != (n,):
        raise ValueError(
            f"lanczos: v0 must have shape ({n},); got {tuple(getattr(v0, 'shape', ()))}."
        )
    if v0.dtype != A.dtype or v0.device != A.device:
        raise TypeError(
            f"lanczos: v0 must have dtype {A.dtype} on {A.device}; got {v0.dtype} on {v0.device}."
        )
    if not bool(torch.isfinite(v0).all()):
        raise ValueError("lanczos: v0 has non-finite entries (NaN or inf).")
    if not bool(v0.norm() > 0):
        raise ValueError("lanczos: v0 is zero.")
    alpha, beta, basis, steps = _lanczos_batch(A, v0.unsqueeze(1), k, reorthogonalize, True)
    return LanczosResult(Q=basis[0, :steps].T, alpha=alpha[0, :steps], beta=beta[0, : steps - 1])


# --------------------------------------------------------------------------- eigsh
def _order(theta: Tensor, which: str) -> Tensor:
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def eigsh(
    A: LinearOperator,
    k: int = 6,
    *,
    which: Literal["LA", "SA", "LM"] = "LA",
    tol: float | None = None,
    max_matvecs: int | None = None,
    block_size: int | None = None,
    num_blocks: int = 6,
    generator: torch.Generator | None = None,
    on_failure: OnFailure = "raise",
) -> tuple[Tensor, Tensor]:
    """Extreme eigenpairs of a symmetric operator by thick-restarted block Lanczos.

    Each cycle extends the current Ritz vectors ``X`` by ``num_blocks`` block-Krylov blocks
    started from their residuals (one batched ``A @`` per block, fully re-orthogonalised),
    solves the projected eigenproblem (Rayleigh–Ritz), and keeps the best ``block_size`` Ritz
    vectors. A pair has converged when ``‖A x − θ x‖ <= tol · max|θ|``, which bounds the
    eigenvalue error by the same amount.

    Args:
        A: Symmetric operator ``(n, n)`` (declared ``is_symmetric``).
        k: Number of eigenpairs, ``1 <= k <= n``.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest
            magnitude.
        tol: Relative residual tolerance (default ``sqrt(eps)`` of the dtype: 1.5e-8 in float64).
        max_matvecs: Budget of products (default ``max(20 n, 2000)``).
        block_size: Ritz vectors kept per cycle, ``>= k`` (default ``min(n, k + max(k, 8))``).
        num_blocks: Krylov blocks added per cycle.
        generator: Source of the random start block.
        on_failure: ``"raise"`` a ``ConvergenceError`` or ``"warn"`` when the budget runs out.

    Returns:
        ``(eigenvalues (k,), eigenvectors (n, k))``, most wanted first: descending for ``"LA"``,
        ascending for ``"SA"``, by decreasing magnitude for ``"LM"``.

    Raises:
        ValueError: Bad ``k``, ``which`` or options, or a non-symmetric operator.
        ConvergenceError: Not converged within ``max_matvecs`` (``on_failure="raise"``).

    References:
        Golub, G. H. & Underwood, R. (1977). The block Lanczos method for computing eigenvalues.
        Wu, K. & Simon, H. (2000). Thick-restart Lanczos method for large symmetric eigenvalue
        problems. SIAM J. Matrix Anal. Appl. 22(2).
    """
    caller = "eigsh"
    n = require_symmetric(A, caller)
    k = positive_int(k, "k", caller)
    if k > n:
        raise ValueError(f"eigsh: k must be <= n = {n}; got {k}.")
    if which not in ("LA", "SA", "LM"):
        raise ValueError(f"eigsh: which must be 'LA', 'SA' or 'LM'; got {which!r}.")
    check_on_failure(on_failure, "eigsh")
    tol = math.sqrt(torch.finfo(A.dtype).eps) if tol is None else float(tol)
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"eigsh: tol must be a finite number > 0; got {tol}.")
    p = (
        min(n, k + max(k, 8))
        if block_size is None
        else positive_int(block_size, "block_size", caller)
    )
    if not k <= p <= n:
        raise ValueError(f"eigsh: block_size must be in [k, n] = [{k}, {n}]; got {p}.")
    num_blocks = positive_int(num_blocks, "num_blocks", caller)
    budget = (
        max(20 * n, 2000)
        if max_matvecs is None
        else positive_int(max_matvecs, "max_matvecs", caller)
    )

    X = orthonormalize(
        probes(
            n,
            p,
            distribution="normal",
            dtype=A.dtype,
            device=A.device,
            generator=generator,
            caller=caller,
        )
    )
    AX = A._matmat(X)
    used = p
    # Largest |Ritz value| seen so far, a lower bound on ‖A‖ that only grows. The residual
    # test is relative to it, not to the kept Ritz values: for "SA" on a singular operator
    # those are all at rounding level, and no residual would ever pass.
    scale = torch.tensor(torch.finfo(A.dtype).tiny, dtype=A.dtype, device=A.device)
    # The random start block is no Krylov space: when an eigenvalue's multiplicity exceeds
    # n - p it holds exact eigenvectors, whose zero residuals say nothing about which pairs are
    # wanted (for "LM", or for a multiple eigenvalue it only partly contains). Convergence is
    # therefore only accepted once the block has been extended at least once.
    extended = False
    while True:
        # Rayleigh–Ritz on span{X, K_1, ..., K_b}: K_1 from the residuals, K_{j+1} = A K_j.
        H = X.T @ AX
        theta, S = torch.linalg.eigh((H + H.T) / 2)
        scale = torch.maximum(scale, theta.abs().max())
        sel = _order(theta, which)[:p]
        theta, X, AX = theta[sel], X @ S[:, sel], AX @ S[:, sel]
        R = AX - X * theta
        res = R[:, :k].norm(dim=0)
        if (extended and bool((res <= tol * scale).all())) or X.shape[1] == n:
            break
        if used >= budget:
            msg = (
                f"eigsh: {k} eigenpairs not converged after {used} products: largest relative "
                f"residual {(res.max() / scale).item():.3e} > tol {tol:.1e}. Raise max_matvecs, "
                "block_size or num_blocks."
            )
            if on_failure == "raise":
                raise ConvergenceError(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=2)
            break
        basis, A_basis, block = [X], [AX], R
        for _ in range(num_blocks):
            B = torch.cat(basis, 1)
            K = orthonormalize(block, against=B)
            # QR of a rank-deficient block still returns unit columns, some (partly) inside
            # range(B): for a zero block, the same unit vectors every time. Project once more
            # and keep only the directions that retain most of their norm (a column-norm test
            # cannot see two columns whose difference lies in range(B); singular values can).
            U, sv, _ = torch.linalg.svd(K - B @ (B.T @ K), full_matrices=False)
            K = U[:, sv > 0.5]
            if K.shape[1] == 0 or B.shape[1] + K.shape[1] > n:
                K = K[:, : max(0, n - B.shape[1])]
                if K.shape[1] == 0:
                    break
            AK = A._matmat(K)
            used += K.shape[1]
            basis.append(K)
            A_basis.append(AK)
            block = AK
        X, AX = torch.cat(basis, 1), torch.cat(A_basis, 1)
        extended = True
    return theta[:k], X[:, :k]


# --------------------------------------------------------------------------- power iteration
def power_iteration(
    A: LinearOperator,
    *,
    max_iter: int = 1000,
    tol: float = 1e-6,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    on_failure: OnFailure = "raise",
) -> tuple[Tensor, Tensor]:
    """The eigenpair of largest magnitude by power iteration.

    Cheap (one product per step) but slow when ``|λ_2 / λ_1|`` is close to one; prefer
    ``eigsh`` when more than a rough estimate is needed.

    Args:
        A: Symmetric operator ``(n, n)``.
        max_iter: Step cap.
        tol: Stop when ``‖A v − θ v‖ <= tol · |θ|``.
        v0: Start vector ``(n,)`` (default random normal from ``generator``).
        generator: Source of the start vector.
        on_failure: ``"raise"`` or ``"warn"`` when ``max_iter`` is reached.

    Returns:
        ``(eigenvalue (), eigenvector (n,))`` with a unit eigenvector.
    """
    caller = "power_iteration"
    n = require_symmetric(A, caller)
    max_iter = positive_int(max_iter, "max_iter", caller)
    check_on_failure(on_failure, caller)
    # A NaN or negative tol (or v0 below) would otherwise surface as a ConvergenceError that
    # blames close eigenvalues.
    tol = float(tol)
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"power_iteration: tol must be a finite number >= 0; got {tol}.")
    if v0 is None:
        v0 = probes(
            n,
            1,
            distribution="normal",
            dtype=A.dtype,
            device=A.device,
            generator=generator,
            caller=caller,
        )[:, 0]
    elif not isinstance(v0, Tensor) or v0.shape != (n,):
        raise ValueError(
            f"power_iteration: v0 must have shape ({n},); got {tuple(getattr(v0, 'shape', ()))}."
        )
    elif v0.dtype != A.dtype or v0.device != A.device:
        raise TypeError(
            f"power_iteration: v0 must have dtype {A.dtype} on {A.device}; got {v0.dtype} on "
            f"{v0.device}."
        )
    elif not bool(torch.isfinite(v0).all()):
        raise ValueError("power_iteration: v0 has non-finite entries (NaN or inf).")
    elif not bool(v0.norm() > 0):
        raise ValueError("power_iteration: v0 is zero.")
    v = v0 / v0.norm()
    Av = A @ v
    theta = v @ Av
    for _ in range(max_iter):
        if (Av - theta * v).norm() <= tol * theta.abs():
            return theta, v
        v = Av / Av.norm()
        Av = A @ v
        theta = v @ Av
    msg = (
        f"power_iteration: not converged in {max_iter} steps (relative residual "
        f"{((Av - theta * v).norm() / theta.abs()).item():.3e} > {tol}); the two largest "
        "eigenvalues may be close in magnitude: use eigsh."
    )
    if on_failure == "raise":
        raise ConvergenceError(msg)
    warnings.warn(msg, ConvergenceWarning, stacklevel=2)
    return theta, v


# --------------------------------------------------------------------------- spectral density
def spectral_density(
    A: LinearOperator,
    *,
    num_probes: int = 8,
    num_matvecs: int = 64,
    num_points: int = 1024,
    kernel_width: float = 0.01,
    scale: Literal["linear", "log"] = "linear",
    epsilon: float | None = None,
    distribution: Literal["rademacher", "normal"] = "rademacher",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Smoothed eigenvalue density ``(1/n) Σ_i g_σ(t − λ_i)`` by stochastic Lanczos quadrature.

    Each probe runs ``num_matvecs`` Lanczos steps (all probes in one batched ``A @`` per step);
    the Ritz values ``θ_j`` with weights ``τ_j`` (squared first components of the eigenvectors
    of ``T``) form a quadrature rule for ``vᵀ δ(t − A) v``, averaged over probes and smoothed by
    a Gaussian kernel ``g_σ``.

    Args:
        A: Symmetric operator ``(n, n)``.
        num_probes: Random start vectors.
        num_matvecs: Lanczos depth per probe (capped at ``n``).
        num_points: Grid size.
        kernel_width: ``σ`` as a fraction of the width of the spectrum (of ``log10`` of it for
            ``scale="log"``).
        scale: ``"linear"``: the density in ``t``, integrating to one over the grid.
            ``"log"`` (Papyan 2020), for PSD spectra spanning orders of magnitude: the density of
            ``u = log10(λ + ε)``, on a grid log-spaced in ``λ``; it integrates to one against
            ``d log10(t + ε)``.
        epsilon: ``ε`` of the log scale (default ``1e-8 · max θ``); every Ritz value must
            exceed ``−ε`` (the operator must be PSD).
        distribution: Probe distribution.
        generator: Source of the probes.

    Returns:
        ``(grid (num_points,), density (num_points,))``; the grid extends ``6σ`` beyond the
        extreme Ritz values so that the kernel mass inside it is one to within ``1e-8``.

    Raises:
        ValueError: Bad options, a non-symmetric operator, or (log scale) a Ritz value
            ``<= −ε``.

    References:
        Lin, L., Saad, Y. & Yang, C. (2016). Approximating spectral densities of large
        matrices. SIAM Review 58(1).
        Ghorbani, B., Krishnan, S. & Xiao, Y. (2019). An investigation into neural net
        optimization via Hessian eigenvalue density. ICML.
        Papyan, V. (2020). Traces of class/cross-class structure pervade deep learning spectra.
        JMLR 21.
    """
    caller = "spectral_density"
    n = require_symmetric(A, caller)
    num_probes = positive_int(num_probes, "num_probes", caller)
    depth = min(positive_int(num_matvecs, "num_matvecs", caller), n)
    num_points = positive_int(num_points, "num_points", caller, minimum=2)
    if not (math.isfinite(kernel_width) and kernel_width > 0):
        raise ValueError(
            f"spectral_density: kernel_width must be a finite number > 0; got {kernel_width}."
        )
    if scale not in ("linear", "log"):
        raise ValueError(f"spectral_density: scale must be 'linear' or 'log'; got {scale!r}.")
    V = probes(
        n,
        num_probes,
        distribution=distribution,
        dtype=A.dtype,
        device=A.device,
        generator=generator,
        caller=caller,
    )
    alpha, beta, _, _ = _lanczos_batch(A, V, depth, True, False)
    T = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    theta, S = torch.linalg.eigh(T)  # (b, depth), (b, depth, depth)
    weights = S[:, 0, :] ** 2  # quadrature weights, sum to one per probe

    if scale == "log":
        top = theta.max().item()
        eps = 1e-8 * abs(top) if epsilon is None else float(epsilon)
        if not (math.isfinite(eps) and eps > 0):
            if epsilon is None:  # the default 1e-8 · max θ is not positive
                raise ValueError(
                    "spectral_density: scale='log' needs a positive spectrum, but the largest "
                    f"Ritz value is {top:.3e}, so the default epsilon (1e-8 · max θ) is not "
                    "positive; pass epsilon > 0 or use scale='linear'."
                )
            raise ValueError(
                f"spectral_density: epsilon must be a finite number > 0; got {epsilon}."
            )
        # Zero-weight Ritz values come from broken-down (decoupled) blocks; ignore them.
        bad = (theta + eps <= 0) & (weights > 0)
        if bool(bad.any()):
            raise ValueError(
                "spectral_density: scale='log' needs a PSD operator, but a Ritz value is "
                f"{theta[bad].min().item():.3e} <= -epsilon = {-eps:.3e}; raise epsilon or use "
                "scale='linear'."
            )
        nodes = torch.log10(torch.where(weights > 0, theta + eps, 1.0))
    else:
        nodes = theta
    live = weights > 0
    lo, hi = nodes[live].min().item(), nodes[live].max().item()
    # A single eigenvalue (c·I in a rotated basis) gives Ritz values that differ by rounding
    # only: a kernel that narrow cannot be resolved by a grid in this dtype (the density would
    # not integrate to one), so such a spread counts as a point mass, like hi == lo.
    resolvable = math.sqrt(torch.finfo(A.dtype).eps) * max(abs(lo), abs(hi))
    width = hi - lo if hi - lo > resolvable else max(abs(hi), 1.0)
    sigma = kernel_width * width
    u = torch.linspace(lo - 6 * sigma, hi + 6 * sigma, num_points, dtype=A.dtype, device=A.device)
    kernel = torch.exp(-0.5 * ((u[:, None, None] - nodes[None]) / sigma) ** 2)
    density = (kernel * weights[None]).sum((1, 2)) / (num_probes * sigma * math.sqrt(2 * math.pi))
    grid = 10**u - eps if scale == "log" else u
    return grid, density
