import pytest
import torch
from taylor_references import jet_reference
from torch import nn

from curvkit.taylor import jet

ORDERS = range(6)


def _mlp(activation, g, D=3, C=2):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    return nn.Sequential(nn.Linear(D, 5), activation, nn.Linear(5, 4), activation, nn.Linear(4, C))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(torch.sin(x + self.inner(x)))


C = torch.tensor([[0.5, -1.0, 2.0, 0.3]], dtype=torch.float64)
W = torch.tensor([[1.0, 2.0], [-0.5, 0.25]], dtype=torch.float64)

PRIMITIVES = {
    "sin": torch.sin,
    "cos": torch.cos,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "exp": torch.exp,
    "expm1": torch.expm1,
    "log": lambda x: torch.log(x + 3),
    "log1p": lambda x: torch.log1p(x + 2),
    "sqrt": lambda x: torch.sqrt(x + 3),
    "rsqrt": lambda x: torch.rsqrt(x + 3),
    "reciprocal": lambda x: torch.reciprocal(x + 3),
    "square": lambda x: x**2,
    "pow10": lambda x: x**10,
    "pow3": lambda x: x**3,
    "pow1.5": lambda x: (x + 3) ** 1.5,
    "softplus": nn.functional.softplus,
    "softplus_beta": lambda x: nn.functional.softplus(x, beta=2.0, threshold=3.0),
    "relu": torch.relu,
    "leaky_relu": lambda x: nn.functional.leaky_relu(x, 0.1),
    "abs": torch.abs,
    "hardtanh": lambda x: nn.functional.hardtanh(x, -0.5, 0.5),
    "clamp": lambda x: torch.clamp(x, min=-0.3),
    "add_scalar": lambda x: x + 2.0,
    "sub_scalar": lambda x: x - 3.0,
    "rsub": lambda x: 2.0 - x,
    "add_self": lambda x: x + x,
    "sub_alpha": lambda x: torch.sub(x.sin(), x, alpha=2.0),
    "mul_self": lambda x: x * x,
    "mul_const": lambda x: x * C,
    "mul_jets_broadcast": lambda x: x.sin() * x[:2].cos().unsqueeze(-1),
    "div_const": lambda x: x / 3.0,
    "div_jets": lambda x: x.sin() / (x * x + 1),
    "const_div_jet": lambda x: C / (x.cos() + 2),
    "neg": lambda x: -x.tanh(),
    "sum": lambda x: x.sin().sum(),
    "sum_dim": lambda x: x.tanh().sum(-1, keepdim=True),
    "mean": lambda x: (x * x).mean(),
    "view_mm": lambda x: x.view(2, 2) @ W,
    "mm_jets": lambda x: x.view(2, 2) @ x.sin().view(2, 2),
    "mv": lambda x: W @ x[:2].tanh(),
    "dot": lambda x: torch.dot(x, x.sin()),
    "transpose_permute": lambda x: x.view(2, 2).t().sin().unsqueeze(0).permute(2, 0, 1),
    "squeeze_expand": lambda x: x.view(1, 4).squeeze(0).expand(3, 4).exp(),
    "cat_const": lambda x: torch.cat([x.sin(), C[0], x]),
    "stack": lambda x: torch.stack([x, x.cos()], dim=1),
    "slice_index": lambda x: x[1:3].sin() * x[torch.tensor([0, 3])],
    "select_flip": lambda x: x.flip(0)[2] * x,
    "split_unbind": lambda x: x.split(2)[1].exp() + x.view(2, 2).unbind(0)[0],
    "where": lambda x: torch.where(x > 0, x.sin(), x * x),
}


@pytest.mark.parametrize("name", PRIMITIVES)
def test_primitive_jets_match_nested_autograd(name):
    f = PRIMITIVES[name]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, generator=g)
    for K in ORDERS:
        series = [torch.randn(4, generator=g) for _ in range(K)]
        value, coefficients = jet(f, K)(x0, series)
        expected = jet_reference(f, x0, series)
        assert len(coefficients) == K
        for k, (ours, ref) in enumerate(zip([value, *coefficients], expected)):
            torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10,
                                       msg=f"{name}: order {K}, coefficient {k}")


COMPOSITIONS = {
    "mlp_tanh": lambda g: _mlp(nn.Tanh(), g),
    "mlp_sin": lambda g: nn.Sequential(nn.Linear(3, 4), _Sin(), nn.Linear(4, 2)),
    "mlp_sigmoid": lambda g: _mlp(nn.Sigmoid(), g),
    "mlp_softplus": lambda g: _mlp(nn.Softplus(), g),
    "residual": lambda g: Residual(),
}


class _Sin(nn.Module):
    def forward(self, x):
        return torch.sin(x)


@pytest.mark.parametrize("name", COMPOSITIONS)
def test_module_jets_match_nested_autograd(name):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = COMPOSITIONS[name](g)
    x0 = torch.randn(2, 3, generator=g)  # a batch of two inputs
    for K in ORDERS:
        series = [torch.randn(2, 3, generator=g) for _ in range(K)]
        value, coefficients = jet(model, K)(x0, series)
        for ours, ref in zip([value, *coefficients], jet_reference(model, x0, series)):
            torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_jet_is_differentiable_in_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x0, x1, x2 = torch.randn(3, 3).unbind(0)
    params = list(model.parameters())
    _, (_, y2) = jet(model, 2)(x0, (x1, x2))
    ours = torch.autograd.grad(y2.sum(), params, allow_unused=True, materialize_grads=True)
    ref_y2 = jet_reference(model, x0, [x1, x2])[2]
    expected = torch.autograd.grad(ref_y2.sum(), params, allow_unused=True,
                                   materialize_grads=True)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)


def test_function_independent_of_input_has_zero_coefficients():
    c = torch.randn(3)
    value, (y1, y2) = jet(lambda x: c * 2, 2)(torch.randn(3), (torch.randn(3), torch.randn(3)))
    torch.testing.assert_close(value, 2 * c)
    assert not y1.any() and not y2.any()


def test_unsupported_operator_is_named():
    message = r"no Taylor-mode rule for ATen operator 'aten\.lgamma\.default'"
    with pytest.raises(NotImplementedError, match=message):
        jet(torch.lgamma, 2)(torch.randn(3), (torch.randn(3), torch.randn(3)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="order must be an integer >= 0; got -1"):
        jet(torch.sin, -1)
    with pytest.raises(ValueError, match="expected 2 series coefficients; got 1"):
        jet(torch.sin, 2)(torch.randn(3), (torch.randn(3),))
    with pytest.raises(ValueError, match=r"must have shape \(3,\); got \(2,\)"):
        jet(torch.sin, 1)(torch.randn(3), (torch.randn(2),))
    with pytest.raises(TypeError, match="f must be an nn.Module or a callable"):
        jet(3, 1)
