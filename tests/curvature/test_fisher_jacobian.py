import pytest
import torch
from cases import (
    INPUT_SHAPES,
    MODELS,
    DictMLP,
    TinyLM,
    cat_data,
    dense_ggn,
    flat_function,
    lm_data,
    make_data,
    num_terms,
    per_example_gradients,
)
from test_ggn_hessian import LOSSES, check_products
from torch import nn
from torch.func import jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvkit.curvature import GGN, EmpiricalFisher, FisherMC, Jacobian


def dense_ef(model, loss_fn, data, params=None):
    G = per_example_gradients(model, loss_fn, data, params)
    return G.T @ G / num_terms(loss_fn, data)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_empirical_fisher_mlp(loss):
    torch.manual_seed(0)
    model, loss_fn = MODELS["mlp"](), LOSSES[loss]()
    data = make_data(model, loss_fn, INPUT_SHAPES["mlp"], sizes=(3, 5, 2))
    EF = EmpiricalFisher(model, loss_fn, data)
    ref = dense_ef(model, loss_fn, data)
    check_products(EF, ref)
    torch.testing.assert_close(EF.diagonal(), ref.diagonal())


def dense_ef_per_term(model, loss_fn, data):
    """``c Σ_{n,t} g_{n,t} g_{n,t}ᵀ`` over the loss terms (tokens), by ``jacrev``."""
    theta, call = flat_function(model)
    X, y = cat_data(data)
    per_term = nn.CrossEntropyLoss(reduction="none", ignore_index=loss_fn.ignore_index)
    G = jacrev(lambda th: per_term(call(th, X), y).reshape(-1))(theta)
    return G.T @ G / num_terms(loss_fn, data)


def test_empirical_fisher_sequence_ignore_index_and_cnn():
    torch.manual_seed(1)
    model, loss_fn = TinyLM().eval(), nn.CrossEntropyLoss(ignore_index=3)
    data = lm_data(sizes=(2, 3), ignore_index=3)
    with sdpa_kernel(SDPBackend.MATH):
        ref, ref_term = dense_ef(model, loss_fn, data), dense_ef_per_term(model, loss_fn, data)
    check_products(EmpiricalFisher(model, loss_fn, data), ref)
    EF = EmpiricalFisher(model, loss_fn, data, grouping="term")
    check_products(EF, ref_term)
    torch.testing.assert_close(EF.diagonal(), ref_term.diagonal())
    model, loss_fn = MODELS["cnn2d"](), nn.CrossEntropyLoss(reduction="sum")
    data = make_data(model, loss_fn, INPUT_SHAPES["cnn2d"], sizes=(2, 3))
    check_products(EmpiricalFisher(model, loss_fn, data), dense_ef(model, loss_fn, data))


def _relative_error(A, B):
    return ((A - B).norm() / B.norm()).item()


@pytest.mark.parametrize("loss", ["ce_mean", "mse_sum", "bce_mean"])
def test_fisher_mc_converges_to_ggn(loss):
    torch.manual_seed(2)
    model, loss_fn = MODELS["mlp"](), LOSSES[loss]()
    data = make_data(model, loss_fn, INPUT_SHAPES["mlp"], sizes=(4, 3))
    ref = dense_ggn(model, loss_fn, data)
    X = torch.randn(ref.shape[0], 4, generator=torch.Generator().manual_seed(0))
    errors = [_relative_error(FisherMC(model, loss_fn, data, mc_samples=m, seed=5) @ X, ref @ X)
              for m in (4, 4096)]
    # Monte-Carlo error shrinks like 1/sqrt(M): a factor 32 here; demand 8.
    assert errors[1] < errors[0] / 8 and errors[1] < 0.05, errors


def test_fisher_mc_sequence_and_diagonal():
    torch.manual_seed(3)
    model, loss_fn = TinyLM().eval(), nn.CrossEntropyLoss(ignore_index=3)
    data = lm_data(sizes=(2, 1), ignore_index=3)
    ref = dense_ggn(model, loss_fn, data)
    F = FisherMC(model, loss_fn, data, mc_samples=2048, seed=1)
    X = torch.randn(ref.shape[0], 2, generator=torch.Generator().manual_seed(0))
    assert _relative_error(F @ X, ref @ X) < 0.05
    model, loss_fn = MODELS["cnn1d"](), nn.CrossEntropyLoss()
    data = make_data(model, loss_fn, INPUT_SHAPES["cnn1d"], sizes=(3, 2))
    ref = dense_ggn(model, loss_fn, data).diagonal()
    assert _relative_error(FisherMC(model, loss_fn, data, mc_samples=4096).diagonal(), ref) < 0.05


