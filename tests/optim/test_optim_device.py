"""Every optimizer on an accelerator equals its CPU run; state lives and resumes on the device.

The device is the ``device`` fixture of ``tests/conftest.py`` (``CURVKIT_TEST_DEVICE``, default
``cuda``; ``cpu`` runs the same comparisons CPU against CPU to check the tests themselves).

The Kronecker methods start preconditioning at step 2, after three gradients: their factors are
then full rank with distinct eigenvalues, so that the bases are determined by the data and not by
the round-off in a null space (which differs between devices and would legitimately change the
per-coordinate Adam statistics of SOAP and KL-SOAP).
"""

import io

import pytest
import torch

from curvkit.optim import (
    KLSOAP,
    SOAP,
    KLShampoo,
    Muon,
    NonFiniteGradientError,
    Shampoo,
    SpectralShampoo,
    Symo,
    newton_schulz,
)

F64 = torch.float64


STEPS = 6
# Two matrices (square and tall), a bias, a conv kernel and a scalar.
SHAPES = [(5, 5), (6, 4), (6,), (4, 3, 3, 3), ()]
# SpectralShampoo has no delayed start: its one eigh sees the first gradient, and a tall
# matrix's G Gᵀ then has a degenerate null space (a device-dependent basis, see module doc).
SQUARE_SHAPES = [(5, 5), (4, 4), (6,), (4, 3, 3, 3), ()]
KRON = dict(precondition_frequency=2, start_preconditioning_step=2)


def _perm_groups(shape):  # module level: param groups are pickled by torch.save
    return ("sign",) if len(shape) == 1 else ("perm", "identity")


MAKERS = {
    "shampoo": (lambda p, **kw: Shampoo(p, lr=1e-2, **KRON, **kw), SHAPES),
    "shampoo_qr": (lambda p, **kw: Shampoo(p, lr=1e-2, basis_update="qr", **KRON, **kw), SHAPES),
    "soap": (lambda p, **kw: SOAP(p, lr=1e-2, **KRON, **kw), SHAPES),
    "soap_eigh": (lambda p, **kw: SOAP(p, lr=1e-2, basis_update="eigh", **KRON, **kw), SHAPES),
    "soap_subspace": (
        lambda p, **kw: SOAP(p, lr=1e-2, basis_update="subspace", subspace_rank=2, **KRON, **kw),
        SHAPES,
    ),
    "klshampoo": (lambda p, **kw: KLShampoo(p, lr=1e-3, **KRON, **kw), SHAPES),
    "klsoap": (lambda p, **kw: KLSOAP(p, lr=1e-3, **KRON, **kw), SHAPES),
    # float64 Newton–Schulz: the bfloat16 default is compared separately, loosely
    "muon": (lambda p, **kw: Muon(p, lr=1e-2, ns_dtype=None, **kw), SHAPES),
    "spectral_kl": (lambda p, **kw: SpectralShampoo(p, lr=1e-2, **kw), SQUARE_SHAPES),
    "spectral_shampoo": (
        lambda p, **kw: SpectralShampoo(
            p, lr=1e-2, target="shampoo", retraction="cayley", update_frequency=2, **kw
        ),
        SQUARE_SHAPES,
    ),
    "symo": (lambda p, **kw: Symo(p, lr=1e-2, **kw), SHAPES),
    "symo_perm": (
        lambda p, **kw: Symo(
            p,
            lr=1e-2,
            precondition_frequency=2,
            groups=_perm_groups,
            **kw,
        ),
        SHAPES,
    ),
}


def _initial(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=F64) for s in shapes]


def _gradients(shapes, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=F64) for s in shapes] for _ in range(steps)]


def _params(values, device, dtype=F64):
    return [v.to(device=device, dtype=dtype, copy=True).requires_grad_(True) for v in values]


def _take_steps(opt, params, grads, **step_options):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(device=p.device, dtype=p.dtype)
        opt.step(**step_options)


def _run(name, device, dtype=F64, steps=STEPS, **options):
    make, shapes = MAKERS[name]
    init = _initial(shapes)
    params = _params(init, device, dtype)
    opt = make(params, **options)
    _take_steps(opt, params, _gradients(shapes, steps))
    return init, params, opt


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _assert_state_on(opt, device):
    found = 0
    for state in opt.state.values():
        for t in _tensors(state):
            assert t.device == device, (t.shape, t.device)
            found += 1
    assert found > 0


