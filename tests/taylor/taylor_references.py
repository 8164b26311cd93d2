"""Independent dense float64 references built from nested torch.func autograd."""

from __future__ import annotations

import math

import torch
from torch.func import hessian, vmap


def jet_reference(f, x0, series):
    """``[d^k/dt^k f(x0 + sum_k t^k/k! x_k)]_{k=0..K}`` at ``t=0`` by repeated reverse mode.

    For a scalar ``t``, ``y'(t) = d/du <u, dy/dt>``: two backward passes per order (the
    "double-vjp" forward derivative), which nests far more cheaply than functorch ``jvp``.
    """
    K = len(series)
    t = torch.zeros((), dtype=x0.dtype, requires_grad=True)
    y = f(x0 + sum(t**k / math.factorial(k) * series[k - 1] for k in range(1, K + 1)))
    out = [y]
    for _ in range(K):
        u = torch.zeros_like(y, requires_grad=True)
        (dt,) = torch.autograd.grad((y * u).sum(), t, create_graph=True, allow_unused=True)
        if dt is None:
            y = torch.zeros_like(y)
        else:
            (y,) = torch.autograd.grad(dt, u, create_graph=True, allow_unused=True)
            y = torch.zeros_like(u) if y is None else y
        out.append(y)
    return out


def per_row(f):
    """``x: (D,) -> f(x[None])[0]`` for a batched ``f``."""
    return lambda x: f(x.unsqueeze(0)).squeeze(0)


def hessians(f, X):
    """``(N, [C,] D, D)`` Hessians of a row-wise ``f`` at the rows of ``X``."""
    return vmap(hessian(per_row(f)))(X)


def laplacian_reference(f, X):
    return hessians(f, X).diagonal(dim1=-2, dim2=-1).sum(-1)


def biharmonic_reference(f, X):
    """Trace of the Hessian of the trace of the Hessian."""
    g = per_row(f)

    def lap(x):
        return hessian(g)(x).diagonal(dim1=-2, dim2=-1).sum(-1)

    return vmap(hessian(lap))(X).diagonal(dim1=-2, dim2=-1).sum(-1)


def standard_laplacian(params):
    """Standard (non-collapsed) Taylor mode of a tanh MLP ``[(W, b), ...]`` written out with a
    direction axis, summed over it: ``fn(x0, X1, X2)`` for the rewrite tests to collapse."""

    def fn(x0, X1, X2):
        for i, (W, b) in enumerate(params):
            x0, X1, X2 = x0 @ W.T + b, X1 @ W.T, X2 @ W.T
            if i < len(params) - 1:
                t = torch.tanh(x0)
                d1 = 1 - t * t
                d2 = -2 * t * d1
                x0, X1, X2 = t, d1 * X1, d1 * X2 + d2 * X1 * X1
        return X2.sum(0)

    return fn


def assert_jet_matches(f, x0, series, reference=None, *, tol=1e-10):
    """curvkit's ``jet(f, K)`` at ``x0`` equals ``jet_reference`` of ``reference`` (default
    ``f``), value and all ``K = len(series)`` coefficients."""
    from curvkit.taylor import jet

    value, coefficients = jet(f, len(series))(x0, series)
    expected = jet_reference(f if reference is None else reference, x0, series)
    for ours, ref in zip([value, *coefficients], expected, strict=True):
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)

