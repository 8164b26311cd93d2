"""Audit regressions for curvkit.taylor: 0-d reductions, identically-zero top rows, bad outputs."""

import pytest
import torch

from curvkit.taylor import biharmonic, jet, laplacian, split_indefinite, weighted_laplacian

DT = torch.float64


def _reference_laplacian(f, X):
    def single(x):
        H = torch.func.hessian(lambda y: f(y.unsqueeze(0)).squeeze(0))(x)
        return H.diagonal(dim1=-2, dim2=-1).sum(-1)

    return torch.stack([single(x) for x in X])


def test_sum_of_zero_dim_jet_keeps_rows():
    # sum()/mean() of a 0-d tensor (empty dim list) used to sum over the packed rows as well
    torch.manual_seed(0)
    X = torch.randn(1, 2, dtype=DT)  # one row, so reducing a 0-d entry is still row-wise

    def f(x):
        return (x ** 2).sum(-1) + (x[0, 0] ** 3).sum() + (x[0, 1] ** 3).mean()

    torch.testing.assert_close(laplacian(f)(X), _reference_laplacian(f, X))
    value, (d1, d2) = jet(lambda x: (x ** 2).sum(), 2)(
        torch.tensor(2.0, dtype=DT), (torch.tensor(1.0, dtype=DT), torch.tensor(0.0, dtype=DT)))
    torch.testing.assert_close(value, torch.tensor(4.0, dtype=DT))
    torch.testing.assert_close(d1, torch.tensor(4.0, dtype=DT))
    torch.testing.assert_close(d2, torch.tensor(2.0, dtype=DT))


@pytest.mark.parametrize("operator", [laplacian, biharmonic])
def test_standard_taylor_mode_with_identically_zero_derivatives(operator):
    # x ** 0 has no non-zero derivative; the standard (non-collapsed) top block used to crash
    torch.manual_seed(0)
    X = torch.randn(3, 2, dtype=DT)

    def f(x):
        return (x ** 0).sum(-1) + x[:, 0] ** 5

    collapsed = operator(f)(X)
    standard = operator(f, collapsed=False)(X)
    torch.testing.assert_close(standard, collapsed)
    if operator is laplacian:
        torch.testing.assert_close(standard, _reference_laplacian(f, X))


def test_several_outputs_raise_a_clear_error():
    X = torch.randn(3, 2, dtype=DT)
    with pytest.raises(ValueError, match="one tensor"):
        laplacian(lambda x: (x.sum(-1), (x ** 2).sum(-1)))(X)


def test_weighted_laplacian_rejects_one_dimensional_sigma_clearly():
    # a (D,) sigma used to fail with an IndexError from the shape check itself
    X = torch.randn(3, 2, dtype=DT)
    with pytest.raises(ValueError, match=r"sigma must have shape \(D, R\)"):
        weighted_laplacian(lambda x: (x ** 2).sum(-1), torch.ones(2, dtype=DT))(X)


@pytest.mark.parametrize("op", [torch.mul, torch.add, torch.sub, torch.div])
@pytest.mark.parametrize("swap", [False, True])
def test_pull_sum_maps_the_axis_onto_a_lower_rank_operand(op, swap):
    # sum over axis 1 of op(a (R, N), b (K, 1, N)): the summed axis is axis 0 of ``a``; the
    # rewrite used to sum ``a`` over its axis 1 (N) instead, silently when R == N
    from torch.fx.experimental.proxy_tensor import make_fx

    from curvkit.taylor.rewrite import simplify

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, dtype=DT, generator=gen)
    b = torch.rand(2, 1, 3, dtype=DT, generator=gen) + 1.0

    def fn(a, b):
        return (op(b, a) if swap and op is not torch.div else op(a, b)).sum(1)

    expected = fn(a, b)
    gm, counts = simplify(make_fx(fn)(a, b), (a, b))
    assert counts["pull_sum"] > 0
    torch.testing.assert_close(gm(a, b), expected)


def test_randomized_weighted_laplacian_of_a_zero_weighting_is_zero():
    # split_indefinite(0) has no columns; the randomized estimator used to crash in torch.cat
    sigma, signs = split_indefinite(torch.zeros(2, 2, dtype=DT))
    X = torch.randn(3, 2, dtype=DT)
    g = weighted_laplacian(lambda x: (x ** 3).sum(-1), sigma, signs=signs,
                           randomization=("rademacher", 2))
    torch.testing.assert_close(g(X), torch.zeros(3, dtype=DT))


def test_detach_stops_the_taylor_coefficients():
    # make_fx records x.detach() as aten.alias, and the jet used to flow through it: the
    # detached term's derivatives were counted (Laplacian 6 + 6 x_i summed instead of 6)
    torch.manual_seed(0)
    X = torch.randn(3, 2, dtype=DT, requires_grad=True)

    def f(x):
        return (x ** 2).sum(-1) * x.detach()[:, 0] + (x.detach() ** 3).sum(-1)

    out = laplacian(f)(X)
    torch.testing.assert_close(out, 4 * X.detach()[:, 0])
    # autograd agrees that the detached factor carries no gradient
    (grad,) = torch.autograd.grad(out.sum(), X)
    torch.testing.assert_close(grad, torch.zeros_like(X))
    value, (d1, d2) = jet(lambda x: x.detach() * x, 2)(
        torch.tensor([2.0], dtype=DT), (torch.tensor([1.0], dtype=DT), torch.tensor([0.0], dtype=DT)))
    torch.testing.assert_close(d1, torch.tensor([2.0], dtype=DT))
    torch.testing.assert_close(d2, torch.tensor([0.0], dtype=DT))


def test_data_attribute_stops_the_taylor_coefficients_like_detach():
    X = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=DT)
    by_data = laplacian(lambda x: (x ** 2).sum(-1) + x.data.pow(3).sum(-1))(X)
    by_detach = laplacian(lambda x: (x ** 2).sum(-1) + x.detach().pow(3).sum(-1))(X)
    torch.testing.assert_close(by_data, torch.full((2,), 4.0, dtype=DT))  # was 4 + 6 Σ x_i
    torch.testing.assert_close(by_detach, by_data)
