"""Blocks of KFAC / EKFAC and the operator that places them in the user's parameter order.

KFAC's blocks act on a *canonical* layout (per layer and group, the joint ``[W | b]`` matrix
row-major), which is a fixed permutation of the parameters' flat order. ``PermutedBlocks`` is
``Pᵀ diag(B_1, ..., B_r) P`` for that permutation ``P``: products read each block's rows from
the parameter order, apply the block and write its rows back (slices and copies of contiguous
runs; an index only for the rare non-contiguous block), and trace, log-determinant,
eigendecomposition and inverses are computed per block.
"""

from __future__ import annotations

import math
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
from curvkit.linalg.structured import _check_damping

__all__ = ["Block", "JointRows", "PermutedBlocks"]


@dataclass(frozen=True)
class JointRows:
    """The rows ``[W_r | b_r]`` of one group of a joint layer.

    ``W`` and ``b`` are contiguous runs of the parameter order, ``(d_out, d_in)`` and
    ``(d_out,)``; the block's order interleaves them row by row.
    """

    weight: slice
    bias: slice
    d_out: int
    d_in: int

    @property
    def size(self) -> int:
        """Number of entries, ``d_out (d_in + 1)``."""
        return self.d_out * (self.d_in + 1)

    def read(self, X: Tensor) -> Tensor:
        """The block's rows of ``X (P, k)``: ``(d_out (d_in + 1), k)`` (one copy)."""
        k = X.shape[1]
        return torch.cat([X[self.weight].reshape(self.d_out, self.d_in, k),
                          X[self.bias].reshape(self.d_out, 1, k)], dim=1).reshape(-1, k)

    def write(self, out: Tensor, Y: Tensor) -> None:
        """Copy the block's rows ``Y`` into ``out (P, k)`` at their parameter positions."""
        k = Y.shape[1]
        Y = Y.reshape(self.d_out, self.d_in + 1, k)
        out[self.weight].view(self.d_out, self.d_in, k).copy_(Y[:, :-1])
        out[self.bias].view(self.d_out, 1, k).copy_(Y[:, -1:])


def _size(index) -> int:
    if isinstance(index, slice):
        return index.stop - index.start
    return index.size if isinstance(index, JointRows) else index.shape[0]


