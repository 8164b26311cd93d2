"""Taylor rules of activations (GELU, SiLU, Mish, ELU/SELU/CELU, erf, LogSigmoid), softmax,
LayerNorm, RMSNorm, attention and the logsumexp/max/min/var reductions, against nested torch.func
autograd (or the formula where torch's own higher derivatives are wrong) in float64."""

import math

import pytest
import torch
import torch.nn.functional as F
from taylor_references import (
    biharmonic_reference,
    hessians,
    jet_reference,
    laplacian_reference,
    per_row,
)
from torch import nn
from torch.func import jacrev, jvp, vmap

from curvkit.pinn.base import Batch, Derivatives
from curvkit.pinn.problems import poisson
from curvkit.pinn.residuals import taylor_residuals
from curvkit.taylor import biharmonic, jet, laplacian, weighted_laplacian
from curvkit.taylor._aten_rules import RULES
from curvkit.taylor._propagation import Context, Jet, Layout


def _celu_reference(x, alpha=0.7):
    # torch's own CELU backward rounds 1/alpha to float32 (relative errors ~1e-9), so the
    # reference is the formula itself
    return torch.where(x > 0, x, alpha * torch.expm1(torch.clamp(x, max=0) / alpha))


def _layer_norm_reference(x, dims, weight=None, bias=None, eps=1e-5):
    # torch 2.14's autograd of native_layer_norm is wrong for nested forward mode (second order,
    # pytorch/pytorch#196700) and for third order in reverse (its double backward treats the
    # saved mean/rstd as constants; cf. pytorch/pytorch#176218): references use the formula
    centred = x - x.mean(dims, keepdim=True)
    out = centred / torch.sqrt((centred * centred).mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    return out + bias if bias is not None else out


class _ReferenceLayerNorm(nn.Module):
    """An ``nn.LayerNorm``'s parameters applied by the formula (for the reference networks)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        dims = tuple(range(-len(self.norm.normalized_shape), 0))
        return _layer_norm_reference(x, dims, self.norm.weight, self.norm.bias, self.norm.eps)


def _reference_network(f: nn.Sequential) -> nn.Sequential:
    """``f`` with its LayerNorms replaced by the formula, sharing every parameter."""
    return nn.Sequential(*[_ReferenceLayerNorm(m) if isinstance(m, nn.LayerNorm) else m
                           for m in f])


# (ours, reference) pairs of elementwise functions
ELEMENTWISE = {
    "erf": (torch.erf, torch.erf),
    "gelu": (F.gelu, lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"),
                  lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi)
                                                      * (x + 0.044715 * x**3)))),
    "silu": (F.silu, lambda x: x * torch.sigmoid(x)),
    "mish": (F.mish, lambda x: x * torch.tanh(torch.log1p(torch.exp(x)))),
    "elu": (F.elu, F.elu),
    "elu_alpha": (lambda x: F.elu(x, 2.5), lambda x: F.elu(x, 2.5)),
    "selu": (F.selu, F.selu),
    "celu": (lambda x: F.celu(x, 0.7), _celu_reference),
    "log_sigmoid": (F.logsigmoid, lambda x: -torch.log1p(torch.exp(-x))),
}


def _series(generator, K, shape=(3, 4)):
    x0, *xs = torch.randn(K + 1, *shape, generator=generator).unbind(0)
    return 2 * x0, xs


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_jets_match_nested_autograd(name):
    ours_fn, reference_fn = ELEMENTWISE[name]
    x0, xs = _series(torch.Generator().manual_seed(0), 4)
    value, coefficients = jet(ours_fn, 4)(x0, xs)
    for ours, ref in zip([value, *coefficients], jet_reference(reference_fn, x0, xs)):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


REDUCTIONS = {
    "softmax_0": lambda x: torch.softmax(x, 0),
    "softmax_last": lambda x: F.softmax(x, -1),
    "log_softmax_1": lambda x: F.log_softmax(x, 1),
    "softmax_size_one_dim": lambda x: torch.softmax(x.unsqueeze(1), 1) * x.unsqueeze(1),
    # a float32 softmax input with dtype= (captured as _to_copy before _softmax)
    "softmax_as_float64": lambda x: torch.softmax(x.float(), 1, dtype=torch.float64),
    "logsumexp": lambda x: torch.logsumexp(x, -1) * torch.logsumexp(x, (0, 1), keepdim=True),
    "amax_amin": lambda x: x.amax(-1) * x.amin((0, 1)),
    "max_min_dim": lambda x: x.max(0).values * x.min(1, keepdim=True).values,
    "max_min_all": lambda x: x.max() - torch.sin(x).min(),
    # products along an odd (3) and an even (4) axis, all entries (12), a dtype argument
    "prod_dims": lambda x: x.prod(0).unsqueeze(0) * x.prod(-1, keepdim=True),
    "prod_all": lambda x: torch.prod(x) * torch.prod(x.double(), 1, dtype=torch.float64).sum(),
    "var_std": lambda x: x.var(-1, keepdim=True) + x.std(0, correction=0, keepdim=True),
    "var_mean_std_mean": lambda x: torch.var_mean(x, 1)[0] * torch.std_mean(x, 1)[1],
    "layer_norm": lambda x: F.layer_norm(x, (4,)),
    # the mean and rstd outputs of native_layer_norm, which graphs rarely read
    "layer_norm_statistics": lambda x: _with_statistics(
        *torch.ops.aten.native_layer_norm(x, [4], None, None, 1e-5)),
    "rms_norm": lambda x: F.rms_norm(x, (4,), eps=1e-3),
}


def _with_statistics(out, mean, rstd):
    return out * mean + rstd


REDUCTION_REFERENCES = {
    "layer_norm": lambda x: _layer_norm_reference(x, -1),
    "layer_norm_statistics": lambda x: _with_statistics(
        _layer_norm_reference(x, -1), x.mean(-1, keepdim=True),
        torch.rsqrt(x.var(-1, correction=0, keepdim=True) + 1e-5)),
}


@pytest.mark.parametrize("name", REDUCTIONS)
def test_reduction_jets_match_nested_autograd(name):
    f = REDUCTIONS[name]
    x0, xs = _series(torch.Generator().manual_seed(1), 3)
    value, coefficients = jet(f, 3)(x0, xs)
    reference = jet_reference(REDUCTION_REFERENCES.get(name, f), x0, xs)
    rtol = 1e-6 if name == "softmax_as_float64" else 1e-10  # the tangents are cast to float32
    for ours, ref in zip([value, *coefficients], reference):
        torch.testing.assert_close(ours, ref, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("op", [torch.ops.aten._softmax.default,
                                torch.ops.aten._log_softmax.default])
def test_softmax_half_to_float_flag(op):
    """The CUDA-only ``half_to_float`` flag (the CPU kernel refuses it) gives float32 jets equal
    to those of the float32 input; without it a half input keeps its dtype."""
    data = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(28)).half()
    ctx = Context(Layout(2))
    flagged = RULES[op](ctx, Jet(data), 1, True).data
    expected = RULES[op](ctx, Jet(data.float()), 1, False).data
    assert flagged.dtype == torch.float32
    torch.testing.assert_close(flagged, expected)
    assert RULES[op](ctx, Jet(data), 1, False).data.dtype == torch.float16
    # and the float32 jets themselves are right
    reference = jet_reference(lambda x: op(x, 1, False), data[0].double(),
                              [data[1].double(), data[2].double()])
    for ours, ref in zip(expected, reference):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


def test_max_at_ties_follows_autograd():
    """Where the maximum is tied, amax averages the tied entries' slopes and max(dim) takes the
    returned index, as torch's autograd does."""
    x0 = torch.tensor([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]])
    x1 = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    for f in [lambda x: x.amax(-1), lambda x: x.max(), lambda x: x.max(1).values,
              lambda x: x.min(0).values]:
        _, (y1,) = jet(f, 1)(x0, (x1,))
        torch.testing.assert_close(y1, jvp(f, (x0,), (x1,))[1])


