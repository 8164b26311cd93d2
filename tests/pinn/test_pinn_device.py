"""PINN residuals, Jacobians, solves, optimizers and ``train`` on an accelerator equal the CPU.

The device is the ``device`` fixture of ``tests/conftest.py`` (``CURVKIT_TEST_DEVICE``, default
``cuda``; ``cpu`` runs the same comparisons CPU against CPU to check the tests themselves).
Points are drawn on the CPU from seeded generators and moved, so both runs see the same points.
The damping keeps every solve well conditioned (``cond ≲ 1e6``): the device's round-off then
changes the results far below the tolerances (checked by perturbing the inputs).
"""

import copy
import io
import math

import pytest
import torch
from pinn_references import reference_residuals

from curvkit.pinn import (
    ENGD,
    SPRING,
    ENGDWoodbury,
    HessianFree,
    Sin,
    derivatives,
    heat,
    kernel_solve,
    linearize,
    log_fokker_planck,
    loss,
    mlp,
    poisson,
    residuals,
    taylor_derivatives,
    train,
)
from curvkit.pinn import _mlp as mlp_module
from curvkit.pinn.residuals import taylor_residuals

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems (tests/conftest.py)


PROBLEMS = {
    "poisson2": lambda: poisson(2, hidden=(6,)),
    "poisson5": lambda: poisson(5, hidden=(6,)),
    "heat1": lambda: heat(1, hidden=(6,)),  # a Laplacian over some coordinates only
}
SMALL = dict(num_interior=30, num_boundary=12, num_eval=200)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _setup(name, n_in=40, n_bd=16, hidden=(6, 5), activation=torch.nn.Tanh, seed=0):
    problem = PROBLEMS[name]()
    g = _gen(seed)
    model = mlp(problem.dim, hidden, activation=activation, generator=g)
    return problem, model, problem.sample(n_in, n_bd, generator=g)


def _to(model, batch, device):
    return copy.deepcopy(model).to(device), tuple(X.to(device) for X in batch)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _close(a, b, rtol=1e-10):
    """``‖a - b‖ <= rtol ‖b‖`` (normwise: the round-off of another device is spread evenly)."""
    a, b = a.detach().cpu(), b.detach().cpu()
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    error, scale = float((a - b).norm()), float(b.norm())
    assert error <= rtol * scale, f"relative error {error / max(scale, 1e-300):.2e} > {rtol:.0e}"


# --------------------------------------------------------------------------- sampling
@pytest.mark.parametrize(
    "problem", [poisson(2), poisson(5), heat(1), log_fokker_planck(2)], ids=lambda p: p.name
)
def test_points_sampled_for_the_device_are_the_cpu_points(problem, device):
    on_device = problem.sample(7, 5, generator=_gen(3), device=device)
    on_cpu = problem.sample(7, 5, generator=_gen(3))
    for a, b in zip(on_device, on_cpu):
        assert a.device == device and a.dtype == F64
        assert torch.equal(a.cpu(), b)
    X = problem.sample_interior(4, generator=_gen(1), dtype=torch.float32, device=device)
    assert X.device == device and X.dtype == torch.float32


# --------------------------------------------------------------------------- residuals, J
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_residuals_and_jacobian_on_device_equal_cpu(name, device):
    problem, model, batch = _setup(name)
    dev_model, dev_batch = _to(model, batch, device)
    dims = problem.laplacian_dims

    r = residuals(dev_model, problem, dev_batch)
    assert r.device == device
    _close(r, residuals(model, problem, batch))
    _close(loss(dev_model, problem, dev_batch), loss(model, problem, batch))
    _close(taylor_residuals(dev_model, problem, dev_batch), r.cpu())
    reference = derivatives(model, batch[0], laplacian_dims=dims)
    for path in (derivatives, taylor_derivatives):  # the fast path and the general one
        for a, b in zip(path(dev_model, dev_batch[0], laplacian_dims=dims), reference):
            assert a.device == device
            _close(a, b)

    lin, lin_cpu = linearize(dev_model, problem, dev_batch), linearize(model, problem, batch)
    J = lin.to_dense()
    assert lin.device == device and J.device == device and lin.residual.device == device
    _close(lin.residual, lin_cpu.residual)
    _close(J, lin_cpu.to_dense())
    r_ref, J_ref = reference_residuals(dev_model, problem, dev_batch)
    assert J_ref.device == device
    _close(J, J_ref.cpu())
    _close(lin.residual, r_ref.cpu())
    for method in ("auto", "gram", "block"):
        K = lin.kernel(method=method)
        assert K.device == device
        _close(K, lin_cpu.kernel(method=method))
    g = _gen(5)
    v = torch.randn(J.shape[1], 3, generator=g, dtype=F64)
    u = torch.randn(J.shape[0], 2, generator=g, dtype=F64)
    for k in (1, 3):  # the contraction path (few columns) and the block path
        _close(lin @ v[:, :k].to(device), lin_cpu @ v[:, :k])
    for k in (1, 2):
        _close(lin.T @ u[:, :k].to(device), lin_cpu.T @ u[:, :k])
    dense = linearize(dev_model, problem, dev_batch, dense=True)
    assert dense.device == device
    _close(dense.to_dense(), J.cpu())
    _close(dense.kernel(), lin_cpu.kernel())


