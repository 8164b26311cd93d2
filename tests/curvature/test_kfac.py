"""KFAC exactness against dense float64 GGN / gradient references (torch.func)."""

import pytest
import torch
from kfac_cases import (
    MeanOverPositions,
    block,
    class_data,
    dense_ggn,
    layer_mask,
    param_slices,
    per_example_grads,
    regression_data,
)
from torch import nn

from curvkit.curvature.kfac import KFAC


def deep_linear(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3, bias=bias), nn.Linear(3, 3, bias=bias),
                         nn.Linear(3, 2, bias=bias))


def layer_groups(model):
    groups = {}
    for n, _ in model.named_parameters():
        groups.setdefault(n.rpartition(".")[0], []).append(n)
    return list(groups.values())


def assert_layer_blocks(K, R, model, groups=None):
    """K equals R on the given diagonal blocks and is zero elsewhere."""
    mask = layer_mask(model, groups or layer_groups(model))
    torch.testing.assert_close(K[mask], R[mask])
    assert (K[~mask] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_type2_equals_ggn_for_deep_linear_mse(reduction, bias):
    model = deep_linear(bias)
    loss_fn = nn.MSELoss(reduction=reduction)
    data = regression_data((4,), (2,), sizes=(3, 5, 2))
    K = KFAC(model, loss_fn, data)
    R = dense_ggn(model, loss_fn, data)
    assert_layer_blocks(K.to_dense(), R, model)
    # products in list form follow the parameter shapes
    v = [torch.randn_like(p) for p in model.parameters()]
    flat = torch.cat([t.reshape(-1) for t in v])
    out = K @ v
    torch.testing.assert_close(torch.cat([o.reshape(-1) for o in out]), K.to_dense() @ flat)


def test_separate_bias_gives_the_per_parameter_blocks():
    model = deep_linear()
    loss_fn = nn.MSELoss()
    data = regression_data((4,), (2,))
    K = KFAC(model, loss_fn, data, separate_bias=True)
    R = dense_ggn(model, loss_fn, data)
    assert_layer_blocks(K.to_dense(), R, model, [[n] for n, _ in model.named_parameters()])


def test_weighted_batches_equal_weighted_ggn():
    model = deep_linear()
    loss_fn = nn.MSELoss(reduction="sum")
    base = regression_data((4,), (2,), sizes=(3, 4))
    g = torch.Generator().manual_seed(3)
    w = [torch.rand(x.shape[0], generator=g) * 2 for x, _ in base]
    data = [(x, y, wi) for (x, y), wi in zip(base, w)]
    K = KFAC(model, loss_fn, data)
    R = dense_ggn(model, loss_fn, base, weights=torch.cat(w))
    assert_layer_blocks(K.to_dense(), R, model)
    with pytest.raises(ValueError, match="weights"):
        KFAC(model, loss_fn, [(base[0][0], base[0][1], -torch.ones(3))])


@pytest.mark.parametrize("weight", [float("nan"), 0.0])
def test_nan_or_all_zero_weights_raise(weight):
    # NaN passed the w < 0 check, and Σ w = 0 made A = 0/0: NaN factors either way.
    x, y = regression_data((4,), (2,), sizes=(3,))[0]
    with pytest.raises(ValueError, match="finite" if weight != 0 else "sum to 0"):
        KFAC(deep_linear(), nn.MSELoss(), [(x, y, torch.full((3,), weight))])


def sequence_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_expand_exact_for_linear_weight_sharing(reduction):
    # (N, S, d) per-token outputs with per-token MSE: positions never interact.
    model = sequence_model()
    loss_fn = nn.MSELoss(reduction=reduction)
    data = regression_data((5, 3), (5, 2), sizes=(2, 3))
    K = KFAC(model, loss_fn, data, approx="expand")
    assert_layer_blocks(K.to_dense(), dense_ggn(model, loss_fn, data), model)


def test_reduce_exact_for_pooled_weight_sharing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), MeanOverPositions(), nn.Linear(4, 2))
    loss_fn = nn.MSELoss()
    data = regression_data((5, 3), (2,), sizes=(2, 3))
    K = KFAC(model, loss_fn, data, approx="reduce")
    R = dense_ggn(model, loss_fn, data)
    assert_layer_blocks(K.to_dense(), R, model)
    # expand is not exact here: the test can tell the two apart
    E = KFAC(model, loss_fn, data, approx="expand").to_dense()
    assert not torch.allclose(E[layer_mask(model, layer_groups(model))],
                              R[layer_mask(model, layer_groups(model))])


def test_expand_and_reduce_coincide_without_sharing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    data = class_data((4,), 3)
    loss_fn = nn.CrossEntropyLoss()
    E = KFAC(model, loss_fn, data, approx="expand").to_dense()
    Rd = KFAC(model, loss_fn, data, approx="reduce").to_dense()
    torch.testing.assert_close(E, Rd)


