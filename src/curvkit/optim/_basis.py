"""Kronecker-basis machinery shared by the Kronecker-factored optimizers.

Every Kronecker method in :mod:`curvkit.optim` (``Shampoo``, ``SOAP``, ``KLShampoo``,
``KLSOAP``) keeps, for each preconditioned tensor axis ``k`` of size ``d``, an orthonormal
basis ``Q_k: (d, d)`` and a *coordinate matrix* ``P_k: (d, d)``. The Kronecker factor is
**defined** as ``S_k := Q_k P_k Q_kᵀ`` and is never formed (the reparametrization of Milligan et
al., 2026). Because ``S Q = Q P`` for orthogonal ``Q``:

* the per-step EMA of ``S`` is an EMA of ``P`` with Gram products of the *rotated* gradient
  ``G̃ = G ×_k Q_kᵀ`` (which every method computes anyway);
* SOAP's power-iteration refresh ``qr(S Q)`` equals ``Q qr(P)``;
* ``eigh(S)`` equals ``Q eigh(P)``;
* a *subspace* refresh rotates only the columns ``I`` of ``Q`` by an orthogonal ``O_I`` from a QR
  of the block ``P[I, I]``; the other columns stay bit-identical, so the basis stays complete.

Storing ``P`` rather than ``S`` is what makes bfloat16 storage work: ``P`` is nearly diagonal and
each entry carries its own exponent, so small eigenvalues keep their relative precision.

Every refresh returns a :class:`BasisChange`, which maps state kept in rotated coordinates
(momentum) and per-column state (second moments, eigenvalue estimates) to the new basis, so each
optimizer only decides *which* of its tensors are coordinates and which are per-column, and
whether per-column state is only permuted with the columns (``columns``) or carried into the
new basis (``second_moments``).

All functions here take and return plain tensors; they run in the dtype of their inputs (the
optimizers pass float32 or float64 working copies).

References:
    Gupta, Koren, Singer (2018). Shampoo: Preconditioned stochastic tensor optimization. ICML.
    Vyas et al. (2025). SOAP: Improving and stabilizing Shampoo using Adam. ICLR.
    Lin et al. (2026). Understanding and improving Shampoo and SOAP via Kullback-Leibler
    minimization. ICLR.
    Milligan, Dangel, Lacoste-Julien, Lin, Xu (2026). Reparametrizing Shampoo and SOAP for subspace
    basis updates and BFloat16 storage. arXiv:2605.26327.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "BasisChange",
    "BasisUpdate",
    "apply_along",
    "coupling_scores",
    "eigh_descending",
    "gram",
    "gram_ema",
    "orthonormalize",
    "refresh",
    "rotate",
    "stochastic_round",
]

BasisUpdate = Literal["eigh", "qr", "subspace"]


# --------------------------------------------------------------------------- tensor algebra
def apply_along(X: Tensor, M: Tensor, axis: int) -> Tensor:
    """Multiply the tensor ``X`` along one axis by the matrix ``M`` (the mode-``axis`` product).

    Args:
        X: Tensor of any order with ``X.shape[axis] == n``.
        M: Matrix of shape ``(m, n)``.
        axis: The axis of ``X`` to transform.

    Returns:
        Tensor ``Y`` shaped like ``X`` with ``Y.shape[axis] == m`` and
        ``Y[..., i, ...] = sum_j M[i, j] X[..., j, ...]``.
    """
    Y = torch.tensordot(M, X, dims=([1], [axis]))  # new axis first
    return Y.movedim(0, axis)


def rotate(X: Tensor, bases: dict[int, Tensor], *, to_basis: bool) -> Tensor:
    """Change coordinates of ``X`` along every axis that has a basis.

    Args:
        X: Tensor of order ``n``.
        bases: Map from axis to orthonormal basis ``Q_k: (d_k, d_k)``; missing axes are identity.
        to_basis: ``True`` computes ``X ×_k Q_kᵀ`` (parameter space → rotated coordinates);
            ``False`` computes ``X ×_k Q_k`` (rotated coordinates → parameter space).

    Returns:
        Tensor shaped like ``X``.
    """
    if X.dim() == 2 and len(bases) == 2:  # the common case as two plain GEMMs
        Qa, Qb = bases[0], bases[1]
        return Qa.T @ X @ Qb if to_basis else Qa @ X @ Qb.T
    for axis, Q in bases.items():
        X = apply_along(X, Q.T if to_basis else Q, axis)
    return X


def gram(X: Tensor, axis: int) -> Tensor:
    """Contract every axis of ``X`` except one: ``X_(k) X_(k)ᵀ``.

    Args:
        X: Tensor of any order with ``X.shape[axis] == d``.
        axis: The kept axis ``k``.

    Returns:
        Symmetric matrix of shape ``(d, d)``.
    """
    Xk = X.movedim(axis, 0).reshape(X.shape[axis], -1)
    return Xk @ Xk.T


def gram_ema(P: Tensor, X: Tensor, axis: int, *, beta: float, alpha: float) -> Tensor:
    """``beta * P + alpha * gram(X, axis)`` as one fused GEMM (no ``(d, d)`` temporaries).

    Equal to the unfused expression up to float round-off; the per-step factor EMAs of every
    Kronecker method go through here.

    Args:
        P: Matrix ``(d, d)``.
        X: Tensor of any order with ``X.shape[axis] == d``.
        axis: The kept axis.
        beta: Weight of ``P``.
        alpha: Weight of the Gram matrix.

    Returns:
        New matrix ``(d, d)`` (``P`` is not modified).
    """
    Xk = X.movedim(axis, 0).reshape(X.shape[axis], -1)
    return torch.addmm(P, Xk, Xk.T, beta=beta, alpha=alpha)


# --------------------------------------------------------------------------- decompositions
def eigh_descending(A: Tensor, *, caller: str = "eigh_descending") -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric matrix with eigenvalues in descending order.

    A float32 (or lower) input is decomposed in float32; if LAPACK fails there, the
    decomposition is retried in float64 with a warning (``eigh`` is known to fail on low-rank
    float32 matrices).

    Args:
        A: Symmetric matrix ``(d, d)``.
        caller: Name used in the fallback warning.

    Returns:
        ``(eigenvalues (d,), eigenvectors (d, d))`` in the dtype of ``A`` (float32 for bf16).
    """
    work = A.float() if A.dtype in (torch.bfloat16, torch.float16) else A
    try:
        evals, evecs = torch.linalg.eigh(work)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        warnings.warn(f"{caller}: eigh failed in {work.dtype}; retrying in float64.",
                      RuntimeWarning, stacklevel=2)
        evals, evecs = torch.linalg.eigh(work.double())
        evals, evecs = evals.to(work.dtype), evecs.to(work.dtype)
    return evals.flip(0), evecs.flip(1)


