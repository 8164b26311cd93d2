"""Audit of curvkit.pinn with users' own networks and PDEs (seventh session, second audit).

The tests above the coverage section failed before their fix; the coverage section checks
custom models (activations, Fourier features, residual connections, output transforms, frozen
parameters, LayerNorm) against torch.func references.
"""

import copy
import math

import pytest
import torch
from pinn_references import reference_residuals
from torch import nn

from curvkit.pinn import (
    ENGD,
    SPRING,
    Derivatives,
    ENGDWoodbury,
    History,
    Sin,
    linear_pde,
    linearize,
    poisson,
    residuals,
    train,
)
from curvkit.pinn._mlp import mlp_structure

TOL = dict(rtol=1e-10, atol=1e-12)


def _mlp(act: nn.Module, d: int = 2, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)  # test-only: nn.Linear draws from the global RNG
    return nn.Sequential(nn.Linear(d, 4), act, nn.Linear(4, 3), copy.deepcopy(act), nn.Linear(3, 1))


def test_active_dropout_is_refused_before_a_step():
    # Dropout in training mode drew a new mask at every call: linearize returned residuals of
    # one random network (two calls differed by 0.35), and the line search compared losses of
    # others, without any error.
    problem = poisson(2)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 1))
    batch = problem.sample(4, 3, generator=torch.Generator().manual_seed(0))
    for build in (lambda: ENGD(model, problem), lambda: SPRING(model, problem),
                  lambda: linearize(model, problem, batch)):
        with pytest.raises(ValueError, match=r"Dropout '2' is in training mode with p=0.5.*eval"):
            build()
    model.eval()  # deterministic: accepted, and the Jacobian is the plain network's
    r_ref, J_ref = reference_residuals(model, problem, batch)
    torch.testing.assert_close(linearize(model, problem, batch).to_dense(), J_ref, **TOL)
    ENGD(model, problem)
    # spectral_norm in training mode (a power-iteration step per call) failed with autograd's
    # "functions with out=... arguments don't support automatic differentiation"
    torch.manual_seed(13)  # test-only: nn.Linear draws from the global RNG
    normed = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(2, 3)), nn.Tanh(),
                           nn.Linear(3, 1))
    with pytest.raises(ValueError, match=r"spectral_norm '0.parametrizations.weight.0' is in "
                                         r"training mode.*model.eval\(\)"):
        linearize(normed, problem, batch)
    normed.eval()
    r_ref, J_ref = reference_residuals(normed, problem, batch)
    torch.testing.assert_close(linearize(normed, problem, batch).to_dense(), J_ref, **TOL)


def test_train_refuses_a_model_that_is_not_a_module_or_has_nothing_to_train():
    # A plain function failed with "'function' object has no attribute 'parameters'", and a
    # frozen model under Adam with autograd's "element 0 of tensors does not require grad".
    problem = poisson(2)
    with pytest.raises(TypeError, match=r"train: model must be an nn.Module or None; got function"):
        train(problem, lambda X: X[:, 0], "engd", steps=1)
    with pytest.raises(ValueError, match=r"train: the model has no trainable parameters"):
        train(problem, _mlp(nn.Tanh()).requires_grad_(False), "adam", steps=1, num_interior=3,
              num_boundary=2)


def test_linear_pde_names_a_source_of_the_wrong_shape():
    # An (N, 1) source broadcast into an (N, N) residual and the error blamed only "the interior
    # residual"; a NumPy array failed inside torch ("Can't call numpy() on Tensor that requires
    # grad"). Constants (numbers, 0-d, (1,)) broadcast as they should.
    model = _mlp(nn.Tanh())
    batch = poisson(2).sample(5, 3, generator=torch.Generator().manual_seed(1))
    for bad, message in ((lambda X: X[:, :1], r"got \(5, 5\): the source returned \(5, 1\)"),
                         (lambda X: X[:, 0].numpy(), r"the source must return .*\(5,\).*ndarray")):
        problem = linear_pde(lambda X: X[:, 0], dim=2, source=bad, name="mine")
        with pytest.raises(ValueError, match=rf"mine: .*{message}"):
            linearize(model, problem, batch)
    reference = linear_pde(lambda X: X[:, 0], dim=2, source=lambda X: X.new_full((5,), 3.0))
    r_ref = linearize(model, reference, batch).residual
    for constant in (3.0, 3, torch.tensor(3.0), torch.tensor([3.0])):
        problem = linear_pde(lambda X: X[:, 0], dim=2, source=lambda X, c=constant: c)
        torch.testing.assert_close(linearize(model, problem, batch).residual, r_ref, **TOL)