def _assert_displacements_close(init, new, reference, rtol, atol=0.0):
    """``‖Δnew - Δref‖ <= rtol ‖Δref‖ + atol ‖init‖`` per parameter, ``Δ = · - init``.

    ``atol`` covers the rounding of low-precision parameters (their displacement is measured
    from stored values).
    """
    for x0, a, b in zip(init, new, reference):
        da = a.detach().cpu().to(F64) - x0
        db = b.detach().cpu().to(F64) - x0
        scale = db.norm()
        assert scale > 0, "the parameter did not move: the comparison would be empty"
        error = (da - db).norm()
        assert error <= rtol * scale + atol * x0.norm(), (tuple(x0.shape), float(error / scale))


@pytest.mark.parametrize("name", list(MAKERS))
def test_steps_on_device_equal_the_cpu_steps(name, device):
    init, cpu, _ = _run(name, "cpu")
    _, dev, opt = _run(name, device)
    for p in dev:
        assert p.device == device and p.dtype == F64
    _assert_displacements_close(init, dev, cpu, rtol=1e-8)
    _assert_state_on(opt, device)
    for state in opt.state.values():
        for t in _tensors(state):
            if t.is_floating_point():
                assert t.dtype == F64


def _round_trip(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("name", list(MAKERS))
def test_state_dict_resumes_on_the_device_and_loads_into_a_cpu_optimizer(name, device):
    make, shapes = MAKERS[name]
    grads = _gradients(shapes, STEPS)
    params = _params(_initial(shapes), device)
    opt = make(params)
    _take_steps(opt, params, grads[:3])
    saved = _round_trip(opt)
    snapshot = [p.detach().clone() for p in params]

    # a fresh optimizer on the device resumes bit for bit
    resumed = _params(snapshot, device)
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(saved)
    _assert_state_on(resumed_opt, device)
    # a CPU optimizer takes the device's state (moved to its parameters, as torch.optim does)
    on_cpu = _params(snapshot, "cpu")
    cpu_opt = make(on_cpu)
    cpu_opt.load_state_dict(saved)
    _assert_state_on(cpu_opt, torch.device("cpu"))

    _take_steps(opt, params, grads[3:])
    _take_steps(resumed_opt, resumed, grads[3:])
    _take_steps(cpu_opt, on_cpu, grads[3:])
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    _assert_displacements_close([s.cpu() for s in snapshot], on_cpu, params, rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(MAKERS))
def test_low_precision_parameters_on_device_track_the_float64_cpu_run(name, dtype, device):
    init, reference, _ = _run(name, "cpu")
    _, dev, opt = _run(name, device, dtype=dtype)
    for p in dev:
        assert p.device == device and p.dtype == dtype
        assert torch.isfinite(p).all()
    _assert_state_on(opt, device)
    for state in opt.state.values():  # working precision float32: state stored in float32
        for t in _tensors(state):
            if t.is_floating_point():
                assert t.dtype == torch.float32, (name, t.dtype)
    if dtype == torch.float32:
        _assert_displacements_close(init, dev, reference, rtol=2e-3, atol=1e-6)
        return
    # bfloat16 storage rounds every update (the same way on every device): within a few
    # spacings of the float64 run, and within about one of the CPU's bfloat16 run
    _, cpu, _ = _run(name, "cpu", dtype=dtype)
    for a, b, c in zip(dev, reference, cpu):
        a = a.detach().cpu().to(F64)
        torch.testing.assert_close(a, b.detach(), rtol=5e-2, atol=5e-2)
        torch.testing.assert_close(a, c.detach().to(F64), rtol=1.6e-2, atol=1e-3)


BF16_STATE = ["shampoo", "soap", "klshampoo", "klsoap", "muon", "spectral_kl", "symo"]


@pytest.mark.parametrize("name", BF16_STATE)
def test_bfloat16_state_on_device_matches_the_cpu_run(name, device):
    # Stochastic rounding draws its bits from CPU generators, so both runs round alike.
    init, cpu, _ = _run(name, "cpu", dtype=torch.float32, state_dtype=torch.bfloat16)
    _, dev, opt = _run(name, device, dtype=torch.float32, state_dtype=torch.bfloat16)
    _assert_state_on(opt, device)
    assert any(t.dtype == torch.bfloat16 for s in opt.state.values() for t in _tensors(s)), (
        "no bfloat16 state stored"
    )
    _assert_displacements_close(init, dev, cpu, rtol=5e-2)


@pytest.mark.parametrize("name", list(MAKERS))
def test_non_finite_gradient_on_device_raises_or_skips(name, device):
    make, shapes = MAKERS[name]
    params = _params(_initial(shapes), device)
    before = [p.detach().clone() for p in params]
    grads = _gradients(shapes, 1)[0]
    grads[1][0, 0] = float("nan")
    opt = make(params)
    with pytest.raises(NonFiniteGradientError):
        _take_steps(opt, params, [grads])
    for a, b in zip(params, before):
        assert torch.equal(a, b)
    skipping = make(params, nonfinite="skip")
    _take_steps(skipping, params, [grads])
    for a, b in zip(params, before):
        assert torch.equal(a, b)
    assert all(s.get("skipped_steps") == 1 for s in skipping.state.values())


@pytest.mark.parametrize("shape", [(8, 8), (12, 7), (7, 12)])
def test_newton_schulz_on_device_matches_cpu(shape, device):
    Y = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    exact = newton_schulz(Y, dtype=None)
    on_device = newton_schulz(Y.to(device), dtype=None)
    assert on_device.device == device and on_device.dtype == F64
    torch.testing.assert_close(on_device.cpu(), exact, rtol=1e-10, atol=1e-12)
    f32 = newton_schulz(Y.to(device, torch.float32), dtype=None)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.cpu().to(F64), exact, rtol=1e-4, atol=1e-4)
    # the bfloat16 default is 3-5 % off the float64 iteration on any device (and accumulates
    # in another order on an accelerator): a loose match, and the quintic's singular values
    bf16 = newton_schulz(Y.to(device))
    assert bf16.device == device and bf16.dtype == F64
    assert (bf16.cpu() - exact).norm() <= 0.15 * exact.norm()
    assert (bf16.cpu() - newton_schulz(Y)).norm() <= 0.15 * exact.norm()
    singular = torch.linalg.svdvals(bf16.cpu())
    assert 0.5 <= singular.min() and singular.max() <= 1.3, singular


