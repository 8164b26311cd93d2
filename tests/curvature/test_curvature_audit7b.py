"""Seventh-session audit of the exact curvature operators against modules users feed them.

References are dense float64 matrices from ``torch.func.jacrev`` / ``torch.func.hessian`` or,
where vmap-based second derivatives are unreliable in torch 2.14 (normalisation layers, the
fused weight norm), the Hessian row by row with ``torch.autograd.grad``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from cases import dense_ggn, dense_hessian, flat_function
from torch import nn
from torch.nn.utils import parametrizations

from curvkit.curvature import GGN, EmpiricalFisher, FisherMC, Hessian, Jacobian


def _columns(P, k=3, seed=0):
    return torch.randn(P, k, generator=torch.Generator().manual_seed(seed))


def _numel(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _row_hessian(model, loss_fn, X, y):
    """Hessian of ``loss_fn(model(X), y)``, one ``autograd.grad`` row at a time (no vmap)."""
    theta, call = flat_function(model)
    th = theta.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_fn(call(th, X), y), th, create_graph=True)
    return torch.stack([torch.autograd.grad(g[i], th, retain_graph=True)[0]
                        for i in range(len(g))])


# --------------------------------------------------------------------------- attention fast path
class _Attention(nn.Module):
    """Self-attention (``nn.MultiheadAttention`` or a ``TransformerEncoderLayer``) + head."""

    def __init__(self, kind):
        super().__init__()
        if kind == "mha":
            self.block = nn.MultiheadAttention(4, 2, batch_first=True)
        else:
            self.block = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True)
        self.kind = kind
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.block(x, x, x, need_weights=False)[0] if self.kind == "mha" else self.block(x)
        return self.head(h).transpose(1, 2)  # (N, C, S) as CrossEntropyLoss takes it


@pytest.mark.parametrize("kind", ["mha", "encoder"])
def test_eval_mode_attention_takes_the_differentiable_path(kind):
    # In eval mode both modules dispatched to PyTorch's fused fast path, which has no
    # forward-mode derivative: the GGN family and the Jacobian failed ("the model cannot be
    # differentiated") on the issue's own "small transformer" in eval mode.
    torch.manual_seed(0)
    model = _Attention(kind).eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(2, 3, 4, generator=g), torch.randint(0, 3, (2, 3), generator=g)),
            (torch.randn(1, 3, 4, generator=g), torch.randint(0, 3, (1, 3), generator=g))]
    loss_fn = nn.CrossEntropyLoss()
    twin = copy.deepcopy(model).train()  # dropout 0: the same function, never the fast path
    V = _columns(_numel(model))
    G = dense_ggn(twin, loss_fn, data)
    torch.testing.assert_close(GGN(model, loss_fn, data) @ V, G @ V)
    H = dense_hessian(twin, loss_fn, data)
    torch.testing.assert_close(Hessian(model, loss_fn, data) @ V, H @ V)
    F_mc = FisherMC(model, loss_fn, data, mc_samples=2)
    assert (F_mc @ V).isfinite().all()
    J = Jacobian(model, data)
    theta, call = flat_function(twin)
    Jref = torch.cat([torch.func.jacrev(lambda th, X=X: call(th, X))(theta).reshape(-1, len(theta))
                      for X, _ in data])
    torch.testing.assert_close(J @ V, Jref @ V)
    assert torch.backends.mha.get_fastpath_enabled()  # restored after the passes


# --------------------------------------------------------------------------- embeddings
class _Tokens(nn.Module):
    def __init__(self, **embedding):
        super().__init__()
        self.embed = nn.Embedding(6, 4, **embedding)
        self.head = nn.Linear(4, 6)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens))).transpose(1, 2)


def _token_data():
    g = torch.Generator().manual_seed(3)
    X = torch.randint(0, 6, (3, 4), generator=g)
    X[0, :2] = 0  # padding tokens
    X[2, 1] = 0
    return [(X, torch.randint(0, 6, (3, 4), generator=g))]


@pytest.mark.parametrize("op_cls", [GGN, EmpiricalFisher])
def test_embedding_padding_row_is_held_fixed_as_in_pytorch_gradients(op_cls):
    # PyTorch's backward gives the padding row no gradient, but forward-mode AD pushed its
    # tangent through: G @ v was Jᵀ_bwd H J_fwd, not symmetric, 5 % off the reference.
    torch.manual_seed(0)
    model, data, loss_fn = _Tokens(padding_idx=0), _token_data(), nn.CrossEntropyLoss()
    plain = copy.deepcopy(model)
    plain.embed.padding_idx = None
    if op_cls is GGN:
        ref = dense_ggn(plain, loss_fn, data)
    else:
        from cases import per_example_gradients
        grads = per_example_gradients(plain, loss_fn, data)
        ref = grads.T @ grads / 12
    keep = torch.ones(ref.shape[0], dtype=torch.bool)
    keep[:4] = False  # embed.weight[0]: the padding row, first in the flat parameters
    ref = ref * keep[:, None] * keep[None, :]
    A = op_cls(model, loss_fn, data)
    V = _columns(A.shape[1])
    torch.testing.assert_close(A @ V, ref @ V)
    torch.testing.assert_close(A @ V[:, :1], ref @ V[:, :1])


def test_jacobian_and_its_adjoint_agree_with_a_padding_row():
    model, data = _Tokens(padding_idx=0), _token_data()
    J = Jacobian(model, data)
    V, U = _columns(J.shape[1], 2), _columns(J.shape[0], 2, seed=1)
    torch.testing.assert_close(U.T @ (J @ V), (J.T @ U).T @ V)


class _TiedTokens(nn.Module):
    """Input and output embeddings tied, with a padding row."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4, padding_idx=0)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens))).transpose(1, 2)