def one_datum_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    data = class_data((4,), 3, sizes=(1,))
    return model, data


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_datum_type2_is_the_exact_ggn_block(reduction):
    model, data = one_datum_case()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    K = KFAC(model, loss_fn, data, fisher="type2").to_dense()
    assert_layer_blocks(K, dense_ggn(model, loss_fn, data), model)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_datum_empirical_is_the_gradient_outer_product(reduction):
    model, data = one_datum_case()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    K = KFAC(model, loss_fn, data, fisher="empirical").to_dense()
    g = per_example_grads(model, loss_fn, data)[0]
    assert_layer_blocks(K, torch.outer(g, g), model)


def test_one_datum_mc_is_the_outer_product_of_a_sampled_gradient():
    # With one datum and one sample, MC KFAC is g̃ g̃ᵀ per layer for the gradient g̃ at a label
    # drawn from the model: it must be the empirical KFAC of one of the C possible labels.
    model, data = one_datum_case()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    X, _ = data[0]
    mc = KFAC(model, loss_fn, data, fisher="mc", seed=5).to_dense()
    candidates = []
    for c in range(3):
        g = per_example_grads(model, loss_fn, [(X, torch.tensor([c]))])[0]
        candidates.append(torch.outer(g, g) * layer_mask(model, layer_groups(model)))
    assert any(torch.allclose(mc, cand) for cand in candidates)


def test_mc_converges_to_type2():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    data = class_data((3,), 3, sizes=(4,))
    loss_fn = nn.CrossEntropyLoss()
    T2 = KFAC(model, loss_fn, data, fisher="type2").to_dense()

    def err(m, seed):
        mc = KFAC(model, loss_fn, data, fisher="mc", mc_samples=m, seed=seed).to_dense()
        return ((mc - T2).norm() / T2.norm()).item()

    few = sum(err(4, s) for s in range(3)) / 3
    many = sum(err(400, s) for s in range(3)) / 3
    # Monte-Carlo error shrinks like 1/sqrt(M): 100x the samples, about a tenth of the error
    assert many < 0.15
    assert many < few / 4


def test_mse_mc_converges_to_type2():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    data = regression_data((3,), (2,), sizes=(3,))
    loss_fn = nn.MSELoss()
    T2 = KFAC(model, loss_fn, data, fisher="type2").to_dense()
    mc = KFAC(model, loss_fn, data, fisher="mc", mc_samples=1000).to_dense()
    assert ((mc - T2).norm() / T2.norm()).item() < 0.1


def test_forward_only_uses_identity_output_factor():
    model = deep_linear(bias=False)
    data = regression_data((4,), (2,), sizes=(3, 4))
    K = KFAC(model, nn.MSELoss(), data, fisher="forward_only").to_dense()
    X, _ = torch.cat([d[0] for d in data]), None
    slices = param_slices(model)
    h = X
    for i, layer in enumerate(model):
        A = h.T @ h / h.shape[0]
        ref = torch.kron(torch.eye(layer.out_features), A)
        torch.testing.assert_close(block(K, slices, [f"{i}.weight"]), ref)
        h = layer(h).detach()


def test_sequence_cross_entropy_with_ignored_tokens_normalises_by_counted_terms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5))

    class Logits(nn.Module):  # (N, S, C) -> (N, C, S) as CrossEntropyLoss takes sequences
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x).transpose(1, 2)

    g = torch.Generator().manual_seed(0)
    data = []
    for n in (2, 3):
        y = torch.randint(0, 5, (n, 4), generator=g)
        y[0, 1] = -100
        data.append((torch.randn(n, 4, 3, generator=g), y))
    T = sum(float((y != -100).sum()) for _, y in data)
    mean = KFAC(Logits(), nn.CrossEntropyLoss(), data).to_dense()
    total = KFAC(Logits(), nn.CrossEntropyLoss(reduction="sum"), data).to_dense()
    torch.testing.assert_close(mean * T, total)
    assert torch.linalg.eigvalsh(mean).min() > -1e-12
    torch.testing.assert_close(mean, mean.T)


def test_bce_one_datum_type2_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = regression_data((3,), (2,), sizes=(1,))[0]
    data = [(x, (y > 0).to(x.dtype))]
    loss_fn = nn.BCEWithLogitsLoss()
    K = KFAC(model, loss_fn, data).to_dense()
    assert_layer_blocks(K, dense_ggn(model, loss_fn, data), model)


def test_invalid_options_raise():
    model = deep_linear()
    data = regression_data((4,), (2,))
    for kwargs in ({"fisher": "typ2"}, {"approx": "sum"}, {"other": "zero"}, {"mc_samples": 0}):
        with pytest.raises(ValueError, match="KFAC"):
            KFAC(model, nn.MSELoss(), data, **kwargs)
    K = KFAC(model, nn.MSELoss(), data, compute=False)
    with pytest.raises(RuntimeError, match="compute"):
        K @ torch.zeros(K.shape[1])


def test_non_finite_factors_raise_without_the_determinism_check():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    X, y = torch.randn(5, 4), torch.randn(5, 2)
    X[2, 1] = float("nan")
    with pytest.raises(ValueError, match="factors of layer '0' are not finite"):
        KFAC(model, nn.MSELoss(), [(X, y)], check_deterministic=False)
