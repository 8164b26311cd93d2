"""Models, data and independent dense float64 references for the KFAC / EKFAC tests.

References are built with ``torch.func.jacrev`` / ``torch.func.hessian`` on the parameters
flattened in ``named_parameters`` order, never with the operators under test.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev


def flat_call(model, names=None):
    named = dict(model.named_parameters())
    names = list(named) if names is None else list(names)
    shapes = [named[n].shape for n in names]
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])

    def call(th, X):
        parts = th.split([math.prod(s) for s in shapes])
        return functional_call(model, {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)},
                               (X,))

    return theta, call


def cat_data(data):
    return torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])


def num_terms(loss_fn, data):
    _, y = cat_data(data)
    if loss_fn.reduction == "sum":
        return 1.0
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return float((y != loss_fn.ignore_index).sum())
    return float(y.numel())


def dense_ggn(model, loss_fn, data, names=None, weights=None):
    """``c Σ_n w_n J_nᵀ H_n J_n`` from ``jacrev`` and ``hessian`` of the sum-reduced loss."""
    theta, call = flat_call(model, names)
    X, y = cat_data(data)
    summed = type(loss_fn)(reduction="sum")
    total = torch.zeros(theta.numel(), theta.numel())
    w = torch.ones(X.shape[0]) if weights is None else weights
    for n in range(X.shape[0]):  # per example: clear, and the problems are tiny
        x1, y1 = X[n:n + 1], y[n:n + 1]
        out = call(theta, x1).detach()
        J = jacrev(lambda th, x1=x1: call(th, x1))(theta).reshape(out.numel(), -1)
        H = hessian(lambda o, y1=y1: summed(o, y1))(out).reshape(out.numel(), out.numel())
        total += w[n] * J.T @ H @ J
    return total / num_terms(loss_fn, data)


def per_example_grads(model, loss_fn, data, names=None):
    """``(N, P)`` gradients of each example's sum-reduced loss."""
    theta, call = flat_call(model, names)
    X, y = cat_data(data)
    summed = type(loss_fn)(reduction="sum")
    rows = []
    for n in range(X.shape[0]):
        x1, y1 = X[n:n + 1], y[n:n + 1]
        rows.append(jacrev(lambda th, x1=x1, y1=y1: summed(call(th, x1), y1))(theta))
    return torch.stack(rows)


def param_slices(model, names=None):
    """Name → slice of the flat parameter vector."""
    named = dict(model.named_parameters())
    out, start = {}, 0
    for n in (list(named) if names is None else names):
        out[n] = slice(start, start + named[n].numel())
        start += named[n].numel()
    return out


def block(M, slices, names_a, names_b=None):
    """Sub-block of ``M`` over parameter groups (concatenated in the given order)."""
    ia = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names_a])
    ib = ia if names_b is None else torch.cat(
        [torch.arange(slices[n].start, slices[n].stop) for n in names_b])
    return M[ia][:, ib]


def layer_mask(model, groups):
    """Boolean ``(P, P)`` mask of the block-diagonal structure given parameter-name groups."""
    slices = param_slices(model)
    P = sum(p.numel() for p in model.parameters())
    mask = torch.zeros(P, P, dtype=torch.bool)
    for g in groups:
        ix = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in g])
        mask[ix.unsqueeze(1), ix.unsqueeze(0)] = True
    return mask


def regression_data(in_shape, out_shape, sizes=(3, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *in_shape, generator=g), torch.randn(n, *out_shape, generator=g))
            for n in sizes]


def class_data(in_shape, classes, sizes=(3, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *in_shape, generator=g), torch.randint(0, classes, (n,), generator=g))
            for n in sizes]


class ChannelsLast(nn.Module):
    """``(N, C, *spatial)`` → ``(N, *spatial, C)``: per-position outputs with features last."""

    def forward(self, x):
        return x.movedim(1, -1)


class MeanOverPositions(nn.Module):
    """``(N, S, D)`` → ``(N, D)``."""

    def forward(self, x):
        return x.mean(dim=1)


class WithFreeParameters(nn.Module):
    """Linear layers with free parameters (``scale``, ``shift``) used outside any layer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.scale = nn.Parameter(torch.tensor([0.7, 1.3, -0.4, 1.1]))
        self.shift = nn.Parameter(torch.randn(2, 2))
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x) * self.scale + self.shift.reshape(-1))
        return self.out(h)


def seeded(fn, seed=0):
    torch.manual_seed(seed)  # test-only: deterministic module initialisation
    return fn()


class FunctionalReuse(nn.Module):
    """A Linear whose weight is used a second time outside its module (``F.linear``)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return nn.functional.linear(self.lin(x), self.lin.weight)
