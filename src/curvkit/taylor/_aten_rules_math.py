"""Taylor rules for the remaining elementwise functions and the two-argument piecewise maps.

Registered into the same ``RULES`` table as ``_aten_rules`` (imported by ``_aten_rules_nn``):

* smooth unary functions by Faà di Bruno: ``tan``, ``sinh``, ``cosh``, the inverse trigonometric
  and hyperbolic functions (``atan``, ``asin``, ``acos``, ``asinh``, ``acosh``, ``atanh``),
  ``exp2``, ``log2``, ``log10``, ``sinc`` and ``logit`` (with or without ``eps``);
* ``atan2``, ``hypot``, ``logaddexp``, ``addcmul``/``addcdiv`` and ``lerp`` of jets, composed
  from the product and series rules; ``deg2rad``/``rad2deg`` (linear);
* piecewise maps: ``hardswish``, ``hardsigmoid``, ``softshrink``/``hardshrink``, ``frac``,
  ``clamp_min``/``clamp_max`` (scalar or tensor bounds), ``clamp`` with tensor bounds,
  ``maximum``/``minimum``.

Kinks follow torch's autograd (checked against it in the tests): ``hardsigmoid`` has slope zero
at ``x = ±3``; ``hardswish`` slope ``0`` at ``-3`` and ``1`` at ``3`` with a zero second
derivative there; scalar ``clamp_min``/``clamp_max`` slope zero at the bound (like ``clamp``);
``maximum``/``minimum`` and tensor-bound clamps give each tied operand half the jet; ``logit``
with ``eps`` has slope ``1 / (x (1 - x))`` on the closed interval ``[eps, 1 - eps]`` and zero
outside; ``softshrink``/``hardshrink`` have slope zero at ``±lambd``; ``hypot`` has zero
derivatives at ``(0, 0)`` (torch's autograd gives NaN there).
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
    _div,
    _mul,
    _promote,
    _rank_of,
    _register,
    _sub,
    _unary,
)
from curvkit.taylor._aten_rules_shape import _root
from curvkit.taylor._propagation import Context, Jet, elementwise

aten = torch.ops.aten

# ----------------------------------------------------------------------------------------------
# derivative tables ``[phi(x), phi'(x), ..., phi^(order)(x)]``


def tan_derivatives(x: Tensor, order: int) -> list:
    """``tan' = 1 + tan²``: every derivative is a polynomial in the value."""
    return _series._from_ode(torch.tan(x), order, (1.0, 0.0, 1.0))


def _alternating(even: Tensor, odd: Tensor, order: int) -> list:
    return [even if n % 2 == 0 else odd for n in range(order + 1)]


def sinh_derivatives(x: Tensor, order: int) -> list:
    """``sinh, cosh, sinh, ...``."""
    return _alternating(torch.sinh(x), torch.cosh(x), order)


def cosh_derivatives(x: Tensor, order: int) -> list:
    """``cosh, sinh, cosh, ...``."""
    return _alternating(torch.cosh(x), torch.sinh(x), order)


def _quadratic_power_antiderivative(value: Tensor, x: Tensor, order: int, a: float, b: float,
                                    p: float, scale: float = 1.0) -> list:
    """Derivatives of ``phi`` with ``phi' = scale (a + b x²)^p``: the inverse trig family.

    ``phi^(n+1)`` is the ``n``-th derivative of ``(a + b x²)^p``, by the scalar Faà di Bruno
    formula with the inner series ``(q, 2 b x, 2 b, 0, ...)``.
    """
    out = [value]
    if order == 0:
        return out
    q = a + b * x * x
    inner = [q, 2 * b * x, torch.full_like(x, 2 * b)][:order]
    inner += [None] * (order - len(inner))
    slope = _series.compose(_series.pow_derivatives(q, order - 1, p), inner)
    return out + [scale * s for s in slope]


def atan_derivatives(x: Tensor, order: int) -> list:
    """``atan' = 1 / (1 + x²)``."""
    return _quadratic_power_antiderivative(torch.atan(x), x, order, 1.0, 1.0, -1.0)


def asin_derivatives(x: Tensor, order: int) -> list:
    """``asin' = (1 - x²)^(-1/2)``."""
    return _quadratic_power_antiderivative(torch.asin(x), x, order, 1.0, -1.0, -0.5)


def acos_derivatives(x: Tensor, order: int) -> list:
    """``acos' = -(1 - x²)^(-1/2)``."""
    return _quadratic_power_antiderivative(torch.acos(x), x, order, 1.0, -1.0, -0.5, -1.0)