def test_fisher_mc_draws_are_reproducible():
    torch.manual_seed(4)
    model, loss_fn = MODELS["mlp"](), nn.CrossEntropyLoss()
    data = make_data(model, loss_fn, INPUT_SHAPES["mlp"])
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    F = FisherMC(model, loss_fn, data, seed=7)
    first = F @ v
    torch.testing.assert_close(F @ v, first, rtol=0, atol=0)  # same draw, same matrix
    second = F.resample() @ v
    assert (second - first).abs().max() > 1e-6
    torch.testing.assert_close(F.resample(seed=7) @ v, first, rtol=0, atol=0)
    torch.testing.assert_close(FisherMC(model, loss_fn, data, seed=8) @ v, second, rtol=0, atol=0)
    # one draw per product pass: k columns at once equal one column at a time
    V = torch.randn(v.shape[0], 3)
    torch.testing.assert_close(F @ V, torch.stack([F @ V[:, i] for i in range(3)], 1))
    # the diagonal belongs to the same draw as the products
    dense = torch.stack([F @ e for e in torch.eye(v.shape[0])], 1)
    torch.testing.assert_close(F.diagonal(), dense.diagonal())
    with pytest.raises(ValueError, match="mc_samples"):
        FisherMC(model, loss_fn, data, mc_samples=0)


def test_fisher_blocks_and_subsets():
    torch.manual_seed(5)
    model, loss_fn = MODELS["mlp"](), nn.MSELoss()
    data = make_data(model, loss_fn, INPUT_SHAPES["mlp"])
    EF = EmpiricalFisher(model, loss_fn, data, params=[model[2].weight], blocks="param")
    check_products(EF, dense_ef(model, loss_fn, data, params=["2.weight"]))
    F = FisherMC(model, loss_fn, data, blocks="layer", mc_samples=3)
    assert F.shape == (sum(p.numel() for p in model.parameters()),) * 2


def dense_jacobian(model, data, params=None):
    theta, call = flat_function(model, params)
    return torch.cat([jacrev(lambda th, X=X: call(th, X))(theta).reshape(-1, theta.numel())
                      for X, _ in data])


@pytest.mark.parametrize("arch", ["mlp", "cnn2d"])
def test_jacobian(arch):
    torch.manual_seed(6)
    model = MODELS[arch]()
    data = make_data(model, nn.MSELoss(), INPUT_SHAPES[arch], sizes=(3, 2))
    J, ref = Jacobian(model, data), dense_jacobian(model, data)
    assert J.shape == ref.shape
    g = torch.Generator().manual_seed(0)
    V, U = torch.randn(ref.shape[1], 3, generator=g), torch.randn(ref.shape[0], 3, generator=g)
    torch.testing.assert_close(J @ V, ref @ V)
    torch.testing.assert_close(J.T @ U, ref.T @ U)
    torch.testing.assert_close(J.T @ U[:, 0], ref.T @ U[:, 0])


def test_jacobian_mapping_inputs_and_subset():
    torch.manual_seed(7)
    model = DictMLP()
    g = torch.Generator().manual_seed(0)
    inputs = [{"a": torch.randn(n, 3, generator=g), "b": torch.randn(n, 2, generator=g)}
              for n in (2, 3)]
    J = Jacobian(model, inputs, params={"net.2.weight": model.net[2].weight})
    theta, call = flat_function(model, ["net.2.weight"])
    ref = torch.cat([jacrev(lambda th, X=X: call(th, X))(theta).reshape(-1, theta.numel())
                     for X in inputs])
    U = torch.randn(ref.shape[0], 2, generator=g)
    torch.testing.assert_close(J.T @ U, ref.T @ U)
    V = ref.T @ U
    torch.testing.assert_close(J @ V, ref @ V)


def test_ggn_equals_jacobian_form():
    # GGN = Jᵀ H J, composed lazily from the Jacobian operator (MSE sum: H = 2I)
    torch.manual_seed(8)
    model, loss_fn = MODELS["mlp"](), nn.MSELoss(reduction="sum")
    data = make_data(model, loss_fn, INPUT_SHAPES["mlp"])
    J = Jacobian(model, data)
    v = torch.randn(J.shape[1])
    torch.testing.assert_close(GGN(model, loss_fn, data) @ v, 2 * (J.T @ (J @ v)))