class _TiedReference(nn.Module):
    """The same function with the padding row a constant of the lookup only, as PyTorch's
    embedding backward treats it."""

    def __init__(self, weight):
        super().__init__()
        self.w = nn.Parameter(weight.detach().clone())

    def forward(self, tokens):
        lookup = torch.cat([self.w[:1].detach(), self.w[1:]])
        return F.linear(torch.tanh(F.embedding(tokens, lookup)), self.w).transpose(1, 2)


def test_tied_embeddings_with_a_padding_row():
    # The shared tensor's padding row gets the output layer's gradient but none from the
    # lookup: the GGN mixed the two conventions (asymmetric, 5 % off), J and Jᵀ disagreed.
    torch.manual_seed(0)
    model, data, loss_fn = _TiedTokens(), _token_data(), nn.CrossEntropyLoss()
    ref_model = _TiedReference(model.embed.weight)
    V = _columns(24)
    torch.testing.assert_close(GGN(model, loss_fn, data) @ V,
                               dense_ggn(ref_model, loss_fn, data) @ V)
    torch.testing.assert_close(Hessian(model, loss_fn, data) @ V,
                               dense_hessian(ref_model, loss_fn, data) @ V)
    J = Jacobian(model, data)
    U = _columns(J.shape[0], 2, seed=1)
    torch.testing.assert_close(U.T @ (J @ V[:, :2]), (J.T @ U).T @ V[:, :2])
    assert "forward" not in vars(model.embed)  # the class's forward again


@pytest.mark.parametrize("op_cls", [GGN, Hessian, EmpiricalFisher])
def test_sparse_embeddings(op_cls):
    # Embedding(sparse=True) made autograd return sparse gradients, on which the operators
    # failed with "Could not run 'aten::view' with arguments from the 'SparseCPU' backend".
    torch.manual_seed(0)
    model, data, loss_fn = _Tokens(sparse=True), _token_data(), nn.CrossEntropyLoss()
    dense = copy.deepcopy(model)
    dense.embed.sparse = False
    ref = op_cls(dense, loss_fn, data).to_dense() if op_cls is EmpiricalFisher else \
        (dense_ggn if op_cls is GGN else dense_hessian)(dense, loss_fn, data)
    V = _columns(ref.shape[0])
    torch.testing.assert_close(op_cls(model, loss_fn, data) @ V, ref @ V)
    assert model.embed.sparse  # the user's setting is left as it was


