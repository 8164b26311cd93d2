"""k-column products: chunked tangents equal one batched pass, k single products and the dense
float64 matrix, for every chunk size the activation-memory rule can pick."""

import pytest
import torch
from cases import INPUT_SHAPES, MODELS, TinyLM, dense_ggn, dense_hessian, lm_data, make_data
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvkit.curvature import GGN, EmpiricalFisher, FisherMC, Hessian
from curvkit.curvature._base import SavedBytes, column_chunk

K = 5


def _case(arch):
    torch.manual_seed(3)
    if arch == "lm":
        return TinyLM().eval(), nn.CrossEntropyLoss(ignore_index=3), lm_data(sizes=(2, 3),
                                                                             ignore_index=3)
    model, loss_fn = MODELS[arch](), nn.CrossEntropyLoss()
    return model, loss_fn, make_data(model, loss_fn, INPUT_SHAPES[arch], sizes=(3, 2))


def _two_columns_budget(model, data):
    """A budget that fits two columns of the first batch: chunks 2, 2, 1 for K = 5."""
    with SavedBytes() as saved, sdpa_kernel(SDPBackend.MATH):
        model(data[0][0])
    assert column_chunk(saved.total, K, budget=2 * saved.total + 1) == 2
    return 2 * saved.total + 1


def _with_budget(op, budget):
    op._column_budget = budget
    return op


@pytest.mark.parametrize("arch", ["mlp", "cnn2d", "lm"])
@pytest.mark.parametrize("op_cls,reference", [(GGN, dense_ggn), (Hessian, dense_hessian)])
def test_chunked_columns_match_dense_and_unchunked(arch, op_cls, reference):
    model, loss_fn, data = _case(arch)
    ref = reference(model, loss_fn, data)
    V = torch.randn(ref.shape[0], K, generator=torch.Generator().manual_seed(0))
    whole = _with_budget(op_cls(model, loss_fn, data), 2**62) @ V  # one chunk of K columns
    torch.testing.assert_close(whole, ref @ V)
    for budget in (1, _two_columns_budget(model, data)):  # chunks of 1 and of 2 columns
        chunked = _with_budget(op_cls(model, loss_fn, data), budget) @ V
        torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    singles = torch.stack([op_cls(model, loss_fn, data) @ V[:, j] for j in range(K)], dim=1)
    torch.testing.assert_close(singles, whole, rtol=1e-12, atol=1e-12)


def test_chunk_sizes_cover_one_to_k():
    model, loss_fn, data = _case("mlp")
    X, _ = data[0]
    with SavedBytes() as saved:
        model(X)
    per_column = saved.total
    layers = [m for m in model if isinstance(m, nn.Linear)]
    # Linear saves its input (and the weight); ReLU its output: all float64.
    assert per_column >= 8 * sum(X.shape[0] * m.in_features for m in layers)
    assert column_chunk(per_column, K, budget=1) == 1
    assert column_chunk(per_column, K, budget=2 * per_column + 1) == 2
    assert column_chunk(per_column, K, budget=2**62) == K
    assert column_chunk(0, K) == K
    assert column_chunk(1, 16, budget=12) == 8  # two equal chunks, not 12 + 4


@pytest.mark.parametrize("grouping", ["example", "term"])
def test_empirical_fisher_chunked_columns(grouping):
    model, loss_fn, data = _case("lm")
    V = torch.randn(sum(p.numel() for p in model.parameters()), K,
                    generator=torch.Generator().manual_seed(1))
    ops = [_with_budget(EmpiricalFisher(model, loss_fn, data, grouping=grouping), b)
           for b in (2**62, 1, _two_columns_budget(model, data))]
    dense = ops[0] @ torch.eye(ops[0].shape[0])
    torch.testing.assert_close(dense, dense.T)  # a symmetric matrix, not just consistent columns
    torch.testing.assert_close(ops[0] @ V, dense @ V)
    for op in ops[1:]:
        torch.testing.assert_close(op @ V, ops[0] @ V, rtol=1e-12, atol=1e-12)


def test_fisher_mc_columns_share_one_draw_per_batch():
    model, loss_fn, data = _case("mlp")
    P = sum(p.numel() for p in model.parameters())
    V = torch.randn(P, K, generator=torch.Generator().manual_seed(2))
    F = FisherMC(model, loss_fn, data, mc_samples=2, seed=5)
    singles = torch.stack([F @ V[:, j] for j in range(K)], dim=1)
    for budget in (2**62, 1, _two_columns_budget(model, data)):
        torch.testing.assert_close(_with_budget(F, budget) @ V, singles, rtol=1e-12, atol=1e-12)
    # the draw's matrix is symmetric PSD: columns from one chunked pass form one matrix
    dense = _with_budget(F, 1) @ torch.eye(P)
    torch.testing.assert_close(dense, dense.T)
    assert torch.linalg.eigvalsh(dense).min() > -1e-10
