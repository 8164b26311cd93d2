"""Taylor mode on an accelerator: jets and PDE operators equal the CPU and nested autograd.

The device is the ``device`` fixture of ``tests/conftest.py`` (``CURVKIT_TEST_DEVICE``, default
``cuda``; ``cpu`` runs the same comparisons CPU against CPU to check the tests themselves).
Randomized operators take CPU generators: their directions are drawn on the CPU and moved, so
both runs use the same directions.
"""

import copy

import pytest
import torch
from taylor_references import (
    biharmonic_reference,
    hessians,
    jet_reference,
    laplacian_reference,
    standard_laplacian,
)
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from curvkit.taylor import (
    DifferentialResult,
    biharmonic,
    jet,
    laplacian,
    split_indefinite,
    weighted_laplacian,
)
from curvkit.taylor.rewrite import simplify

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems (tests/conftest.py)


D = 3


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _tanh_net(C=1):
    torch.manual_seed(0)  # nn.Linear draws from the global RNG
    return nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, C))


def _mixed_net(C=2):
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(D, 6), nn.Softplus(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, C)
    )


class _Closure:
    """A plain function closing over a tensor (a graph constant on the tensor's device)."""

    def __init__(self, device):
        self.w = torch.tensor([0.5, -1.0, 2.0], dtype=F64, device=device)

    def __call__(self, X):
        return torch.sin(X @ self.w) * X[:, 0] + torch.exp(0.3 * X).sum(-1) + (X**3).sum(-1)


def _on(device, case):
    """``(f, params)`` of a case on ``device`` (params: the tensors gradients flow into)."""
    if case == "tanh":
        net = _tanh_net().to(device)
        return net, list(net.parameters())
    if case == "mixed":
        net = _mixed_net().to(device)
        return net, list(net.parameters())
    f = _Closure(device)
    f.w.requires_grad_(True)
    return f, [f.w]


CASES = ["tanh", "mixed", "closure"]


def _points(N=4, seed=2):
    return torch.randn(N, D, generator=_gen(seed), dtype=F64)


def _close(a, b, rtol=1e-10):
    """``‖a - b‖ <= rtol ‖b‖`` (normwise: the round-off of another device is spread evenly)."""
    a, b = a.detach().cpu(), b.detach().cpu()
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    error, scale = float((a - b).norm()), float(b.norm())
    assert error <= rtol * scale, f"relative error {error / max(scale, 1e-300):.2e} > {rtol:.0e}"


def _leaves(result):
    if isinstance(result, DifferentialResult):
        return [t for t in result if t is not None]
    return [result]