def test_linear_pde_takes_variable_coefficients():
    # laplacian / gradient / value accepted numbers only (a function failed in float() with a
    # TypeError naming nobody). With u = sin(x0) x1, a = 1 + x0, b = (x1, 2), c = x0:
    # Δu = -sin(x0) x1, ∇u = (cos(x0) x1, sin(x0)).
    def u(X):
        return torch.sin(X[:, 0]) * X[:, 1]

    def f(X):
        x0, x1 = X[:, 0], X[:, 1]
        s, co = torch.sin(x0), torch.cos(x0)
        return -(1 + x0) * s * x1 + x1 * co * x1 + 2 * s + x0 * s * x1

    problem = linear_pde(u, dim=2, source=f, laplacian=lambda X: 1 + X[:, 0],
                         gradient=lambda X: torch.stack([X[:, 1], 2 * torch.ones_like(X[:, 0])], 1),
                         value=lambda X: X[:, 0])
    X = torch.rand(6, 2, generator=torch.Generator().manual_seed(2))
    x0, x1 = X[:, 0], X[:, 1]
    exact = Derivatives(u(X), torch.stack([torch.cos(x0) * x1, torch.sin(x0)], 1),
                        -torch.sin(x0) * x1)
    torch.testing.assert_close(problem.residual(X, exact), torch.zeros(6), **TOL)
    model = _mlp(nn.SiLU())
    batch = problem.sample(5, 3, generator=torch.Generator().manual_seed(3))
    r_ref, J_ref = reference_residuals(model, problem, batch)
    lin = linearize(model, problem, batch)
    torch.testing.assert_close(lin.residual, r_ref, **TOL)
    torch.testing.assert_close(lin.to_dense(), J_ref, **TOL)
    bad = linear_pde(u, dim=2, source=f, gradient=lambda X: X[:, :1].T, name="mine")
    with pytest.raises(ValueError, match=r"mine: the gradient coefficient must .*\(5, 2\)"):
        linearize(model, bad, batch)


class _Cumprod(nn.Module):  # an op without a Taylor rule (cumsum has one now)
    def forward(self, x):
        return torch.cumprod(x, -1)


