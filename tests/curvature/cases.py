"""Tiny models, data and independent dense float64 references for the curvature tests."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel


class TinyLM(nn.Module):
    """Embedding + one pre-norm attention block + MLP + vocabulary head; logits ``(N, V, S)``."""

    def __init__(self, vocab=7, width=4, heads=2, context=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.1 * torch.randn(context, width))
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        a = self.norm1(h)
        S = tokens.shape[1]
        mask = torch.triu(torch.full((S, S), float("-inf"), dtype=h.dtype, device=h.device),
                          diagonal=1)
        h = h + self.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(h).transpose(1, 2)  # (N, V, S) as CrossEntropyLoss takes it


class DictMLP(nn.Module):
    """MLP taking a mapping input ``{"a": (N, 3), "b": (N, 2)}``."""

    def __init__(self, out=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, out))

    def forward(self, X):
        return self.net(torch.cat([X["a"], X["b"]], dim=1))


def mlp(out=3):
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, out))


def cnn2d(out=3):
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(3, 2, 2), nn.Sigmoid(), nn.AvgPool2d(1), nn.Flatten(),
                      nn.Linear(2, out))
    with torch.no_grad():  # non-trivial running statistics for eval-mode BatchNorm
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 1.5)
    return m.eval()


def cnn1d(out=3):
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.MaxPool1d(2), nn.Flatten(),
                         nn.Linear(6, out))


def cnn3d(out=3):
    return nn.Sequential(nn.Conv3d(1, 2, 2), nn.Tanh(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                         nn.Linear(2, out))


INPUT_SHAPES = {"mlp": (5,), "cnn2d": (2, 4, 4), "cnn1d": (2, 6), "cnn3d": (1, 3, 3, 3)}
MODELS = {"mlp": mlp, "cnn2d": cnn2d, "cnn1d": cnn1d, "cnn3d": cnn3d}


def targets(loss_fn, out_shape, g):
    n = out_shape[0]
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return torch.randint(0, out_shape[1], (n, *out_shape[2:]), generator=g)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return torch.rand(out_shape, generator=g).round()
    return torch.randn(out_shape, generator=g)


def make_data(model, loss_fn, in_shape, sizes=(3, 5, 2), seed=0, out_dim=3):
    g = torch.Generator().manual_seed(seed)
    data = []
    for n in sizes:
        X = torch.randn(n, *in_shape, generator=g)
        data.append((X, targets(loss_fn, (n, out_dim), g)))
    return data


def lm_data(sizes=(2, 3), seq=5, vocab=7, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = []
    for n in sizes:
        X = torch.randint(0, vocab, (n, seq), generator=g)
        y = torch.randint(0, vocab, (n, seq), generator=g)
        y[torch.rand(n, seq, generator=g) < 0.3] = ignore_index
        data.append((X, y))
    return data


# --------------------------------------------------------------------------- dense references
def flat_function(model, params=None):
    """``θ ↦ model`` call with the selected parameters replaced by slices of a flat ``θ``."""
    named = dict(model.named_parameters())
    names = list(named) if params is None else list(params)
    shapes = [named[n].shape for n in names]
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])

    def call(th, X):
        parts = th.split([math.prod(s) for s in shapes])
        p = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return functional_call(model, p, (X,))

    return theta, call


def cat_data(data):
    Xs, ys = zip(*data)
    if isinstance(Xs[0], dict):
        X = {k: torch.cat([x[k] for x in Xs]) for k in Xs[0]}
    else:
        X = torch.cat(Xs)
    return X, torch.cat(ys)


@sdpa_kernel(SDPBackend.MATH)
def dense_hessian(model, loss_fn, data, params=None):
    """Hessian of the loss of all data concatenated into one batch (``jacrev`` of ``jacrev``).

    For models with LayerNorm the rows are computed one ``torch.autograd.grad`` at a time: in
    torch 2.14 the vmap-based ``torch.func.hessian`` and ``jacrev(jacrev(...))`` return a
    non-symmetric (wrong) matrix for the tiny transformer, while the row-by-row Hessian is
    symmetric and matches central finite differences to 1e-11.
    """
    theta, call = flat_function(model, params)
    X, y = cat_data(data)
    if not any(isinstance(m, nn.LayerNorm) for m in model.modules()):
        return jacrev(jacrev(lambda th: loss_fn(call(th, X), y)))(theta)
    th = theta.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_fn(call(th, X), y), th, create_graph=True)
    rows = [torch.autograd.grad(g[i], th, retain_graph=True, allow_unused=True,
                                materialize_grads=True)[0] for i in range(len(g))]
    return torch.stack(rows).detach()


@sdpa_kernel(SDPBackend.MATH)
def dense_ggn(model, loss_fn, data, params=None):
    """``Jᵀ H_f J`` with ``J`` from ``jacrev`` and ``H_f`` from ``torch.func.hessian``."""
    theta, call = flat_function(model, params)
    X, y = cat_data(data)
    out = call(theta, X).detach()
    J = jacrev(lambda th: call(th, X))(theta).reshape(out.numel(), -1)
    Hf = hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    return J.T @ Hf @ J


@sdpa_kernel(SDPBackend.MATH)
def per_example_gradients(model, loss_fn, data, params=None):
    """``(N, P)`` gradients of each example's sum-reduced loss (``jacrev``)."""
    theta, call = flat_function(model, params)
    X, y = cat_data(data)
    summed = type(loss_fn)(**{**_loss_kwargs(loss_fn), "reduction": "none"})

    def losses(th):
        per = summed(call(th, X), y)
        return per.reshape(per.shape[0], -1).sum(1)

    return jacrev(losses)(theta)


def num_terms(loss_fn, data):
    X, y = cat_data(data)
    if loss_fn.reduction == "sum":
        return 1.0
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return float((y != loss_fn.ignore_index).sum())
    return float(y.numel())


def _loss_kwargs(loss_fn):
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return {"ignore_index": loss_fn.ignore_index}
    return {}