# ----------------------------------------------------------------------------------------------
# the public operators on small networks


def _mlp(activation, D, C=2):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 5), activation, nn.Linear(5, C))


NETS = {
    "gelu": lambda D: _mlp(nn.GELU(), D),
    "gelu_tanh": lambda D: _mlp(nn.GELU(approximate="tanh"), D),
    "silu": lambda D: _mlp(nn.SiLU(), D),
    "mish": lambda D: _mlp(nn.Mish(), D),
    "elu": lambda D: _mlp(nn.ELU(alpha=0.5), D),
    "selu": lambda D: _mlp(nn.SELU(), D),
    "celu": lambda D: _mlp(nn.CELU(alpha=1.5), D),
    "softmax": lambda D: _mlp(nn.Softmax(-1), D),
    "log_softmax": lambda D: _mlp(nn.LogSoftmax(-1), D),
    "layer_norm": lambda D: _mlp(nn.LayerNorm(5), D),
    "rms_norm": lambda D: _mlp(nn.RMSNorm(5), D),
}


@pytest.mark.parametrize("name", NETS)
def test_laplacian_and_weighted_laplacian(name):
    D = 2 + list(NETS).index(name) % 3  # input dimensions 2, 3 and 4 across the networks
    f = NETS[name](D)
    X = torch.randn(3, D, generator=torch.Generator().manual_seed(3))
    H = hessians(_reference_network(f), X)  # (N, C, D, D)
    sigma = torch.randn(D, D - 1, generator=torch.Generator().manual_seed(4))
    for collapsed in (True, False):
        torch.testing.assert_close(laplacian(f, collapsed=collapsed)(X),
                                   H.diagonal(dim1=-2, dim2=-1).sum(-1))
        result = weighted_laplacian(f, sigma, collapsed=collapsed, return_gradient=True)(X)
        torch.testing.assert_close(result.operator,
                                   torch.einsum("ncde,dr,er->nc", H, sigma, sigma))
        torch.testing.assert_close(result.gradient, vmap(jacrev(f))(X))


