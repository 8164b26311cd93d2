"""Packed (collapsed) K-jets and the two non-linear propagation rules.

A jet of a tensor of shape ``S`` is stored as one tensor ``data`` of shape ``(P, *S)`` whose rows
are, in order:

* ``x_0`` (1 row), the value;
* ``Q`` *tangents*: first-order coefficients of extra directions that never reach higher orders
  (used to return the gradient alongside a randomized operator);
* for every order ``k = 1..K-1``, the ``R`` per-direction coefficients ``x_{k,r}``;
* the top coefficients: ``R`` rows ``x_{K,r}`` (standard Taylor mode) or, **collapsed**, one row
  ``s_K = sum_r w_r x_{K,r}``.

Every operation that is linear in its jet argument (matmul with a constant, views, sums, ...) acts
on all ``P`` rows in one batched call, e.g. a linear layer is a single ``(P*N, D_in) @ W.T``
matmul. Only elementwise non-linearities and products of two jets need the rules below.

The collapsed top coefficient is exact: in Faà di Bruno's formula the top input coefficient
``x_K`` only enters through the trivial partition ``{K}``, linearly, as ``phi'(x_0) x_K``; hence
``sum_r w_r y_{K,r} = phi'(x_0) s_K + sum_r w_r (all other partitions)``, and the same holds for
the Leibniz rule (Dangel et al., 2025, section 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from curvkit.taylor._series import Derivatives, faa_di_bruno_terms


@dataclass(frozen=True)
class Layout:
    """Row layout of a packed jet.

    Attributes:
        order: Jet order ``K >= 0``.
        num_directions: Number of directions ``R >= 1``.
        num_tangents: Number ``Q >= 0`` of first-order-only tangent rows.
        collapsed: Whether the top coefficient is the weighted sum over directions.
    """

    order: int
    num_directions: int = 1
    num_tangents: int = 0
    collapsed: bool = True

    @property
    def top_rows(self) -> int:
        """Rows of the top coefficient: 1 if collapsed, else ``R``."""
        return 1 if self.collapsed else self.num_directions

    @property
    def size(self) -> int:
        """Total number of rows ``P``."""
        if self.order == 0:
            return 1 + self.num_tangents
        return 1 + self.num_tangents + (self.order - 1) * self.num_directions + self.top_rows


class Jet:
    """A packed jet; ``data`` has shape ``(P, *S)`` with rows as described in the module doc."""

    __slots__ = ("data",)

    def __init__(self, data: Tensor):
        self.data = data

    @property
    def primal(self) -> Tensor:
        """The value ``x_0``, shape ``S``."""
        return self.data[0]

    @property
    def shape(self) -> torch.Size:
        """Shape ``S`` of the tensor the jet describes."""
        return self.data.shape[1:]

    def __repr__(self) -> str:
        return f"Jet(rows={self.data.shape[0]}, shape={tuple(self.shape)})"


class Context:
    """Layout and direction weights shared by all jets of one propagation.

    Args:
        layout: The row layout.
        weights: Direction weights ``w`` of shape ``(R,)`` used in the collapsed sum, or ``None``
            for all ones.
    """

    def __init__(self, layout: Layout, weights: Tensor | None = None):
        self.layout = layout
        self.weights = weights

    def split(self, data: Tensor) -> tuple[Tensor, Tensor, list[Tensor], Tensor | None]:
        """Views ``(x0 (S), tangents (Q, S), [x_k (R, S) for k < K], top (rows, S) or None)``."""
        lay = self.layout
        q, r = lay.num_tangents, lay.num_directions
        tangents = data[1 : 1 + q]
        if lay.order == 0:
            return data[0], tangents, [], None
        start = 1 + q
        blocks = [data[start + i * r : start + (i + 1) * r] for i in range(lay.order - 1)]
        return data[0], tangents, blocks, data[start + (lay.order - 1) * r :]

    def join(self, x0: Tensor, tangents: Tensor | None, blocks: list[Tensor],
             top: Tensor | None) -> Jet:
        """Concatenate rows back into a packed jet (``top`` of shape ``S`` when collapsed)."""
        pieces = [x0.unsqueeze(0)]
        if self.layout.num_tangents:
            pieces.append(tangents)
        pieces.extend(blocks)
        if top is not None:
            pieces.append(top.unsqueeze(0) if self.layout.collapsed else top)
        shape = torch.broadcast_shapes(*(p.shape[1:] for p in pieces))
        pieces = [p.expand(p.shape[0], *shape) for p in pieces]
        return Jet(torch.cat(pieces))

    def weighted_sum(self, t: Tensor) -> Tensor:
        """``sum_r w_r t_r`` for ``t`` of shape ``(R, *S)``; returns shape ``S``."""
        if self.weights is None:
            return t.sum(0)
        return torch.tensordot(self.weights.to(t.dtype), t, dims=1)

    def constant(self, value: Tensor) -> Jet:
        """Promote a constant to a jet with zero higher coefficients."""
        zeros = value.new_zeros(self.layout.size - 1, *value.shape)
        return Jet(torch.cat([value.unsqueeze(0), zeros]))


def _accumulate(acc: Tensor | None, term: Tensor | None) -> Tensor | None:
    if term is None:
        return acc
    return term if acc is None else acc + term


def _scale(c: float, t: Tensor) -> Tensor:
    return t if c == 1.0 else c * t


def elementwise(ctx: Context, x: Jet, derivatives: Callable[[Tensor, int], Derivatives]) -> Jet:
    """Faà di Bruno's rule for an elementwise function ``phi``.

    Args:
        ctx: Propagation context.
        x: Input jet.
        derivatives: Maps ``(x0, K)`` to ``[phi(x0), ..., phi^(K)(x0)]`` (``None`` = zero).

    Returns:
        The jet of ``phi(x)``.
    """
    lay = ctx.layout
    x0, tangents, blocks, top = ctx.split(x.data)
    d = derivatives(x0, lay.order)
    if (lay.order == 2 and lay.collapsed and all(v is not None for v in d)
            and not (torch.is_grad_enabled() and x.data.requires_grad)):
        return _forward_laplacian_no_grad(ctx, x.data, d)
    zero = torch.zeros((), dtype=x0.dtype, device=x0.device)
    coefficients: dict[int, Tensor] = {k + 1: b for k, b in enumerate(blocks)}
    if not lay.collapsed and top is not None:
        coefficients[lay.order] = top
    products: dict[tuple[int, ...], Tensor] = {}

    def product(sigma: tuple[int, ...]) -> Tensor:
        # Products of per-direction coefficients, memoised by prefix (partitions share them).
        if sigma not in products:
            head = coefficients[sigma[0]]
            products[sigma] = head if len(sigma) == 1 else head * product(sigma[1:])
        return products[sigma]

    def polynomial(k: int, m: int) -> Tensor:
        out = None
        for c, sigma in faa_di_bruno_terms(k)[m]:
            out = _accumulate(out, _scale(c, product(sigma)))
        return out

    def coefficient(k: int, skip_trivial: bool) -> Tensor:
        out = None
        for m in faa_di_bruno_terms(k):
            if d[m] is None or (skip_trivial and m == 1):
                continue
            poly = polynomial(k, m)
            out = _accumulate(out, d[m] * (ctx.weighted_sum(poly) if skip_trivial else poly))
        return zero if out is None else out

    new_blocks = [coefficient(k, False) for k in range(1, lay.order)]
    new_top = None
    if lay.order >= 1:
        if lay.collapsed:
            new_top = coefficient(lay.order, True)
            if d[1] is not None:
                new_top = new_top + d[1] * top[0]
        else:
            new_top = coefficient(lay.order, False)
            if new_top.dim() == 0:  # identically zero (e.g. x ** 0): one row per direction
                new_top = new_top.expand_as(top)
    new_tangents = None
    if lay.num_tangents:
        new_tangents = zero * tangents if d[1] is None else d[1] * tangents
    value = d[0]
    return ctx.join(value, new_tangents, [b.expand_as(blocks[0]) if b.dim() == 0 else b
                                          for b in new_blocks], new_top)


def _forward_laplacian_no_grad(ctx: Context, data: Tensor, d: list[Tensor]) -> Jet:
    """Collapsed K=2 elementwise rule writing straight into one output pack (no autograd).

    ``y_1 = phi' x_1`` and ``s_2' = phi' s_2 + phi'' sum_r w_r x_{1,r}^2``. Writing every row into
    a preallocated pack (``out=``) keeps two packs alive instead of four (input, ``phi' x_1``,
    ``x_1^2``, concatenation), which is what makes the forward Laplacian light on memory.
    ``out=`` is not differentiable, so this path only runs when nothing requires grad.
    """
    lay = ctx.layout
    x0, tangents, (x1,), top = ctx.split(data)
    shape = torch.broadcast_shapes(*(v.shape for v in d), x0.shape)
    out = torch.empty((data.shape[0], *shape), dtype=data.dtype, device=data.device)
    o0, otangents, (o1,), otop = ctx.split(out)
    o0.copy_(d[0])
    if lay.num_tangents:
        torch.mul(d[1], tangents, out=otangents)
    if ctx.weights is None:
        # sum_r x_{1,r}^2 as a reduction, without materialising the R squares
        square_sum = torch.linalg.vector_norm(x1, dim=0).square_()
    else:
        square_sum = torch.tensordot(ctx.weights.to(x1.dtype), x1 * x1, dims=1)
    torch.mul(d[1], top[0], out=otop[0])
    otop[0].addcmul_(d[2], square_sum)
    torch.mul(d[1], x1, out=o1)
    return Jet(out)


def bilinear(ctx: Context, op: Callable[[Tensor, Tensor], Tensor], a: Jet, b: Jet) -> Jet:
    """Leibniz's rule ``(a ∘ b)_k = sum_j C(k, j) a_j ∘ b_{k-j}`` for a bilinear ``∘``.

    Args:
        ctx: Propagation context.
        op: The bilinear map; it must broadcast over leading batch dimensions.
        a: Left jet.
        b: Right jet.

    Returns:
        The jet of ``op(a, b)``.
    """
    lay = ctx.layout
    a0, at, ablocks, atop = ctx.split(a.data)
    b0, bt, bblocks, btop = ctx.split(b.data)
    value = op(a0, b0)
    tangents = op(at, b0) + op(a0, bt) if lay.num_tangents else None
    ca = [a0, *ablocks]
    cb = [b0, *bblocks]
    if not lay.collapsed and atop is not None:
        ca.append(atop)
        cb.append(btop)

    def coefficient(k: int, lo: int, hi: int) -> Tensor:
        out = None
        for j in range(lo, hi + 1):
            out = _accumulate(out, _scale(math.comb(k, j), op(ca[j], cb[k - j])))
        return out

    blocks = [coefficient(k, 0, k) for k in range(1, lay.order)]
    top = None
    if lay.order >= 1:
        if lay.collapsed:
            top = op(a0, btop[0]) + op(atop[0], b0)
            if lay.order >= 2:
                top = top + ctx.weighted_sum(coefficient(lay.order, 1, lay.order - 1))
        else:
            top = coefficient(lay.order, 0, lay.order)
    return ctx.join(value, tangents, blocks, top)
