import pytest
import torch
from pinn_references import reference_residuals
from torch import nn
from torch.func import hessian, jacrev, vmap

from curvkit.pinn.jacobian import DenseResidualJacobian, ResidualJacobian, linearize
from curvkit.pinn.problems import Batch, heat, log_fokker_planck, mlp, poisson
from curvkit.pinn.residuals import Sin, derivatives, loss, residuals


def _model(kind, dim, g):
    if kind == "tanh":
        return mlp(dim, (6, 5), generator=g)
    if kind == "sigmoid":
        return mlp(dim, (4,), activation=nn.Sigmoid, generator=g)
    if kind == "sin_nobias":
        torch.manual_seed(0)  # test-only: nn.Linear draws from the global RNG
        return nn.Sequential(
            nn.Linear(dim, 5, bias=False),
            Sin(),
            nn.Linear(5, 4),
            nn.Tanh(),
            nn.Linear(4, 1, bias=False),
        )
    raise ValueError(kind)


CASES = {
    "poisson2": lambda: poisson(2),
    "poisson5": lambda: poisson(5),
    "heat1": lambda: heat(1),
    "log_fp3": lambda: log_fokker_planck(3),
}


@pytest.mark.parametrize("kind", ["tanh", "sigmoid", "sin_nobias"])
@pytest.mark.parametrize("case", CASES)
def test_layerwise_jacobian_matches_autograd(case, kind):
    problem = CASES[case]()
    g = torch.Generator().manual_seed(0)
    model = _model(kind, problem.dim, g)
    batch = problem.sample(7, 5, generator=g)
    r_ref, J_ref = reference_residuals(model, problem, batch)
    lin = linearize(model, problem, batch)
    assert isinstance(lin, ResidualJacobian)
    torch.testing.assert_close(lin.residual, r_ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(lin.to_dense(), J_ref, rtol=1e-11, atol=1e-13)
    for method in ("gram", "block", "auto"):
        torch.testing.assert_close(
            lin.kernel(method=method), J_ref @ J_ref.T, rtol=1e-11, atol=1e-13
        )
    # products: vector, narrow and wide blocks (two code paths), parameter lists
    P, N = J_ref.shape[1], J_ref.shape[0]
    for k in (None, 2, 40):
        v = torch.randn(P, generator=g) if k is None else torch.randn(P, k, generator=g)
        u = torch.randn(N, generator=g) if k is None else torch.randn(N, k, generator=g)
        torch.testing.assert_close(lin @ v, J_ref @ v, rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(lin.T @ u, J_ref.T @ u, rtol=1e-11, atol=1e-13)
    v_list = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    v_flat = torch.cat([t.reshape(-1) for t in v_list])
    (out,) = lin @ v_list  # the sample-space side has a single "shape", (N,)
    torch.testing.assert_close(out, J_ref @ v_flat, rtol=1e-11, atol=1e-13)
    back = lin.T @ u[:, 0]
    torch.testing.assert_close(back, J_ref.T @ u[:, 0], rtol=1e-11, atol=1e-13)
    # the same products from the cached layer blocks (the randomized solvers' path)
    assert lin.cache_blocks()
    for k in (None, 2, 40):
        v = torch.randn(P, generator=g) if k is None else torch.randn(P, k, generator=g)
        u = torch.randn(N, generator=g) if k is None else torch.randn(N, k, generator=g)
        torch.testing.assert_close(lin @ v, J_ref @ v, rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(lin.T @ u, J_ref.T @ u, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(lin.to_dense(), J_ref, rtol=1e-11, atol=1e-13)


def test_cache_blocks_respects_the_memory_budget(monkeypatch):
    import curvkit.pinn.jacobian as jacobian

    problem = poisson(2)
    g = torch.Generator().manual_seed(1)
    lin = linearize(mlp(2, (4,), generator=g), problem, problem.sample(6, 4, generator=g))
    monkeypatch.setattr(jacobian, "_CACHE_BYTES", 8 * lin.shape[0] * lin.shape[1] - 1)
    assert not lin.cache_blocks() and lin._blocks is None
    monkeypatch.setattr(jacobian, "_CACHE_BYTES", 8 * lin.shape[0] * lin.shape[1])
    assert lin.cache_blocks() and len(lin._blocks) == len(lin.layers)


def test_residuals_and_loss_gradient_match_reference():
    problem = log_fokker_planck(2)
    g = torch.Generator().manual_seed(1)
    model = mlp(problem.dim, (6, 5), generator=g)
    batch = problem.sample(9, 4, generator=g)
    r_ref, J_ref = reference_residuals(model, problem, batch)
    torch.testing.assert_close(residuals(model, problem, batch), r_ref, rtol=1e-12, atol=1e-13)
    L = loss(model, problem, batch)
    grads = torch.autograd.grad(L, list(model.parameters()))
    torch.testing.assert_close(
        torch.cat([t.reshape(-1) for t in grads]), J_ref.T @ r_ref, rtol=1e-11, atol=1e-13
    )


def test_forward_laplacian_matches_nested_autograd_partial_dims():
    g = torch.Generator().manual_seed(2)
    model = mlp(4, (7, 6), generator=g)
    X = torch.rand(5, 4, generator=g)
    d = derivatives(model, X, laplacian_dims=(1, 3))
    u = lambda x: model(x.unsqueeze(0)).reshape(())  # noqa: E731
    H = vmap(hessian(u))(X)
    torch.testing.assert_close(d.laplacian, H[:, 1, 1] + H[:, 3, 3], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(d.gradient, vmap(jacrev(u))(X), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(d.value, model(X).reshape(-1).detach(), rtol=1e-14, atol=0)


class _Skip(nn.Module):
    def __init__(self, g):
        super().__init__()
        self.inner = mlp(2, (5,), generator=g)
        self.out = nn.Linear(2, 1)

    def forward(self, x):
        return self.inner(x) + torch.sin(self.out(x)) * x[:, :1]


def test_unsupported_model_falls_back_to_dense_jacobian():
    problem = poisson(2)
    g = torch.Generator().manual_seed(3)
    model = _Skip(g)
    batch = problem.sample(6, 4, generator=g)
    lin = linearize(model, problem, batch)
    assert isinstance(lin, DenseResidualJacobian)
    r_ref, J_ref = reference_residuals(model, problem, batch)
    torch.testing.assert_close(lin.to_dense(), J_ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(lin.kernel(), J_ref @ J_ref.T, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(residuals(model, problem, batch), r_ref, rtol=1e-12, atol=1e-13)


def test_bad_batch_raises():
    problem = poisson(3)
    model = mlp(3, (4,))
    with pytest.raises(ValueError, match=r"linearize: boundary points must have shape \(N, 3\)"):
        linearize(model, problem, Batch(torch.rand(4, 3), torch.rand(4, 2)))
    with pytest.raises(ValueError, match="kernel: method must be"):
        linearize(model, problem, problem.sample(3, 2)).kernel(method="svd")


def test_sequential_reusing_a_linear_layer_raises_clearly():
    # The same Linear registered twice ties its parameters: the fast path's per-layer indices
    # ran past model.parameters() (IndexError) and the general path's J lacked the tied
    # parameters' columns. Both paths now refuse such a model up front.
    problem = poisson(2)
    g = torch.Generator().manual_seed(6)
    shared = mlp(4, (), out_dim=4, generator=g)[0]
    model = nn.Sequential(mlp(2, (), out_dim=4, generator=g)[0], nn.Tanh(), shared, nn.Tanh(),
                          shared, nn.Tanh(), mlp(4, (), generator=g)[0])
    batch = problem.sample(6, 4, generator=g)
    for dense in (False, True):
        with pytest.raises(ValueError, match=r"linearize: .*'4.weight' is also registered as "
                                             r"'2.weight'"):
            linearize(model, problem, batch, dense=dense)
    with pytest.raises(ValueError, match="derivatives: .*registered as"):
        loss(model, problem, batch)
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