@pytest.mark.parametrize("name", NETS)
def test_biharmonic(name):
    f = NETS[name](2)
    X = torch.randn(2, 2, generator=torch.Generator().manual_seed(5))
    expected = biharmonic_reference(_reference_network(f), X)
    for collapsed in (True, False):
        torch.testing.assert_close(biharmonic(f, collapsed=collapsed)(X), expected)


def test_randomized_operators_average_their_directions():
    """A randomized Laplacian with S directions equals (1/S) sum_s v_s^T H v_s for its draws."""
    f = NETS["gelu"](3)
    X = torch.randn(2, 3, generator=torch.Generator().manual_seed(6))
    S = 4
    for collapsed in (True, False):
        ours = laplacian(f, randomization=("normal", S), collapsed=collapsed)(
            X, generator=torch.Generator().manual_seed(7))
        v = torch.randn(S, *X.shape, generator=torch.Generator().manual_seed(7))
        expected = torch.einsum("ncde,snd,sne->nc", hessians(f, X), v, v) / S
        torch.testing.assert_close(ours, expected)


def test_elu_kink_follows_autograd():
    """At x = 0 the slope is the left one and higher derivatives vanish, as in torch's autograd."""
    f = nn.Sequential(nn.SELU(), nn.Linear(3, 1))
    X = torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    result = laplacian(f, return_gradient=True)(X)
    torch.testing.assert_close(result.operator, laplacian_reference(f, X))
    torch.testing.assert_close(result.gradient, vmap(jacrev(f))(X))


@pytest.mark.parametrize("dim", [1, -1])
def test_softmax_along_token_dims(dim):
    """Softmax/log_softmax along each axis of per-point (2, 3) tensors, and attention scores."""
    torch.manual_seed(8)
    W = torch.randn(6, 6)

    def f(X):
        tokens = (X @ W).reshape(X.shape[0], 2, 3)
        attention = torch.softmax(tokens @ tokens.transpose(1, 2), -1) @ tokens
        return (torch.softmax(tokens, dim) * attention + F.log_softmax(tokens, dim)).flatten(1)

    X = torch.randn(3, 6, generator=torch.Generator().manual_seed(9))
    for collapsed in (True, False):
        torch.testing.assert_close(laplacian(f, collapsed=collapsed)(X), laplacian_reference(f, X))