# --------------------------------------------------------------------------- weight norm
def _weight_norm_mlp(theta, X, dim):
    """The weight-normed MLP written out: flat ``theta`` = (b0, g, v, W2, b2), model order."""
    sizes = {0: (4, 1), 1: (1, 5), None: ()}[dim]
    b0, g, v, W2, b2 = theta.split([4, math.prod(sizes) if sizes else 1, 20, 12, 3])
    v = v.reshape(4, 5)
    norm = v.norm() if dim is None else v.norm(dim=1 - dim, keepdim=True)
    W0 = g.reshape(sizes) * v / norm
    return F.linear(torch.tanh(F.linear(X, W0, b0)), W2.reshape(3, 4), b2)


@pytest.mark.parametrize("dim", [0, 1, None])
def test_weight_norm_parametrization(dim):
    # torch._weight_norm's fused kernel has no forward-mode derivative (GGN, Fisher, Jacobian
    # failed) and its batched double backward is wrong: H @ V with several columns was 30-60 %
    # off (one column at a time was right).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    parametrizations.weight_norm(model[0], dim=dim)
    assert [n for n, _ in model.named_parameters()] == [
        "0.bias", "0.parametrizations.weight.original0", "0.parametrizations.weight.original1",
        "2.weight", "2.bias"]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)
    torch.testing.assert_close(_weight_norm_mlp(theta, X, dim), model(X))  # the same function
    loss_fn = nn.MSELoss()
    th = theta.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_fn(_weight_norm_mlp(th, X, dim), y), th,
                                  create_graph=True)
    H = torch.stack([torch.autograd.grad(grad[i], th, retain_graph=True)[0]
                     for i in range(len(grad))])
    J = torch.func.jacrev(lambda t: _weight_norm_mlp(t, X, dim))(theta).reshape(18, -1)
    G = J.T @ J * (2.0 / 18)
    V = _columns(len(theta))
    torch.testing.assert_close(Hessian(model, loss_fn, [(X, y)]) @ V, H @ V)
    torch.testing.assert_close(GGN(model, loss_fn, [(X, y)]) @ V, G @ V)
    torch.testing.assert_close(Jacobian(model, [(X, y)]) @ V, J @ V)
    assert "forward" not in vars(model[0].parametrizations.weight[0])  # restored


# --------------------------------------------------------------------------- wrappers
@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_compiled_and_data_parallel_models(wrap):
    # torch.compile: "Cannot access data pointer of Tensor that doesn't have storage";
    # DataParallel: "The stateless API can't be used with nn.DataParallel module".
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    model = torch.compile(inner) if wrap == "compile" else nn.DataParallel(inner)
    # (DataParallel moves the module to the GPU where there is exactly one: the data follow)
    device = next(inner.parameters()).device
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(n, 5, generator=g).to(device),
             torch.randint(0, 3, (n,), generator=g).to(device)) for n in (3, 2)]
    loss_fn = nn.CrossEntropyLoss()
    G = GGN(model, loss_fn, data)
    prefix = "_orig_mod." if wrap == "compile" else "module."
    assert list(G.params) == [prefix + n for n, _ in inner.named_parameters()]
    V = _columns(G.shape[1]).to(device)
    torch.testing.assert_close(G @ V, dense_ggn(inner, loss_fn, data) @ V)
    torch.testing.assert_close(Hessian(model, loss_fn, data) @ V,
                               dense_hessian(inner, loss_fn, data) @ V)
    sub = GGN(model, loss_fn, data, params={prefix + "2.weight": inner[2].weight})
    ref = dense_ggn(inner, loss_fn, data, params=["2.weight"])
    torch.testing.assert_close(sub.to_dense(), ref)


