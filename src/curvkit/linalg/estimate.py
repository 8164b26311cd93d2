"""Randomized estimators of the trace, the diagonal and the Frobenius norm of an operator.

Every estimator draws all of its probes at once and applies the operator to them in one
batched product ``A @ X`` (two for the sketching methods), so a curvature operator with a
batched ``_matmat`` pays for a few passes, not one per probe. Randomness comes only from the
``generator`` argument.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from curvkit.linalg._common import lookup, positive_int, probes, require_operator, require_square
from curvkit.linalg.operator import LinearOperator

__all__ = ["trace", "diagonal", "frobenius_norm"]

Distribution = Literal["rademacher", "normal"]


def _draw(A: LinearOperator, n: int, k: int, distribution: str, generator, caller: str) -> Tensor:
    return probes(
        n,
        k,
        distribution=distribution,
        dtype=A.dtype,
        device=A.device,
        generator=generator,
        caller=caller,
    )


# --------------------------------------------------------------------------- trace
def _trace_hutchinson(A, n, m, distribution, generator):
    V = _draw(A, n, m, distribution, generator, "trace")
    return (V * A._matmat(V)).sum() / m


def _trace_hutchpp(A, n, m, distribution, generator):
    # Split m = 2s + g: s products sketch the top subspace, s more give tr(Qᵀ A Q), and g
    # Hutchinson probes estimate the trace of the deflated remainder (Meyer et al. 2021).
    s = m // 3
    g = m - 2 * s
    S = _draw(A, n, s, distribution, generator, "trace")
    G = _draw(A, n, g, distribution, generator, "trace")
    Q, _ = torch.linalg.qr(A._matmat(S))
    G = G - Q @ (Q.T @ G)
    return (Q * A._matmat(Q)).sum() + (G * A._matmat(G)).sum() / g


def _exchange_projectors(R: Tensor, chunk: int = 64):
    """Yield ``(idx, P)`` with ``P[j]`` the orthogonal projector onto ``range(R[:, ≠ i])``.

    ``R: (t, t)`` holds the sketch in the coordinates of its own orthonormal basis, so the
    leave-one-out bases of XTrace/XDiag cost ``O(t^3)`` per column instead of new products.
    Computed in chunks of columns to bound memory at ``O(chunk · t^2)``.
    """
    t = R.shape[1]
    cols = torch.arange(t, device=R.device)
    for start in range(0, t, chunk):
        idx = cols[start : start + chunk]
        keep = cols.unsqueeze(0) != idx.unsqueeze(1)  # (c, t)
        R_minus = R.T.unsqueeze(0).expand(len(idx), t, t)[keep].reshape(len(idx), t - 1, t)
        W, _ = torch.linalg.qr(R_minus.transpose(1, 2))  # (c, t, t - 1)
        yield idx, W @ W.transpose(1, 2)  # (c, t, t)


def _xsketch(A, n, m, distribution, generator, caller):
    t = m // 2
    Om = _draw(A, n, t, distribution, generator, caller)
    Y = A._matmat(Om)
    Q, R = torch.linalg.qr(Y)
    return Om, Y, Q, R


def _exact_if_budget_covers(A, n, m):
    """``A`` itself, from ``n`` unit-vector products, when ``m/2`` probes would span the space."""
    if m // 2 >= n:
        return A._matmat(torch.eye(n, dtype=A.dtype, device=A.device))
    return None


def _trace_xtrace(A, n, m, distribution, generator):
    # Exchangeable Hutch++ (Epperly, Tropp & Webber 2024): for each probe ω_i, deflate with the
    # basis of the other probes' sketch, so every probe serves both as sketch and as test
    # vector. With a = Qᵀω_i, b = Qᵀ A ω_i, c = Qᵀ Aᵀ ω_i, M = Qᵀ A Q and P̃_i the projector of
    # the leave-one-out basis in Q-coordinates, the i-th estimate is
    #   tr(P̃_i M) + ω_iᵀ A ω_i − aᵀ P̃_i b − cᵀ P̃_i a + aᵀ P̃_i M P̃_i a.
    dense = _exact_if_budget_covers(A, n, m)
    if dense is not None:
        return dense.trace()
    Om, Y, Q, R = _xsketch(A, n, m, distribution, generator, "trace")
    Z = A._matmat(Q)
    M = Q.T @ Z
    Acoef, Ccoef = Q.T @ Om, Z.T @ Om  # columns a_i and c_i = Qᵀ Aᵀ ω_i
    direct = (Om * Y).sum(0)
    estimates = []
    for idx, P in _exchange_projectors(R):
        a, b, c = Acoef.T[idx], R.T[idx], Ccoef.T[idx]  # (chunk, t)
        Pa = (P @ a.unsqueeze(2)).squeeze(2)
        est = (
            (P * M.T.unsqueeze(0)).sum((1, 2))  # tr(P̃ M)
            + direct[idx]
            - (Pa * b).sum(1)
            - (Pa * c).sum(1)
            + (Pa * (Pa @ M.T)).sum(1)  # (P̃a)ᵀ M (P̃a)
        )
        estimates.append(est)
    return torch.cat(estimates).mean()


_TRACE_METHODS: dict[str, tuple[Callable, int]] = {
    "hutchinson": (_trace_hutchinson, 1),
    "hutch++": (_trace_hutchpp, 3),
    "xtrace": (_trace_xtrace, 4),
}


def trace(
    A: LinearOperator,
    *,
    num_matvecs: int,
    method: Literal["hutchinson", "hutch++", "xtrace"] = "hutchinson",
    distribution: Distribution = "rademacher",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Estimate ``tr(A)`` from ``num_matvecs`` products with random probes.

    - ``"hutchinson"``: ``mean_i vᵢᵀ A vᵢ``; unbiased, error ``O(‖A‖_F / sqrt(m))``.
    - ``"hutch++"``: sketch the top eigenspace with ``m/3`` products, compute its trace exactly
      and apply Hutchinson to the rest; error ``O(1/m)`` for PSD ``A``; exact when
      ``rank(A) <= m/3``.
    - ``"xtrace"``: the exchangeable version of Hutch++, using every probe both in the sketch and
      as a test vector (``m/2`` probes, ``m`` products); exact when ``rank(A) < m/2 − 1``
      (and computed exactly from ``n`` products when ``m/2 >= n``).

    All three are unbiased and take non-symmetric operators.

    Args:
        A: Square operator ``(n, n)``.
        num_matvecs: Products to spend, ``m`` (at least 1, 3 and 4 respectively; XTrace uses
            ``2·floor(m/2)``).
        method: The estimator.
        distribution: Probe entries, ``"rademacher"`` (±1) or ``"normal"``.
        generator: Source of the probes (on the CPU, or on ``A.device``).

    Returns:
        A scalar tensor.

    Raises:
        ValueError: A non-square operator, an unknown method or distribution, or too few
            products for the method.

    References:
        Hutchinson, M. F. (1989). Commun. Stat. Simul. Comput. 18(3).
        Meyer, R. A., Musco, C., Musco, C. & Woodruff, D. P. (2021). Hutch++. SOSA.
        Epperly, E. N., Tropp, J. A. & Webber, R. J. (2024). XTrace. SIAM J. Matrix Anal. Appl.
    """
    n = require_square(A, "trace")
    impl, minimum = lookup(_TRACE_METHODS, method, "trace method", "trace")
    m = positive_int(num_matvecs, "num_matvecs", f"trace (method={method!r})", minimum=minimum)
    return impl(A, n, m, distribution, generator)