@pytest.mark.parametrize("affine", ["none", "weight", "weight_bias"])
@pytest.mark.parametrize("normalized", [(3,), (2, 3)])
def test_layer_norm_over_last_dims(affine, normalized):
    torch.manual_seed(10)
    W = torch.randn(6, 6)
    weight = torch.randn(normalized) if affine != "none" else None
    bias = torch.randn(normalized) if affine == "weight_bias" else None
    dims = tuple(range(-len(normalized), 0))

    def ours(X):
        return F.layer_norm((X @ W).reshape(-1, 2, 3), normalized, weight, bias).flatten(1)

    def reference(X):
        return _layer_norm_reference((X @ W).reshape(-1, 2, 3), dims, weight, bias).flatten(1)

    X = torch.randn(3, 6, generator=torch.Generator().manual_seed(11))
    H = hessians(reference, X)
    for collapsed in (True, False):
        result = laplacian(ours, collapsed=collapsed, return_value=True)(X)
        torch.testing.assert_close(result.value, reference(X))
        torch.testing.assert_close(result.operator, H.diagonal(dim1=-2, dim2=-1).sum(-1))


def test_rms_norm_without_affine_and_with_eps():
    f = nn.Sequential(nn.Linear(3, 4), nn.RMSNorm(4, eps=1e-2, elementwise_affine=False),
                      nn.Linear(4, 1))
    X = torch.randn(3, 3, generator=torch.Generator().manual_seed(12))
    torch.testing.assert_close(laplacian(f)(X), laplacian_reference(f, X))


def test_float32_and_bfloat16_networks():
    """Low-precision networks agree with the float64 reference to their precision."""
    torch.manual_seed(13)
    f = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 8),
                      nn.Softmax(-1), nn.SiLU(), nn.Linear(8, 1))
    X = torch.randn(4, 3, generator=torch.Generator().manual_seed(14))
    expected = laplacian_reference(_reference_network(f), X)
    for dtype, tol in [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)]:
        low = laplacian(f.to(dtype))(X.to(dtype))
        assert low.dtype == dtype
        scale = expected.abs().max()
        assert (low.double() - expected).abs().max() <= tol * scale


def test_parameter_gradients_flow_through_new_rules():
    """d(sum of Laplacians)/dθ equals double autograd through the nested reference.

    With torch's own LayerNorm in the reference this fails: torch 2.14's third-order autograd of
    native_layer_norm is wrong (a central finite difference of the nested Laplacian in a weight
    agrees with the Taylor rules, not with it); the formula's reference agrees with both.
    """
    torch.manual_seed(15)
    f = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.GELU(), nn.Linear(5, 4),
                      nn.LogSoftmax(-1), nn.Mish(), nn.Linear(4, 1))
    X = torch.randn(3, 3, generator=torch.Generator().manual_seed(16))
    params = list(f.parameters())
    options = {"allow_unused": True, "materialize_grads": True}  # the output bias has none
    ours = torch.autograd.grad(laplacian(f)(X).sum(), params, **options)
    expected = torch.autograd.grad(laplacian_reference(_reference_network(f), X).sum(), params,
                                   **options)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("activation", [nn.SiLU, nn.GELU])