def asinh_derivatives(x: Tensor, order: int) -> list:
    """``asinh' = (1 + x²)^(-1/2)``."""
    return _quadratic_power_antiderivative(torch.asinh(x), x, order, 1.0, 1.0, -0.5)


def acosh_derivatives(x: Tensor, order: int) -> list:
    """``acosh' = (x² - 1)^(-1/2)``."""
    return _quadratic_power_antiderivative(torch.acosh(x), x, order, -1.0, 1.0, -0.5)


def atanh_derivatives(x: Tensor, order: int) -> list:
    """``atanh' = 1 / (1 - x²)``."""
    return _quadratic_power_antiderivative(torch.atanh(x), x, order, 1.0, -1.0, -1.0)


def exp2_derivatives(x: Tensor, order: int) -> list:
    """``(2^x)^(n) = ln(2)^n 2^x``."""
    e = torch.exp2(x)
    return [e] + [math.log(2.0) ** n * e for n in range(1, order + 1)]


def _log_base_derivatives(x: Tensor, order: int, value: Tensor, base: float) -> list:
    scale = 1.0 / math.log(base)
    return [value] + [scale * d for d in _series.log_derivatives(x, order)[1:]]


def log2_derivatives(x: Tensor, order: int) -> list:
    """``log2 = log / ln 2``."""
    return _log_base_derivatives(x, order, torch.log2(x), 2.0)


def log10_derivatives(x: Tensor, order: int) -> list:
    """``log10 = log / ln 10``."""
    return _log_base_derivatives(x, order, torch.log10(x), 10.0)


# |πx| below which sinc's derivatives come from its power series: the closed form divides by
# powers of πx and cancels catastrophically near zero; the series' terms (πx)^(2j) / (2j+1)! have
# fallen below 1e-17 relative by j = 14 on this interval.
_SINC_SERIES_RADIUS, _SINC_SERIES_TERMS = 2.0, 16


