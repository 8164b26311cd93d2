import copy

import pytest
import torch
from torch.func import functional_call, hessian, jacrev, vmap

from curvkit.pinn.engd import ENGD, LINE_SEARCH_GRID, HessianFree, line_search
from curvkit.pinn.problems import Derivatives, heat, mlp, poisson
from curvkit.pinn.woodbury import SPRING, ENGDWoodbury


def _reference(model, problem, batch):
    """r̃ and J by torch.func nested autograd, independent of the library's code."""
    X_in, X_bd = batch
    idx = list(problem.laplacian_index)
    names = [k for k, v in model.named_parameters() if v.requires_grad]

    def r(params):
        full = dict(model.named_parameters()) | params
        u = lambda x: functional_call(model, full, (x.unsqueeze(0),)).reshape(())  # noqa: E731
        lap = vmap(hessian(u))(X_in).diagonal(dim1=1, dim2=2)[:, idx].sum(1)
        d = Derivatives(vmap(u)(X_in), vmap(jacrev(u))(X_in), lap)
        r_in = problem.residual(X_in, d) / X_in.shape[0] ** 0.5
        r_bd = (vmap(u)(X_bd) - problem.solution(X_bd)) / X_bd.shape[0] ** 0.5
        return torch.cat([r_in, r_bd])

    params = {k: v.detach() for k, v in model.named_parameters() if k in names}
    jac = jacrev(r)(params)
    J = torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in names], dim=1)
    return r(params).detach(), J


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _setup(n_in, n_bd, hidden=(5, 4), problem=None, seed=0):
    problem = poisson(2) if problem is None else problem
    g = torch.Generator().manual_seed(seed)
    model = mlp(problem.dim, hidden, generator=g)
    return problem, model, problem.sample(n_in, n_bd, generator=g)


@pytest.mark.parametrize("n_in, n_bd", [(7, 5), (60, 20)])  # N < P = 49 and N > P
@pytest.mark.parametrize("damping", [1e-6, 1e-3])
def test_engd_and_woodbury_equal_the_reference_step(n_in, n_bd, damping):
    problem, model, batch = _setup(n_in, n_bd)
    r, J = _reference(model, problem, batch)
    P = J.shape[1]
    expected = _flat(model) - torch.linalg.solve(J.T @ J + damping * torch.eye(P), J.T @ r)
    steps = {}
    for name, cls in (("engd", ENGD), ("woodbury", ENGDWoodbury)):
        m = copy.deepcopy(model)
        loss = cls(m, problem, lr=1.0, damping=damping).step(batch)
        assert loss == pytest.approx(0.5 * float(r.square().sum()), rel=1e-13)
        steps[name] = _flat(m)
    scale = (expected - _flat(model)).norm()
    for name in steps:
        assert (steps[name] - expected).norm() <= 1e-9 * scale, name
    # the two routes are the same linear algebra: they agree to float64 precision
    assert (steps["engd"] - steps["woodbury"]).norm() <= 1e-10 * scale


def test_woodbury_equals_engd_with_line_search_over_steps():
    problem, model, _ = _setup(30, 10, problem=heat(1))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    # λ sets the conditioning of both solves (P > N: JᵀJ is singular), hence the agreement.
    opt_a = ENGD(a, problem, damping=1e-5)
    opt_b = ENGDWoodbury(b, problem, damping=1e-5)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        batch = problem.sample(30, 10, generator=g)
        la, lb = opt_a.step(batch), opt_b.step(batch)
        assert la == pytest.approx(lb, rel=1e-9)
        assert opt_a.state[a[0].weight]["step_size"] == opt_b.state[b[0].weight]["step_size"]
    torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("lr", ["line_search", 0.5])
