"""The two collapsed Taylor-mode paths of the PINN derivatives against each other and torch.func.

The forward-Laplacian fast path (``Sequential`` MLPs) must equal ``curvkit.taylor`` on the same
model; the general path (``curvkit.taylor`` on any model) must equal ``torch.func`` nested reverse
mode, which is written out here independently of the library.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

import curvkit.pinn._mlp as mlp_module
import curvkit.pinn.jacobian as jacobian_module
from curvkit.pinn._mlp import Sin, forward_laplacian, mlp_structure
from curvkit.pinn.engd import _loss_fn
from curvkit.pinn.jacobian import DenseResidualJacobian, ResidualJacobian, linearize
from curvkit.pinn.problems import heat, log_fokker_planck, mlp, poisson
from curvkit.pinn.residuals import derivatives, loss, residuals, taylor_derivatives
from curvkit.taylor import laplacian, weighted_laplacian


def _sequential(kind, dim, g):
    if kind == "tanh":
        return mlp(dim, (6, 5), generator=g)
    if kind == "sigmoid":
        return mlp(dim, (4,), activation=nn.Sigmoid, generator=g)
    torch.manual_seed(0)  # test-only: nn.Linear draws from the global RNG
    return nn.Sequential(
        nn.Linear(dim, 5, bias=False), Sin(), nn.Identity(), nn.Linear(5, 4), nn.Tanh(),
        nn.Linear(4, 1, bias=False),
    )


class ResidualMLP(nn.Module):
    """``x ↦ w · (h + tanh(B h)) + c`` with ``h = tanh(A x)``: not a ``Sequential``."""

    def __init__(self, dim, width, g):
        super().__init__()
        self.inner = nn.Linear(dim, width)
        self.block = nn.Linear(width, width)
        self.head = nn.Linear(width, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)

    def forward(self, x):
        h = torch.tanh(self.inner(x))
        h = h + torch.tanh(self.block(h))
        return self.head(h)


def _reference_derivatives(f, X, dims):
    u = lambda x: f(x.unsqueeze(0)).reshape(())  # noqa: E731
    H = vmap(hessian(u))(X)
    return vmap(u)(X), vmap(jacrev(u))(X), H.diagonal(dim1=1, dim2=2)[:, list(dims)].sum(1)


def _reference(model, problem, batch, params=None):
    """``r̃`` and ``J`` by torch.func nested reverse mode."""
    X_in, X_bd = batch
    idx = list(problem.laplacian_index)
    params = params or {k: v.detach() for k, v in model.named_parameters()}

    def r(ps):
        f = lambda Z: functional_call(model, ps, (Z,))  # noqa: E731
        value, gradient, lap = _reference_derivatives(f, X_in, idx)
        from curvkit.pinn.problems import Derivatives

        r_in = problem.residual(X_in, Derivatives(value, gradient, lap)) / X_in.shape[0] ** 0.5
        r_bd = (f(X_bd).reshape(-1) - problem.solution(X_bd)) / X_bd.shape[0] ** 0.5
        return torch.cat([r_in, r_bd])

    jac = jacrev(r)(params)
    return r(params), torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in params], dim=1)


# --------------------------------------------------------------------------- fast path == taylor
@pytest.mark.parametrize("kind", ["tanh", "sigmoid", "sin_identity_nobias"])
def test_fast_path_equals_curvkit_taylor(kind):
    g = torch.Generator().manual_seed(0)
    model = _sequential(kind, 4, g)
    assert mlp_structure(model) is not None
    X = torch.rand(9, 4, generator=g) * 2 - 1
    d = derivatives(model, X)
    ref = laplacian(model, return_value=True, return_gradient=True)(X)
    torch.testing.assert_close(d.value, ref.value.reshape(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d.gradient, ref.gradient.reshape(9, 4), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d.laplacian, ref.operator.reshape(-1), rtol=1e-12, atol=1e-12)
    # a partial Laplacian, against the weighted Laplacian with the selection matrix
    dims = (0, 2)
    d = derivatives(model, X, laplacian_dims=dims)
    S = torch.eye(4)[:, list(dims)]
    partial = weighted_laplacian(model, S)(X).reshape(-1)
    torch.testing.assert_close(d.laplacian, partial, rtol=1e-12, atol=1e-12)
    # the layer-capturing variant (used by linearize) carries the same channels
    params = [p.detach() for p in model.parameters()]
    Y, _ = forward_laplacian(mlp_structure(model), params, X, laplacian_dims=dims)
    torch.testing.assert_close(Y[:, 0, 0], ref.value.reshape(-1).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Y[:, 1:-1, 0], ref.gradient.reshape(9, 4).detach(),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Y[:, -1, 0], partial.detach(), rtol=1e-12, atol=1e-12)


def test_fast_path_parameter_gradient_equals_curvkit_taylor():
    g = torch.Generator().manual_seed(1)
    model = _sequential("tanh", 3, g)
    X = torch.rand(6, 3, generator=g)
    d = derivatives(model, X)
    ref = laplacian(model, return_value=True, return_gradient=True)(X)
    fast = torch.autograd.grad((d.laplacian.square() + d.gradient.sum(1) + d.value).sum(),
                               list(model.parameters()))
    slow = torch.autograd.grad((ref.operator.square().reshape(-1)
                                + ref.gradient.reshape(6, 3).sum(1)
                                + ref.value.reshape(-1)).sum(),
                               list(model.parameters()))
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fast_path_in_row_chunks_equals_one_pass(monkeypatch):
    g = torch.Generator().manual_seed(2)
    model = _sequential("tanh", 3, g)
    X = torch.rand(11, 3, generator=g)

    def run():
        d = derivatives(model, X, laplacian_dims=(0, 2))
        grads = torch.autograd.grad((d.laplacian.square() + d.gradient.sum(1) + d.value).sum(),
                                    list(model.parameters()))
        return [t.detach() for t in d] + list(grads)

    whole = run()
    structure = mlp_structure(model)
    assert mlp_module._chunk_rows(structure, X) >= 11  # one pass at the default budget
    width = max(max(o, i) for o, i, _ in structure.linear_shapes)
    monkeypatch.setattr(mlp_module, "_CHUNK_BYTES", 4 * 3 * width * X.element_size())
    assert mlp_module._chunk_rows(structure, X) == 4  # chunks of 4, 4, 3 points
    for a, b in zip(run(), whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- general path
CASES = {
    "poisson3": lambda: poisson(3),
    "heat2": lambda: heat(2),
    "log_fp2": lambda: log_fokker_planck(2),
}


@pytest.mark.parametrize("case", CASES)
def test_general_path_on_residual_mlp_matches_torch_func(case):
    problem = CASES[case]()
    g = torch.Generator().manual_seed(2)
    model = ResidualMLP(problem.dim, 5, g)
    assert mlp_structure(model) is None
    batch = problem.sample(7, 4, generator=g)
    value, gradient, lap = _reference_derivatives(model, batch.interior, problem.laplacian_index)
    d = derivatives(model, batch.interior, laplacian_dims=problem.laplacian_dims)
    torch.testing.assert_close(d.value, value, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(d.gradient, gradient, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(d.laplacian, lap, rtol=1e-12, atol=1e-13)

    r_ref, J_ref = _reference(model, problem, batch)
    torch.testing.assert_close(residuals(model, problem, batch), r_ref, rtol=1e-12, atol=1e-13)
    grads = torch.autograd.grad(loss(model, problem, batch), list(model.parameters()))
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in grads]), J_ref.T @ r_ref,
                               rtol=1e-11, atol=1e-13)
    lin = linearize(model, problem, batch)
    assert isinstance(lin, DenseResidualJacobian)
    torch.testing.assert_close(lin.residual, r_ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(lin.to_dense(), J_ref, rtol=1e-11, atol=1e-13)

    # the line search's loss at other parameters (functional evaluation through curvkit.taylor)
    names = [k for k, _ in model.named_parameters()]
    moved = [p.detach() + 0.1 * torch.randn(p.shape, generator=g) for p in model.parameters()]
    r_moved, _ = _reference(model, problem, batch, dict(zip(names, moved)))
    line_search_loss = _loss_fn(model, problem, batch)  # one capture for every candidate
    expected = 0.5 * float(r_moved.square().sum())
    assert float(line_search_loss(moved)) == pytest.approx(expected, rel=1e-12)
    current = [p.detach() for p in model.parameters()]
    assert float(line_search_loss(current)) == pytest.approx(
        0.5 * float(r_ref.square().sum()), rel=1e-12
    )
    d_moved = taylor_derivatives(model, batch.interior, laplacian_dims=problem.laplacian_dims,
                                 params=dict(zip(names, moved)))
    moved_model = lambda Z: functional_call(model, dict(zip(names, moved)), (Z,))  # noqa: E731
    _, _, lap_moved = _reference_derivatives(moved_model, batch.interior, problem.laplacian_index)
    torch.testing.assert_close(d_moved.laplacian, lap_moved, rtol=1e-12, atol=1e-13)


def test_dense_jacobian_in_blocks_of_points(monkeypatch):
    problem = heat(1)
    g = torch.Generator().manual_seed(3)
    model = ResidualMLP(problem.dim, 4, g)
    batch = problem.sample(5, 4, generator=g)
    _, J_ref = _reference(model, problem, batch)
    monkeypatch.setattr(jacobian_module, "_POINTS_PER_BLOCK", 2)  # blocks 2, 2, 1 and 2, 2
    torch.testing.assert_close(linearize(model, problem, batch).to_dense(), J_ref,
                               rtol=1e-11, atol=1e-13)


def test_dense_flag_equals_layerwise_jacobian():
    problem = log_fokker_planck(2)
    g = torch.Generator().manual_seed(4)
    model = mlp(problem.dim, (5, 4), generator=g)
    batch = problem.sample(6, 3, generator=g)
    layerwise = linearize(model, problem, batch)
    dense = linearize(model, problem, batch, dense=True)
    assert isinstance(layerwise, ResidualJacobian) and isinstance(dense, DenseResidualJacobian)
    torch.testing.assert_close(dense.residual, layerwise.residual, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(dense.to_dense(), layerwise.to_dense(), rtol=1e-11, atol=1e-13)


def test_bad_inputs_raise():
    model = mlp(3, (4,))
    X = torch.rand(5, 3)
    with pytest.raises(ValueError, match=r"derivatives: laplacian_dims must be distinct"):
        derivatives(model, X, laplacian_dims=(0, 3))
    with pytest.raises(ValueError, match=r"derivatives: laplacian_dims must be distinct"):
        derivatives(model, X, laplacian_dims=(1, 1))
    with pytest.raises(ValueError, match=r"derivatives: X must have shape \(N, D\)"):
        derivatives(model, X[0])
    with pytest.raises(ValueError, match=r"taylor_derivatives: f must map .* got output shape"):
        taylor_derivatives(lambda Z: torch.tanh(Z[:, :2]), X)
    with pytest.raises(TypeError, match="taylor_derivatives: params need an nn.Module"):
        taylor_derivatives(torch.tanh, X, params={})


def test_woodbury_step_on_general_path_equals_reference_step():
    """An optimizer on a non-Sequential model: the general path end to end."""
    from curvkit.pinn.woodbury import ENGDWoodbury

    problem = heat(1)
    g = torch.Generator().manual_seed(5)
    model = ResidualMLP(problem.dim, 4, g)
    batch = problem.sample(8, 4, generator=g)
    r, J = _reference(model, problem, batch)
    damping = 1e-4
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = before - J.T @ torch.linalg.solve(J @ J.T + damping * torch.eye(J.shape[0]), r)
    loss_value = ENGDWoodbury(model, problem, lr=1.0, damping=damping).step(batch)
    assert loss_value == pytest.approx(0.5 * float(r.square().sum()), rel=1e-12)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (after - expected).norm() <= 1e-9 * (expected - before).norm()


def test_points_that_do_not_fit_the_model_raise_clearly():
    problem = poisson(2)
    g = torch.Generator().manual_seed(2)
    model = mlp(2, (4,), generator=g)
    batch = problem.sample(5, 3, generator=g)
    bad = batch.interior.clone()
    bad[1, 0] = float("nan")
    # NaN points used to surface as a Cholesky failure ("not positive definite") in the step
    with pytest.raises(ValueError, match=r"linearize: interior points must be finite; got 1 "):
        linearize(model, problem, (bad, batch.boundary))
    with pytest.raises(ValueError, match=r"residuals: boundary points must be finite"):
        loss(model, problem, (batch.interior, batch.boundary.clamp_min(float("inf"))))
    # a float32 model on float64 points (or integer points) used to fail inside a matmul
    with pytest.raises(ValueError, match=r"linearize: interior points have dtype torch.float64 "
                                         r"but the model's parameters torch.float32"):
        linearize(mlp(2, (4,), dtype=torch.float32), problem, batch)
    with pytest.raises(ValueError, match=r"residuals: interior points have dtype torch.int64"):
        loss(model, problem, (batch.interior.long(), batch.boundary))
    with pytest.raises(ValueError, match=r"derivatives: X has dtype torch.float32 but the model"):
        derivatives(model, batch.interior.float())
    # an MLP built for another dimension than the problem's
    with pytest.raises(ValueError, match=r"linearize: the model's first Linear takes 3 inputs "
                                         r"but the points have 2 coordinates"):
        linearize(mlp(3, (4,)), problem, batch)


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


def _modified_linear_models(g):
    def net(first):
        return nn.Sequential(first, nn.Tanh(), mlp(5, (), generator=g)[0])

    hooked = net(mlp(2, (), out_dim=5, generator=g)[0])
    hooked[0].register_forward_hook(lambda module, args, out: 3.0 * out)
    outer = net(mlp(2, (), out_dim=5, generator=g)[0])
    outer.register_forward_pre_hook(lambda module, args: (args[0] + 0.5,))
    torch.manual_seed(0)  # test-only: nn.Linear draws from the global RNG
    return {
        "subclass": net(_ScaledLinear(2, 5, dtype=torch.float64)),
        "layer_hook": hooked,
        "model_hook": outer,
        "weight_norm": net(torch.nn.utils.parametrizations.weight_norm(
            nn.Linear(2, 5, dtype=torch.float64))),
    }


@pytest.mark.parametrize("kind", ["subclass", "layer_hook", "model_hook", "weight_norm"])
def test_linear_layers_with_a_changed_forward_take_the_general_path(kind):
    # The fast path re-implements nn.Linear from the weights alone: a subclass's forward or a
    # hook was silently ignored, and a parametrized weight broke its parameter indices.
    problem = poisson(2)
    g = torch.Generator().manual_seed(7)
    model = _modified_linear_models(g)[kind]
    batch = problem.sample(6, 4, generator=g)
    expected = residuals(model, problem, batch).detach()
    with torch.no_grad():
        r_bd = (model(batch.boundary).reshape(-1) - problem.solution(batch.boundary)) / 2.0
    torch.testing.assert_close(expected[6:], r_bd, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(linearize(model, problem, batch).residual, expected,
                               rtol=1e-13, atol=1e-14)
    assert mlp_structure(model) is None


def test_batch_is_any_pair_of_point_tensors():
    problem = poisson(2)
    g = torch.Generator().manual_seed(8)
    model = mlp(2, (4,), generator=g)
    batch = problem.sample(4, 3, generator=g)
    # optimizers took a plain tuple, loss() failed on it with an AttributeError
    assert loss(model, problem, tuple(batch)) == loss(model, problem, batch)
    for call in (loss, linearize):
        with pytest.raises(ValueError, match=r"batch must be a pair \(interior, boundary\) of "
                                             r"point tensors; got a tuple of length 1"):
            call(model, problem, (batch.interior,))
