import pytest
import torch
from taylor_references import biharmonic_reference, hessians, laplacian_reference
from torch import nn

from curvkit.taylor import (
    DifferentialResult,
    biharmonic,
    laplacian,
    split_indefinite,
    weighted_laplacian,
)
from curvkit.taylor._propagation import Layout


def _net(D=3, C=1, activation=nn.Tanh, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(D, 6), activation(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, C)]
    return nn.Sequential(*layers)


def _scalar(net):
    return lambda X: net(X).squeeze(-1)


CASES = {
    "module_vector": lambda: _net(C=2),
    "function_scalar": lambda: _scalar(_net(activation=nn.Softplus)),
    "sin_residual": lambda: (lambda X: torch.sin(X).sum(-1) * X[:, 0] + (X**3).sum(-1)),
}


@pytest.mark.parametrize("collapsed", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_laplacian_matches_hessian_trace(case, collapsed):
    f = CASES[case]()
    X = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(laplacian(f, collapsed=collapsed)(X), laplacian_reference(f, X))


def test_laplacian_returns_value_and_gradient():
    f = _net(C=2)
    X = torch.randn(5, 3)
    result = laplacian(f, return_value=True, return_gradient=True)(X)
    assert isinstance(result, DifferentialResult)
    torch.testing.assert_close(result.value, f(X))
    torch.testing.assert_close(result.gradient, torch.func.vmap(torch.func.jacrev(f))(X))
    torch.testing.assert_close(result.operator, laplacian_reference(f, X))
    only_value = laplacian(f, return_value=True)(X)
    assert only_value.gradient is None and only_value.value.shape == (5, 2)
    randomized = laplacian(f, randomization=("normal", 3), return_gradient=True)(X)
    assert randomized.value is None
    torch.testing.assert_close(randomized.gradient, result.gradient)


@pytest.mark.parametrize("collapsed", [True, False])
@pytest.mark.parametrize("weighting", ["identity", "diagonal", "half_rank", "x_dependent"])
def test_weighted_laplacian_matches_hessian(weighting, collapsed):
    D = 4
    f = _net(D=D, C=2)
    X = torch.randn(3, D)
    H = hessians(f, X)  # (N, C, D, D)
    if weighting == "x_dependent":
        def sigma(X):
            return torch.stack([X.sin(), X**2], dim=-1)  # (N, D, 2)

        S = sigma(X)
        expected = torch.einsum("ncde,ndr,ner->nc", H, S, S)
    else:
        sigma = {"identity": torch.eye(D), "diagonal": torch.diag(torch.arange(1.0, D + 1)),
                 "half_rank": torch.diag(torch.tensor([1.0, 2.0, 0.0, 0.0]))[:, :2]}[weighting]
        expected = torch.einsum("ncde,dr,er->nc", H, sigma, sigma)
    ours = weighted_laplacian(f, sigma, collapsed=collapsed, return_gradient=True)(X)
    torch.testing.assert_close(ours.operator, expected)
    torch.testing.assert_close(ours.gradient, torch.func.vmap(torch.func.jacrev(f))(X))


@pytest.mark.parametrize("collapsed", [True, False])
def test_indefinite_weighting_by_sign_split(collapsed):
    D = 3
    f = _scalar(_net(D=D))
    X = torch.randn(4, D)
    A = torch.randn(D, D)
    C = A + A.T  # indefinite
    assert torch.linalg.eigvalsh(C).min() < 0 < torch.linalg.eigvalsh(C).max()
    sigma, signs = split_indefinite(C)
    expected = torch.einsum("nde,de->n", hessians(f, X), C)
    torch.testing.assert_close(
        weighted_laplacian(f, sigma, signs=signs, collapsed=collapsed)(X), expected)


@pytest.mark.parametrize("collapsed", [True, False])
@pytest.mark.parametrize("case", ["module_vector", "function_scalar"])
def test_exact_biharmonic_matches_nested_hessians(case, collapsed):
    f = CASES[case]()
    X = torch.randn(3, 3)
    torch.testing.assert_close(biharmonic(f, collapsed=collapsed)(X), biharmonic_reference(f, X))


def test_biharmonic_of_quartic_polynomial_closed_form():
    D = 4
    T = torch.randn(D, D, D, D)
    T = sum(T.permute(*p) for p in _permutations(4)) / 24  # symmetrise

    def f(X):
        return torch.einsum("abcd,na,nb,nc,nd->n", T, X, X, X, X)

    X = torch.randn(2, D)
    expected = 24 * torch.einsum("aabb->", T)
    torch.testing.assert_close(biharmonic(f)(X), expected.expand(2))


def _permutations(n):
    import itertools

    return list(itertools.permutations(range(n)))


def _relative_error(estimate, truth):
    return ((estimate - truth).norm() / truth.norm()).item()


def _monte_carlo(operator, X, truth, *, chunk_max=100):
    """Average independent chunks until the relative error drops below 1e-2."""
    generator = torch.Generator().manual_seed(0)
    total = torch.zeros_like(truth)
    for chunk in range(1, chunk_max + 1):
        total = total + operator(X, generator=generator)
        if _relative_error(total / chunk, truth) < 1e-2:
            return chunk
    raise AssertionError(f"no convergence: relative error {_relative_error(total / chunk, truth)}")


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_stochastic_laplacian_is_unbiased(distribution):
    f = _net(C=2)
    X = torch.randn(3, 3)
    truth = laplacian_reference(f, X)
    operator = laplacian(f, randomization=(distribution, 256))
    chunks = _monte_carlo(operator, X, truth)
    # a single sample is far from the truth: the test must not pass by accident
    single = laplacian(f, randomization=(distribution, 1))(X, generator=torch.Generator())
    assert chunks >= 1 and _relative_error(single, truth) > 1e-2


def test_stochastic_weighted_laplacian_with_signs_is_unbiased():
    D = 3
    f = _scalar(_net(D=D))
    X = torch.randn(3, D)
    A = torch.randn(D, D)
    sigma, signs = split_indefinite(A + A.T)
    truth = torch.einsum("nde,de->n", hessians(f, X), A + A.T)
    _monte_carlo(weighted_laplacian(f, sigma, signs=signs, randomization=("normal", 256)),
                 X, truth)


def test_stochastic_biharmonic_is_unbiased():
    f = lambda X: X[:, 0].sin() * X[:, 1].cos() * X[:, 2] + (X[:, 0] * X[:, 1]) ** 2  # noqa: E731
    X = torch.randn(2, 3)
    _monte_carlo(biharmonic(f, randomization=("normal", 1024)), X, biharmonic_reference(f, X))


@pytest.mark.parametrize("make", [
    lambda f: laplacian(f, randomization=("rademacher", 5)),
    lambda f: weighted_laplacian(f, torch.randn(3, 2, generator=torch.Generator().manual_seed(5)),
                                 randomization=("normal", 4)),
    lambda f: biharmonic(f, randomization=("normal", 3)),
])
def test_collapsed_equals_standard_for_the_same_directions(make):
    f = _net(C=2)
    X = torch.randn(4, 3)
    collapsed = make(f)(X, generator=torch.Generator().manual_seed(3))
    operator = make(f)
    operator.collapsed = False
    standard = operator(X, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(collapsed, standard, rtol=1e-10, atol=1e-12)


def _param_grads(output, params, **kwargs):
    return torch.autograd.grad(output, params, allow_unused=True, materialize_grads=True,
                               **kwargs)


@pytest.mark.parametrize("operator", ["laplacian", "biharmonic"])
def test_gradients_flow_to_parameters(operator):
    net = _net(C=1)
    f = _scalar(net)
    params = list(net.parameters())
    X = torch.randn(4, 3)
    ours_fn, ref_fn = {"laplacian": (laplacian, laplacian_reference),
                       "biharmonic": (biharmonic, biharmonic_reference)}[operator]
    ours, ref = ours_fn(net)(X).squeeze(-1), ref_fn(f, X)
    torch.testing.assert_close(ours, ref)
    weights = torch.randn(4)
    for a, b in zip(_param_grads(ours @ weights, params), _param_grads(ref @ weights, params)):
        torch.testing.assert_close(a, b)


def test_per_sample_parameter_jacobian_of_laplacian():
    net = _net(C=1)
    params = list(net.parameters())[:-1]  # the output bias does not enter a Laplacian
    X = torch.randn(5, 3)
    result = laplacian(net, return_value=True)(X)
    eye = torch.eye(5)
    ours = _param_grads(result.operator.squeeze(-1), params, grad_outputs=eye,
                        is_grads_batched=True)
    ref = _param_grads(laplacian_reference(_scalar(net), X), params, grad_outputs=eye,
                       is_grads_batched=True)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_closure_tensors_receive_gradients_and_updates():
    w = torch.randn(3, requires_grad=True)

    def f(X):
        return torch.tanh(X @ w) ** 2

    X = torch.randn(4, 3)
    g = laplacian(f)
    ours = torch.autograd.grad(g(X).sum(), w)[0]
    ref = torch.autograd.grad(laplacian_reference(f, X).sum(), w)[0]
    torch.testing.assert_close(ours, ref)
    with torch.no_grad():
        w.mul_(0.5)  # an optimizer step updates the tensor in place
    torch.testing.assert_close(g(X), laplacian_reference(f, X))


def test_graph_is_cached_per_input_signature_and_reads_current_parameters():
    net = _net()
    g = laplacian(net)
    X = torch.randn(4, 3)
    g(X)
    g(X + 1)
    assert len(g.captured.programs) == 1
    g(torch.randn(6, 3))
    assert len(g.captured.programs) == 2
    with torch.no_grad():
        net[0].weight.mul_(2.0)
    torch.testing.assert_close(g(X).squeeze(-1), laplacian_reference(_scalar(net), X))
    assert len(g.captured.programs) == 2


def test_collapsed_layout_propagates_fewer_rows():
    D = 50
    assert Layout(2, D, collapsed=True).size == D + 2
    assert Layout(2, D, collapsed=False).size == 2 * D + 1
    R = 35  # exact biharmonic directions for D = 5
    assert Layout(4, R, collapsed=True).size == 3 * R + 2
    assert Layout(4, R, collapsed=False).size == 4 * R + 1


def test_bad_inputs_are_reported():
    f = _net()
    with pytest.raises(ValueError, match=r"laplacian: X must be a floating tensor of shape"):
        laplacian(f)(torch.randn(3))
    with pytest.raises(ValueError, match=r"randomization must be None or"):
        laplacian(f, randomization=("uniform", 3))
    with pytest.raises(ValueError, match=r"biharmonic: randomization must be"):
        biharmonic(f, randomization=("rademacher", 3))
    with pytest.raises(ValueError, match=r"sigma must have shape \(D, R\) with N=2, D=3; got"):
        weighted_laplacian(f, torch.randn(4, 2))(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"signs must be a 1-d tensor of ±1"):
        weighted_laplacian(f, torch.randn(3, 2), signs=torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match=r"f must map \(N, D\) = \(2, 3\) to \(N,\) or \(N, C\)"):
        laplacian(lambda X: X.sum())(torch.randn(2, 3))
    with pytest.raises(TypeError, match="collapsed must be a bool"):
        laplacian(f, collapsed=1)


def test_no_grad_fast_path_matches_reference():
    f = _net(C=2)
    X = torch.randn(4, 3)
    sigma, signs = split_indefinite(torch.diag(torch.tensor([1.0, -2.0, 3.0])))
    H = hessians(f, X)
    with torch.no_grad():  # the out= fast path (no autograd graph)
        lap = laplacian(f, return_gradient=True, randomization=("normal", 2))(
            X, generator=torch.Generator().manual_seed(0))
        exact = laplacian(f)(X)
        weighted = weighted_laplacian(f, sigma, signs=signs)(X)
    with_grad = laplacian(f, return_gradient=True, randomization=("normal", 2))(
        X, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lap.operator, with_grad.operator)
    torch.testing.assert_close(lap.gradient, with_grad.gradient)
    torch.testing.assert_close(exact, H.diagonal(dim1=-2, dim2=-1).sum(-1))
    torch.testing.assert_close(weighted, torch.einsum("ncdd,d->nc", H.diagonal(
        dim1=-2, dim2=-1).diag_embed(), torch.tensor([1.0, -2.0, 3.0])))


def test_refuses_to_run_inside_torch_func_transforms():
    # make_fx would bake the transforms' wrapped tensors in as constants: wrong values, no error
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    op = laplacian(net)
    X = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.vmap(lambda x: op(x.unsqueeze(0)))(X)
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.grad(lambda x: op(x).sum())(X)
    assert op(X).shape == (4, 1)  # fine outside


def test_reused_layer_keeps_its_parameters():
    """A layer registered twice (tied weights): the capture must not replace its Parameters."""
    torch.manual_seed(0)
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(2, 1)).double()
    X = torch.rand(3, 2, dtype=torch.float64)
    out = laplacian(model)(X).reshape(-1)
    assert isinstance(model[0].weight, nn.Parameter) and model[0].weight is model[2].weight
    torch.testing.assert_close(out, laplacian_reference(model, X).reshape(-1))
    out.sum().backward()  # both uses of the shared weight reach its gradient
    assert model[0].weight.grad is not None