@pytest.mark.parametrize("activation", [torch.nn.Tanh, torch.nn.Sigmoid, Sin])
def test_fast_path_on_device_equals_cpu_row_chunks(activation, device, monkeypatch):
    # The CPU splits the points into cache-sized row chunks; an accelerator takes them in one
    # pass (chunks would only add launches). Both give the unchunked values.
    problem, model, batch = _setup("heat1", n_in=11, activation=activation)
    assert mlp_module.mlp_structure(model) is not None
    dev_model, (X, _) = _to(model, batch, device)

    def run(m, X):
        d = derivatives(m, X, laplacian_dims=problem.laplacian_dims)
        target = (d.laplacian.square() + d.gradient.sum(1) + d.value).sum()
        grads = torch.autograd.grad(target, list(m.parameters()))
        return [t.detach() for t in d] + list(grads)

    whole = run(model, batch[0])
    structure = mlp_module.mlp_structure(model)
    width = max(max(o, i) for o, i, _ in structure.linear_shapes)
    monkeypatch.setattr(mlp_module, "_CHUNK_BYTES", 4 * X.shape[1] * width * X.element_size())
    assert mlp_module._chunk_rows(structure, batch[0]) == 4  # chunks of 4, 4, 3 points
    assert mlp_module._chunk_rows(structure, X) == (4 if device.type == "cpu" else X.shape[0])
    for chunked, on_device, reference in zip(run(model, batch[0]), run(dev_model, X), whole):
        assert on_device.device == device
        _close(chunked, reference)
        _close(on_device, reference)


# --------------------------------------------------------------------------- optimizer steps
STEPPERS = {
    "engd": lambda m, p, lr: ENGD(m, p, lr=lr, damping=1e-4),
    "woodbury": lambda m, p, lr: ENGDWoodbury(m, p, lr=lr, damping=1e-4),
    "spring": lambda m, p, lr: SPRING(m, p, lr=lr, momentum=0.5, damping=1e-4),
    "hessian_free": lambda m, p, lr: HessianFree(m, p, lr=lr, damping=1e-2, max_iter=3, rtol=1e-30),
}


def _steps(make, model, problem, batches, lr):
    opt = make(model, problem, lr)
    out = []
    for batch in batches:
        value = opt.step(batch)
        out.append((value, opt.state[opt.param_groups[0]["params"][0]]["step_size"]))
    return opt, out


@pytest.mark.parametrize("lr", [0.05, "line_search"])
@pytest.mark.parametrize("method", list(STEPPERS))
def test_steps_on_device_equal_cpu_steps(method, lr, device):
    problem, model, _ = _setup("poisson2")
    g = _gen(8)
    batches = [problem.sample(40, 16, generator=g) for _ in range(2)]  # two: SPRING's momentum
    dev_model = copy.deepcopy(model).to(device)
    dev_batches = [tuple(X.to(device) for X in b) for b in batches]
    opt, on_device = _steps(STEPPERS[method], dev_model, problem, dev_batches, lr)
    _, on_cpu = _steps(STEPPERS[method], model, problem, batches, lr)
    for (a, eta_a), (b, eta_b) in zip(on_device, on_cpu):
        assert isinstance(a, float) and a == pytest.approx(b, rel=1e-10)
        assert eta_a == pytest.approx(eta_b, rel=1e-10)  # a grid point, or SPRING's constraint
    assert all(p.device == device for p in dev_model.parameters())
    _close(_flat(dev_model), _flat(model), rtol=1e-8)
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                assert value.device == device


