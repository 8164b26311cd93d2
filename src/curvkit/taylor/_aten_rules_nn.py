"""Taylor rules for the activations, normalisations and reductions of PINNs and transformers.

Registered into the same ``RULES`` table as ``_aten_rules`` (imported by ``_capture``). The ATen
overloads are the ones ``make_fx`` records for the ``torch.nn`` modules and functionals:

* ``GELU`` (both ``approximate`` modes) -> ``aten.gelu.default``; ``SiLU`` -> ``aten.silu``;
  ``Mish`` -> ``aten.mish``; ``ELU``/``SELU`` -> ``aten.elu``; ``CELU`` -> ``aten.celu``;
  ``torch.erf`` -> ``aten.erf``; ``LogSigmoid`` -> ``aten.log_sigmoid_forward`` (returning
  ``(out, buffer)``): elementwise, by Faà di Bruno with the series of ``_series``.
* ``softmax``/``log_softmax`` (``torch.``, ``F.``, ``nn.``) -> ``aten._softmax`` /
  ``aten._log_softmax`` (a ``dtype=`` argument becomes a preceding ``_to_copy``).
* ``LayerNorm``/``F.layer_norm`` -> ``aten.native_layer_norm`` returning ``(out, mean, rstd)``;
  ``BatchNorm`` in eval mode -> ``aten.native_batch_norm`` (its running statistics' affine map);
  ``GroupNorm`` -> ``aten.native_group_norm``.
* ``F.scaled_dot_product_attention`` (and ``nn.MultiheadAttention``/``TransformerEncoderLayer``,
  which call it) -> on the CPU ``aten._scaled_dot_product_flash_attention_for_cpu``, or where
  that kernel does not apply (e.g. a value head size unlike the query's) torch's math path, which
  records ``mul.Scalar`` and ``aten._safe_softmax``. (Accelerator kernels have other overloads,
  not covered.)
* ``RMSNorm``/``F.rms_norm`` decompose into ``pow``, ``mean.dim``, the in-place ``add_.Scalar``
  (of ``eps``), ``rsqrt`` and ``mul``; only ``add_.Scalar`` is new.
* reductions ``prod`` (all, or ``.dim_int``), ``logsumexp``, ``amax``/``amin``, ``max``/``min``
  (all, or ``.dim`` with indices), ``var``/``std`` (and ``var_mean``/``std_mean``) with a ``correction``.

Normalisations, softmax and attention are composed from the existing exact jet rules (mean,
subtraction, Leibniz, the ``rsqrt``/``exp``/``log`` series): exact, and their full-size work (one
or two products over the normalised tensor) is what a fused rule would do as well.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from curvkit.taylor import _series
from curvkit.taylor._aten_rules import (
    RULES,
    _add,
    _add_rule,
    _dim,
    _dims,
    _matmul,
    _mean,
    _mul,
    _promote,
    _rank,
    _register,
    _sub,
    _sum,
)
from curvkit.taylor._propagation import Context, Jet, elementwise

aten = torch.ops.aten

# ----------------------------------------------------------------------------------------------
# elementwise activations


def _elementwise_rule(derivatives):
    def rule(ctx, x, *args, **kwargs):
        return elementwise(ctx, x, lambda x0, k: derivatives(x0, k, *args, **kwargs))

    return rule


RULES[aten.erf.default] = _elementwise_rule(_series.erf_derivatives)
RULES[aten.silu.default] = _elementwise_rule(_series.silu_derivatives)
RULES[aten.mish.default] = _elementwise_rule(_series.mish_derivatives)


@_register(aten.gelu.default)
def _gelu(ctx, x, *, approximate="none"):
    return elementwise(ctx, x, lambda x0, k: _series.gelu_derivatives(x0, k, approximate))


@_register(aten.elu.default)
def _elu(ctx, x, alpha=1.0, scale=1.0, input_scale=1.0):
    return elementwise(
        ctx, x, lambda x0, k: _series.elu_derivatives(x0, k, alpha, scale, input_scale))


@_register(aten.celu.default)
def _celu(ctx, x, alpha=1.0):
    # celu(x) = max(0, x) + min(0, alpha (exp(x / alpha) - 1)) = elu(x, alpha, 1, 1 / alpha)
    def derivatives(x0, k):
        out = _series.elu_derivatives(x0, k, alpha, 1.0, 1.0 / alpha)
        out[0] = torch.celu(x0, alpha)
        return out

    return elementwise(ctx, x, derivatives)


@_register(aten.log_sigmoid_forward.default)
def _log_sigmoid(ctx, x):
    # (output, buffer): the buffer only serves torch's backward; it stays a plain tensor
    _, buffer = torch.ops.aten.log_sigmoid_forward(x.primal)
    return elementwise(ctx, x, _series.log_sigmoid_derivatives), buffer


# ----------------------------------------------------------------------------------------------
# in-place add (RMSNorm's ``+ eps``) computed out of place; _capture checks that the mutated
# tensor is fresh and read by nothing else, which makes that exact


@_register(aten.add.Scalar, aten.add_.Scalar, aten.add_.Tensor)
def _add_scalar(ctx, x, other, alpha=1):
    return _add_rule(ctx, x, other, alpha)


# ----------------------------------------------------------------------------------------------
# half-precision inputs: normalisations accumulate in float32 like torch's CPU kernels


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _upcast(x: Jet) -> tuple[Jet, torch.dtype]:
    dtype = x.data.dtype
    return (Jet(x.data.float()), dtype) if dtype in _LOW_PRECISION else (x, dtype)


def _cast(x: Jet, dtype: torch.dtype) -> Jet:
    return x if x.data.dtype == dtype else Jet(x.data.to(dtype))


# ----------------------------------------------------------------------------------------------
# softmax and log_softmax


def _shifted_exp_sum(ctx: Context, x: Jet, dims: list[int]) -> tuple[Jet, Jet, Jet, Tensor]:
    """``z = x - c``, ``exp(z)`` and its sum over ``dims`` (kept), with ``c`` the value's max.

    softmax(x - c) = softmax(x) and logsumexp(x) = logsumexp(x - c) + c for any c constant along
    ``dims``, so the jet of c does not matter: shifting by the (detached) maximum of the value is
    exact for every coefficient and keeps exp from overflowing, as torch's kernels do. Like
    ``torch.logsumexp``, an infinite maximum is not subtracted (an all ``-inf`` slice stays
    ``-inf`` instead of becoming NaN).
    """
    axes = [d - 1 for d in _dims(dims, _rank(x))]
    shift = x.primal.detach().amax(axes, keepdim=True)
    shift = shift.masked_fill(torch.isinf(shift), 0.0)
    z = _add_rule(ctx, x, shift, sign=-1)
    e = elementwise(ctx, z, _series.exp_derivatives)
    return z, e, _sum(ctx, e, dims, True), shift


def _softmax_jet(ctx: Context, x: Jet, dim: int, *, log: bool) -> Jet:
    if _rank(x) == 0:  # softmax of one entry is 1 (log: 0), whatever its jet
        return ctx.constant(torch.zeros_like(x.primal) if log else torch.ones_like(x.primal))
    z, e, total, _ = _shifted_exp_sum(ctx, x, [dim])
    if log:
        return _sub(ctx, z, elementwise(ctx, total, _series.log_derivatives))
    return _mul(ctx, e, elementwise(ctx, total, partial(_series.pow_derivatives, exponent=-1.0)))


def _softmax_rule(log: bool):
    def rule(ctx: Context, x: Jet, dim: int, half_to_float: bool) -> Jet:
        x, dtype = _upcast(x)
        if half_to_float:  # CUDA's fused cast: the result is float32
            dtype = torch.float32
        return _cast(_softmax_jet(ctx, x, dim, log=log), dtype)

    return rule


def _fully_masked(x: Jet, dim: int) -> Tensor:
    """Where every entry along ``dim`` of the value is ``-inf`` (kept dim; broadcasts on rows)."""
    return (x.primal.detach() == -math.inf).all(_dim(dim, _rank(x)) - 1, keepdim=True)


@_register(aten._safe_softmax.default)
def _safe_softmax(ctx, x, dim, dtype=None):
    """Softmax giving zeros (and zero jets) on rows that are ``-inf`` throughout.

    Those rows are replaced by zeros *before* the softmax so that no NaN arises anywhere, not
    even in the backward pass of a masked_fill afterwards.
    """
    if dtype is not None:
        x = Jet(x.data.to(dtype))
    x, out_dtype = _upcast(x)
    if _rank(x) == 0:
        return _cast(_softmax_jet(ctx, x, dim, log=False), out_dtype)
    masked = _fully_masked(x, dim)
    out = _softmax_jet(ctx, Jet(x.data.masked_fill(masked, 0.0)), dim, log=False)
    return _cast(Jet(out.data.masked_fill(masked, 0.0)), out_dtype)


def _product_along(ctx, x: Jet, d: int) -> Jet:
    """Product of a jet along data axis ``d`` (the axis kept, of size one): Leibniz, pairwise.

    Halves multiplied elementwise, ``log2(n)`` batched jet products: exact with zeros and
    signs (no ``exp(Σ log)``). Boundary factors of PINN outputs, ``Π_i x_i (1 - x_i)``, are
    the common case.
    """
    while x.data.shape[d] > 1:
        n = x.data.shape[d]
        half = n // 2
        a, b, rest = torch.split(x.data, [half, half, n - 2 * half], dim=d)
        paired = _mul(ctx, Jet(a), Jet(b))
        x = Jet(torch.cat([paired.data, rest], dim=d)) if rest.shape[d] else paired
    return x


@_register(aten.prod.dim_int)
def _prod(ctx, x, dim, keepdim=False, *, dtype=None):
    if dtype is not None:
        x = Jet(x.data.to(dtype))
    rank = _rank(x)
    if rank == 0:
        return x
    d = _dim(dim, rank)
    out = _product_along(ctx, x, d)
    return out if keepdim else Jet(out.data.squeeze(d))


@_register(aten.prod.default)
def _prod_all(ctx, x, *, dtype=None):
    if dtype is not None:
        x = Jet(x.data.to(dtype))
    flat = Jet(x.data.reshape(x.data.shape[0], -1))
    return Jet(_product_along(ctx, flat, 1).data.reshape(x.data.shape[0]))


@_register(aten.logsumexp.default)
def _logsumexp(ctx, x, dim, keepdim=False):
    x, dtype = _upcast(x)
    rank = _rank(x)
    if rank == 0:
        return _cast(x, dtype)
    _, _, total, shift = _shifted_exp_sum(ctx, x, dim)
    out = _add_rule(ctx, elementwise(ctx, total, _series.log_derivatives), shift)
    if not keepdim:
        out = Jet(out.data.squeeze(_dims(dim, rank)))
    return _cast(out, dtype)


RULES[aten._softmax.default] = _softmax_rule(log=False)
RULES[aten._log_softmax.default] = _softmax_rule(log=True)


@_register(aten.mul.Scalar)
def _mul_scalar(ctx, x, other):
    return Jet(x.data * other)


def _transposed(t):
    return Jet(t.data.transpose(-2, -1)) if isinstance(t, Jet) else t.transpose(-2, -1)


@_register(aten._scaled_dot_product_flash_attention_for_cpu.default)
def _attention_cpu(ctx, query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None,
                   scale=None):
    """``softmax(q kᵀ scale + mask) v`` and the rows' logsumexp, composed from jet rules.

    Fully masked rows give zeros, like torch's kernel; ``attn_mask`` arrives additive (torch turns
    a boolean mask into ``0 / -inf`` before this op).
    """
    if dropout_p:
        raise NotImplementedError(
            "curvkit.taylor: attention dropout is random and has no Taylor rule; got "
            f"dropout_p={dropout_p} (evaluate the model in eval mode).")
    q_heads, k_heads = query.shape[-3:-2], key.shape[-3:-2]
    if q_heads != k_heads:
        raise NotImplementedError(
            "curvkit.taylor: attention with different numbers of query and key heads (grouped "
            f"query attention) has no Taylor rule; got {tuple(query.shape)} and "
            f"{tuple(key.shape)}.")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if isinstance(query, Jet) or isinstance(key, Jet):
        scores = _mul_scalar(ctx, _matmul(ctx, query, _transposed(key)), scale)
    else:
        scores = query @ key.transpose(-2, -1) * scale
    L, S = scores.shape[-2], scores.shape[-1]
    if is_causal:  # top-left aligned, as torch's kernels
        like = scores.primal if isinstance(scores, Jet) else scores
        keep = torch.ones(L, S, dtype=torch.bool, device=like.device).tril()
        bias = torch.zeros(L, S, dtype=like.dtype, device=like.device)
        attn_mask = bias.masked_fill(~keep, -math.inf)
    if attn_mask is not None:
        scores = (_add(ctx, scores, attn_mask) if isinstance(scores, Jet) or isinstance(
            attn_mask, Jet) else scores + attn_mask)
    if not isinstance(scores, Jet):  # only the values carry the jet
        probabilities = torch.ops.aten._safe_softmax(scores, -1)
        lse = torch.logsumexp(scores, -1)
        return _matmul(ctx, probabilities, value), ctx.constant(lse)
    scores, dtype = _upcast(scores)
    masked = _fully_masked(scores, -1)
    _, e, total, shift = _shifted_exp_sum(ctx, Jet(scores.data.masked_fill(masked, 0.0)), [-1])
    probabilities = _mul(ctx, e, elementwise(
        ctx, total, partial(_series.pow_derivatives, exponent=-1.0)))
    probabilities = _cast(Jet(probabilities.data.masked_fill(masked, 0.0)), dtype)
    lse = _add_rule(ctx, elementwise(ctx, total, _series.log_derivatives), shift)
    lse = Jet(lse.data.masked_fill(masked, 0.0).squeeze(-1))
    return _matmul(ctx, probabilities, value), _cast(lse, dtype)


# ----------------------------------------------------------------------------------------------
# layer normalisation, variance


def _rsqrt(ctx: Context, x: Jet) -> Jet:
    return elementwise(ctx, x, partial(_series.pow_derivatives, exponent=-0.5))


@_register(aten.native_batch_norm.default)
def _batch_norm(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
    """Eval-mode BatchNorm: the per-channel affine map of the running statistics.

    Returns ``(out, save_mean, save_invstd)`` as ATen does in eval mode (the last two empty).
    Training mode normalises by the statistics of the batch, so each point's output depends on
    the others: no derivative of ``u(x)`` exists there.
    """
    if training or running_mean is None or running_var is None:
        raise NotImplementedError(
            "curvkit.taylor: BatchNorm with batch statistics (training mode, or no running "
            "statistics) couples the points of a batch, so u(x) has no derivatives of its own; "
            "call model.eval() (with track_running_stats=True).")
    x = _promote(ctx, x)
    shape = (-1,) + (1,) * (_rank(x) - 2)  # channels on dim 1
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    out = _add_rule(ctx, _mul(ctx, x, scale.reshape(shape)), shift.reshape(shape))
    empty = x.data.new_empty(0)
    return out, empty, empty


@_register(aten.native_layer_norm.default)
def _layer_norm(ctx, x, normalized_shape, weight, bias, eps):
    """``(x - mean) * rstd * weight + bias`` over the last ``len(normalized_shape)`` dims.

    Returns ``(out, mean, rstd)`` like ATen (``mean``/``rstd`` keep the normalised dims as size
    one); graphs usually read only ``out``, and the other two jets are by-products.
    """
    x, dtype = _upcast(_promote(ctx, x))
    rank = _rank(x)
    dims = list(range(rank - len(normalized_shape), rank))
    mean = _mean(ctx, x, dims, True)
    centred = _sub(ctx, x, mean)
    variance = _mean(ctx, _mul(ctx, centred, centred), dims, True)
    rstd = _rsqrt(ctx, _add(ctx, variance, eps))
    out = _mul(ctx, centred, rstd)
    if weight is not None:
        out = _mul(ctx, out, weight)
    if bias is not None:
        out = _add(ctx, out, bias)
    return _cast(out, dtype), _cast(mean, dtype), _cast(rstd, dtype)


@_register(aten.native_group_norm.default)
def _group_norm(ctx, x, weight, bias, N, C, HxW, group, eps):
    """GroupNorm: each example's channels in ``group`` groups normalised over (channels, space).

    ``x: (N, C, *)`` viewed as ``(N, group, C/group · HxW)``, normalised over the last axis as
    LayerNorm does, viewed back, then the per-channel affine map. Returns ``(out, mean, rstd)``
    with ``mean``/``rstd`` of shape ``(N, group)`` like ATen.
    """
    x, dtype = _upcast(_promote(ctx, x))
    shape = x.data.shape
    grouped = Jet(x.data.reshape(shape[0], N, group, -1))
    mean = _mean(ctx, grouped, [2], True)
    centred = _sub(ctx, grouped, mean)
    rstd = _rsqrt(ctx, _add(ctx, _mean(ctx, _mul(ctx, centred, centred), [2], True), eps))
    out = Jet(_mul(ctx, centred, rstd).data.reshape(shape))
    channels = (-1,) + (1,) * (len(shape) - 3)  # weight and bias act on dim 1 of x
    if weight is not None:
        out = _mul(ctx, out, weight.reshape(channels))
    if bias is not None:
        out = _add(ctx, out, bias.reshape(channels))
    statistics = [_cast(Jet(t.data.reshape(shape[0], N, group)), dtype) for t in (mean, rstd)]
    return _cast(out, dtype), *statistics


def _variance(ctx: Context, x: Jet, dims, correction, keepdim: bool) -> tuple[Jet, Jet]:
    """``sum((x - mean)^2) / max(n - correction, 0)`` over ``dims`` and the mean (kept dims)."""
    rank = _rank(x)
    reduced = [d - 1 for d in _dims(dims, rank)] if rank else []
    n = math.prod(x.shape[d] for d in reduced)
    correction = 1 if correction is None else correction
    mean = _mean(ctx, x, dims, True)
    centred = _sub(ctx, x, mean)
    squares = _sum(ctx, _mul(ctx, centred, centred), dims, keepdim)
    # like torch: a non-positive denominator gives inf/nan, not an error
    variance = Jet(squares.data / torch.tensor(max(n - correction, 0), dtype=squares.data.dtype))
    if not keepdim and rank:
        mean = Jet(mean.data.squeeze(_dims(dims, rank)))
    return variance, mean


@_register(aten.var.correction)
def _var(ctx, x, dim=None, *, correction=None, keepdim=False):
    return _variance(ctx, x, dim, correction, keepdim)[0]


@_register(aten.std.correction)
def _std(ctx, x, dim=None, *, correction=None, keepdim=False):
    variance = _variance(ctx, x, dim, correction, keepdim)[0]
    return elementwise(ctx, variance, partial(_series.pow_derivatives, exponent=0.5))


@_register(aten.var_mean.correction)
def _var_mean(ctx, x, dim=None, *, correction=None, keepdim=False):
    return _variance(ctx, x, dim, correction, keepdim)


@_register(aten.std_mean.correction)
def _std_mean(ctx, x, dim=None, *, correction=None, keepdim=False):
    variance, mean = _variance(ctx, x, dim, correction, keepdim)
    return elementwise(ctx, variance, partial(_series.pow_derivatives, exponent=0.5)), mean


# ----------------------------------------------------------------------------------------------
# max/min: the jet of the selected entry
#
# Where the extremum is attained at a single entry it stays there in a neighbourhood, so the
# reduction equals that entry and its jet is exact. At ties (a kink) the rules follow torch's
# autograd: ``amax``/``max()`` average the tied entries' jets, ``max(dim)`` takes the entry at the
# returned index.


def _extremum_all(reduce):
    def rule(ctx, x, dim=(), keepdim=False):
        rank = _rank(x)
        if rank == 0:
            return x
        axes = [d - 1 for d in _dims(dim, rank)]
        x0 = x.primal.detach()
        hits = (x0 == reduce(x0, axes, keepdim=True)).to(x0.dtype)
        weights = hits / hits.sum(axes, keepdim=True)
        return Jet((x.data * weights).sum(_dims(dim, rank), keepdim=keepdim))

    return rule


RULES[aten.amax.default] = _extremum_all(torch.amax)
RULES[aten.amin.default] = _extremum_all(torch.amin)


@_register(aten.max.default)
def _max_all(ctx, x):
    return RULES[aten.amax.default](ctx, x)


@_register(aten.min.default)
def _min_all(ctx, x):
    return RULES[aten.amin.default](ctx, x)


def _extremum_dim(reduce):
    def rule(ctx, x, dim, keepdim=False):
        rank = _rank(x)
        if rank == 0:
            return x, torch.zeros((), dtype=torch.long, device=x.data.device)
        _, indices = reduce(x.primal.detach(), dim, keepdim=True)
        d = _dim(dim, rank)
        picked = x.data.gather(d, indices.unsqueeze(0).expand(x.data.shape[0], *indices.shape))
        if not keepdim:
            picked, indices = picked.squeeze(d), indices.squeeze(d - 1)
        return Jet(picked), indices

    return rule


RULES[aten.max.dim] = _extremum_dim(torch.max)
RULES[aten.min.dim] = _extremum_dim(torch.min)


# the remaining elementwise/piecewise functions, norms and structural maps register themselves
from curvkit.taylor import _aten_rules_math, _aten_rules_shape  # noqa: E402, F401