def test_pinn_residuals_with_smooth_activations(activation):
    """curvkit.pinn's general (Taylor) path on a SiLU/GELU network against torch.func."""
    problem = poisson(dim=2)
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(2, 6), activation(), nn.Linear(6, 6), activation(),
                          nn.Linear(6, 1))
    g = torch.Generator().manual_seed(18)
    batch = Batch(torch.rand(5, 2, generator=g), torch.rand(3, 2, generator=g))
    u = per_row(lambda X: model(X).squeeze(-1))
    X_in = batch.interior
    d = Derivatives(vmap(u)(X_in), vmap(jacrev(u))(X_in),
                    laplacian_reference(lambda X: model(X).squeeze(-1), X_in))
    expected = torch.cat([problem.residual(X_in, d) / math.sqrt(5),
                          (vmap(u)(batch.boundary) - problem.solution(batch.boundary))
                          / math.sqrt(3)])
    torch.testing.assert_close(taylor_residuals(model, problem, batch), expected)


# ----------------------------------------------------------------------------------------------
# attention (torch's forward AD does not support the CPU attention kernel: formula references)


def _attention_reference(q, k, v, mask=None, causal=False, scale=None):
    """``softmax(q kᵀ scale + mask) v``; rows masked throughout give zeros, as in torch."""
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    if mask is not None and mask.dtype == torch.bool:
        full = (~mask).all(-1, keepdim=True)
        scores = scores.masked_fill(~mask, -math.inf).masked_fill(full, 0.0)
        return (torch.softmax(scores, -1) @ v).masked_fill(full, 0.0)
    return torch.softmax(scores if mask is None else scores + mask, -1) @ v


def _attention_case(kind, attention):
    g = torch.Generator().manual_seed(19)
    W = torch.randn(6, 18, generator=g)
    constant = torch.randn(1, 1, 3, 2, generator=g)
    additive = torch.randn(3, 3, generator=g)
    upper = torch.ones(3, 3, dtype=torch.bool).triu()
    first_row_masked = torch.ones(3, 3, dtype=torch.bool)
    first_row_masked[0] = False

    def f(X):
        q, k, v = (X @ W).reshape(X.shape[0], 1, 3, 3, 2).unbind(2)  # (N, heads=1, L=3, E=2)
        c = constant.expand(X.shape[0], 1, 3, 2)
        args, options = {
            "plain": ((q, k, v), {}),
            "causal": ((q, k, v), {"is_causal": True}),
            "boolean_mask_and_scale": ((q, k, v), {"attn_mask": upper, "scale": 0.7}),
            "additive_mask": ((q, k, v), {"attn_mask": additive}),
            "fully_masked_row": ((q, k, v), {"attn_mask": first_row_masked}),
            "constant_key": ((q, c, v), {}),
            "constant_query_key": ((c, c, v), {}),
            # a value head size unlike the query's takes torch's math path (mul.Scalar and
            # _safe_softmax) instead of the fused CPU kernel
            "math_path": ((q, k, torch.cat([v, q], -1)), {}),
        }[kind]
        if attention is _attention_reference:
            renamed = {"attn_mask": "mask", "is_causal": "causal"}
            options = {renamed.get(name, name): o for name, o in options.items()}
        return attention(*args, **options).flatten(1)

    return f


@pytest.mark.parametrize("kind", ["plain", "causal", "boolean_mask_and_scale", "additive_mask",
                                  "fully_masked_row", "constant_key", "constant_query_key",
                                  "math_path"])
def test_scaled_dot_product_attention(kind):
    ours = _attention_case(kind, F.scaled_dot_product_attention)
    X = torch.randn(2, 6, generator=torch.Generator().manual_seed(20))
    expected = laplacian_reference(_attention_case(kind, _attention_reference), X)
    for collapsed in (True, False):
        torch.testing.assert_close(laplacian(ours, collapsed=collapsed)(X), expected)