# --------------------------------------------------------------------------- diagonal
def _diag_hutchinson(A, n, m, distribution, generator):
    V = _draw(A, n, m, distribution, generator, "diagonal")
    return (V * A._matmat(V)).sum(1) / m


def _diag_xdiag(A, n, m, distribution, generator):
    # Exchangeable diagonal estimator (Epperly, Tropp & Webber 2024): for each probe,
    # diag(P_i A) exactly plus the Hutchinson estimate ω_i ⊙ (I − P_i) A ω_i of the remainder,
    # with P_i the projector onto the other probes' sketch. Averaged over i, the first term is
    # diag(Q P̄ Qᵀ A) with P̄ the mean projector, so it needs one product with Aᵀ Q.
    dense = _exact_if_budget_covers(A, n, m)
    if dense is not None:
        return dense.diagonal()
    Om, Y, Q, R = _xsketch(A, n, m, distribution, generator, "diagonal")
    t = Om.shape[1]
    AtQ = A._rmatmat(Q)  # (n, t)
    P_mean = torch.zeros(t, t, dtype=A.dtype, device=A.device)
    C = torch.empty(t, t, dtype=A.dtype, device=A.device)  # column i: P̃_i Qᵀ A ω_i
    for idx, P in _exchange_projectors(R):
        P_mean += P.sum(0)
        C[:, idx] = (P @ R.T[idx].unsqueeze(2)).squeeze(2).T
    P_mean /= t
    deflated = ((Q @ P_mean) * AtQ).sum(1)
    remainder = (Om * (Y - Q @ C)).sum(1) / t
    return deflated + remainder