class _Layout:
    """Moves rows between the parameter order and the blocks' canonical order."""

    def __init__(self, indices: list, size: int):
        self.indices, self.size = indices, size
        self.sizes = [_size(ix) for ix in indices]
        if sum(self.sizes) != size:
            raise RuntimeError(f"KFAC: internal error, blocks cover {sum(self.sizes)} of {size} "
                               "entries.")

    def read(self, X: Tensor) -> list[Tensor]:
        """Per block its rows of ``X (P, k)``, in the block's order."""
        return [X[ix] if not isinstance(ix, JointRows) else ix.read(X) for ix in self.indices]

    def write(self, parts: list[Tensor]) -> Tensor:
        """The inverse of ``read``: ``(P, k)`` in the parameter order."""
        out = parts[0].new_empty(self.size, parts[0].shape[1])
        for ix, Y in zip(self.indices, parts):
            if isinstance(ix, JointRows):
                ix.write(out, Y)
            else:
                out[ix] = Y
        return out


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
            own (canonical) order: a ``slice`` when contiguous, ``JointRows`` for a joint
            ``[W | b]`` group, else an ``(n_b,)`` index tensor.
        kind: ``"kron"`` (``data = (first, second)``: ``first ⊗ second``), ``"dense"``
            (``(M,)``), ``"diagonal"`` (``(d,)``) or ``"eigen"`` (``(Q_1, Q_2, λ)``:
            ``(Q_1 ⊗ Q_2) diag(λ) (Q_1 ⊗ Q_2)ᵀ``, EKFAC).
        data: The tensors, see ``kind``.
        label: Layer path or parameter name, for messages.
        a_pos: For ``"kron"``, which factor is the input factor ``A`` (0 or 1).
        key: For ``"kron"``: ``("W", j)`` (weight, with the joint bias, of group ``j``) or
            ``("b", j)`` (separate bias of group ``j``); lets EKFAC find its eigenvalues.
    """

    index: Tensor | slice | JointRows
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
            try:  # from the factors' determinants
                return Kronecker(*self.data, psd=True).logdet()
            except ValueError:  # a singular factor: named below with its smallest eigenvalue
                pass
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


def _shift(M: Tensor, d: float) -> Tensor:
    return M + d * torch.eye(M.shape[0], dtype=M.dtype, device=M.device) if d else M


class Permuted(LinearOperator):
    """``Pᵀ diag(B_1, ..., B_r) P``: blocks ``ops`` in canonical order, placed by ``layout``.

    ``layout=None``: the blocks are contiguous and in the parameter order (no reordering).
    """

    is_symmetric = True

    def __init__(self, ops: list[LinearOperator], layout: _Layout | None, in_shapes=None):
        inner = BlockDiagonal(ops)
        super().__init__(inner.shape, dtype=inner.dtype, device=inner.device, in_shapes=in_shapes)
        self.inner, self.layout = inner, layout
        self.is_psd = inner.is_psd

    def _matmat(self, X):
        if self.layout is None:
            return self.inner._matmat(X)
        parts = self.layout.read(X)
        return self.layout.write([op._matmat(x) for op, x in zip(self.inner.blocks, parts)])

    def trace(self):
        return self.inner.trace()

    def diagonal(self):
        if self.layout is None:
            return self.inner.diagonal()
        d = [op.diagonal().unsqueeze(1) for op in self.inner.blocks]
        return self.layout.write(d)[:, 0]


class _ScatterRows(LinearOperator):
    """``Pᵀ Q``: the rows of the block-diagonal ``Q`` moved to the parameter order.

    Its columns (eigen-coordinates) stay in canonical order.
    """

    def __init__(self, Q: BlockDiagonal, layout: _Layout | None):
        super().__init__(Q.shape, dtype=Q.dtype, device=Q.device)
        self.Q, self.layout = Q, layout

    def _matmat(self, X):
        if self.layout is None:
            return self.Q._matmat(X)
        parts = X.split(self.layout.sizes)
        return self.layout.write([q._matmat(x) for q, x in zip(self.Q.blocks, parts)])

    def _rmatmat(self, Y):
        if self.layout is None:
            return self.Q._rmatmat(Y)
        parts = self.layout.read(Y)
        return torch.cat([q._rmatmat(y) for q, y in zip(self.Q.blocks, parts)])


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
        layout = None if end == size else _Layout([b.index for b in blocks], size)
        super().__init__([b.operator() for b in blocks], layout, in_shapes)
        self.blocks = blocks

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(F + damping·I)``, block by block."""
        damping = _check_damping(damping, "KFAC.logdet")
        return sum(b.logdet(damping) for b in self.blocks)

    def frobenius_norm(self) -> Tensor:
        """``‖F‖_F``."""
        return torch.sqrt(sum(b.frobenius_sq() for b in self.blocks))

    def eigh(self) -> tuple[Tensor, LinearOperator]:
        """Eigenvalues and the eigenvector operator in ``params`` order."""
        pairs = [b.eigh() for b in self.blocks]
        Q = BlockDiagonal([Q for _, Q in pairs])
        return torch.cat([lam for lam, _ in pairs]), _ScatterRows(Q, self.layout)

    def inverse(self, damping: float = 0.0, *, heuristic: str | None = None,
                exact: bool = False) -> LinearOperator:
        """Damped inverse, block by block, in ``params`` order."""
        damping = _check_damping(damping, "KFAC.inverse")
        ops = [b.inverse(damping, heuristic, exact) for b in self.blocks]
        return Permuted(ops, self.layout, self.in_shapes)