def _self_attention_reference(attention: nn.MultiheadAttention, x):
    """Multi-head self-attention of ``x: (N, L, E)`` written out with the module's parameters."""
    heads, E = attention.num_heads, x.shape[-1]
    qkv = x @ attention.in_proj_weight.T + attention.in_proj_bias
    q, k, v = qkv.reshape(*x.shape[:2], 3, heads, E // heads).permute(2, 0, 3, 1, 4)
    return attention.out_proj(_attention_reference(q, k, v).transpose(1, 2).reshape(x.shape))


def _encoder_reference(layer: nn.TransformerEncoderLayer, x):
    """A post-norm encoder layer (GELU feed-forward) written out with the layer's parameters."""
    x = _ReferenceLayerNorm(layer.norm1)(x + _self_attention_reference(layer.self_attn, x))
    return _ReferenceLayerNorm(layer.norm2)(x + layer.linear2(F.gelu(layer.linear1(x))))


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention(need_weights):
    """need_weights=True runs torch's explicit bmm/softmax path, False the fused kernel."""
    torch.manual_seed(26)
    attention = nn.MultiheadAttention(4, 2, batch_first=True)
    embed = nn.Linear(3, 12)

    def ours(X):
        t = embed(X).reshape(X.shape[0], 3, 4)
        return attention(t, t, t, need_weights=need_weights)[0].flatten(1)

    def reference(X):
        return _self_attention_reference(attention, embed(X).reshape(X.shape[0], 3, 4)).flatten(1)

    X = torch.randn(2, 3, generator=torch.Generator().manual_seed(27))
    torch.testing.assert_close(laplacian(ours)(X), laplacian_reference(reference, X))


def test_transformer_encoder_layer():
    torch.manual_seed(21)
    layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, activation="gelu",
                                       batch_first=True).eval()
    embed = nn.Linear(3, 12)

    def tokens(X):
        return embed(X).reshape(X.shape[0], 3, 4)

    X = torch.randn(2, 3, generator=torch.Generator().manual_seed(22))
    expected = laplacian_reference(lambda X: _encoder_reference(layer, tokens(X)).sum(-1), X)
    for collapsed in (True, False):
        ours = laplacian(lambda X: layer(tokens(X)).sum(-1), collapsed=collapsed)(X)
        torch.testing.assert_close(ours, expected)


def test_safe_softmax_of_fully_masked_rows_is_zero_without_nan_gradients():
    mask = torch.zeros(3, 4)
    mask[1] = -math.inf
    mask[2, :2] = -math.inf
    x0, xs = _series(torch.Generator().manual_seed(23), 2)
    x0.requires_grad_(True)
    value, coefficients = jet(lambda x: torch.ops.aten._safe_softmax(x + mask, -1), 2)(x0, xs)

    def reference(x):
        full = torch.isinf(mask).all(-1, keepdim=True)
        return torch.softmax((x + mask).masked_fill(full, 0.0), -1).masked_fill(full, 0.0)

    for ours, ref in zip([value, *coefficients], jet_reference(reference, x0, xs)):
        torch.testing.assert_close(ours, ref)
    assert not value[1].any() and not coefficients[1][1].any()
    (gradient,) = torch.autograd.grad(coefficients[1].sum(), x0)
    assert torch.isfinite(gradient).all()


def test_new_rules_on_the_device_equal_the_cpu(device):
    """GELU, LayerNorm, softmax, SiLU, ELU and RMSNorm on the accelerator equal the CPU run."""
    torch.manual_seed(24)
    f = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 6),
                      nn.Softmax(-1), nn.SiLU(), nn.Linear(6, 6), nn.ELU(), nn.RMSNorm(6),
                      nn.Mish(), nn.Linear(6, 2)).double()
    # float64: fourth derivatives through eleven float32 layers differ between devices by
    # more than float32's default tolerance
    X = torch.randn(3, 3, generator=torch.Generator().manual_seed(25), dtype=torch.float64)
    expected = [laplacian(f)(X), biharmonic(f)(X)]
    f.to(device)
    ours = [laplacian(f)(X.to(device)), biharmonic(f)(X.to(device))]
    for a, b in zip(ours, expected):
        assert a.device == device
        torch.testing.assert_close(a.cpu(), b)


# ----------------------------------------------------------------------------------------------
# what is still refused


def test_unsupported_operator_still_names_the_op():
    message = r"laplacian: no Taylor-mode rule for ATen operator 'aten\.lgamma\.default'"
    with pytest.raises(NotImplementedError, match=message):
        laplacian(lambda X: torch.lgamma(X.exp()).sum(-1))(torch.randn(2, 3))


