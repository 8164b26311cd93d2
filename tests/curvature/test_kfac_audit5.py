"""KFAC / EKFAC operator API: damping validation of logdet, state dicts of other models."""

import pytest
import torch
from kfac_cases import class_data
from torch import nn

from curvkit.curvature.ekfac import EKFAC
from curvkit.curvature.kfac import KFAC


class Scale(nn.Module):
    """Elementwise ``x * weight + bias``: parameters named like a norm layer's, no KFAC rule."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * self.weight + self.bias


class Tokens(nn.Module):
    """Token embedding, a positional embedding (shared by all examples: an "other" block)."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(5, 3), nn.Embedding(4, 3), nn.Linear(3, 2)

    def forward(self, t):
        return self.head(torch.tanh(self.tok(t) + self.pos(torch.arange(t.shape[1]))).mean(1))


def token_data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 5, (n, 4), generator=g), torch.randint(0, 2, (n,), generator=g))
            for n in (3, 4)]


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize("damping", [float("nan"), float("inf"), -0.5])
def test_logdet_refuses_non_finite_or_negative_damping(cls, damping):
    # logdet(nan) returned nan and logdet(inf) inf; a negative damping was reported as a
    # singular block. inverse() already refused all three.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), Scale(4), nn.Linear(4, 2))
    K = cls(model, nn.CrossEntropyLoss(), class_data((3,), 2))
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        K.logdet(damping)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        K.inverse(damping)
    P = K.shape[0]
    D = K.to_dense().double()
    torch.testing.assert_close(K.logdet(torch.tensor(0.2)).double(),
                               torch.logdet(D + 0.2 * torch.eye(P, dtype=D.dtype)),
                               rtol=1e-4, atol=1e-4)


def _pairs():
    """(saved model, its data, other model with equal parameter names and shapes, its data)."""
    torch.manual_seed(0)
    x3 = class_data((3,), 3)
    tokens = [(torch.randint(0, 3, (4,)), torch.randint(0, 3, (4,)))]
    yield ("linear_vs_embedding", nn.Sequential(nn.Linear(3, 3, bias=False)), x3,
           nn.Sequential(nn.Embedding(3, 3)), tokens)
    # weights (4, 2, 1) and biases (4,) in both; groups=2 makes two blocks of other sizes
    yield ("conv_groups", nn.Sequential(nn.Conv1d(2, 4, 1)),
           [(torch.randn(4, 2, 1), torch.randint(0, 4, (4, 1)))],
           nn.Sequential(nn.Conv1d(4, 4, 1, groups=2)),
           [(torch.randn(4, 4, 1), torch.randint(0, 4, (4, 1)))])
    yield ("norm_vs_other", nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), x3,
           nn.Sequential(nn.Linear(3, 3), Scale(3)), x3)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize("case", ["linear_vs_embedding", "conv_groups", "norm_vs_other"])
def test_load_state_dict_of_another_model_raises(cls, case):
    # Equal parameter names and shapes passed the check, and the factors were read as blocks
    # of another kind (transposed Kronecker order, other groups, a dense norm block as the
    # other parameters' diagonal or a missing factor at the first product).
    _, saved_model, saved_data, model, data = next(p for p in _pairs() if p[0] == case)
    state = cls(saved_model, nn.CrossEntropyLoss(), saved_data).state_dict()
    fresh = cls(model, nn.CrossEntropyLoss(), data, compute=False)
    with pytest.raises(ValueError, match="load_state_dict.*not this model's"):
        fresh.load_state_dict(state)
    with pytest.raises(RuntimeError, match="not computed"):  # nothing half-loaded
        fresh @ torch.ones(fresh.shape[0])


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_load_state_dict_of_a_truncated_state_raises_clearly(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    data = class_data((3,), 2)
    state = cls(model, nn.CrossEntropyLoss(), data).state_dict()
    fresh = cls(model, nn.CrossEntropyLoss(), data, compute=False)
    with pytest.raises(ValueError, match="lacks \\['others'\\]"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "others"})
    factors = {k: v for k, v in state["factors"].items() if k != "1"}
    with pytest.raises(ValueError, match="factors of '1'"):
        fresh.load_state_dict(state | {"factors": factors})
    with pytest.raises(ValueError, match="cover"):
        fresh.load_state_dict(state | {"layers": state["layers"][:1]})


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize("other", ["diagonal", "dense"])
@pytest.mark.parametrize("separate_bias", [False, True])
def test_state_round_trip_with_other_blocks_is_bit_for_bit(cls, other, separate_bias):
    # The positional embedding is moved to the other parameters by the factor pass: the
    # state's blocks are then not the static plan's, and must still load.
    torch.manual_seed(0)
    model, data = Tokens(), token_data()
    kw = dict(other=other, separate_bias=separate_bias, fisher="mc", mc_samples=2)
    K = cls(model, nn.CrossEntropyLoss(), data, **kw)
    assert K.others == ["pos.weight"]
    fresh = cls(model, nn.CrossEntropyLoss(), data, compute=False, **kw)
    fresh.load_state_dict(K.state_dict())
    X = torch.randn(K.shape[0], 3)
    assert torch.equal(fresh @ X, K @ X)
    assert torch.equal(fresh.inverse(0.1) @ X, K.inverse(0.1) @ X)
    assert torch.equal(fresh.logdet(0.1), K.logdet(0.1))
    assert torch.equal(fresh.trace(), K.trace())


def test_forward_only_state_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 2, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3))
    data = class_data((4, 3, 3), 3)
    K = KFAC(model, nn.CrossEntropyLoss(), data, fisher="forward_only")
    fresh = KFAC(model, nn.CrossEntropyLoss(), data, fisher="forward_only", compute=False)
    fresh.load_state_dict(K.state_dict())
    X = torch.randn(K.shape[0], 2)
    assert torch.equal(fresh @ X, K @ X)