def test_spring_with_zero_momentum_is_woodbury(lr):
    problem, model, _ = _setup(25, 8)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    opt_a = SPRING(a, problem, lr=lr, momentum=0.0, damping=1e-9, norm_constraint=None)
    opt_b = ENGDWoodbury(b, problem, lr=lr, damping=1e-9)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = problem.sample(25, 8, generator=g)
        opt_a.step(batch)
        opt_b.step(batch)
    torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-12, atol=1e-14)


def test_spring_momentum_matches_closed_form_minimiser():
    problem, model, _ = _setup(9, 6)
    mu, lam, lr = 0.7, 1e-2, 0.3  # moderate λ: large steps would amplify rounding chaotically
    opt = SPRING(model, problem, lr=lr, momentum=mu, damping=lam, norm_constraint=None)
    ref = copy.deepcopy(model)
    phi = torch.zeros(sum(p.numel() for p in model.parameters()))
    g = torch.Generator().manual_seed(2)
    for k in range(3):
        batch = problem.sample(9, 6, generator=g)
        r, J = _reference(ref, problem, batch)
        # φ_k = argmin ‖Jφ - ε‖² + λ‖φ - μφ_{k-1}‖² = (JᵀJ + λI)^{-1} (Jᵀε + λμφ_{k-1})
        P = J.shape[1]
        phi = torch.linalg.solve(J.T @ J + lam * torch.eye(P), -J.T @ r + lam * mu * phi)
        d = phi / (1 - mu ** (2 * (k + 1))) ** 0.5
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(_flat(ref) + lr * d, ref.parameters())
        opt.step(batch)
        torch.testing.assert_close(_flat(model), _flat(ref), rtol=1e-8, atol=1e-10)


def test_spring_norm_constraint_limits_the_step():
    problem, model, batch = _setup(20, 8)
    before = _flat(model)
    opt = SPRING(model, problem, lr=1.0, momentum=0.0, damping=1e-6, norm_constraint=1e-6)
    opt.step(batch)
    # s = min(lr, sqrt(C)/‖φ‖) and μ = 0 (no bias correction): ‖Δθ‖ = min(‖φ‖, sqrt(C))
    step = (_flat(model) - before).norm()
    phi_norm = opt.state[model[0].weight]["phi_norm"]
    assert phi_norm > 1e-3  # so the constraint is active
    assert step == pytest.approx(1e-3, rel=1e-10)


def test_line_search_never_increases_the_loss():
    problem, model, _ = _setup(40, 12, hidden=(16,))
    opt = ENGDWoodbury(model, problem, damping=1e-2)
    g = torch.Generator().manual_seed(3)
    batch = problem.sample(40, 12, generator=g)
    losses = [opt.step(batch) for _ in range(10)]
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.01 * losses[0]
    assert opt.state[model[0].weight]["step_size"] in LINE_SEARCH_GRID


def test_line_search_takes_no_step_and_warns_when_nothing_helps():
    problem, model, batch = _setup(10, 5)
    opt = ENGDWoodbury(model, problem, damping=1e-8)
    opt._direction = lambda lin, group, params: lin.T @ lin.residual  # an ascent direction
    before = _flat(model)
    with pytest.warns(RuntimeWarning, match="ENGDWoodbury: no step size"):
        opt.step(batch)
    assert torch.equal(before, _flat(model))


def test_linear_model_one_step_solves_least_squares():
    # Only the last layer trains: the residuals are affine in θ (Gauss–Newton is exact).
    problem, model, batch = _setup(50, 20, hidden=(12,))
    model[0].requires_grad_(False)
    opt = ENGDWoodbury(model, problem, lr=1.0, damping=1e-12)
    r, J = _reference(model, problem, batch)
    optimum = 0.5 * float((r - J @ torch.linalg.lstsq(J, r).solution).square().sum())
    opt.step(batch)
    r_after, _ = _reference(model, problem, batch)
    assert 0.5 * float(r_after.square().sum()) == pytest.approx(optimum, rel=1e-8)