OPERATORS = {
    "laplacian": lambda f, dev: laplacian(f, return_value=True, return_gradient=True),
    "laplacian_standard": lambda f, dev: laplacian(f, collapsed=False),
    "laplacian_rademacher": lambda f, dev: laplacian(
        f, randomization=("rademacher", 4), return_gradient=True
    ),
    "weighted_constant": lambda f, dev: weighted_laplacian(
        f, torch.randn(D, 2, generator=_gen(5), dtype=F64).to(dev), return_gradient=True
    ),
    "weighted_x_dependent": lambda f, dev: weighted_laplacian(
        f, lambda X: torch.stack([X.sin(), X**2], dim=-1), collapsed=False
    ),
    "weighted_normal": lambda f, dev: weighted_laplacian(
        f, torch.randn(D, 2, generator=_gen(5), dtype=F64).to(dev), randomization=("normal", 3)
    ),
    "biharmonic": lambda f, dev: biharmonic(f, return_value=True),
    "biharmonic_standard": lambda f, dev: biharmonic(f, collapsed=False),
    "biharmonic_normal": lambda f, dev: biharmonic(f, randomization=("normal", 3)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", list(OPERATORS))
def test_operator_on_device_equals_cpu(name, case, device):
    X = _points()
    outputs, grads = [], []
    for dev in (torch.device("cpu"), device):
        f, params = _on(dev, case)
        op = OPERATORS[name](f, dev)
        result = op(X.to(dev), generator=_gen(7))  # (ignored by the exact operators)
        leaves = _leaves(result)
        for t in leaves:
            assert t.device == dev and t.dtype == F64
        # autograd through the Taylor-mode pass reaches the parameters on their device
        weights = [torch.randn(t.shape, generator=_gen(8), dtype=F64).to(dev) for t in leaves]
        total = sum((t * w).sum() for t, w in zip(leaves, weights))
        g = torch.autograd.grad(total, params, allow_unused=True, materialize_grads=True)
        assert all(t.device == dev for t in g)
        outputs.append(leaves)
        grads.append(g)
    for a, b in zip(outputs[1], outputs[0]):
        _close(a, b)
    for a, b in zip(grads[1], grads[0]):
        _close(a, b, rtol=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_operators_on_device_equal_nested_autograd_on_device(case, device):
    f, _ = _on(device, case)
    X = _points(3).to(device)
    H = hessians(f, X)  # (N, [C,] D, D) by torch.func, on the device
    assert H.device == device
    _close(laplacian(f)(X), laplacian_reference(f, X), rtol=1e-9)
    sigma = torch.randn(D, 2, generator=_gen(5), dtype=F64).to(device)
    expected = torch.einsum("...de,dr,er->...", H, sigma, sigma)
    _close(weighted_laplacian(f, sigma)(X), expected, rtol=1e-9)
    A = torch.randn(D, D, generator=_gen(6), dtype=F64).to(device)
    C = A + A.T  # indefinite: signs of both kinds
    s, signs = split_indefinite(C)
    assert s.device == device and signs.device == device
    _close(weighted_laplacian(f, s, signs=signs)(X), torch.einsum("...de,de->...", H, C), 1e-9)
    _close(biharmonic(f)(X), biharmonic_reference(f, X), rtol=1e-8)


def test_float32_operators_on_device_track_float64(device):
    # float32 on the device (no TF32 or other reduced-precision matmuls behind the user's back)
    X = _points()
    net = _mixed_net()
    exact = [laplacian(net)(X), biharmonic(net)(X)]
    low = copy.deepcopy(net).to(device, torch.float32)
    X32 = X.to(device, torch.float32)
    for op, expected in zip((laplacian(low), biharmonic(low)), exact):
        out = op(X32)
        assert out.device == device and out.dtype == torch.float32
        _close(out.to(F64), expected, rtol=1e-4)


@pytest.mark.parametrize("order", [1, 2, 4])
def test_jet_on_device_equals_cpu_and_the_reference(order, device):
    x0 = _points(2, seed=3)
    series = [torch.randn(2, D, generator=_gen(10 + k), dtype=F64) for k in range(order)]
    results = []
    for dev in (torch.device("cpu"), device):
        net = _mixed_net().to(dev)
        value, coefficients = jet(net, order)(x0.to(dev), [s.to(dev) for s in series])
        assert value.device == dev and all(c.device == dev for c in coefficients)
        results.append((net, [value, *coefficients]))
    for a, b in zip(results[1][1], results[0][1]):
        _close(a, b)
    net = results[1][0]
    reference = jet_reference(net, x0.to(device), [s.to(device) for s in series])
    for a, b in zip(results[1][1], reference):
        _close(a, b.cpu(), rtol=1e-9)


def test_detach_stops_the_coefficients_on_device(device):
    X = _points(3, seed=4).to(device).requires_grad_(True)

    def f(x):
        return (x**2).sum(-1) * x.detach()[:, 0] + (x.detach() ** 3).sum(-1) + x.data.sum(-1)

    out = laplacian(f)(X)
    assert out.device == device
    _close(out, 2 * D * X.detach()[:, 0].cpu())
    (grad,) = torch.autograd.grad(out.sum(), X)
    assert grad.device == device and not grad.any()
    x = torch.tensor([2.0], dtype=F64, device=device)
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    value, (d1, d2) = jet(lambda x: x.detach() * x, 2)(x, (one, zero))
    assert d1.device == device
    _close(torch.stack([value, d1, d2]), torch.tensor([[4.0], [2.0], [0.0]], dtype=F64))


def test_operator_follows_the_model_across_devices(device):
    # One operator, its graph cached per device: after model.to(device) it runs there.
    net = _tanh_net(C=2)
    op = laplacian(net, return_value=True)
    X = _points()
    on_cpu = op(X)
    net.to(device)
    on_device = op(X.to(device))
    assert on_device.operator.device == device
    for a, b in zip(_leaves(on_device), _leaves(on_cpu)):
        _close(a, b)
    net.cpu()  # and back: the CPU graph is still cached and reads the moved parameters
    _close(op(X).operator, on_cpu.operator)


def test_collapsing_rewrite_on_device_equals_cpu(device):
    g = _gen(11)
    widths = (D, 6, 4, 1)
    params = [
        (torch.randn(b, a, generator=g, dtype=F64), torch.randn(b, generator=g, dtype=F64))
        for a, b in zip(widths[:-1], widths[1:])
    ]
    X = _points(5, seed=12)
    results = []
    for dev in (torch.device("cpu"), device):
        moved = [(W.to(dev), b.to(dev)) for W, b in params]
        inputs = [
            X.to(dev),
            torch.eye(D, dtype=F64, device=dev).unsqueeze(1).expand(D, 5, D).contiguous(),
            torch.zeros(D, 5, D, dtype=F64, device=dev),
        ]
        gm = make_fx(standard_laplacian(moved))(*inputs)
        gm, counts = simplify(gm, inputs, check=True)
        assert counts["pull_sum"] >= len(params)
        out = gm(*inputs)
        assert out.device == dev
        results.append((out, moved, inputs[0]))
    _close(results[1][0], results[0][0])
    _, moved, Xd = results[1]

    def f(x):
        for i, (W, b) in enumerate(moved):
            x = x @ W.T + b
            if i < len(moved) - 1:
                x = torch.tanh(x)
        return x

    _close(results[1][0], laplacian_reference(f, Xd).cpu(), rtol=1e-9)


# --------------------------------------------------------------------------- bad input
def test_points_off_the_models_device_raise_clearly(other_device):
    net = _tanh_net()  # on the CPU
    X = _points().to(other_device)
    with pytest.raises(ValueError, match=r"laplacian: .*device"):
        laplacian(net)(X)


def test_a_constant_sigma_on_the_cpu_follows_the_points(device):
    sigma = torch.randn(D, 2, generator=_gen(5), dtype=F64)  # on the CPU
    signs = torch.tensor([1.0, -1.0], dtype=F64)
    X = _points()
    op = weighted_laplacian(lambda x: (x**3).sum(-1), sigma, signs=signs)
    out = op(X.to(device))
    assert out.device == device
    _close(out.cpu(), op(X), rtol=1e-12)