class SwitchingModel(nn.Module):
    """Calls ``b`` in its first forward pass only: EKFAC's correction pass sees other layers."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = torch.tanh(self.a(x))
        return self.head(self.b(h) if self.calls == 1 else h)


def test_failed_ekfac_correction_leaves_no_kfac_behind():
    # The KFAC stage's blocks were built before the correction pass: after it failed the
    # EKFAC answered products (and inverses) as plain KFAC.
    torch.manual_seed(0)
    E = EKFAC(SwitchingModel(), nn.CrossEntropyLoss(), class_data((3,), 2, sizes=(4,)),
              check_deterministic=False, compute=False)
    with pytest.raises(RuntimeError, match="differ between passes"):
        E.compute()
    with pytest.raises(RuntimeError, match="not computed"):
        E @ torch.ones(E.shape[0])
    assert E.factors == {} and E.specs == []


def test_failed_recompute_keeps_the_previous_factors():
    # _store emptied the factors before it found a non-finite one: the operator kept its old
    # blocks while factors and state_dict() were empty (a state that loads as nothing).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    data = class_data((3,), 2)
    K = KFAC(model, nn.CrossEntropyLoss(), data, check_deterministic=False)
    X = torch.randn(K.shape[0], 2)
    before, state = K @ X, K.state_dict()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        K.compute()
    assert torch.equal(K @ X, before)
    assert K.state_dict()["factors"].keys() == state["factors"].keys()
    fresh = KFAC(model, nn.CrossEntropyLoss(), data, check_deterministic=False, compute=False)
    fresh.load_state_dict(K.state_dict())
    assert torch.equal(fresh @ X, before)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_to_points_to_the_way_that_converts_the_factors(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).float()
    data = [(x.float(), y) for x, y in class_data((3,), 2, sizes=(6,))]
    K = cls(model, nn.CrossEntropyLoss(), data)
    with pytest.raises(NotImplementedError, match=r"load_state_dict\(old.state_dict\(\)\)"):
        K.to(torch.float64)
    # ... and the way it names works: the same factors, now in float64
    K64 = cls(model.double(), nn.CrossEntropyLoss(), [(x.double(), y) for x, y in data],
              compute=False)
    K64.load_state_dict(K.state_dict())
    v = torch.randn(K.shape[0], dtype=torch.float64)
    assert K64.dtype == torch.float64
    torch.testing.assert_close(K64 @ v, (K @ v.float()).double(), rtol=1e-5, atol=1e-6)


def test_model_based_operators_say_how_to_change_dtype():
    from curvkit.curvature import GGN

    model = nn.Sequential(nn.Linear(3, 2))
    G = GGN(model, nn.CrossEntropyLoss(), class_data((3,), 2, sizes=(4,)))
    with pytest.raises(NotImplementedError, match=r"GGN cannot be moved: every product evaluates"):
        G.to(torch.float32)


def test_singular_kronecker_block_named_like_the_others_at_zero_damping():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    data = [(x * torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0]), y)  # an exactly singular input factor
            for x, y in class_data((5,), 2, sizes=(6,))]
    K = KFAC(model, nn.CrossEntropyLoss(), data)
    with pytest.raises(ValueError, match=r"KFAC.logdet: block '0' is singular"):
        K.logdet()
    assert torch.isfinite(K.logdet(1e-3))


def test_ekfac_type2_over_positions_warns_that_it_sums_products_between_positions():
    import warnings

    torch.manual_seed(0)
    model = nn.Linear(3, 2)  # per position: KFAC is exact here, EKFAC's type-2 vectors are not
    seq = [(torch.randn(4, 5, 3), torch.randn(4, 5, 2))]
    with pytest.warns(UserWarning, match=r"over all 5 positions .* fisher='mc' is unbiased"):
        EKFAC(model, nn.MSELoss(), seq)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EKFAC(model, nn.MSELoss(), [(torch.randn(4, 3), torch.randn(4, 2))])  # one position
        EKFAC(model, nn.MSELoss(), seq, fisher="mc")
        KFAC(model, nn.MSELoss(), seq)
    tokens = [(torch.randn(4, 5, 3), torch.randint(0, 2, (4, 5)))]
    lm = nn.Sequential(nn.Linear(3, 2), Transpose())
    with pytest.warns(UserWarning, match="over all 5 positions"):
        EKFAC(lm, nn.CrossEntropyLoss(), tokens)


class Transpose(nn.Module):
    """``(N, S, C) -> (N, C, S)``: logits with the class dimension second, as the loss wants."""

    def forward(self, x):
        return x.transpose(1, 2)


def test_compute_false_reads_no_data_until_compute():
    # a loader that records every pass: construction must not iterate it
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    batches = [(torch.randn(5, 3), torch.randn(5, 2))]

    class Recorded(list):
        passes = 0

        def __iter__(self):
            Recorded.passes += 1
            return super().__iter__()

    data = Recorded(batches)
    K = KFAC(model, torch.nn.MSELoss(), data, compute=False)
    assert Recorded.passes == 0
    K.compute()
    assert Recorded.passes > 0
    torch.testing.assert_close(K.to_dense(), KFAC(model, torch.nn.MSELoss(), batches).to_dense())
    # the determinism check still runs, at the first compute()
    K_drop = KFAC(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5)),
                  torch.nn.MSELoss(), batches, compute=False)
    with pytest.raises(ValueError, match="Dropout"):
        K_drop.compute()