# --------------------------------------------------------------------------- batch statistics
def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).train()


def test_training_batchnorm_unchecked_is_the_batch_statistics_curvature_without_side_effects():
    # With check_deterministic=False, multi-column GGN products failed inside functorch
    # ("in-place operation ... would mutate a captured Tensor") and every Hessian product
    # updated the model's running statistics.
    model = _bn_model()
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)
    ref_model = copy.deepcopy(model)  # batch statistics, no running ones
    ref_model[1].track_running_stats = False
    ref_model[1].running_mean = ref_model[1].running_var = None
    ref_model[1].num_batches_tracked = None
    loss_fn = nn.MSELoss()
    H = _row_hessian(ref_model, loss_fn, X, y)
    theta, call = flat_function(ref_model)
    out = call(theta, X)
    J = torch.func.jacrev(lambda th: call(th, X))(theta).reshape(out.numel(), -1)
    G = J.T @ J * (2.0 / out.numel())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    V = _columns(len(theta))
    torch.testing.assert_close(GGN(model, loss_fn, [(X, y)], check_deterministic=False) @ V, G @ V)
    torch.testing.assert_close(Hessian(model, loss_fn, [(X, y)], check_deterministic=False) @ V,
                               H @ V)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert model[1].track_running_stats and model.training
    with pytest.raises(ValueError, match=r"GGN.diagonal: BatchNorm module\(s\) \['1'\] "
                                         "normalise with batch statistics"):
        GGN(model, loss_fn, [(X, y)], check_deterministic=False).diagonal()


# --------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("op_cls", [GGN, Hessian])
def test_products_under_autocast_keep_the_parameters_precision(op_cls):
    # A product inside a user's autocast region ran the model in bfloat16 (GGN 1e-3 off).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).float()
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(6, 5, generator=g, dtype=torch.float32),
             torch.randint(0, 3, (6,), generator=g))]
    ref = dense_ggn if op_cls is GGN else dense_hessian
    exact = ref(copy.deepcopy(model).double(), nn.CrossEntropyLoss(),
                [(data[0][0].double(), data[0][1])])
    V = _columns(exact.shape[0])
    expected = (exact @ V).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = op_cls(model, nn.CrossEntropyLoss(), data) @ V.float()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * math.sqrt(V.shape[0]))


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("op_cls", [GGN, Hessian, EmpiricalFisher, FisherMC])
def test_weighted_batches_are_refused_by_the_exact_operators(op_cls):
    model = nn.Sequential(nn.Linear(5, 3))
    data = [(torch.randn(4, 5), torch.randn(4, 3), torch.ones(4))]
    with pytest.raises(ValueError, match=rf"{op_cls.__name__}: batch 0 is weighted \(X, y, w\); "
                                         "this operator takes unweighted"):
        op_cls(model, nn.MSELoss(), data)


@pytest.mark.parametrize("loss_fn, hint", [
    (nn.NLLLoss(), "drop it and pass the logits with nn.CrossEntropyLoss"),
    (nn.KLDivLoss(reduction="sum"), "nn.CrossEntropyLoss and probability targets"),
    (nn.HuberLoss(), r"\(the Hessian operator accepts any twice-differentiable loss\)\.$"),
])
def test_unsupported_losses_name_the_supported_ones_and_the_equivalent(loss_fn, hint):
    # NLLLoss/KLDivLoss on log-softmax outputs are cross-entropy in disguise: say so.
    model = nn.Sequential(nn.Linear(5, 3), nn.LogSoftmax(dim=1))
    data = [(torch.randn(4, 5), torch.randint(0, 3, (4,)))]
    with pytest.raises(ValueError, match="GGN: supports MSELoss, CrossEntropyLoss, "
                                         "BCEWithLogitsLoss; got " + type(loss_fn).__name__) as err:
        GGN(model, loss_fn, data)
    assert err.match(hint)
