"""Taylor rules for ATen operators, keyed by ``OpOverload``.

A rule receives the propagation context and the node's arguments, where tensors that depend on the
jet input are ``Jet`` objects and all others (parameters, constants, shapes) are plain values.
Rules come in three kinds: *linear* (applied to all packed rows at once, with dimension
arguments shifted by one for the leading row axis), *elementwise* (Faà di Bruno) and *bilinear*
(Leibniz). Operators whose result depends on the value only through a piecewise-constant map
(comparisons, ``sign``, ``floor``, ``*_like``) are evaluated on the value and return constants.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from curvkit.taylor import _series
from curvkit.taylor._propagation import Context, Jet, bilinear, elementwise

aten = torch.ops.aten
RULES: dict[object, Callable] = {}


def _register(*ops):
    def decorate(fn):
        for op in ops:
            RULES[op] = fn
        return fn

    return decorate


def _dim(d: int, rank: int) -> int:
    """Shift a dimension of a tensor of rank ``rank`` past the leading row axis."""
    return (d + rank if d < 0 else d) + 1


def _dims(dims: Sequence[int] | None, rank: int) -> list[int]:
    if not dims:  # ATen reads an empty dim list as "all dimensions"
        return list(range(1, rank + 1))
    return [_dim(d, rank) for d in dims]


def _aligned(x: Jet, rank: int) -> Tensor:
    """Packed data reshaped so that its tensor part has ``rank`` dimensions (for broadcasting)."""
    data = x.data
    missing = rank - (data.dim() - 1)
    return data.reshape(data.shape[0], *([1] * missing), *data.shape[1:]) if missing > 0 else data


def _rank_of(*values) -> int:
    shapes = [v.shape for v in values if isinstance(v, (Jet, Tensor))]
    return len(torch.broadcast_shapes(*shapes))


def _promote(ctx: Context, value) -> Jet:
    return value if isinstance(value, Jet) else ctx.constant(torch.as_tensor(value))


# ----------------------------------------------------------------------------------------------
# elementwise non-linearities (Faà di Bruno)


def _unary(derivatives):
    def rule(ctx, x, *args, **kwargs):
        return elementwise(ctx, x, lambda x0, k: derivatives(x0, k, *args, **kwargs))

    return rule


for _op, _fn in [
    (aten.tanh.default, _series.tanh_derivatives),
    (aten.sigmoid.default, _series.sigmoid_derivatives),
    (aten.sin.default, _series.sin_derivatives),
    (aten.cos.default, _series.cos_derivatives),
    (aten.exp.default, _series.exp_derivatives),
    (aten.log.default, _series.log_derivatives),
]:
    RULES[_op] = _unary(_fn)

RULES[aten.sqrt.default] = _unary(partial(_series.pow_derivatives, exponent=0.5))
RULES[aten.rsqrt.default] = _unary(partial(_series.pow_derivatives, exponent=-0.5))
RULES[aten.reciprocal.default] = _unary(partial(_series.pow_derivatives, exponent=-1.0))


@_register(aten.pow.Tensor_Scalar)
def _pow(ctx, x, exponent):
    if isinstance(exponent, Jet):
        raise NotImplementedError("curvkit.taylor: pow with a jet exponent has no Taylor rule.")
    return elementwise(ctx, x, lambda x0, k: _series.pow_derivatives(x0, k, float(exponent)))


@_register(aten.expm1.default)
def _expm1(ctx, x):
    def derivatives(x0, k):
        out = _series.exp_derivatives(x0, k)
        return [torch.expm1(x0)] + out[1:]

    return elementwise(ctx, x, derivatives)


@_register(aten.log1p.default)
def _log1p(ctx, x):
    def derivatives(x0, k):
        return [torch.log1p(x0)] + _series.log_derivatives(1 + x0, k)[1:]

    return elementwise(ctx, x, derivatives)


@_register(aten.softplus.default)
def _softplus(ctx, x, beta=1.0, threshold=20.0):
    return elementwise(ctx, x, lambda x0, k: _series.softplus_derivatives(x0, k, beta, threshold))


def _piecewise(value_fn, slope_fn):
    def rule(ctx, x, *args):
        def derivatives(x0, k):
            return _series.piecewise_linear_derivatives(value_fn(x0, *args), slope_fn(x0, *args), k)

        return elementwise(ctx, x, derivatives)

    return rule


def _between(x0, low, high):
    inside = torch.ones_like(x0)
    if low is not None:
        inside = inside * (x0 > low)
    if high is not None:
        inside = inside * (x0 < high)
    return inside


RULES[aten.relu.default] = _piecewise(torch.relu, lambda x0: (x0 > 0).to(x0.dtype))
RULES[aten.abs.default] = _piecewise(torch.abs, torch.sign)
RULES[aten.leaky_relu.default] = _piecewise(
    lambda x0, slope=0.01: torch.nn.functional.leaky_relu(x0, slope),
    lambda x0, slope=0.01: torch.where(x0 > 0, 1.0, slope).to(x0.dtype),
)
RULES[aten.hardtanh.default] = _piecewise(
    lambda x0, lo=-1.0, hi=1.0: torch.clamp(x0, lo, hi),
    lambda x0, lo=-1.0, hi=1.0: _between(x0, lo, hi),
)
RULES[aten.clamp.default] = _piecewise(
    lambda x0, lo=None, hi=None: torch.clamp(x0, lo, hi),
    lambda x0, lo=None, hi=None: _between(x0, lo, hi),
)


# ----------------------------------------------------------------------------------------------
# products (Leibniz) and linear maps


@_register(aten.mul.Tensor)
def _mul(ctx, a, b):
    rank = _rank_of(a, b)
    if isinstance(a, Jet) and isinstance(b, Jet):
        pa, pb = Jet(_aligned(a, rank)), Jet(_aligned(b, rank))
        return bilinear(ctx, torch.mul, pa, pb)
    x, c = (a, b) if isinstance(a, Jet) else (b, a)
    return Jet(_aligned(x, rank) * c)


@_register(aten.div.Tensor)
def _div(ctx, a, b):
    if isinstance(b, Jet):
        inverse = elementwise(ctx, b, partial(_series.pow_derivatives, exponent=-1.0))
        return _mul(ctx, a, inverse)
    return Jet(_aligned(a, _rank_of(a, b)) / b)


@_register(aten.neg.default)
def _neg(ctx, x):
    return Jet(-x.data)


def _add_rule(ctx, a, b, alpha=1, sign=1):
    # a + sign * alpha * b, where at least one operand is a jet
    factor = sign * alpha
    rank = _rank_of(a, b)
    if isinstance(a, Jet) and isinstance(b, Jet):
        pb = _aligned(b, rank)
        return Jet(_aligned(a, rank) + (pb if factor == 1 else factor * pb))
    if isinstance(a, Jet):
        x, c, cx, cc = a, b, 1, factor
    else:
        x, c, cx, cc = b, a, factor, 1
    data = _aligned(x, rank)
    if cx != 1:
        data = cx * data
    # the constant only shifts the value row
    shape = torch.broadcast_shapes(data.shape[1:], torch.as_tensor(c).shape)
    data = data.expand(data.shape[0], *shape)
    value = data[0] + (c if cc == 1 else cc * c)
    return Jet(torch.cat([value.unsqueeze(0), data[1:]]))


@_register(aten.add.Tensor)
def _add(ctx, a, b, alpha=1):
    return _add_rule(ctx, a, b, alpha)


@_register(aten.sub.Tensor)
def _sub(ctx, a, b, alpha=1):
    return _add_rule(ctx, a, b, alpha, sign=-1)


@_register(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(ctx, a, b, alpha=1):
    return _add_rule(ctx, b, a, alpha, sign=-1)


def _matmul(ctx, a, b, op=torch.matmul):
    if isinstance(a, Jet) and isinstance(b, Jet):
        return bilinear(ctx, op, a, b)
    if isinstance(a, Jet):
        return Jet(op(a.data, b))
    return Jet(op(a, b.data))


def _mv(a, b):
    return torch.matmul(a, b.unsqueeze(-1)).squeeze(-1)


def _dot(a, b):
    return (a * b).sum(-1)


RULES[aten.mm.default] = _matmul
RULES[aten.bmm.default] = _matmul
RULES[aten.matmul.default] = _matmul
RULES[aten.mv.default] = partial(_matmul, op=_mv)
RULES[aten.dot.default] = partial(_matmul, op=_dot)


@_register(aten.addmm.default)
def _addmm(ctx, bias, a, b, *, beta=1, alpha=1):
    if not isinstance(a, Jet) and not isinstance(b, Jet):
        # only the bias carries the jet: the product is a constant that shifts its value row
        scaled = bias if beta == 1 else Jet(beta * bias.data)
        return _add_rule(ctx, scaled, torch.mm(a, b), alpha)
    out = _matmul(ctx, a, b)
    if alpha != 1:
        out = Jet(alpha * out.data)
    if isinstance(bias, Jet):
        return _add_rule(ctx, out, bias, beta)
    # The matmul output is a fresh tensor that autograd does not save, so the bias can be added
    # to its value row in place instead of copying the whole pack.
    out.data[0].add_(bias, alpha=beta)
    return out


# ----------------------------------------------------------------------------------------------
# shape operations and reductions: applied to all rows, dims shifted by one


def _rank(x: Jet) -> int:
    return x.data.dim() - 1


@_register(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(ctx, x, shape):
    return Jet(x.data.reshape(x.data.shape[0], *shape))


@_register(aten.unsqueeze.default)
def _unsqueeze(ctx, x, dim):
    return Jet(x.data.unsqueeze(_dim(dim, _rank(x) + 1)))


@_register(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(ctx, x, dims=None):
    if dims is None:
        dims = [i for i, s in enumerate(x.shape) if s == 1]
    elif isinstance(dims, int):
        dims = [dims]
    dims = [_dim(d, _rank(x)) for d in dims]
    return Jet(x.data.squeeze(dims) if dims else x.data)


@_register(aten.t.default)
def _t(ctx, x):
    return Jet(x.data.transpose(1, 2) if _rank(x) == 2 else x.data)


@_register(aten.transpose.int)
def _transpose(ctx, x, d0, d1):
    return Jet(x.data.transpose(_dim(d0, _rank(x)), _dim(d1, _rank(x))))


@_register(aten.permute.default)
def _permute(ctx, x, dims):
    return Jet(x.data.permute(0, *_dims(dims, _rank(x))))


@_register(aten.expand.default)
def _expand(ctx, x, sizes, implicit=False):
    return Jet(_aligned(x, len(sizes)).expand(x.data.shape[0], *sizes))


@_register(aten.slice.Tensor)
def _slice(ctx, x, dim=0, start=None, end=None, step=1):
    return Jet(aten.slice.Tensor(x.data, _dim(dim, _rank(x)), start, end, step))


@_register(aten.select.int)
def _select(ctx, x, dim, index):
    return Jet(x.data.select(_dim(dim, _rank(x)), index))


@_register(aten.index_select.default)
def _index_select(ctx, x, dim, index):
    return Jet(x.data.index_select(_dim(dim, _rank(x)), index))


@_register(aten.index.Tensor)
def _index(ctx, x, indices):
    if any(isinstance(i, Jet) for i in indices):
        raise NotImplementedError("curvkit.taylor: indexing with a jet-valued index has no rule.")
    # The row axis goes last, never indexed: with non-adjacent advanced indices torch moves the
    # broadcast index dimensions to the front, which would otherwise push the rows off axis 0.
    return Jet(aten.index.Tensor(x.data.movedim(0, -1), indices).movedim(-1, 0))


@_register(aten.flip.default)
def _flip(ctx, x, dims):
    # unlike a reduction, an empty dim list flips nothing
    return Jet(x.data.flip([_dim(d, _rank(x)) for d in dims]))


@_register(aten.clone.default, aten.alias.default, aten.contiguous.default)
def _identity(ctx, x, *args, **kwargs):
    return x


@_register(aten._to_copy.default)
def _to_copy(ctx, x, **kwargs):
    return Jet(aten._to_copy.default(x.data, **kwargs))


@_register(aten.sum.dim_IntList)
def _sum(ctx, x, dims=None, keepdim=False, *, dtype=None):
    if _rank(x) == 0:  # a 0-d tensor is its own sum; an empty dim list must not reach the rows
        return _to_copy(ctx, x, dtype=dtype) if dtype is not None else x
    return Jet(x.data.sum(_dims(dims, _rank(x)), keepdim=keepdim, dtype=dtype))


@_register(aten.sum.default)
def _sum_all(ctx, x, *, dtype=None):
    return _sum(ctx, x, None, dtype=dtype)


@_register(aten.mean.dim)
def _mean(ctx, x, dims=None, keepdim=False, *, dtype=None):
    if _rank(x) == 0:
        return _to_copy(ctx, x, dtype=dtype) if dtype is not None else x
    return Jet(x.data.mean(_dims(dims, _rank(x)), keepdim=keepdim, dtype=dtype))


@_register(aten.mean.default)
def _mean_all(ctx, x, *, dtype=None):
    return _mean(ctx, x, None, dtype=dtype)


@_register(aten.cat.default)
def _cat(ctx, tensors, dim=0):
    jets = [_promote(ctx, t) for t in tensors]
    return Jet(torch.cat([j.data for j in jets], _dim(dim, _rank(jets[0]))))


@_register(aten.stack.default)
def _stack(ctx, tensors, dim=0):
    jets = [_promote(ctx, t) for t in tensors]
    return Jet(torch.stack([j.data for j in jets], _dim(dim, _rank(jets[0]) + 1)))


@_register(aten.split.Tensor, aten.split_with_sizes.default)
def _split(ctx, x, sizes, dim=0):
    return [Jet(p) for p in torch.split(x.data, sizes, _dim(dim, _rank(x)))]


@_register(aten.unbind.int)
def _unbind(ctx, x, dim=0):
    return [Jet(p) for p in x.data.unbind(_dim(dim, _rank(x)))]


@_register(aten.where.self)
def _where(ctx, condition, a, b):
    if isinstance(condition, Jet):
        raise NotImplementedError("curvkit.taylor: torch.where with a jet condition has no rule.")
    a, b = _promote(ctx, a), _promote(ctx, b)
    rank = _rank_of(condition, a, b)
    return Jet(torch.where(condition, _aligned(a, rank), _aligned(b, rank)))


# ----------------------------------------------------------------------------------------------
# piecewise-constant functions of the value: evaluated on x_0, their derivatives vanish

PRIMAL_ONLY = {
    aten.gt.Tensor, aten.gt.Scalar, aten.lt.Tensor, aten.lt.Scalar, aten.ge.Tensor,
    aten.ge.Scalar, aten.le.Tensor, aten.le.Scalar, aten.eq.Tensor, aten.eq.Scalar,
    aten.ne.Tensor, aten.ne.Scalar, aten.sign.default, aten.floor.default, aten.ceil.default,
    aten.round.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
    aten.empty_like.default, aten.new_zeros.default, aten.new_ones.default,
    aten.new_full.default, aten.new_empty.default, aten.argmax.default, aten.argmin.default,
    aten.isnan.default, aten.isinf.default, aten.sym_size.int, aten.trunc.default,
}