def _qr_positive(A: Tensor) -> tuple[Tensor, Tensor]:
    """``A = O R`` with the signs fixed so that ``diag(R) >= 0``.

    The sign fix makes ``O`` close to the identity when ``A`` is nearly diagonal with a positive
    diagonal, so that column ``i`` of the rotated basis keeps its meaning.

    Returns:
        ``(O, R)``, both ``(d, d)``.
    """
    O, R = torch.linalg.qr(A)
    signs = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(O.dtype)
    return O * signs, R * signs[:, None]


def _align_columns(O: Tensor) -> tuple[Tensor, Tensor]:
    """Permute and sign-flip the columns of an orthogonal ``O`` towards the identity.

    Greedy matching: the largest remaining ``|O[i, j]|`` assigns column ``j`` to position ``i``.
    Used after ``eigh`` so that per-column state (second moments, eigenvalue estimates) stays
    attached to the basis vector it was accumulated for.

    Args:
        O: Orthogonal matrix ``(d, d)``.

    Returns:
        ``(O[:, perm] * signs, perm)`` with ``diag >= 0``.
    """
    d = O.shape[0]
    weights = O.abs()
    order = torch.argsort(weights.flatten(), descending=True).tolist()
    row_of_col = [-1] * d
    taken_rows: set[int] = set()
    assigned = 0
    for flat in order:  # at most d^2 cheap iterations, only at (rare) refreshes
        i, j = divmod(flat, d)
        if row_of_col[j] >= 0 or i in taken_rows:
            continue
        row_of_col[j] = i
        taken_rows.add(i)
        assigned += 1
        if assigned == d:
            break
    perm = torch.empty(d, dtype=torch.long)
    perm[torch.tensor(row_of_col)] = torch.arange(d)
    aligned = O.index_select(1, perm.to(O.device))
    signs = torch.where(torch.diagonal(aligned) < 0, -1.0, 1.0).to(O.dtype)
    return aligned * signs, perm