@pytest.mark.parametrize("solver", ["nystrom", "nystrom_stable", "nystrom_pcg"])
def test_nystrom_solves_on_device_with_a_cpu_generator_equal_cpu(solver, device):
    problem, model, batch = _setup("poisson2", n_in=30, n_bd=10)
    dev_model, dev_batch = _to(model, batch, device)
    lin, lin_cpu = linearize(dev_model, problem, dev_batch), linearize(model, problem, batch)
    options = dict(damping=1e-3, solver=solver, rank=12)
    u = kernel_solve(lin, -lin.residual, generator=_gen(2), **options)
    assert u.device == device and u.shape == lin.residual.shape
    expected = kernel_solve(lin_cpu, -lin_cpu.residual, generator=_gen(2), **options)
    _close(u, expected, rtol=1e-7)
    K = lin.kernel()
    with_kernel = kernel_solve(lin, -lin.residual, kernel=K, generator=_gen(2), **options)
    assert with_kernel.device == device
    _close(with_kernel, expected, rtol=1e-7)
    # a generator on the device draws other sketches, but must work and stay there
    if device.type != "cpu":
        own = kernel_solve(lin, -lin.residual, generator=torch.Generator(device), **options)
        assert own.device == device and torch.isfinite(own).all()


RANDOMIZED = {
    "woodbury_nystrom": lambda m, p: ENGDWoodbury(
        m, p, lr=0.05, damping=1e-2, solver="nystrom", rank=8, seed=3
    ),
    "woodbury_stable": lambda m, p: ENGDWoodbury(
        m, p, damping=1e-2, solver="nystrom_stable", rank=8, seed=3
    ),
    "spring_pcg": lambda m, p: SPRING(
        m, p, lr=0.05, momentum=0.9, damping=1e-2, solver="nystrom_pcg", rank=8
    ),
    "spring_exact": lambda m, p: SPRING(m, p, momentum=0.9, damping=1e-4),
}


@pytest.mark.parametrize("method", list(RANDOMIZED))
def test_optimizer_state_resumes_on_device_and_loads_on_cpu(method, device):
    problem, model, _ = _setup("poisson2")
    g = _gen(9)
    batches = [problem.sample(30, 10, generator=g) for _ in range(4)]
    dev_batches = [tuple(X.to(device) for X in b) for b in batches]
    a = copy.deepcopy(model).to(device)
    opt_a = RANDOMIZED[method](a, problem)
    for batch in dev_batches[:2]:
        opt_a.step(batch)
    buffer = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    b = copy.deepcopy(model).to(device)
    b.load_state_dict(saved["model"])
    opt_b = RANDOMIZED[method](b, problem)
    opt_b.load_state_dict(saved["opt"])
    c = copy.deepcopy(model)  # the CPU takes the device's checkpoint
    c.load_state_dict(saved["model"])
    opt_c = RANDOMIZED[method](c, problem)
    opt_c.load_state_dict(saved["opt"])
    for state in opt_c.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                assert value.device == torch.device("cpu")
    for dev_batch, batch in zip(dev_batches[2:], batches[2:]):
        loss_a = opt_a.step(dev_batch)
        assert opt_b.step(dev_batch) == loss_a
        loss_c = opt_c.step(batch)
        assert math.isfinite(loss_c)
    assert torch.equal(_flat(a), _flat(b))
    assert all(p.device == device for p in a.parameters())
    if method == "spring_exact":  # no sketch: the CPU continues exactly as the device does
        _close(_flat(c), _flat(a).cpu(), rtol=1e-8)


# (nystrom_pcg converges whatever the sketch in a few iterations: it would agree anyway)
@pytest.mark.parametrize("method", ["woodbury_nystrom", "woodbury_stable"])
def test_randomized_steps_on_device_equal_cpu_steps_or_repeat(method, device):
    # The sketches are drawn on the solve's device (the GPU-efficient variant draws no host
    # data), so a seeded randomized run is reproducible on one device and equals the CPU run
    # only on the CPU.
    problem, model, _ = _setup("poisson2")
    g = _gen(10)
    batches = [problem.sample(30, 10, generator=g) for _ in range(2)]
    runs = []
    for _ in range(2):
        dev_model = copy.deepcopy(model).to(device)
        opt_dev = RANDOMIZED[method](dev_model, problem)
        for batch in batches:
            opt_dev.step(tuple(X.to(device) for X in batch))
        runs.append(_flat(dev_model))
    assert torch.equal(runs[0], runs[1])
    assert runs[0].device == device and torch.isfinite(runs[0]).all()
    if device.type == "cpu":
        opt_cpu = RANDOMIZED[method](model, problem)
        for batch in batches:
            opt_cpu.step(batch)
        _close(runs[0], _flat(model), rtol=1e-8)