def test_hessian_free_converges_to_the_engd_step():
    problem, model, batch = _setup(30, 10)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ENGD(a, problem, lr=1.0, damping=1e-3).step(batch)
    opt = HessianFree(b, problem, lr=1.0, damping=1e-3, max_iter=500, rtol=1e-13)
    opt.step(batch)
    torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-8, atol=1e-10)
    # truncated to a few iterations it is a different (worse) step
    c = copy.deepcopy(model)
    HessianFree(c, problem, lr=1.0, damping=1e-3, max_iter=2).step(batch)
    assert (_flat(c) - _flat(a)).norm() > 1e-6


def test_spring_state_dict_resumes_bit_for_bit():
    problem, model, _ = _setup(20, 8)
    opt = SPRING(model, problem, lr=0.1, momentum=0.8, damping=1e-6, solver="nystrom", rank=10)
    g = torch.Generator().manual_seed(4)
    batches = [problem.sample(20, 8, generator=g) for _ in range(5)]
    for b in batches[:3]:
        opt.step(b)
    model2 = copy.deepcopy(model)
    opt2 = SPRING(model2, problem, lr=0.1, momentum=0.8, damping=1e-6, solver="nystrom", rank=10)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for b in batches[3:]:
        opt.step(b)
        opt2.step(b)
    assert torch.equal(_flat(model), _flat(model2))


def test_bad_options_raise():
    problem, model, _ = _setup(5, 5)
    with pytest.raises(ValueError, match="ENGD: lr must be 'line_search' or a positive float"):
        ENGD(model, problem, lr="armijo")
    with pytest.raises(ValueError, match="SPRING: momentum must be in"):
        SPRING(model, problem, momentum=1.0)
    with pytest.raises(ValueError, match="ENGDWoodbury: solver 'nystrom' needs an int rank"):
        ENGDWoodbury(model, problem, solver="nystrom")
    with pytest.raises(ValueError, match="ENGDWoodbury: damping must be"):
        ENGDWoodbury(model, problem, damping=-1.0)
    with pytest.raises(TypeError, match="ENGD: model must be an nn.Module"):
        ENGD(lambda x: x, problem)


def test_bad_options_raise_at_construction():
    # Each of these used to be accepted and fail later (or never) with an unrelated message.
    problem, model, _ = _setup(5, 5)
    with pytest.raises(TypeError, match="ENGD: problem must be a curvkit.pinn Problem; got str"):
        ENGD(model, "poisson")
    with pytest.raises(ValueError, match="SPRING: lr must be 'line_search' or a positive float"):
        SPRING(model, problem, lr=True)
    with pytest.raises(ValueError, match="SPRING: norm_constraint must be > 0 or None; got 'a'"):
        SPRING(model, problem, norm_constraint="a")
    with pytest.raises(ValueError, match="HessianFree: rtol must be a finite number >= 0"):
        HessianFree(model, problem, rtol=-1.0)
    with pytest.raises(ValueError, match="ENGDWoodbury: pcg_iterations must be an int >= 1"):
        ENGDWoodbury(model, problem, solver="nystrom_pcg", rank=3, pcg_iterations=0)
    with pytest.raises(ValueError, match="SPRING: seed must be an int; got 'a'"):
        SPRING(model, problem, solver="nystrom", rank=3, seed="a")
    with pytest.raises(ValueError, match="ENGDWoodbury: solver 'nystrom' needs damping > 0"):
        ENGDWoodbury(model, problem, solver="nystrom", rank=3, damping=0.0)


def test_line_search_takes_float_or_tensor_losses_alike():
    # (x - 0.3)² along the direction 1 from 0: the best grid step is 2^-2 = 0.25
    params, direction = [torch.zeros(1)], [torch.ones(1)]
    as_tensor = lambda ps: (ps[0] - 0.3).square().sum()  # noqa: E731
    as_float = lambda ps: float(as_tensor(ps))  # noqa: E731
    for loss_fn in (as_tensor, as_float):
        assert line_search(loss_fn, params, direction, 0.09, caller="t") == 0.25
