"""Blocks of KFAC / EKFAC and the operator that places them in the user's parameter order.

KFAC's blocks act on a *canonical* layout (per layer and group, the joint ``[W | b]`` matrix
row-major), which is a fixed permutation of the parameters' flat order. ``PermutedBlocks`` is
``Pᵀ diag(B_1, ..., B_r) P`` for that permutation ``P``: products gather, apply the blocks and
scatter back; trace, log-determinant, eigendecomposition and inverses are computed per block.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from curvkit.linalg import (
    BlockDiagonal,
    Dense,
    Diagonal,
    Identity,
    Kronecker,
    LinearOperator,
    SymmetricEigen,
)

__all__ = ["Block", "PermutedBlocks"]


class _Kron2(Kronecker):
    """``F_1 ⊗ F_2`` with products as two batched matmuls, ``F_1 V F_2ᵀ``, and no copies.

    The generic ``Kronecker`` product permutes modes between its matmuls, which copies the
    operand twice; for KFAC's two factors ``V: (k, n_1, n_2)`` is a free view of the block.
    """

    def _matmat(self, X):
        F1, F2 = self.factors
        V = X.T.reshape(X.shape[1], F1.shape[1], F2.shape[1])
        return (F1 @ V @ F2.T).reshape(X.shape[1], -1).T

    def _rmatmat(self, Y):
        F1, F2 = self.factors
        V = Y.T.reshape(Y.shape[1], F1.shape[0], F2.shape[0])
        return (F1.T @ V @ F2).reshape(Y.shape[1], -1).T


@dataclass
class Block:
    """One diagonal block.

    Attributes:
        index: Positions of the block's entries in the flat ``params`` order, in the block's
            own (canonical) order: a ``slice`` when contiguous, else an ``(n_b,)`` tensor or a
            function returning it (built when a product first needs it).
        kind: ``"kron"`` (``data = (first, second)``: ``first ⊗ second``), ``"dense"``
            (``(M,)``), ``"diagonal"`` (``(d,)``) or ``"eigen"`` (``(Q_1, Q_2, λ)``:
            ``(Q_1 ⊗ Q_2) diag(λ) (Q_1 ⊗ Q_2)ᵀ``, EKFAC).
        data: The tensors, see ``kind``.
        label: Layer path or parameter name, for messages.
        a_pos: For ``"kron"``, which factor is the input factor ``A`` (0 or 1).
        key: For ``"kron"``: ``("W", j)`` (weight, with the joint bias, of group ``j``) or
            ``("b", j)`` (separate bias of group ``j``); lets EKFAC find its eigenvalues.
    """

    index: Tensor | slice | Callable[[], Tensor]
    kind: str
    data: tuple[Tensor, ...]
    label: str
    a_pos: int = 1
    key: tuple = ()

    def operator(self) -> LinearOperator:
        """The block as a structured operator."""
        if self.kind == "kron":
            return _Kron2(*self.data, psd=True)
        if self.kind == "dense":
            return Dense(self.data[0], psd=True)
        if self.kind == "diagonal":
            return Diagonal(self.data[0])
        Q1, Q2, lam = self.data
        return SymmetricEigen(_Kron2(Q1, Q2), lam)

    def inverse(self, damping: float, heuristic: str | None, exact: bool) -> LinearOperator:
        """Damped inverse (see ``KFAC.inverse``)."""
        if self.kind != "kron":
            return self.operator().inverse(damping)
        if exact:  # (Q_1 ⊗ Q_2)(Λ_1 ⊗ Λ_2 + λ)⁻¹(Q_1 ⊗ Q_2)ᵀ
            (l1, Q1), (l2, Q2) = (torch.linalg.eigh(f) for f in self.data)
            shifted = torch.outer(l1, l2).flatten() + damping
            if (shifted <= 0).any():
                raise ValueError(f"KFAC.inverse: block {self.label!r} is singular; add damping.")
            return SymmetricEigen(_Kron2(Q1, Q2), 1.0 / shifted)
        A, G = self.data[self.a_pos], self.data[1 - self.a_pos]
        d_A = d_G = damping
        if heuristic == "pi":
            mean_A, mean_G = A.trace() / A.shape[0], G.trace() / G.shape[0]
            if not (mean_A > 0 and mean_G > 0):
                raise ValueError(
                    f"KFAC.inverse: the 'pi' heuristic needs factors with positive mean "
                    f"eigenvalue; block {self.label!r} has tr A/d = {mean_A.item():.3g}, "
                    f"tr G/d = {mean_G.item():.3g}. Use heuristic=None or exact=True.")
            pi = torch.sqrt(mean_A / mean_G).item()
            d_A, d_G = pi * math.sqrt(damping), math.sqrt(damping) / pi
        damped = {self.a_pos: _shift(A, d_A), 1 - self.a_pos: _shift(G, d_G)}
        inv = Kronecker(damped[0], damped[1], psd=True).inverse()  # Cholesky, float64 retry
        return _Kron2(*inv.factors, psd=True)

    def logdet(self, damping: float) -> Tensor:
        """``log det(B + damping·I)``."""
        if self.kind == "kron" and damping == 0.0:
            return Kronecker(*self.data, psd=True).logdet()
        if self.kind == "kron":
            lam = torch.outer(torch.linalg.eigvalsh(self.data[0]),
                              torch.linalg.eigvalsh(self.data[1])).flatten()
        elif self.kind == "dense":
            lam = torch.linalg.eigvalsh(self.data[0])
        else:
            lam = self.data[-1]
        lam = lam + damping
        if (lam <= 0).any():
            raise ValueError(f"KFAC.logdet: block {self.label!r} is singular (smallest eigenvalue "
                             f"{lam.min().item():.3g} with damping {damping}); add damping.")
        return lam.log().sum()

    def frobenius_sq(self) -> Tensor:
        """``‖B‖_F²``."""
        if self.kind == "kron":
            return self.data[0].square().sum() * self.data[1].square().sum()
        return self.data[-1].square().sum()

    def eigh(self) -> tuple[Tensor, LinearOperator]:
        """Eigenvalues and eigenvector operator of the block."""
        if self.kind == "kron":
            return Kronecker(*self.data, psd=True).eigh()
        if self.kind == "dense":
            lam, Q = torch.linalg.eigh(self.data[0])
            return lam, Dense(Q)
        if self.kind == "diagonal":
            d = self.data[0]
            return d, Identity(d.shape[0], dtype=d.dtype, device=d.device)
        Q1, Q2, lam = self.data
        return lam, _Kron2(Q1, Q2)


def _gather_index(blocks: list[Block], size: int, device) -> Tensor:
    """The blocks' positions joined: the canonical order's gather index ``(P,)``."""
    parts = []
    for b in blocks:
        if isinstance(b.index, slice):
            parts.append(torch.arange(b.index.start, b.index.stop, device=device))
        else:
            parts.append(b.index() if callable(b.index) else b.index)
    perm = torch.cat(parts)
    if perm.shape[0] != size:
        raise RuntimeError(f"KFAC: internal error, blocks cover {perm.shape[0]} of {size} "
                           "entries.")
    return perm


def _scatter(Y: Tensor, perm: Tensor) -> Tensor:
    """``out[perm] = Y``: canonical rows back to ``params`` order."""
    out = torch.empty_like(Y)
    out[perm] = Y
    return out


def _shift(M: Tensor, d: float) -> Tensor:
    return M + d * torch.eye(M.shape[0], dtype=M.dtype, device=M.device) if d else M


class Permuted(LinearOperator):
    """``Pᵀ B P`` for a square operator ``B`` in canonical order and the gather index ``perm``.

    ``perm=None`` is the identity (no gather or scatter); a callable ``perm`` is evaluated at
    the first use and kept.
    """

    is_symmetric = True

    def __init__(self, inner: LinearOperator, perm: Tensor | Callable[[], Tensor] | None,
                 in_shapes=None):
        super().__init__(inner.shape, dtype=inner.dtype, device=inner.device, in_shapes=in_shapes)
        self.inner, self._perm = inner, perm
        self.is_psd = inner.is_psd

    @property
    def perm(self) -> Tensor | None:
        """The gather index ``(P,)`` (``None``: identity)."""
        if callable(self._perm):
            self._perm = self._perm()
        return self._perm

    def _matmat(self, X):
        perm = self.perm
        if perm is None:
            return self.inner._matmat(X)
        return _scatter(self.inner._matmat(X[perm]), perm)

    def trace(self):
        return self.inner.trace()

    def diagonal(self):
        d = self.inner.diagonal()
        return d if self.perm is None else _scatter(d, self.perm)


class _ScatterRows(LinearOperator):
    """``Pᵀ Q``: the columns of ``Q`` (canonical rows) moved to ``params`` order."""

    def __init__(self, Q: LinearOperator, perm: Tensor):
        super().__init__(Q.shape, dtype=Q.dtype, device=Q.device)
        self.Q, self.perm = Q, perm

    def _matmat(self, X):
        Y = self.Q._matmat(X)
        return Y if self.perm is None else _scatter(Y, self.perm)

    def _rmatmat(self, Y):
        return self.Q._rmatmat(Y if self.perm is None else Y[self.perm])


class PermutedBlocks(Permuted):
    """``Pᵀ diag(B_1, ..., B_r) P`` with per-block trace, logdet, eigh, Frobenius norm, inverse."""

    def __init__(self, blocks: list[Block], size: int, in_shapes=None, device=None):
        end = 0
        for b in blocks:
            if not isinstance(b.index, slice) or b.index.start != end:
                break
            end = b.index.stop
        else:  # contiguous, in order: canonical order is the parameters' order
            if end != size:
                raise RuntimeError(f"KFAC: internal error, blocks cover {end} of {size} entries.")
        # The gather index is built at the first product: factor computation does not need it.
        perm = None if end == size else functools.partial(_gather_index, blocks, size, device)
        super().__init__(BlockDiagonal([b.operator() for b in blocks]), perm, in_shapes)
        self.blocks = blocks

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(F + damping·I)``, block by block."""
        return sum(b.logdet(float(damping)) for b in self.blocks)

    def frobenius_norm(self) -> Tensor:
        """``‖F‖_F``."""
        return torch.sqrt(sum(b.frobenius_sq() for b in self.blocks))

    def eigh(self) -> tuple[Tensor, LinearOperator]:
        """Eigenvalues and the eigenvector operator in ``params`` order."""
        pairs = [b.eigh() for b in self.blocks]
        Q = BlockDiagonal([Q for _, Q in pairs])
        return torch.cat([lam for lam, _ in pairs]), _ScatterRows(Q, self.perm)

    def inverse(self, damping: float = 0.0, *, heuristic: str | None = None,
                exact: bool = False) -> LinearOperator:
        """Damped inverse, block by block, in ``params`` order."""
        damping = float(damping)
        if not math.isfinite(damping) or damping < 0:
            raise ValueError(f"KFAC.inverse: damping must be a finite number >= 0; got {damping}.")
        inv = BlockDiagonal([b.inverse(damping, heuristic, exact) for b in self.blocks])
        return Permuted(inv, self.perm, self.in_shapes)