def test_an_operation_without_a_taylor_rule_is_named_with_the_caller(tmp_path):
    # The general path built its operator with curvkit.taylor.laplacian, so a step of ENGD on a
    # model with an unsupported op said "laplacian: no Taylor-mode rule ...".
    torch.manual_seed(10)  # test-only: nn.Linear draws from the global RNG
    model = nn.Sequential(nn.Linear(2, 3), _Cumprod(), nn.Linear(3, 1))
    problem = poisson(2)
    batch = problem.sample(3, 2, generator=torch.Generator().manual_seed(11))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NotImplementedError, match=r"^linearize: no Taylor-mode rule for ATen "
                                                  r"operator 'aten.cumprod.default'"):
        ENGDWoodbury(model, problem).step(batch)
    # train fails at its first evaluation, before any step or checkpoint
    with pytest.raises(NotImplementedError, match=r"^derivatives: .*'aten.cumprod.default'"):
        train(problem, model, "spring", steps=2, num_interior=3, num_boundary=2,
              checkpoint=tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_forward_assigned_to_a_layer_instance_leaves_the_mlp_fast_path():
    # mlp_structure checked exact layer types only, so a Sequential whose Linear had its forward
    # replaced on the instance took the fast path with the plain Linear formula: residuals off
    # by 0.05, silently.
    model = _mlp(nn.Tanh())
    first = model[0]
    first.forward = lambda x: nn.functional.linear(2 * x, first.weight, first.bias)
    assert mlp_structure(model) is None
    problem = poisson(2)
    batch = problem.sample(4, 3, generator=torch.Generator().manual_seed(14))
    r_ref, J_ref = reference_residuals(model, problem, batch)
    lin = linearize(model, problem, batch)
    torch.testing.assert_close(lin.residual, r_ref, **TOL)
    torch.testing.assert_close(lin.to_dense(), J_ref, **TOL)


class _BatchNormalised(nn.Module):
    """Normalises its input by the batch's statistics: ``u(x)`` depends on the other points."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))

    def forward(self, x):
        return self.net((x - x.mean(0)) / (1 + x.square().mean(0)))


def test_a_model_coupling_the_points_of_a_batch_is_refused():
    # Taylor mode propagated the batch mean as if it were a function of each point: linearize,
    # residuals and every optimizer returned derivatives of no function of x, without an error.
    torch.manual_seed(15)  # test-only: nn.Linear draws from the global RNG
    model = _BatchNormalised()
    problem = poisson(2)
    batch = problem.sample(5, 4, generator=torch.Generator().manual_seed(16))
    for call in (lambda: linearize(model, problem, batch), lambda: residuals(model, problem, batch),
                 lambda: ENGDWoodbury(model, problem).step(batch),
                 lambda: train(problem, model, "adam", steps=1, num_interior=5, num_boundary=4)):
        with pytest.raises(ValueError, match=r"output at a point depends on the other points"):
            call()


class _Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))

    def forward(self, x):
        return self.net(x + 1e-3 * torch.randn_like(x))


def test_a_random_forward_is_refused_but_adam_may_train_dropout():
    # Noise drawn in the forward: each linearize gave residuals and J of another network.
    problem = poisson(2)
    batch = problem.sample(4, 3, generator=torch.Generator().manual_seed(17))
    torch.manual_seed(18)  # test-only: nn.Linear and the model's noise draw from the global RNG
    with pytest.raises(ValueError, match=r"linearize: the model gives different outputs for the "
                                         r"same points at two calls"):
        linearize(_Noisy(), problem, batch)
    # stochastic training by design (Adam on a dropout network) stays allowed
    dropout = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 1))
    history = train(problem, dropout, "adam", steps=2, num_interior=4, num_boundary=3)
    assert len(history.loss) == 3 and all(math.isfinite(v) for v in history.loss)


def test_resume_refuses_a_model_that_differs_from_the_checkpoints(tmp_path):
    # A checkpoint of a SiLU network resumed silently into a tanh network with the same Linear
    # layers; one with another set of trainable parameters failed with torch's ValueError after
    # the model's parameters had already been overwritten by the checkpoint's.
    problem = poisson(2)
    kwargs = dict(num_interior=5, num_boundary=3, steps=2)
    train(problem, _mlp(nn.SiLU()), "engd", checkpoint=tmp_path / "c.pt", **{**kwargs, "steps": 1})
    with pytest.raises(ValueError, match=r"train: cannot resume .* differs in model .*SiLU"):
        train(problem, _mlp(nn.Tanh()), "engd", resume=tmp_path / "c.pt", **kwargs)
    frozen = _mlp(nn.SiLU(), seed=12)
    frozen[0].bias.requires_grad_(False)
    before = copy.deepcopy(frozen.state_dict())
    with pytest.raises(ValueError, match=r"train: cannot resume .*trainable parameters differ"):
        train(problem, frozen, "engd", resume=tmp_path / "c.pt", **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())


# --------------------------------------------------------------------------- coverage
class _FourierFeatures(nn.Module):
    """A fixed random projection (a buffer), sin / cos features, then a GELU MLP."""

    def __init__(self):
        super().__init__()
        self.register_buffer("B", torch.randn(2, 3, generator=torch.Generator().manual_seed(4)))
        self.net = nn.Sequential(nn.Linear(6, 4), nn.GELU(), nn.Linear(4, 1))

    def forward(self, x):
        z = x @ self.B
        return self.net(torch.cat([torch.sin(z), torch.cos(z)], -1))


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(2, 4), nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.c(h + nn.functional.silu(self.b(h)))


class _HardBoundary(nn.Module):
    """``u = x0 (1 - x0) net(x)``: the condition on x0 ∈ {0, 1} holds by construction."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 4), nn.Softplus(), nn.Linear(4, 1))

    def forward(self, x):
        return x[:, :1] * (1 - x[:, :1]) * self.net(x)


class _Frozen(nn.Module):
    """A frozen first weight, a frozen scale parameter and a buffer."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(2, 4), nn.Linear(4, 1)
        self.a.weight.requires_grad_(False)
        self.scale = nn.Parameter(torch.tensor(1.5), requires_grad=False)
        self.register_buffer("shift", torch.tensor(0.25))

    def forward(self, x):
        return self.c(nn.functional.mish(self.scale * self.a(x) + self.shift))


class _Doubled(nn.Sequential):
    """Looks like an MLP to ``type``-blind code, but scales its input."""

    def forward(self, x):
        return super().forward(2 * x)


def _custom_models():
    torch.manual_seed(5)  # test-only: nn.Linear draws from the global RNG
    frozen_bias = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    frozen_bias[0].bias.requires_grad_(False)
    return {
        "silu": _mlp(nn.SiLU()), "gelu_tanh": _mlp(nn.GELU("tanh")), "sin": _mlp(Sin()),
        "fourier": _FourierFeatures(), "residual": _Residual(), "hard_bc": _HardBoundary(),
        "frozen": _Frozen(), "sequential_subclass": _Doubled(nn.Linear(2, 4), nn.Tanh(),
                                                             nn.Linear(4, 1)),
        "flatten_inside": nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4, 1)),
        "frozen_bias": frozen_bias,
    }


def test_custom_models_jacobians_and_steps_match_torch_func():
    # A PDE with an advection term and a Laplacian over one coordinate (time-like x0).
    problem = linear_pde(lambda X: X[:, 0] * torch.sin(X[:, 1]), dim=2,
                         source=lambda X: X[:, 0] ** 2, laplacian_dims=(1,),
                         gradient=[1.0, -0.5], value=0.3)
    batch = problem.sample(6, 4, generator=torch.Generator().manual_seed(6))
    for name, model in _custom_models().items():
        if name in ("sequential_subclass", "flatten_inside", "frozen_bias"):
            assert mlp_structure(model) is None, name  # not the fast path's formula
        r_ref, J_ref = reference_residuals(model, problem, batch)
        trainable = torch.cat([torch.full((p.numel(),), p.requires_grad)
                               for p in model.parameters()])
        J_ref = J_ref[:, trainable]
        lin = linearize(model, problem, batch)
        torch.testing.assert_close(lin.residual, r_ref, **TOL, msg=name)
        torch.testing.assert_close(lin.to_dense(), J_ref, **TOL, msg=name)
        torch.testing.assert_close(lin.kernel(), J_ref @ J_ref.T, **TOL, msg=name)
        # ENGD and ENGD-Woodbury: the same step (a damping that keeps both solves accurate)
        steps = []
        for cls in (ENGD, ENGDWoodbury):
            copied = copy.deepcopy(model)
            cls(copied, problem, lr=1.0, damping=1e-4).step(batch)
            steps.append(torch.cat([(q - p).reshape(-1) for q, p in
                                    zip(copied.parameters(), model.parameters())]).detach())
        torch.testing.assert_close(steps[0], steps[1], rtol=1e-9, atol=1e-12, msg=name)
        frozen = ~trainable
        assert not steps[0][frozen].any(), name


class _LayerNormNet(nn.Module):
    def __init__(self, manual: bool):
        super().__init__()
        self.manual = manual
        self.a, self.ln, self.c = nn.Linear(2, 4), nn.LayerNorm(4), nn.Linear(4, 1)

    def forward(self, x):
        h = self.a(x)
        if self.manual:  # the same function written with mean / rsqrt
            centred = h - h.mean(-1, keepdim=True)
            h = centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + self.ln.eps)
            h = h * self.ln.weight + self.ln.bias
        else:
            h = self.ln(h)
        return self.c(torch.tanh(h))


def test_layer_norm_network_jacobian_matches_a_hand_written_layer_norm():
    # torch.func's third derivatives through nn.LayerNorm are wrong in this torch (off by
    # 0.2-0.9 against finite differences), so the reference network writes LayerNorm by hand.
    torch.manual_seed(7)  # test-only: nn.Linear draws from the global RNG
    model = _LayerNormNet(manual=False)
    with torch.no_grad():
        model.ln.weight.normal_(generator=torch.Generator().manual_seed(8))
    manual = copy.deepcopy(model)
    manual.manual = True
    problem = poisson(2)
    batch = problem.sample(5, 3, generator=torch.Generator().manual_seed(9))
    r_ref, J_ref = reference_residuals(manual, problem, batch)
    lin = linearize(model, problem, batch)
    torch.testing.assert_close(lin.residual, r_ref, **TOL)
    torch.testing.assert_close(lin.to_dense(), J_ref, **TOL)


def test_custom_model_trains_resumes_bit_for_bit_and_plots(tmp_path):
    problem = poisson(2)
    kwargs = dict(num_interior=8, num_boundary=4, options={"damping": 1e-6, "lr": 0.1})
    model = _FourierFeatures()
    start = copy.deepcopy(model.state_dict())
    full = train(problem, model, "spring", steps=3, **kwargs)
    first = _FourierFeatures()
    first.load_state_dict(start)
    train(problem, first, "spring", steps=1, checkpoint=tmp_path / "c.pt", **kwargs)
    resumed = train(problem, _FourierFeatures(), "spring", steps=3, resume=tmp_path / "c.pt",
                    **kwargs)
    assert resumed.loss == full.loss and resumed.l2_error == full.l2_error
    assert all(math.isfinite(v) for v in full.loss)
    resumed.plot(tmp_path / "run.png")
    assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"
    assert History.from_dict(resumed.to_dict()).loss == resumed.loss