_DIAGONAL_METHODS: dict[str, tuple[Callable, int]] = {
    "hutchinson": (_diag_hutchinson, 1),
    "xdiag": (_diag_xdiag, 4),
}


def diagonal(
    A: LinearOperator,
    *,
    num_matvecs: int,
    method: Literal["hutchinson", "xdiag"] = "hutchinson",
    distribution: Distribution = "rademacher",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Estimate ``diag(A)`` from ``num_matvecs`` products with random probes.

    - ``"hutchinson"``: ``mean_i vᵢ ⊙ A vᵢ``; unbiased; with Rademacher probes it is exact for
      diagonal ``A``.
    - ``"xdiag"``: exchangeable sketch-and-deflate (``m/2`` probes, ``m`` products, one of them
      batch with ``Aᵀ``); exact when ``rank(A) < m/2 − 1`` (and computed exactly from ``n``
      products when ``m/2 >= n``).

    Args:
        A: Square operator ``(n, n)``.
        num_matvecs: Products to spend (at least 1 and 4 respectively).
        method: The estimator.
        distribution: ``"rademacher"`` or ``"normal"`` probes.
        generator: Source of the probes.

    Returns:
        The estimate, shape ``(n,)``.

    Raises:
        ValueError: A non-square operator, an unknown method, or too few products.

    References:
        Bekas, C., Kokiopoulou, E. & Saad, Y. (2007). An estimator for the diagonal of a matrix.
        Appl. Numer. Math. 57(11).
        Epperly, E. N., Tropp, J. A. & Webber, R. J. (2024). XTrace. SIAM J. Matrix Anal. Appl.
    """
    n = require_square(A, "diagonal")
    impl, minimum = lookup(_DIAGONAL_METHODS, method, "diagonal method", "diagonal")
    m = positive_int(num_matvecs, "num_matvecs", f"diagonal (method={method!r})", minimum=minimum)
    return impl(A, n, m, distribution, generator)


# --------------------------------------------------------------------------- Frobenius norm
def frobenius_norm(
    A: LinearOperator,
    *,
    num_matvecs: int,
    distribution: Distribution = "rademacher",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Estimate ``‖A‖_F`` as the square root of Hutchinson's ``mean_i ‖A vᵢ‖²``.

    The squared estimate is unbiased for ``‖A‖_F² = tr(AᵀA)``; the root is consistent (its
    bias vanishes as ``num_matvecs`` grows).

    Args:
        A: Operator ``(m, n)``, square or not.
        num_matvecs: Products to spend (``>= 1``).
        distribution: ``"rademacher"`` or ``"normal"`` probes.
        generator: Source of the probes.

    Returns:
        A scalar tensor.
    """
    require_operator(A, "frobenius_norm")
    m = positive_int(num_matvecs, "num_matvecs", "frobenius_norm")
    V = _draw(A, A.shape[1], m, distribution, generator, "frobenius_norm")
    return ((A._matmat(V) ** 2).sum() / m).sqrt()
