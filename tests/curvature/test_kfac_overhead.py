"""What a KFAC recompute costs per layer beyond its factors' arithmetic.

On an accelerator at small sizes a compute is bound by the host: every tensor call is a
dispatch (and often a kernel launch). A recompute casts nothing that already has the
parameters' dtype, and the work per layer stays a small, fixed number of tensor calls.
The checks that moved (one stack for all layers' counts and diagonal sums) still name the
right layer.
"""

import collections

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from curvkit.curvature.ekfac import EKFAC
from curvkit.curvature.kfac import KFAC


class _Calls(TorchFunctionMode):
    """Counts the torch calls made under it, and the ``Tensor.to`` calls that return their input."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()
        self.no_op_casts = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        self.calls[name] += 1
        if name == "to" and out is args[0]:
            self.no_op_casts += 1
        return out


def _mlp_op(layers, *, cls=KFAC, separate_bias=True, fisher="mc"):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)]).double()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 4, generator=g, dtype=torch.float64),
             torch.randint(0, 4, (6,), generator=g))]
    return cls(model, nn.CrossEntropyLoss(), data, fisher=fisher, separate_bias=separate_bias)


def _recompute_calls(op) -> _Calls:
    mode = _Calls()
    with mode:
        op.compute()
    return mode


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_a_recompute_makes_no_no_op_casts(cls):
    # Inputs, output gradients and counts already in the parameters' dtype are not cast
    # again (each no-op .to() is a dispatch; the old pass made 3 per layer).
    op = _mlp_op(3, cls=cls)
    assert _recompute_calls(op).no_op_casts == 0


@pytest.mark.parametrize("separate_bias,bound", [(True, 33), (False, 38)])
def test_tensor_calls_per_layer_of_a_recompute_are_bounded(separate_bias, bound):
    # The difference between a 4- and a 2-layer MLP is the cost of two layers, whatever the
    # data engine and the loss spend per batch. Attribute reads (shape, dtype) are not calls.
    # The old pass made 41 (separate bias) and 45 (joint) calls per layer; this one 30 and 35.
    counts = [_recompute_calls(_mlp_op(n, separate_bias=separate_bias)).calls for n in (2, 4)]
    per_layer = {k: (counts[1][k] - counts[0][k]) / 2 for k in counts[1] | counts[0]}
    per_layer.pop("__get__", None)
    assert sum(per_layer.values()) <= bound, per_layer


def test_the_recomputed_factors_equal_the_formula():
    # Independent float64 reference for the factors of a recompute after a parameter change:
    # A = mean of the inputs' outer products, G = Σ over examples of g gᵀ / N, with g the
    # sampled-label gradient at the layer output (type-2 would need the loss Hessian; the
    # empirical Fisher uses the true labels, so no sampling enters the reference).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (5,), generator=g)
    op = KFAC(model, nn.CrossEntropyLoss(), [(X, y)], fisher="empirical", separate_bias=True)
    with torch.no_grad():
        model[0].weight.add_(0.5)
    op.compute()
    h = torch.tanh(X @ model[0].weight.T + model[0].bias)
    out = h @ model[2].weight.T + model[2].bias
    r = torch.softmax(out, 1) - nn.functional.one_hot(y, 2)  # ∂(Σ ℓ)/∂out
    g2 = r
    g0 = (r @ model[2].weight) * (1 - h**2)
    N = X.shape[0]
    expected = {"0": (X.T @ X / N, g0.T @ g0 / N), "2": (h.T @ h / N, g2.T @ g2 / N)}
    for path, (A, G) in expected.items():
        torch.testing.assert_close(op.factors[path]["A"][0], A)
        torch.testing.assert_close(op.factors[path]["G"][0], G)


class _TwoBranches(nn.Module):
    """``first(x) + clamp(second(big))``: only ``second`` sees an infinite input."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        big = x.clone()
        big[:, 0] = float("inf")
        return self.first(x) + self.second(big).clamp(-1.0, 1.0)


def test_the_non_finite_layer_is_named_among_finite_ones():
    # The counts and diagonal sums of all layers are read in one piece: the error must name
    # the layer whose factor is not finite, not its neighbour.
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = torch.randn(4, 2, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="factors of layer 'second' are not finite"):
        KFAC(_TwoBranches().double(), nn.MSELoss(), [(X, y)], check_deterministic=False)


def test_zero_total_weight_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = torch.randn(4, 2, generator=g, dtype=torch.float64)
    w = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="layer '0' has no input of nonzero weight"):
        KFAC(model, nn.MSELoss(reduction="sum"), [(X, y, w)], check_deterministic=False)