# --------------------------------------------------------------------------- train
TRAIN_METHODS = {
    "spring": {"damping": 1e-4, "momentum": 0.5},
    "engd_woodbury": {"damping": 1e-4, "lr": 0.05},
    "engd": {"damping": 1e-4},
    "hessian_free": {"damping": 1e-2, "max_iter": 3, "rtol": 1e-30},
    "adam": {"lr": 1e-2},
}


def _same_history(a, b, rtol):
    assert a.step == b.step
    for key in ("loss", "l2_error", "step_size"):
        for x, y in zip(getattr(a, key), getattr(b, key)):
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=rtol), key


@pytest.mark.parametrize("method", list(TRAIN_METHODS))
def test_train_on_device_matches_cpu_and_resumes(method, device, tmp_path):
    problem = PROBLEMS["poisson2"]()
    run = dict(method=method, options=TRAIN_METHODS[method], **SMALL)
    on_cpu = train(problem, steps=3, **run)
    on_device = train(problem, steps=3, device=device, **run)
    _same_history(on_device, on_cpu, rtol=1e-9)
    # stopped after one step on the device, resumed there: the uninterrupted device run
    ckpt = tmp_path / "device.pt"
    train(problem, steps=1, device=device, checkpoint=ckpt, **run)
    resumed = train(problem, steps=3, device=device, resume=ckpt, **run)
    assert resumed.loss == on_device.loss and resumed.l2_error == on_device.l2_error
    # a CPU checkpoint resumes on the device (and the device's on the CPU)
    cpu_ckpt = tmp_path / "cpu.pt"
    train(problem, steps=1, checkpoint=cpu_ckpt, **run)
    _same_history(train(problem, steps=3, device=device, resume=cpu_ckpt, **run), on_cpu, 1e-9)
    _same_history(train(problem, steps=3, resume=ckpt, **run), on_cpu, 1e-9)


def test_train_with_a_given_model_on_the_device(device):
    problem = PROBLEMS["poisson2"]()
    model = mlp(2, (6,), generator=_gen(0))
    dev_model = copy.deepcopy(model).to(device)
    on_cpu = train(problem, model, "engd", steps=2, **SMALL)
    on_device = train(problem, dev_model, "engd", steps=2, **SMALL)  # device=None: the model's
    _same_history(on_device, on_cpu, rtol=1e-9)
    assert all(p.device == device for p in dev_model.parameters())
    _close(_flat(dev_model), _flat(model), rtol=1e-8)


# --------------------------------------------------------------------------- bad input
def test_points_off_the_models_device_raise_clearly(other_device):
    problem, model, batch = _setup("poisson2", n_in=6, n_bd=4)
    model = model.to(other_device)  # the points stay on the CPU
    where = f"{batch[0].device}.*{next(model.parameters()).device}"
    for call, caller in [
        (lambda: residuals(model, problem, batch), "residuals"),
        (lambda: loss(model, problem, batch), "residuals"),
        (lambda: linearize(model, problem, batch), "linearize"),
        (lambda: derivatives(model, batch[0]), "derivatives"),
        (lambda: ENGD(model, problem).step(batch), "linearize"),
        (lambda: SPRING(model, problem).step(batch), "linearize"),
        (lambda: problem.l2_error(model, batch[0]), "l2_error"),
    ]:
        with pytest.raises(ValueError, match=rf"{caller}: .*device.*{where}"):
            call()


def test_train_refuses_a_model_on_another_device(other_device):
    problem = PROBLEMS["poisson2"]()
    model = mlp(2, (6,), generator=_gen(0)).to(other_device)
    with pytest.raises(ValueError, match=r"train: device='cpu' but the model's parameters"):
        train(problem, model, "engd", steps=1, device="cpu", **SMALL)


def test_a_device_mismatch_is_not_reported_as_a_dtype_mismatch(other_device):
    problem, model, batch = _setup("poisson2", n_in=6, n_bd=4)
    model = model.to(other_device)
    with pytest.raises(ValueError) as info:
        residuals(model, problem, batch)
    headline = str(info.value).split("(")[0]
    assert "device" in headline and "dtype" not in headline, str(info.value)


def test_general_path_with_points_off_the_models_device_raises_clearly(other_device):
    problem, model, batch = _setup("poisson2", n_in=6, n_bd=4)
    model = model.to(other_device)
    with pytest.raises(ValueError, match=r"taylor_derivatives: .*device"):
        taylor_derivatives(model, batch[0])
