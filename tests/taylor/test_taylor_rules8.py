"""Taylor rules of the eighth session: inverse trigonometric/hyperbolic functions and the other
elementwise functions, hardswish/hardsigmoid, clamp_min/clamp_max/maximum/minimum (with their
kink conventions), atan2, addcmul/addcdiv/lerp, vector norms (F.normalize) and the structural
maps, against nested torch autograd (or a formula where torch's own higher derivatives are
missing) in float64."""

import math

import pytest
import torch
import torch.nn.functional as F
from taylor_references import (
    assert_jet_matches,
    biharmonic_reference,
    jet_reference,
    laplacian_reference,
)
from torch import nn

from curvkit.taylor import biharmonic, jet, laplacian


def _hardsigmoid_formula(x):
    # torch has no double backward for hardsigmoid; the same piecewise map by clamp
    return torch.clamp(x + 3, 0, 6) / 6


def _hardswish_formula(x):
    return x * torch.clamp(x + 3, 0, 6) / 6


# name -> (function, map of a standard normal sample into its domain, reference function)
ELEMENTWISE = {
    "tan": (torch.tan, lambda z: 0.5 * z, None),
    "sinh": (torch.sinh, None, None),
    "cosh": (torch.cosh, None, None),
    "atan": (torch.atan, None, None),
    "asin": (torch.asin, lambda z: 0.8 * torch.tanh(z), None),
    "acos": (torch.acos, lambda z: 0.8 * torch.tanh(z), None),
    "asinh": (torch.asinh, None, None),
    "acosh": (torch.acosh, lambda z: 1.2 + z.abs(), None),
    "atanh": (torch.atanh, lambda z: 0.8 * torch.tanh(z), None),
    "exp2": (torch.exp2, None, None),
    "log2": (torch.log2, lambda z: 0.5 + z.abs(), None),
    "log10": (torch.log10, lambda z: 0.5 + z.abs(), None),
    # away from zero, where torch's own sinc backward cancels (zero is tested on its own)
    "sinc": (torch.sinc, lambda z: 0.3 * z.sign() + 0.5 * z, None),
    "logit": (torch.logit, torch.sigmoid, None),
    # with eps: entries below eps and above 1 - eps have zero derivatives
    "logit_eps": (lambda x: torch.logit(x, 0.2), torch.sigmoid,
                  lambda x: torch.logit(torch.clamp(x, 0.2, 0.8))),
    "hardswish": (F.hardswish, lambda z: 3 * z, _hardswish_formula),
    "hardsigmoid": (F.hardsigmoid, lambda z: 3 * z, _hardsigmoid_formula),
    "clamp_min": (lambda x: x.clamp_min(0.2).exp(), None, None),
    "clamp_max": (lambda x: x.clamp_max(-0.2).sin(), None, None),
    "softshrink": (lambda x: F.softshrink(x, 0.3).exp(), None, None),
    "hardshrink": (lambda x: F.hardshrink(x, 0.3).exp(), None, None),
    "frac": (lambda x: torch.frac(x).sin() + torch.trunc(x), lambda z: 3 * z, None),
    "deg2rad": (lambda x: torch.deg2rad(x).sin() * torch.rad2deg(x), None, None),
}