def test_spectral_shampoo_targets_on_device_equal_cpu(device):
    g = torch.Generator().manual_seed(4)
    shapes = [(5, 4), (6,)]
    init = _initial(shapes)
    grads = _gradients(shapes, 3)

    def factors(n):
        A = torch.randn(n, n + 2, generator=g, dtype=F64)
        return A @ A.T

    targets = [(factors(5), factors(4)) for _ in range(3)]
    results = []
    for dev in ("cpu", device):
        params = _params(init, dev)
        opt = SpectralShampoo(params, lr=1e-2)
        for step_grads, (Ca, Cb) in zip(grads, targets):
            pair = (Ca.to(dev), Cb.to(dev))
            _take_steps(opt, params, [step_grads], targets={params[0]: pair})
        _assert_state_on(opt, torch.device(dev))
        results.append(params)
    _assert_displacements_close(init, results[1], results[0], rtol=1e-8)


def test_spectral_shampoo_targets_on_another_device_raise_clearly(other_device):
    device, other = torch.device("cpu"), other_device
    params = _params(_initial([(5, 4)]), device)
    opt = SpectralShampoo(params, lr=1e-2)
    params[0].grad = torch.ones(5, 4, dtype=F64, device=device)
    pair = (torch.eye(5, dtype=F64, device=other), torch.eye(4, dtype=F64, device=other))
    with pytest.raises(ValueError, match="device"):
        opt.step(targets={params[0]: pair})


@pytest.mark.parametrize("name", ["shampoo", "soap", "muon", "symo", "spectral_kl"])
def test_parameters_on_the_device_and_the_cpu_in_one_optimizer(name, device):
    # torch.optim optimizers take parameters on several devices (e.g. an embedding kept on the
    # CPU); each parameter's update only involves its own tensors.
    init, alone, _ = _run(name, "cpu")
    make, shapes = MAKERS[name]
    params = [
        v.to(device if i % 2 == 0 else "cpu", copy=True).requires_grad_(True)
        for i, v in enumerate(init)
    ]
    opt = make(params)
    _take_steps(opt, params, _gradients(shapes, STEPS))
    for i, p in enumerate(params):
        assert p.device == (device if i % 2 == 0 else torch.device("cpu"))
    _assert_displacements_close(init, params, alone, rtol=1e-8)