def sinc_derivatives(x: Tensor, order: int) -> list:
    """``sinc(x) = sin(πx) / (πx)`` (``1`` at ``0``); ``sinc^(n)(x) = π^n s^(n)(πx)``.

    ``s(u) = sin(u) / u``: for ``|u| >= 2`` Leibniz on ``sin(u) · u^(-1)``,
    ``s^(n) = sum_j C(n, j) sin^(j)(u) (-1)^(n-j) (n-j)! u^(-(n-j+1))``; below, the power series
    ``s^(n)(u) = sum_{2j >= n} (-1)^j u^(2j-n) / ((2j-n)! (2j+1))``, smooth through ``u = 0``
    (where torch's autograd agrees: ``sinc'(0) = 0``).
    """
    out = [torch.sinc(x)]
    if order == 0:
        return out
    u = math.pi * x
    small = u.abs() < _SINC_SERIES_RADIUS
    u_far = torch.where(small, _SINC_SERIES_RADIUS, u)  # keeps the unused branch finite
    u_near = torch.where(small, u, 0.0)
    sines = _series.sin_derivatives(u_far, order)
    inverse = 1.0 / u_far
    for n in range(1, order + 1):
        far = sum(math.comb(n, j) * sines[j] * (-1) ** (n - j) * math.factorial(n - j)
                  * inverse ** (n - j + 1) for j in range(n + 1))
        near = sum((-1) ** j / (math.factorial(2 * j - n) * (2 * j + 1)) * u_near ** (2 * j - n)
                   for j in range((n + 1) // 2, _SINC_SERIES_TERMS + 1))
        out.append(math.pi**n * torch.where(small, near, far))
    return out


def logit_derivatives(x: Tensor, order: int, eps: float | None = None) -> list:
    """``logit(x) = log(x / (1 - x))``: ``logit^(n) = (n-1)! ((-1)^(n-1) x^(-n) + (1-x)^(-n))``.

    With ``eps`` torch clamps ``x`` to ``[eps, 1 - eps]`` first: outside, the derivatives are
    zero; on the closed interval (bounds included, as torch's autograd) they are the formula's.
    """
    out = [torch.logit(x, eps)]
    if order == 0:
        return out
    inside = None if eps is None else (x >= eps) & (x <= 1 - eps)
    a, b = torch.reciprocal(x), torch.reciprocal(1 - x)
    pa, pb = a, b
    for n in range(1, order + 1):
        d = math.factorial(n - 1) * ((-1) ** (n - 1) * pa + pb)
        out.append(d if inside is None else torch.where(inside, d, 0.0))
        pa, pb = pa * a, pb * b
    return out


for _op, _fn in [
    (aten.tan.default, tan_derivatives),
    (aten.sinh.default, sinh_derivatives),
    (aten.cosh.default, cosh_derivatives),
    (aten.atan.default, atan_derivatives),
    (aten.asin.default, asin_derivatives),
    (aten.acos.default, acos_derivatives),
    (aten.asinh.default, asinh_derivatives),
    (aten.acosh.default, acosh_derivatives),
    (aten.atanh.default, atanh_derivatives),
    (aten.exp2.default, exp2_derivatives),
    (aten.log2.default, log2_derivatives),
    (aten.log10.default, log10_derivatives),
    (aten.sinc.default, sinc_derivatives),
    (aten.logit.default, logit_derivatives),
]:
    RULES[_op] = _unary(_fn)


# ----------------------------------------------------------------------------------------------
# piecewise polynomial activations


def hardsigmoid_derivatives(x: Tensor, order: int) -> list:
    """``relu6(x + 3) / 6``: slope ``1/6`` on the open interval ``(-3, 3)``, else zero."""
    slope = torch.where((x > -3) & (x < 3), 1.0 / 6.0, 0.0).to(x.dtype)
    return _series.piecewise_linear_derivatives(torch.nn.functional.hardsigmoid(x), slope, order)


def hardswish_derivatives(x: Tensor, order: int) -> list:
    """``x relu6(x + 3) / 6``: ``0``, ``x (x + 3) / 6``, ``x`` on the three pieces.

    As torch's autograd: slope ``0`` at ``-3`` and ``1`` at ``3`` (the outer pieces'), second
    derivative ``1/3`` on the open interval only.
    """
    out = [torch.nn.functional.hardswish(x)]
    if order >= 1:
        middle = (x > -3) & (x < 3)
        out.append(torch.where(middle, x / 3 + 0.5, (x >= 3).to(x.dtype)))
    if order >= 2:
        out.append(torch.where(middle, 1.0 / 3.0, 0.0).to(x.dtype))
    return out + [None] * (order - 2)


RULES[aten.hardsigmoid.default] = _unary(hardsigmoid_derivatives)
RULES[aten.hardswish.default] = _unary(hardswish_derivatives)


def _shrink(shrink):
    """``softshrink``/``hardshrink``: slope one where ``|x| > lambd``, zero inside.

    At ``±lambd`` the slope is zero, as in torch's autograd.
    """

    def rule(ctx, x, lambd=0.5):
        return elementwise(ctx, x, lambda x0, k: _series.piecewise_linear_derivatives(
            shrink(x0, lambd), (x0.abs() > lambd).to(x0.dtype), k))

    return rule


RULES[aten.softshrink.default] = _shrink(torch.nn.functional.softshrink)
RULES[aten.hardshrink.default] = _shrink(torch.nn.functional.hardshrink)
# frac(x) = x - trunc(x): slope one, the jumps at integers are piecewise constant (as autograd)
RULES[aten.frac.default] = _unary(lambda x0, k: _series.piecewise_linear_derivatives(
    torch.frac(x0), torch.ones_like(x0), k))
RULES[aten.deg2rad.default] = lambda ctx, x: Jet(x.data * (math.pi / 180.0))
RULES[aten.rad2deg.default] = lambda ctx, x: Jet(x.data * (180.0 / math.pi))


def _clamp_scalar(bound_name: str):
    def rule(ctx, x, bound):
        if bound_name == "min":
            value, slope = (lambda x0: torch.clamp_min(x0, bound)), (lambda x0: x0 > bound)
        else:
            value, slope = (lambda x0: torch.clamp_max(x0, bound)), (lambda x0: x0 < bound)
        return elementwise(ctx, x, lambda x0, k: _series.piecewise_linear_derivatives(
            value(x0), slope(x0).to(x0.dtype), k))

    return rule


RULES[aten.clamp_min.default] = _clamp_scalar("min")
RULES[aten.clamp_max.default] = _clamp_scalar("max")


def _select(ctx: Context, a, b, *, larger: bool) -> Jet:
    """The jet of ``maximum(a, b)`` (``larger``) or ``minimum``: the selected operand's jet.

    At ties (a kink) each operand gets half, as torch's autograd does.
    """
    a, b = _promote(ctx, a), _promote(ctx, b)
    rank = _rank_of(a, b)
    A, B = _aligned(a, rank), _aligned(b, rank)
    a0, b0 = A[0].detach(), B[0].detach()
    first = a0 > b0 if larger else a0 < b0
    second = b0 > a0 if larger else b0 < a0
    return Jet(torch.where(first, A, torch.where(second, B, 0.5 * (A + B))))


RULES[aten.maximum.default] = partial(_select, larger=True)
RULES[aten.minimum.default] = partial(_select, larger=False)
RULES[aten.clamp_min.Tensor] = partial(_select, larger=True)
RULES[aten.clamp_max.Tensor] = partial(_select, larger=False)
# cosine_similarity clamps a fresh tensor in place; _capture checks that it is read nowhere else
RULES[aten.clamp_min_.Tensor] = partial(_select, larger=True)


@_register(aten.clamp.Tensor)
def _clamp_tensor(ctx, x, min=None, max=None):  # noqa: A002  (ATen's argument names)
    """``minimum(maximum(x, min), max)``: ties share the jet as in torch's autograd."""
    out = x if min is None else _select(ctx, x, min, larger=True)
    return out if max is None else _select(ctx, out, max, larger=False)


# ----------------------------------------------------------------------------------------------
# two-argument smooth functions composed from the product rules


@_register(aten.atan2.default)
def _atan2(ctx, y, x):
    """``atan2(y, x)``: locally ``atan(y / x) + c`` where ``|x| >= |y|``, else ``c - atan(x / y)``.

    Both quotients are bounded by one where used, so neither branch divides by a small number; the
    unused branch sees a unit denominator instead (no NaN reaches autograd). At ``(0, 0)`` atan2
    is not differentiable and the derivatives are not finite.
    """
    y, x = _promote(ctx, y), _promote(ctx, x)
    rank = _rank_of(y, x)
    Y, X = Jet(_aligned(y, rank)), Jet(_aligned(x, rank))
    shape = torch.broadcast_shapes(Y.shape, X.shape)
    Y, X = Jet(Y.data.expand(Y.data.shape[0], *shape)), Jet(X.data.expand(X.data.shape[0], *shape))
    y0, x0 = Y.primal.detach(), X.primal.detach()
    use_x = x0.abs() >= y0.abs()
    one = ctx.constant(torch.ones_like(y0)).data

    def safe(denominator: Jet, keep: Tensor) -> Jet:
        return Jet(torch.where(keep, denominator.data, one))

    atan = _unary(atan_derivatives)
    by_x = atan(ctx, _div(ctx, Y, safe(X, use_x)))
    by_y = atan(ctx, _div(ctx, X, safe(Y, ~use_x)))
    data = torch.where(use_x, by_x.data, -by_y.data)
    return Jet(torch.cat([torch.atan2(Y.primal, X.primal).unsqueeze(0), data[1:]]))


def _scaled(x: Jet, value) -> Jet:
    return x if value == 1 else Jet(value * x.data)


@_register(aten.addcmul.default)
def _addcmul(ctx, x, a, b, *, value=1):
    product = _mul(ctx, _promote(ctx, a), b)
    return _add_rule(ctx, x, _scaled(product, value))


@_register(aten.addcdiv.default)
def _addcdiv(ctx, x, a, b, *, value=1):
    quotient = _div(ctx, _promote(ctx, a), b)
    return _add_rule(ctx, x, _scaled(quotient, value))


@_register(aten.lerp.Scalar, aten.lerp.Tensor)
def _lerp(ctx, start, end, weight):
    """``start + weight (end - start)`` (a jet ``weight`` by Leibniz)."""
    step = _sub(ctx, _promote(ctx, end), start)
    return _add_rule(ctx, start, _mul(ctx, step, weight) if isinstance(weight, (Jet, Tensor))
                     else Jet(weight * step.data))


@_register(aten.logaddexp.default)
def _logaddexp(ctx, a, b):
    """``m + log(exp(a - m) + exp(b - m))`` with ``m`` the larger value.

    ``m`` is a constant (the value's maximum): exact for every coefficient, and no overflow.
    """
    a, b = _promote(ctx, a), _promote(ctx, b)
    shift = torch.maximum(a.primal, b.primal).detach()
    shift = shift.masked_fill(torch.isinf(shift), 0.0)
    exp = _unary(_series.exp_derivatives)
    total = _add_rule(ctx, exp(ctx, _add_rule(ctx, a, shift, sign=-1)),
                      exp(ctx, _add_rule(ctx, b, shift, sign=-1)))
    return _add_rule(ctx, _unary(_series.log_derivatives)(ctx, total), shift)


@_register(aten.hypot.default)
def _hypot(ctx, a, b):
    """``sqrt(a² + b²)``.

    At ``a = b = 0`` (a cone point, where torch's autograd gives NaN) the derivatives are zero,
    the convention of ``linalg_vector_norm``.
    """
    a, b = _promote(ctx, a), _promote(ctx, b)
    return _root(ctx, _add_rule(ctx, _mul(ctx, a, a), _mul(ctx, b, b)), 0.5)