def _elementwise(name):
    f, domain, reference = ELEMENTWISE[name]
    return f, domain or (lambda z: z), reference or f


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_jets_match_nested_autograd(name):
    f, domain, reference = _elementwise(name)
    gen = torch.Generator().manual_seed(0)
    x0 = domain(torch.randn(3, 4, generator=gen))
    series = list(torch.randn(4, 3, 4, generator=gen).unbind(0))
    assert_jet_matches(f, x0, series, reference)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_biharmonic_and_laplacian_of_the_elementwise_family(name):
    f, domain, reference = _elementwise(name)
    w = torch.tensor([0.6, -0.4])

    def net(X):  # (N, 2) -> (N,): the function of a linear feature, kept in its domain
        return f(domain(X @ w + 0.1)) * X[:, 0]

    def net_reference(X):
        return reference(domain(X @ w + 0.1)) * X[:, 0]

    X = torch.randn(2, 2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(biharmonic(net)(X), biharmonic_reference(net_reference, X),
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(laplacian(net)(X), laplacian_reference(net_reference, X))


def test_sinc_through_zero_and_the_series_boundary():
    """Derivatives at 0 are ``(-1)^k π^(2k) / (2k + 1)`` (even orders) and 0 (odd); either side
    of |πx| = 2, where the rule switches from the power series to the closed form, they match
    autograd of ``sin(πx) / (πx)``."""
    x0 = torch.zeros(1)
    _, coefficients = jet(torch.sinc, 4)(x0, [torch.ones(1)] + [torch.zeros(1)] * 3)
    at_zero = [0.0, -math.pi**2 / 3, 0.0, math.pi**4 / 5, 0.0, -math.pi**6 / 7]
    torch.testing.assert_close(torch.cat(coefficients), torch.tensor(at_zero[:4]))
    # next to zero (where sin(πx) / (πx) differentiated in closed form cancels to nothing):
    # sinc^(n)(x) = sinc^(n)(0) + x sinc^(n+1)(0) + O(x²)
    x0 = torch.tensor([-1e-5, 1e-5])
    _, coefficients = jet(torch.sinc, 4)(x0, [torch.ones(2)] + [torch.zeros(2)] * 3)
    for n, ours in enumerate(coefficients):
        torch.testing.assert_close(ours, at_zero[n] + x0 * at_zero[n + 1], rtol=0, atol=1e-7)
    x0 = torch.tensor([-0.64, -0.63, 0.2, 0.63, 0.64, 1.5])
    series = list(torch.randn(4, 6, generator=torch.Generator().manual_seed(2)).unbind(0))
    value, coefficients = jet(torch.sinc, 4)(x0, series)
    reference = jet_reference(lambda x: torch.sin(math.pi * x) / (math.pi * x), x0, series)
    for ours, ref in zip([value, *coefficients], reference):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# kinks follow torch's autograd


def _derivatives_at(f, x0, order):
    """Elementwise ``[f'(x0), ..., f^(order)(x0)]`` from the jet along a unit direction."""
    series = [torch.ones_like(x0)] + [torch.zeros_like(x0)] * (order - 1)
    return jet(f, order)(x0, series)[1]


def _autograd_derivatives(f, x0, order):
    x = x0.clone().requires_grad_(True)
    out, y = [], f(x)
    for _ in range(order):
        if not y.requires_grad:
            out.append(torch.zeros_like(x0))
            continue
        (y,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        out.append(y.detach())
    return out


@pytest.mark.parametrize("name, f, kinks, order", [
    ("hardswish", F.hardswish, [-3.0, 3.0], 2),
    ("hardsigmoid", F.hardsigmoid, [-3.0, 3.0], 1),
    ("relu6", F.relu6, [0.0, 6.0], 1),
    ("clamp_min", lambda x: x.clamp_min(0.5), [0.5], 2),
    ("clamp_max", lambda x: x.clamp_max(0.5), [0.5], 2),
    ("logit_eps", lambda x: torch.logit(x, 0.25), [0.25, 0.75], 2),
    ("softshrink", lambda x: F.softshrink(x, 0.5), [-0.5, 0.5], 2),
    ("hardshrink", lambda x: F.hardshrink(x, 0.5), [-0.5, 0.5], 2),
])
def test_kinks_follow_autograd(name, f, kinks, order):
    x0 = torch.tensor(kinks)
    for ours, ref in zip(_derivatives_at(f, x0, order), _autograd_derivatives(f, x0, order)):
        torch.testing.assert_close(ours, ref)


def test_maximum_minimum_and_tensor_clamps():
    """Away from ties the selected operand's jet; at ties each operand gets half, as autograd."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 4, generator=gen)
    x0[0, :2] = x0.flip(0)[0, :2]  # ties between x and its flip (rows 0 and 2)
    series = list(torch.randn(3, 3, 4, generator=gen).unbind(0))

    def f(x):
        y = x.flip(0)
        return (torch.maximum(x.sin(), y.cos()) * torch.minimum(x, y.exp())
                + torch.clamp(x, y - 0.5, y + 0.5) + torch.clamp_min(x, y)
                + 3 * torch.clamp_max(x, y) + torch.maximum(x, y) * torch.minimum(x, y))

    value, coefficients = jet(f, 3)(x0, series)
    untied = jet_reference(f, x0, series)
    tied = torch.zeros(3, 4, dtype=torch.bool)
    tied[0, :2] = tied[2, :2] = True
    for ours, ref in zip([value, *coefficients], untied):
        torch.testing.assert_close(ours[~tied], ref[~tied], rtol=1e-10, atol=1e-10)
    # first order at the ties: the directional derivative autograd gives (half of each operand)
    ours = coefficients[0]
    _, jvp = torch.func.jvp(f, (x0,), (series[0],))
    torch.testing.assert_close(ours, jvp)


def test_norms_every_ord_and_normalize():
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(3, 4, generator=gen)
    series = list(torch.randn(3, 3, 4, generator=gen).unbind(0))

    def f(x):
        v = torch.linalg.vector_norm
        return (F.normalize(x, dim=-1) * v(x, 1, 0) + v(x, 3, -1, keepdim=True)
                + v(x, float("inf"), 0) * v(x, -float("inf"), -1, keepdim=True)
                + v(x, 0.5, (0, 1)) + x.norm() + v(x, 0, -1, keepdim=True)
                + F.cosine_similarity(x, x.flip(0).sin()).unsqueeze(-1))

    assert_jet_matches(f, x0, series)


def test_norm_of_zero_has_zero_derivatives_like_autograd():
    """At a zero vector the 2-norm's (and F.normalize's) first derivative is autograd's: the norm
    contributes nothing, so normalize(x) = x / eps; no NaN reaches the higher rows."""
    x0 = torch.zeros(2, 3)
    x0[1] = torch.tensor([1.0, -2.0, 0.5])
    series = list(torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(5)).unbind(0))
    for f in [lambda x: torch.linalg.vector_norm(x, dim=-1), lambda x: F.normalize(x, dim=-1)]:
        value, (first, second) = jet(f, 2)(x0, series)
        _, jvp = torch.func.jvp(f, (x0,), (series[0],))
        torch.testing.assert_close(first, jvp)
        assert torch.isfinite(second).all()
        torch.testing.assert_close(second[1], jet_reference(f, x0[1:], [s[1:] for s in series])
                                   [2][0])
    # hypot at (0, 0), where torch's autograd gives NaN: the same zero derivatives
    _, (first, second) = jet(lambda x: torch.hypot(x[:, 0], x[:, 2]), 2)(x0, series)
    torch.testing.assert_close(torch.stack([first[0], second[0]]), torch.zeros(2))


def test_atan2_addcmul_addcdiv_lerp():
    gen = torch.Generator().manual_seed(6)
    x0 = torch.randn(3, 4, generator=gen)
    # atan2(x, x.flip(0)) with a zero second argument, and a zero first one over a negative
    # second (the branch cut at ±π, where the quotient x / y switches to y / x)
    x0[0, 0], x0[0, 1], x0[2, 1] = 0.0, 0.0, -1.5
    series = list(torch.randn(4, 3, 4, generator=gen).unbind(0))
    c = torch.randn(4, generator=gen)

    def f(x):
        y = x.flip(0)
        return (torch.atan2(x, y) + torch.atan2(c, x) * torch.atan2(x.sin(), c)
                + torch.addcmul(x, x.sin(), y, value=0.5) + torch.addcdiv(c, x, y.exp(), value=2)
                + torch.lerp(x, y.cos(), 0.3) + torch.lerp(c, x, y.sigmoid())
                + torch.logaddexp(x, y.sin()) * torch.logaddexp(c, 40 * x)
                + torch.hypot(x, y) + torch.hypot(c, x.exp()))

    assert_jet_matches(f, x0, series)


def test_structural_maps():
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(3, 4, generator=gen)
    series = list(torch.randn(3, 3, 4, generator=gen).unbind(0))
    index = torch.tensor([[0, 3], [2, 2], [1, 0]])

    def f(x):
        s = x.sin()
        square = torch.baddbmm(s[:, :3].unsqueeze(0), x.unsqueeze(0), s.T.unsqueeze(0),
                               beta=0.5, alpha=2.0)[0]
        return (torch.cumsum(s, 1) * torch.roll(x, 1, 1) + torch.roll(s, 2)
                + s.repeat(2, 1)[1:4] + F.pad(x.gather(1, index), (1, 1), value=3.0)
                + s.masked_fill(x > 0, 2.0) + x.masked_fill(x < 0, s.sum())
                + F.pad(torch.tril(square) * torch.triu(square, 1) + square.diagonal(1).sum()
                        + torch.trace(square), (0, 1)) * x.diagonal()[:1])

    assert_jet_matches(f, x0, series)


def test_selections_sort_topk_cummax_and_embeddings():
    """Sorted/selected entries carry their own jets (ties as torch's returned indices)."""
    gen = torch.Generator().manual_seed(9)
    x0 = torch.randn(3, 4, generator=gen)
    x0[1, 2] = x0[1, 0]  # a tie in a row
    series = list(torch.randn(3, 3, 4, generator=gen).unbind(0))

    def f(x):
        s = x.sin()
        return (torch.sort(x, 0).values * torch.sort(s, dim=1, descending=True, stable=True)[0]
                + torch.topk(s * x, 2, 0, largest=False).values.sum(0)
                + torch.cummax(x, 1).values * torch.cummin(s, 0).values
                + torch.diag_embed(s[0], 1)[:3].sum(-1, keepdim=True) * x.unfold(1, 2, 2).sum(-1).repeat(1, 2))

    assert_jet_matches(f, x0, series)


# ----------------------------------------------------------------------------------------------
# the public operators on a small network with the new modules


class _Normalize(nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=-1)


class _Formula(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _network():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 6), nn.Hardswish(), nn.Linear(6, 6), _Normalize(),
                         nn.Linear(6, 6), nn.Hardsigmoid(), nn.Linear(6, 5), nn.Tanh(),
                         _Formula(lambda x: torch.atan2(x[:, :2], 1.5 + torch.cumsum(x, 1)[:, 2:4])
                                  * torch.asinh(x[:, 4:])))


def test_laplacian_and_biharmonic_of_a_network_with_the_new_modules():
    f = _network()
    # torch lacks hardsigmoid's double backward, and its vector_norm backward fails when nested
    # four times (an in-place masked_fill): the references use the formulas
    formulas = {nn.Hardswish: _hardswish_formula, nn.Hardsigmoid: _hardsigmoid_formula,
                _Normalize: lambda x: x / (x * x).sum(-1, keepdim=True).sqrt().clamp_min(1e-12)}
    reference = nn.Sequential(*[_Formula(formulas[type(m)]) if type(m) in formulas else m
                                for m in f])
    X = torch.randn(3, 2, generator=torch.Generator().manual_seed(8))
    for collapsed in (True, False):
        torch.testing.assert_close(laplacian(f, collapsed=collapsed)(X),
                                   laplacian_reference(reference, X))
    torch.testing.assert_close(biharmonic(f)(X[:2]), biharmonic_reference(reference, X[:2]))