# --------------------------------------------------------------------------- basis changes
@dataclass(frozen=True)
class BasisChange:
    """How one refresh changed the basis of one axis: ``Q_new[:, J] = Q_old[:, J] @ T⁻¹``.

    The change is a permutation ``perm`` of the columns (applied first), followed by a
    coordinate map ``T`` (``c_new = T c_old``) acting on the columns ``index`` (all when ``None``).
    For an orthogonal rotation ``O``, ``T = Oᵀ``; for the gauge fix ``Q ← Q R⁻¹``, ``T = R``.

    Attributes:
        perm: Column permutation ``(d,)`` or ``None``.
        index: Columns ``(r,)`` that the map acts on, or ``None`` for all.
        coord_map: ``T: (r, r)`` (or ``(d, d)``), or ``None`` for a pure permutation.
    """

    perm: Tensor | None = None
    index: Tensor | None = None
    coord_map: Tensor | None = None

    def coordinates(self, X: Tensor, axis: int) -> Tensor:
        """Map a tensor held in rotated coordinates (e.g. momentum) to the new basis.

        Args:
            X: Tensor with the basis axis at ``axis``.
            axis: The axis this change belongs to.

        Returns:
            ``X`` expressed in the new basis (same shape).
        """
        X = self.columns(X, axis)
        if self.coord_map is None:
            return X
        return self._map_along(X, self.coord_map.to(X.dtype), axis)

    def second_moments(self, X: Tensor, axis: int) -> Tensor:
        """Map a diagonal second moment (Adam's ``Ṽ``, eigenvalue estimates) to the new basis.

        Per-column values ``v`` stand for the matrix ``diag(v)`` in the old coordinates; in the
        new ones that matrix is ``T diag(v) Tᵀ``, whose diagonal is ``(T ∘ T) v`` (``∘`` the
        elementwise product). Applied along every axis of a Kronecker basis this is
        ``Ṽ_new = (T_L ∘ T_L) Ṽ (T_R ∘ T_R)ᵀ`` with ``T = Q_newᵀ Q_old``: the diagonal of the old
        second moment rotated densely into the new basis, without forming it. For an orthogonal
        ``T`` the rows of ``T ∘ T`` sum to one, so an EMA keeps its total weight (and Adam's
        bias correction stays valid).

        Args:
            X: Non-negative per-column state with the basis axis at ``axis``.
            axis: The axis this change belongs to.

        Returns:
            ``X`` in the new basis (same shape).
        """
        X = self.columns(X, axis)
        if self.coord_map is None:
            return X
        return self._map_along(X, self.coord_map.to(X.dtype).square(), axis)

    def _map_along(self, X: Tensor, T: Tensor, axis: int) -> Tensor:
        if self.index is None:
            return apply_along(X, T, axis)
        part = apply_along(X.index_select(axis, self.index), T, axis)
        return X.index_copy(axis, self.index, part)

    def columns(self, X: Tensor, axis: int) -> Tensor:
        """Carry per-column state (second moments, eigenvalues) along with the permutation.

        Args:
            X: Tensor with the basis axis at ``axis``.
            axis: The axis this change belongs to.

        Returns:
            ``X`` with its ``axis`` permuted like the basis columns (not rotated).
        """
        return X if self.perm is None else X.index_select(axis, self.perm)


