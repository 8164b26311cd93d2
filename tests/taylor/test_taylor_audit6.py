"""Audit regressions for curvkit.taylor: addmm with a jet bias only, non-adjacent advanced
indexing, flip over no dims, no_grad regions inside f, train/eval caching, CSE of scalars."""

import pytest
import torch
from taylor_references import hessians, jet_reference, laplacian_reference
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from curvkit.taylor import jet, laplacian, weighted_laplacian
from curvkit.taylor.rewrite import simplify

DT = torch.float64


def _assert_jet_matches(f, x0, K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    series = [torch.randn(x0.shape, dtype=DT, generator=gen) for _ in range(K)]
    value, coefficients = jet(f, K)(x0, series)
    for ours, ref in zip([value, *coefficients], jet_reference(f, x0, series)):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_addmm_whose_only_jet_is_the_bias():
    # addmm(bias, A, B) with constant A, B: the rule treated the constant product as a jet
    # (``B.data`` as packed rows) and failed or, with matching sizes, mixed up rows
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, dtype=DT, generator=gen)
    B = torch.randn(3, 2, dtype=DT, generator=gen)
    X = torch.randn(4, 2, dtype=DT, generator=gen)

    def f(x):  # the same constant row for every datum, so f acts on rows independently
        return torch.addmm(x.sin(), a.expand(x.shape[0], 3), B).pow(2).sum(-1)

    torch.testing.assert_close(laplacian(f)(X), laplacian_reference(f, X))
    A = torch.randn(4, 3, dtype=DT, generator=gen)  # (N, 3) @ (3, 2) matches the bias (N, 2)
    _assert_jet_matches(lambda x: torch.addmm(x.exp(), A, B, beta=2.0, alpha=0.5), X, 3)


def test_index_with_non_adjacent_advanced_indices():
    # x[i, :, j] puts the broadcast index dimension first; on the packed rows it used to land
    # in front of the row axis (IndexError, or wrong rows when the sizes agree)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4, 8, dtype=DT, generator=gen)
    first, last = torch.tensor([0, 1, 1]), torch.tensor([1, 1, 0])

    def f(x):
        picked = x.view(-1, 2, 2, 2)[:, first, :, last]  # (3, N, 2)
        return picked.sin().sum((0, 2)) * x[:, 0]

    torch.testing.assert_close(laplacian(f)(X), laplacian_reference(f, X))
    _assert_jet_matches(lambda x: x[torch.tensor([1, 0]), :, torch.tensor([2, 2])].exp(),
                        torch.randn(2, 3, 3, dtype=DT, generator=gen), 2)


def test_flip_over_no_dims_is_the_identity():
    # ATen reads flip(x, []) as "flip nothing"; the rule flipped every dimension instead
    x0 = torch.randn(2, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    _assert_jet_matches(lambda x: torch.flip(x, []) * x.sin(), x0, 3)


def test_no_grad_region_inside_f_is_a_constant():
    # autograd treats what f computes under no_grad as a constant; the jet flowed through it
    X = torch.randn(3, 2, dtype=DT, generator=torch.Generator().manual_seed(0))

    def f(x):
        with torch.no_grad():
            shift = (x**3).sum(-1)
        with torch.inference_mode():
            scale = x.exp().sum(-1)
        return (x**2).sum(-1) * 1.5 + shift + scale

    ref = laplacian_reference(f, X)
    torch.testing.assert_close(ref, torch.full((3,), 6.0, dtype=DT))
    torch.testing.assert_close(laplacian(f)(X), ref)
    # the operator called under no_grad is not a no_grad region of f
    def g(x):
        return (x**3).sum(-1)

    with torch.no_grad():
        torch.testing.assert_close(laplacian(g)(X), laplacian_reference(g, X))
    value, (d1,) = jet(f, 1)(X[0], (torch.ones(2, dtype=DT),))
    torch.testing.assert_close(d1, 3 * X[0].sum())


class _ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1).double()

    def forward(self, x):
        y = self.lin(x).squeeze(-1)
        return y**2 if self.training else y**3


def test_cached_graph_follows_train_and_eval_mode():
    # the cache key ignored module.training: after .eval() the train-mode graph was reused
    torch.manual_seed(0)
    model = _ModeDependent()
    X = torch.randn(3, 2, dtype=DT)
    g = laplacian(model)
    torch.testing.assert_close(g(X), laplacian_reference(model, X))
    model.eval()
    torch.testing.assert_close(g(X), laplacian_reference(model, X))
    model.train()
    torch.testing.assert_close(g(X), laplacian_reference(model, X))
    assert len(g.captured.programs) == 2


def test_cse_keeps_equal_scalars_of_different_types_apart():
    # 2 == 2.0 as dict keys: x * 2 and x * 2.0 were merged, changing the output's dtype
    x = torch.arange(6).reshape(2, 3)

    def fn(x):
        return x * 2, x * 2.0, x + True, x + 1

    expected = fn(x)
    gm, _ = simplify(make_fx(fn)(x), (x,))
    for ours, ref in zip(gm(x), expected):
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_randomized_weighted_laplacian_with_x_dependent_sigma_is_unbiased(distribution):
    # one direction per row, many copies of one point: independent single-sample estimates,
    # whose mean must lie within 5 standard errors of the truth (false alarm ~6e-7)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, dtype=DT, generator=gen)

    def f(X):
        return torch.sin(X[:, 0] * X[:, 1]) + X[:, 2] ** 3 * X[:, 0] + (X[:, 1] * X[:, 2]).exp()

    def sigma(X):
        return torch.stack([X.sin(), X**2], dim=-1)

    S = sigma(x)
    truth = torch.einsum("nde,ndr,ner->n", hessians(f, x), S, S)[0]
    M = 4000
    op = weighted_laplacian(f, sigma, randomization=(distribution, 1))
    samples = op(x.expand(M, 3).contiguous(), generator=torch.Generator().manual_seed(1))
    standard_error = samples.std() / M**0.5
    assert samples.std() > 1e-3 * truth.abs()  # a genuinely random estimator
    assert (samples.mean() - truth).abs() < 5 * standard_error
