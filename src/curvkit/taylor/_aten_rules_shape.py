"""Taylor rules for vector norms and the remaining structural (linear) operators.

Registered into the same ``RULES`` table as ``_aten_rules`` (imported by ``_aten_rules_nn``):

* ``linalg_vector_norm`` (``torch.linalg.vector_norm``, ``Tensor.norm``, ``F.normalize`` with
  ``clamp_min``/``expand``/``div``) for every ``ord``: ``2`` as ``sqrt(sum x²)``, ``1`` as
  ``sum |x|``, ``±inf`` as ``amax``/``amin`` of ``|x|`` (ties averaged, as torch's autograd), ``0``
  (a count: piecewise constant) and any other ``p`` as ``(sum |x|^p)^(1/p)``. Where the norm is
  zero its derivatives are set to zero, torch's autograd convention.
* linear maps applied to all packed rows: ``cumsum``, ``roll``, ``repeat``, ``gather``,
  ``masked_fill``, ``tril``/``triu``, ``diagonal``, ``diag_embed``, ``trace``, ``unfold``,
  ``constant_pad_nd`` (``F.pad``), and ``baddbmm``;
* selections by the value's order, ``sort``, ``topk``, ``cummax``/``cummin``: the jets of the
  entries at the returned indices (exact away from ties; at ties torch's autograd routes the
  derivative through the same indices).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from curvkit.taylor import _series
from curvkit.taylor._aten_rules import (
    RULES,
    _add_rule,
    _aligned,
    _dim,
    _matmul,
    _mul,
    _promote,
    _rank,
    _register,
    _sum,
)
from curvkit.taylor._propagation import Context, Jet, elementwise

aten = torch.ops.aten


# ----------------------------------------------------------------------------------------------
# vector norms


def _root(ctx: Context, total: Jet, exponent: float) -> Jet:
    """``total ** exponent`` with zero derivatives where ``total`` is zero (torch's convention).

    The zero entries see a unit value instead, so that no infinity or NaN reaches the other rows
    or autograd; their value row is ``0 ** exponent = 0`` (``exponent > 0``).
    """
    zero = total.primal.detach() == 0
    safe = Jet(torch.where(zero, ctx.constant(torch.ones_like(total.primal)).data, total.data))
    out = elementwise(ctx, safe, partial(_series.pow_derivatives, exponent=exponent))
    return Jet(torch.where(zero, out.data.new_zeros(()), out.data))


@_register(aten.linalg_vector_norm.default)
def _vector_norm(ctx, x, ord=2, dim=None, keepdim=False, *, dtype=None):  # noqa: A002
    """``‖x‖_ord`` over ``dim`` (all dims when ``None`` or empty)."""
    if dtype is not None:
        x = Jet(x.data.to(dtype))
    if isinstance(dim, int):
        dim = [dim]
    ord = float(ord)  # noqa: A001
    if ord == 0:  # the number of non-zero entries: piecewise constant
        return ctx.constant(torch.linalg.vector_norm(x.primal, 0, dim, keepdim))
    magnitude = RULES[aten.abs.default](ctx, x)
    if math.isinf(ord):
        reduce = RULES[aten.amax.default] if ord > 0 else RULES[aten.amin.default]
        return reduce(ctx, magnitude, dim or [], keepdim)
    if ord == 1:
        return _sum(ctx, magnitude, dim, keepdim)
    if ord == 2:  # x² is smooth where |x| is not: no kink at zero entries
        return _root(ctx, _sum(ctx, _mul(ctx, x, x), dim, keepdim), 0.5)
    powered = elementwise(ctx, magnitude, partial(_series.pow_derivatives, exponent=ord))
    return _root(ctx, _sum(ctx, powered, dim, keepdim), 1.0 / ord)


# ----------------------------------------------------------------------------------------------
# linear structural maps: applied to all rows, dims shifted by one


@_register(aten.cumsum.default)
def _cumsum(ctx, x, dim, *, dtype=None):
    if _rank(x) == 0:
        return Jet(x.data.to(dtype)) if dtype is not None else x
    return Jet(x.data.cumsum(_dim(dim, _rank(x)), dtype=dtype))


@_register(aten.roll.default)
def _roll(ctx, x, shifts, dims=()):
    if not dims:  # torch rolls the flattened tensor
        flat = x.data.reshape(x.data.shape[0], -1)
        return Jet(flat.roll(list(shifts), 1).reshape(x.data.shape))
    return Jet(x.data.roll(list(shifts), [_dim(d, _rank(x)) for d in dims]))


@_register(aten.repeat.default)
def _repeat(ctx, x, repeats):
    return Jet(_aligned(x, len(repeats)).repeat(1, *repeats))


def _no_jet(caller: str, name: str, value) -> None:
    if isinstance(value, Jet):
        raise NotImplementedError(
            f"curvkit.taylor: {caller} with a jet-valued {name} has no Taylor rule (the {name} "
            "must not depend on the input).")


@_register(aten.gather.default)
def _gather(ctx, x, dim, index, *, sparse_grad=False):
    _no_jet("gather", "index", index)
    x = _promote(ctx, x)
    rows = x.data.shape[0]
    return Jet(x.data.gather(_dim(dim, _rank(x)), index.unsqueeze(0).expand(rows, *index.shape)))


@_register(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(ctx, x, mask, value):
    """Filled entries take ``value``'s jet (zero derivatives for a constant), others keep ``x``'s."""
    _no_jet("masked_fill", "mask", mask)
    x = _promote(ctx, x)
    if isinstance(value, Jet):  # a 0-d tensor value that depends on the input
        filler = value.data.to(x.data.dtype).reshape(-1, *([1] * _rank(x)))
        return Jet(torch.where(mask, filler, x.data))
    value_row = x.primal.masked_fill(mask, value)
    return Jet(torch.cat([value_row.unsqueeze(0), x.data[1:].masked_fill(mask, 0)]))


@_register(aten.tril.default)
def _tril(ctx, x, diagonal=0):
    return Jet(x.data.tril(diagonal))


@_register(aten.triu.default)
def _triu(ctx, x, diagonal=0):
    return Jet(x.data.triu(diagonal))


@_register(aten.diagonal.default)
def _diagonal(ctx, x, offset=0, dim1=0, dim2=1):
    rank = _rank(x)
    return Jet(x.data.diagonal(offset, _dim(dim1, rank), _dim(dim2, rank)))


@_register(aten.trace.default)
def _trace(ctx, x):
    return Jet(x.data.diagonal(0, 1, 2).sum(-1))


@_register(aten.diag_embed.default)
def _diag_embed(ctx, x, offset=0, dim1=-2, dim2=-1):
    rank = _rank(x) + 1  # the dims name axes of the output
    return Jet(x.data.diag_embed(offset, _dim(dim1, rank), _dim(dim2, rank)))


@_register(aten.unfold.default)
def _unfold(ctx, x, dimension, size, step):
    return Jet(x.data.unfold(_dim(dimension, _rank(x)), size, step))


def _picked(x: Jet, d: int, indices: Tensor) -> Jet:
    """The entries of every row of ``x`` at ``indices`` (of the value's shape) along data axis d."""
    return Jet(x.data.gather(d, indices.unsqueeze(0).expand(x.data.shape[0], *indices.shape)))


@_register(aten.sort.default, aten.sort.stable)
def _sort(ctx, x, *args, **kwargs):
    """The jets of the entries in sorted order (ties keep torch's order, as its autograd)."""
    values, indices = torch.ops.aten.sort(x.primal.detach(), *args, **kwargs)
    if _rank(x) == 0:
        return x, indices
    # sort.default(x, dim=-1, descending=False); sort.stable(x, *, stable, dim=-1, descending)
    dim = args[0] if args else kwargs.get("dim", -1)
    return _picked(x, _dim(dim, _rank(x)), indices), indices


@_register(aten.topk.default)
def _topk(ctx, x, k, dim=-1, largest=True, sorted=True):  # noqa: A002
    _, indices = torch.topk(x.primal.detach(), k, dim, largest, sorted)
    if _rank(x) == 0:
        return x, indices
    return _picked(x, _dim(dim, _rank(x)), indices), indices


def _cumulative_extremum(reduce):
    def rule(ctx, x, dim):
        _, indices = reduce(x.primal.detach(), dim)
        if _rank(x) == 0:
            return x, indices
        return _picked(x, _dim(dim, _rank(x)), indices), indices

    return rule


RULES[aten.cummax.default] = _cumulative_extremum(torch.cummax)
RULES[aten.cummin.default] = _cumulative_extremum(torch.cummin)


@_register(aten.constant_pad_nd.default)
def _constant_pad(ctx, x, pad, value=0):
    """Padding fills the value row with ``value`` and the derivative rows with zeros."""
    value_row = torch.nn.functional.pad(x.primal, list(pad), value=value)
    rest = torch.nn.functional.pad(x.data[1:], list(pad), value=0.0)
    return Jet(torch.cat([value_row.unsqueeze(0), rest]))


@_register(aten.baddbmm.default)
def _baddbmm(ctx, x, a, b, *, beta=1, alpha=1):
    """``beta x + alpha (a @ b)`` (``x`` ignored when ``beta == 0``, as torch does)."""
    if isinstance(a, Jet) or isinstance(b, Jet):
        product = _matmul(ctx, a, b)
        product = product if alpha == 1 else Jet(alpha * product.data)
    else:
        product = alpha * torch.bmm(a, b)
    if beta == 0:
        return product
    return _add_rule(ctx, product, x, beta)

