"""KFAC "other" blocks by a loop over the examples, for models torch.func.vmap cannot batch.

``looped_other_gradients`` must give what ``FactorPass.other_gradients`` gives (vmap over
one-example passes) where vmap works, and, on LSTM / GRU / PReLU (no vmap rule), per-example
gradients and GGN blocks that match references built without vmap:
``torch.autograd.functional.jacobian(vectorize=False)`` and the analytic MSE output Hessian.
"""

import pytest
import torch
from kfac_cases import (
    WithFreeParameters,
    cat_data,
    dense_ggn,
    flat_call,
    layer_mask,
    param_slices,
    regression_data,
    seeded,
)
from torch import nn
from torch.autograd.functional import jacobian

from curvkit.curvature.engine import Batch, DataEngine
from curvkit.curvature.kfac import KFAC
from curvkit.curvature.kfac_pass import FactorPass, _example_dims, plan_layers
from curvkit.curvature.losses import output_loss
from curvkit.curvature.per_example_loop import looped_other_gradients, vmap_unsafe_modules


class _Recurrent(nn.Module):
    """``(N, T, 3)`` → ``(N, 2)``: a recurrent layer read at its last step, then a Linear."""

    def __init__(self, cell):
        super().__init__()
        self.rnn, self.head = cell(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class _FreeFromDict(WithFreeParameters):
    """``WithFreeParameters`` on a mapping input with shared entries (a 0-d gain, a flag) next
    to per-example ones."""

    def forward(self, X):
        h = torch.tanh(self.lin(X["a"]) * self.scale * X["gain"] + self.shift.reshape(-1))
        out = self.out(h)
        return out if X["plain"] else out.neg()


class _Cell(nn.Module):
    """``(N, 3)`` → ``(N, 3)``: one step of a recurrent cell (its hidden state)."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell(3, 3)

    def forward(self, x):
        h = self.cell(x)
        return h[0] if isinstance(h, tuple) else h


MODELS = {  # constructor, input and output shapes per example
    "lstm": (lambda: _Recurrent(nn.LSTM), (3, 3), (2,)),
    "gru": (lambda: _Recurrent(nn.GRU), (3, 3), (2,)),
    "lstm_cell": (lambda: _Cell(nn.LSTMCell), (3,), (3,)),
    "prelu": (lambda: nn.Sequential(nn.Linear(3, 3), nn.PReLU(3)), (3,), (3,)),
}


def _engine(model, data, names=None):
    named = dict(model.named_parameters())
    params = {n: named[n] for n in (named if names is None else names)}
    return DataEngine(model, output_loss(nn.MSELoss(), caller="t", analytic=True), data, params,
                      caller="t", check_deterministic=False)


def _batch(X, y):
    N = y.shape[0]
    return Batch(X, y, None, N, float(y.numel()), 0)


def _vectors(K, out_shape, seed=1):
    return torch.randn(K, *out_shape, generator=torch.Generator().manual_seed(seed))


def _others(model):
    names = list(dict(model.named_parameters()))
    return plan_layers(model, dict(model.named_parameters()), separate_bias=False)[1], names


def test_loop_equals_the_vmap_path_where_vmap_works():
    model = seeded(_FreeFromDict)
    X, y = regression_data((3,), (3,), sizes=(4,))[0]
    data = [({"a": X, "gain": torch.tensor(0.8), "plain": False}, y)]
    engine = _engine(model, data)
    layers, others = plan_layers(model, dict(engine.params), separate_bias=False)
    assert others == ["scale", "shift"]
    fp = FactorPass(engine, layers, list(others), fisher="type2", mc_samples=1,
                    approx="expand", other="dense", check=False)
    batch = _batch(*data[0])
    V = _vectors(3, (4, 3))
    expected = fp.other_gradients(batch, V)
    received = looped_other_gradients(engine, batch, V, others, _example_dims(batch))
    assert list(received) == others
    for n in others:
        assert received[n].shape == expected[n].shape == (4, 3, engine.params[n].numel())
        assert received[n].dtype == expected[n].dtype
        torch.testing.assert_close(received[n], expected[n], rtol=1e-12, atol=1e-12)


def _reference_gradients(model, X, V, names):
    """``U[n, k] = V[k, n]ᵀ J_n`` with ``J_n`` from ``jacobian(vectorize=False)``, no vmap."""
    theta, call = flat_call(model, names)
    rows = []
    for n in range(X.shape[0]):
        J = jacobian(lambda th, n=n: call(th, X[n:n + 1]), theta, vectorize=False)
        J = J.reshape(-1, theta.numel())  # (out_numel, P)
        rows.append(V[:, n].reshape(V.shape[0], -1) @ J)  # (K, P)
    U = torch.stack(rows)  # (N, K, P)
    return {n: U[..., s] for n, s in param_slices(model, names).items()}


def _vmapped_parameter_vjps(model, X, V):
    """What ``FactorPass.other_gradients`` runs: vmap over examples and vectors of a vjp."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def per_example(x, v):
        _, vjp_fn = torch.func.vjp(
            lambda p: torch.func.functional_call(model, p, (x.unsqueeze(0),)).squeeze(0), params)
        return torch.func.vmap(vjp_fn)(v)

    return torch.func.vmap(per_example, in_dims=(0, 1))(X, V)


@pytest.mark.parametrize("case", list(MODELS))
def test_per_example_gradients_match_jacobians_without_vmap(case):
    make, in_shape, out_shape = MODELS[case]
    model = seeded(make)
    X, y = regression_data(in_shape, out_shape, sizes=(3,))[0]
    others, _ = _others(model)
    assert others and all(n.startswith(("rnn.", "cell.", "1.")) for n in others)
    engine = _engine(model, [(X, y)])
    batch = _batch(X, y)
    V = _vectors(2, (3, *out_shape))
    with pytest.raises(Exception):  # noqa: B017  (the premise: vmap has no rule for these)
        _vmapped_parameter_vjps(model, X, V)
    received = looped_other_gradients(engine, batch, V, others, _example_dims(batch))
    expected = _reference_gradients(model, X, V, others)
    for n in others:
        torch.testing.assert_close(received[n], expected[n], rtol=1e-12, atol=1e-12)


def test_unbatchable_backward_falls_back_to_one_backward_per_vector(monkeypatch):
    # A backward without batching rule (cuDNN's RNN kernels) refuses is_grads_batched.
    model = seeded(MODELS["lstm"][0])
    X, y = regression_data((3, 3), (2,), sizes=(3,))[0]
    others, _ = _others(model)
    grad, batched_calls = torch.autograd.grad, []

    def refusing(*args, is_grads_batched=False, **kwargs):
        if is_grads_batched:
            batched_calls.append(1)
            raise RuntimeError("Batching rule not implemented for aten::some_backward")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", refusing)
    batch = _batch(X, y)
    V = _vectors(3, (3, 2))
    received = looped_other_gradients(_engine(model, [(X, y)]), batch, V, others,
                                      _example_dims(batch))
    assert len(batched_calls) == 1  # refused once: the other examples loop at once
    expected = _reference_gradients(model, X, V, others)
    for n in others:
        torch.testing.assert_close(received[n], expected[n], rtol=1e-12, atol=1e-12)


def test_a_wrong_batched_backward_is_caught_on_the_first_example(monkeypatch):
    # PReLU's batching rule is wrong under nested vmaps; a wrong rule under is_grads_batched
    # must not pass either: the first example's plain backward passes expose it.
    model = seeded(MODELS["prelu"][0])
    X, y = regression_data((3,), (3,), sizes=(3,))[0]
    others, _ = _others(model)
    grad, batched_calls = torch.autograd.grad, []

    def off_by_ten_percent(*args, is_grads_batched=False, **kwargs):
        grads = grad(*args, is_grads_batched=is_grads_batched, **kwargs)
        if is_grads_batched:
            batched_calls.append(1)
            grads = tuple(None if g is None else 1.1 * g for g in grads)
        return grads

    monkeypatch.setattr(torch.autograd, "grad", off_by_ten_percent)
    batch = _batch(X, y)
    V = _vectors(3, (3, 3))
    received = looped_other_gradients(_engine(model, [(X, y)]), batch, V, others,
                                      _example_dims(batch))
    assert len(batched_calls) == 1  # not trusted again in this call
    expected = _reference_gradients(model, X, V, others)
    for n in others:
        torch.testing.assert_close(received[n], expected[n], rtol=1e-12, atol=1e-12)


def test_outputs_that_are_not_one_row_per_example_are_refused():
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.scale = nn.Linear(3, 2), nn.Parameter(torch.ones(2))

        def forward(self, x):
            return (self.lin(x) * self.scale).T  # (2, N)

    model = seeded(Transposed)
    X = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    batch = _batch(X, torch.zeros(3, 2))
    V = _vectors(1, (2, 3))  # shaped like the output (what KFAC's vectors are)
    with pytest.raises(ValueError, match=r"looped_other_gradients: example 0 .* \(2, 1\); "
                                         r"expected \(1, 3\)"):
        looped_other_gradients(_engine(model, [(X, batch.y)]), batch, V, ["scale"],
                               _example_dims(batch))


def _ggn_without_vmap(model, data, names):
    """``(1/T) Σ_n J_nᵀ (2 I) J_n`` of the mean MSE: ``jacobian(vectorize=False)`` of the batch."""
    theta, call = flat_call(model, names)
    X, y = cat_data(data)
    J = jacobian(lambda th: call(th, X), theta, vectorize=False).reshape(-1, theta.numel())
    return 2.0 * J.T @ J / y.numel()


def test_the_dense_reference_without_vmap_is_the_ggn():
    model = seeded(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    data = regression_data((3,), (2,), sizes=(2, 3))
    torch.testing.assert_close(_ggn_without_vmap(model, data, None),
                               dense_ggn(model, nn.MSELoss(), data), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", list(MODELS))
def test_per_example_loop_blocks_from_the_loop_are_the_exact_ggn_blocks(case, monkeypatch):
    # The wiring the patch adds: other_gradients falls back to the loop where vmap fails.
    def looped(self, batch, V):
        return looped_other_gradients(self.engine, batch, V, self.others, _example_dims(batch))

    monkeypatch.setattr(FactorPass, "other_gradients", looped)
    make, in_shape, out_shape = MODELS[case]
    model = seeded(make)
    data = regression_data(in_shape, out_shape, sizes=(2, 2))
    others, names = _others(model)
    K = KFAC(model, nn.MSELoss(), data, other="dense")
    assert K.others == others
    mask = layer_mask(model, [[n] for n in others])
    torch.testing.assert_close(K.to_dense()[mask], _ggn_without_vmap(model, data, names)[mask],
                               rtol=1e-10, atol=1e-12)


def test_modules_that_vmap_cannot_batch_or_gets_wrong_are_named():
    model = nn.Sequential(nn.Linear(3, 3), nn.PReLU(), _Recurrent(nn.GRU), _Cell(nn.RNNCell),
                          nn.Tanh())
    assert vmap_unsafe_modules(model) == ["1", "2.rnn", "3.cell"]
    assert vmap_unsafe_modules(nn.Sequential(nn.Linear(3, 3), nn.ReLU())) == []


# ------------------------------------------------------------------ wired into other_gradients
class _ScaledPReLU(nn.Module):
    """A free scale before a PReLU: vmap's wrong PReLU backward reaches parameters upstream."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))
        self.act, self.lin = nn.PReLU(), nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(self.act(x * self.scale))


@pytest.mark.parametrize("other", ["dense", "diagonal"])
@pytest.mark.parametrize("case", [*MODELS, "prelu_upstream"])
def test_per_example_loop_blocks_of_models_vmap_cannot_batch_are_exact(case, other):
    # Refused before (LSTM, GRU, cells: no vmap rule), or silently wrong: vmap's PReLU backward
    # with as many examples as vectors (3 examples, 3 type-2 vectors) was off by 5%.
    if case == "prelu_upstream":  # one batch of 3: the old code ran through, wrong
        model, sizes = seeded(_ScaledPReLU), (3,)
        in_shape, out_shape, params, others = (3,), (3,), [model.scale], ["scale"]
    else:
        make, in_shape, out_shape = MODELS[case]
        model, sizes = seeded(make), (3, 2)
        params, (others, _) = None, _others(model)
    data = regression_data(in_shape, out_shape, sizes=sizes)
    names = [n for n, _ in model.named_parameters()] if params is None else others
    K = KFAC(model, nn.MSELoss(), data, params=params, other=other)
    assert K.others == others
    R = _ggn_without_vmap(model, data, names)
    mask = layer_mask(model, [[n] for n in others]) if params is None else torch.ones_like(R) > 0
    if other == "diagonal":
        mask = mask & torch.eye(R.shape[0], dtype=torch.bool)
    torch.testing.assert_close(K.to_dense()[mask], R[mask], rtol=1e-10, atol=1e-12)


def test_models_failing_one_example_passes_are_refused_by_name():
    class NeedsTwo(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.scale = nn.Linear(3, 2), nn.Parameter(torch.ones(2))

        def forward(self, x):
            if x.shape[0] < 2:
                raise RuntimeError("needs two examples")
            return self.lin(x) * self.scale

    data = regression_data((3,), (2,), sizes=(3,))
    with pytest.raises(ValueError, match=r"\['scale'\].*torch\.func\.vmap.*loop.*needs two "
                                         r"examples.*Exclude them"):
        KFAC(seeded(NeedsTwo), nn.MSELoss(), data, other="dense")


class _FunctionalPReLU(nn.Module):
    """``F.prelu`` outside an ``nn.PReLU`` module: ``vmap_unsafe_modules`` cannot see it."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([0.7, -1.3, 0.4]))
        self.slope = nn.Parameter(torch.tensor([0.25]))
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(torch.nn.functional.prelu(x * self.scale, self.slope))


def test_a_wrong_vmap_batching_rule_unseen_by_module_type_is_caught():
    # vmap runs, returns wrong gradients for 3 examples and 3 vectors, and the plain-autograd
    # check of the first example sends the batch to the loop
    model = seeded(_FunctionalPReLU).double()
    assert not vmap_unsafe_modules(model)
    data = regression_data((3,), (3,), sizes=(3,))
    K = KFAC(model, nn.MSELoss(), data, params=[model.scale, model.slope], other="dense")
    R = _ggn_without_vmap(model, data, ["scale", "slope"])
    mask = torch.zeros(4, 4, dtype=torch.bool)  # one dense block per parameter
    mask[:3, :3] = mask[3:, 3:] = True
    torch.testing.assert_close(K.to_dense()[mask], R[mask], rtol=1e-10, atol=1e-12)
    assert (K.to_dense()[~mask] == 0).all()