def test_in_place_on_a_view_or_input_is_refused():
    """An in-place op whose mutation other readers would see (through a view, or on the input)
    cannot be replaced by an out-of-place rule: it is refused, not silently wrong."""

    def through_view(X):
        y = torch.sin(X)
        y[:, 0].add_(1.0)  # mutates y through a view
        return y.sum(-1)

    def on_input(X):
        X.add_(1.0)
        return X.sum(-1)

    for f in (through_view, on_input):
        with pytest.raises(NotImplementedError, match="in-place ATen operator 'aten.add_"):
            laplacian(f)(torch.randn(2, 3))


def test_boundary_factor_products_through_the_pde_operators():
    # u = Π_i x_i (1 − x_i) · net(x), the usual hard boundary condition, with a zero factor
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))

    def u(x):
        return (x * (1 - x)).prod(-1, keepdim=True) * net(x)

    def u_reference(x):  # torch's higher derivatives of prod are NaN at a zero factor
        q = x * (1 - x)
        return q[:, :1] * q[:, 1:2] * q[:, 2:] * net(x)

    X = torch.rand(4, 3, generator=torch.Generator().manual_seed(5))
    X[0, 1] = 0.0
    H = hessians(u_reference, X)
    expected = biharmonic_reference(u_reference, X)
    for collapsed in (True, False):
        torch.testing.assert_close(laplacian(u, collapsed=collapsed)(X),
                                   H.diagonal(dim1=-2, dim2=-1).sum(-1))
        torch.testing.assert_close(biharmonic(u, collapsed=collapsed)(X), expected)


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_in_eval_mode_is_its_affine_map(affine):
    bn = nn.BatchNorm1d(4, affine=affine)
    net = nn.Sequential(nn.Linear(2, 4), bn, nn.Tanh(), nn.Linear(4, 1)).eval()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():  # running statistics and affine parameters away from 0 and 1
        bn.running_mean.copy_(torch.rand(4, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(4, generator=g))
        if affine:
            bn.weight.copy_(torch.randn(4, generator=g))
            bn.bias.copy_(torch.randn(4, generator=g))
    X = torch.rand(3, 2, generator=g)
    for collapsed in (True, False):
        torch.testing.assert_close(laplacian(net, collapsed=collapsed)(X),
                                   laplacian_reference(net, X))
    torch.testing.assert_close(biharmonic(net)(X), biharmonic_reference(net, X))


def test_batch_norm_with_batch_statistics_is_refused():
    net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).train()
    with pytest.raises(NotImplementedError, match="BatchNorm with batch statistics"):
        laplacian(net)(torch.rand(3, 2))


class _GroupNormNet(nn.Module):
    """Linear → GroupNorm over (channels, positions) or over channels alone → tanh → Linear."""

    def __init__(self, affine: bool, positions: int):
        super().__init__()
        self.positions = positions
        self.lin1 = nn.Linear(2, 6 * positions)
        self.norm = nn.GroupNorm(3, 6, affine=affine)
        self.lin2 = nn.Linear(6 * positions, 1)
        if affine:
            g = torch.Generator().manual_seed(7)
            with torch.no_grad():
                self.norm.weight.copy_(torch.randn(6, generator=g))
                self.norm.bias.copy_(torch.randn(6, generator=g))

    def forward(self, x):
        shape = (x.shape[0], 6, self.positions) if self.positions > 1 else (x.shape[0], 6)
        h = self.norm(self.lin1(x).reshape(shape))
        return self.lin2(torch.tanh(h).reshape(x.shape[0], -1))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("positions", [1, 2])
def test_group_norm(affine, positions):
    net = _GroupNormNet(affine, positions)
    X = torch.rand(3, 2, generator=torch.Generator().manual_seed(8))
    for collapsed in (True, False):
        torch.testing.assert_close(laplacian(net, collapsed=collapsed)(X),
                                   laplacian_reference(net, X))
    torch.testing.assert_close(biharmonic(net)(X), biharmonic_reference(net, X))