def _permute(Q: Tensor, P: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
    return Q.index_select(1, perm), P.index_select(0, perm).index_select(1, perm)


def _symmetrize(P: Tensor) -> Tensor:
    return 0.5 * (P + P.T)


def coupling_scores(P: Tensor) -> Tensor:
    """Whitened off-diagonal coupling of each basis vector: ``c_i = sum_{j≠i} P_ij² / (P_ii P_jj)``.

    Args:
        P: Coordinate matrix ``(d, d)``.

    Returns:
        Scores ``(d,)``; large values mark columns far from being eigenvectors.
    """
    diag = torch.diagonal(P).abs().clamp_min(torch.finfo(P.dtype).tiny)
    W = P.square() / torch.outer(diag, diag)
    W.fill_diagonal_(0)  # zero it rather than subtract it: no cancellation for tiny couplings
    return W.sum(1)


def _most_coupled(P: Tensor, rank: int) -> Tensor:
    """The ``rank`` indices of the most strongly coupled pairs ``(i, j)``, taken pair by pair.

    Selecting whole pairs matters: a rotation within ``I`` cannot reduce the coupling between
    ``I`` and its complement, so choosing indices by a per-index score alone can settle on a set
    whose block is already diagonal and stall. Taking the strongest pair first guarantees that the
    largest whitened off-diagonal entry is reduced by every refresh.
    """
    d = P.shape[0]
    diag = torch.diagonal(P).abs().clamp_min(torch.finfo(P.dtype).tiny)
    W = torch.triu(P.square() / torch.outer(diag, diag), diagonal=1)
    candidates = torch.topk(W.flatten(), min(rank * rank, d * d)).indices.tolist()
    chosen: dict[int, None] = {}  # insertion-ordered set
    for flat in candidates:
        for i in divmod(flat, d):
            if len(chosen) < rank:
                chosen.setdefault(i)
        if len(chosen) == rank:
            break
    if len(chosen) < rank:  # fewer coupled pairs than rank: fill by per-index score
        for i in torch.argsort(coupling_scores(P), descending=True).tolist():
            if len(chosen) == rank:
                break
            chosen.setdefault(i)
    return torch.tensor(list(chosen), dtype=torch.long, device=P.device)


def refresh(
    Q: Tensor,
    P: Tensor,
    *,
    method: BasisUpdate,
    sort: bool,
    rank: int | None = None,
) -> tuple[Tensor, Tensor, BasisChange]:
    """Refresh one axis's basis from its coordinate matrix.

    Methods (``S = Q P Qᵀ`` is the factor):

    * ``"eigh"``: ``P = O Λ Oᵀ``; ``Q ← Q O``, ``P ← Λ``. The columns of ``O`` are aligned to the
      identity (greedy matching and sign fix), so per-column state stays attached.
    * ``"qr"``: one power-iteration step, ``Q ← qr(S Q) = Q qr(P)``; ``P ← Oᵀ P O``.
    * ``"subspace"``: QR of the block ``P[I, I]`` for ``rank`` columns ``I`` taken from the most
      strongly coupled pairs (whitened ``P_ij² / (P_ii P_jj)``), sorted by ``P_ii`` descending;
      only ``Q[:, I]`` and the rows and columns ``I`` of ``P`` change.

    Args:
        Q: Basis ``(d, d)``.
        P: Symmetric coordinate matrix ``(d, d)``.
        method: ``"eigh"``, ``"qr"`` or ``"subspace"``.
        sort: Sort the columns by ``diag(P)`` descending before a ``"qr"`` refresh (SOAP and
            Shampoo do; the KL methods do not, since ``λ_i`` is tied to column ``i``).
        rank: Subspace size ``r`` for ``"subspace"`` (``1 <= r <= d``).

    Returns:
        ``(Q_new, P_new, change)``.

    Raises:
        ValueError: For an unknown method or a rank out of range.
    """
    d = Q.shape[0]
    if method == "eigh":
        evals, O = eigh_descending(P, caller="refresh")
        O, perm = _align_columns(O)
        # Oᵀ P O = diag(λ) up to round-off: no need to spend 4 d³ flops forming it
        P_new = torch.diag(evals.index_select(0, perm.to(evals.device)))
        return Q @ O, P_new, BasisChange(coord_map=O.T)
    if method == "qr":
        perm = None
        if sort:
            perm = torch.argsort(torch.diagonal(P), descending=True)
            Q, P = _permute(Q, P, perm)
        O, R = _qr_positive(P)
        # P = O R gives Oᵀ P O = R O: one GEMM instead of two (the QR algorithm's step)
        return Q @ O, _symmetrize(R @ O), BasisChange(perm=perm, coord_map=O.T)
    if method == "subspace":
        if rank is None or not 1 <= rank <= d:
            raise ValueError(f"refresh: subspace rank must be in [1, {d}]; got {rank}.")
        chosen = _most_coupled(P, rank)
        index = chosen[torch.argsort(torch.diagonal(P)[chosen], descending=True)]
        O, _ = _qr_positive(P[index][:, index])  # (r, r)
        Q = Q.index_copy(1, index, Q[:, index] @ O)
        P = P.index_copy(0, index, O.T @ P[index])  # rows I ← Oᵀ P[I, :]
        P = P.index_copy(1, index, P[:, index] @ O)  # cols I ← P[:, I] O
        return Q, _symmetrize(P), BasisChange(index=index, coord_map=O.T)
    raise ValueError(f"refresh: method must be 'eigh', 'qr' or 'subspace'; got {method!r}.")


def orthonormalize(Q: Tensor, P: Tensor) -> tuple[Tensor, Tensor, BasisChange]:
    """Gauge fix for a basis that drifted from orthonormality (bfloat16 storage).

    With ``QᵀQ = RᵀR`` (Cholesky), ``Q ← Q R⁻¹`` is orthonormal and ``P ← R P Rᵀ`` keeps
    ``Q P Qᵀ`` exactly invariant. Falls back to a Householder QR (``Q = Q' R``) if the Cholesky
    fails, which is the same map.

    Args:
        Q: Nearly orthonormal basis ``(d, d)``.
        P: Coordinate matrix ``(d, d)``.

    Returns:
        ``(Q_new, P_new, change)``; ``change`` maps coordinates by ``R``.
    """
    C = Q.T @ Q
    R, info = torch.linalg.cholesky_ex(C, upper=True)
    if int(info) == 0:
        Q_new = torch.linalg.solve_triangular(R, Q, upper=True, left=False)
    else:
        Q_new, R = torch.linalg.qr(Q)
    return Q_new, _symmetrize(R @ P @ R.T), BasisChange(coord_map=R)


def orthogonality_error(Q: Tensor) -> float:
    """``max |QᵀQ - I|`` for a basis ``Q: (d, d)``."""
    Qf = Q.float() if Q.dtype == torch.bfloat16 else Q
    eye = torch.eye(Q.shape[0], dtype=Qf.dtype, device=Q.device)
    return float((Qf.T @ Qf - eye).abs().max())


# --------------------------------------------------------------------------- storage
def stochastic_round(x: Tensor, generator: torch.Generator) -> Tensor:
    """Round float32 values to bfloat16 stochastically (unbiased in expectation).

    Adds uniform random bits below bfloat16's mantissa to the float32 bit pattern and truncates.
    The bit pattern stores sign and magnitude separately, so this rounds the magnitude up with
    probability equal to the discarded fraction, for either sign. An EMA stored this way keeps
    increments smaller than the bfloat16 spacing on average instead of losing them.

    Args:
        x: Tensor of any shape (converted to float32 first).
        generator: Source of the random bits (CPU).

    Returns:
        bfloat16 tensor shaped like ``x``.
    """
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, generator=generator, dtype=torch.int32)
    rounded = (bits + noise.to(bits.device)) & -65536  # clear the low 16 bits
    # Non-finite values keep their pattern (the noise could turn inf into nan).
    rounded = torch.where(torch.isfinite(x.float()), rounded, bits)
    return rounded.view(torch.float32).to(torch.bfloat16)
