"""The checks of KFAC's factor pass: hooked calls that make up the gradient, finite factors.

A parameter planned for a Kronecker or norm block must get its whole gradient through the
calls of its module that the forward hooks saw. Weight tying across a module and a functional
use (``F.linear(x, layer.weight)`` elsewhere in the model) add a term the hooks never see, and
the factors would silently miss it. On the first batch of the first ``compute()`` the pass
rebuilds each such gradient ``Jᵀv`` from the recorded inputs and output gradients and compares
it with autograd's, within the round-off of any summation order. After every pass the layers'
input weights and the finiteness of their factors are read in one device synchronisation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from curvkit.curvature.kfac_pass import FactorPass

__all__ = ["verify_coverage", "check_layers"]


def verify_coverage(fp: FactorPass, out: Tensor, v: Tensor, a_list: list[Tensor | None]) -> None:
    """Raise if ``fp``'s hooked calls do not reproduce a planned parameter's gradient ``Jᵀv``.

    Args:
        fp: The factor pass, after its forward pass of the batch (``out``).
        out: The model output.
        v: One backpropagated vector, shaped like ``out``.
        a_list: Per layer its inputs without the column of ones
            (``fp.layer_inputs(plan, ones=False)``), or ``None`` for a norm layer.

    Raises:
        ValueError: Naming the parameter and the module whose calls miss part of its gradient.
    """
    names = [n for plan in fp.layers for n in (plan.weight, plan.bias) if n is not None]
    # Each gradient entry is a sum over rows (examples x positions) that autograd and the
    # rebuild below accumulate in different orders. In float32 over a batch of images they
    # differ by far more than a fixed rtol (a conv bias over 10⁵ rows: 4e-4 relative), so
    # the check keeps one example's vector (the largest: a weight may zero others), whose
    # gradients sum its rows only, and allows the round-off bound of any summation order,
    # 2 (n + 1) eps Σ|terms| over n terms (Higham, Accuracy and Stability, §4.2), ``bound``
    # holding Σ|terms| per entry. A tie or a functional reuse adds a whole term of its own.
    N = v.shape[0]
    keep = torch.zeros(N, dtype=v.dtype, device=v.device)
    keep[v.reshape(N, -1).norm(dim=1).argmax()] = 1
    v = v * keep.reshape(N, *([1] * (v.ndim - 1)))
    grads, true = fp.backward(out, v, [fp.params[n] for n in names], retain=True, cast=False)
    # Under autocast a layer's operands and results are rounded to a lower precision: a
    # few units of it per term (the products still accumulate at the higher precision).
    eps = {id(plan): max(torch.finfo(g.dtype).eps for g in g_calls)
           for plan, g_calls in zip(fp.layers, grads)}
    grads = [[g if g.dtype == fp.dtype else g.to(fp.dtype) for g in g_calls]
             for g_calls in grads]
    true = dict(zip(names, true))
    for plan, g_calls, a in zip(fp.layers, grads, a_list):
        rebuilt, bound = {}, {}
        if plan.is_kron:
            g = fp.layer_grads(plan, g_calls)
            rows = int(g.flatten(2).ne(0).any(-1).sum())  # the rows that add a term
            if plan.weight is not None and plan.rule.order == "GA":
                rebuilt[plan.weight] = torch.einsum("nsgo,nsgi->goi", g, a)
                bound[plan.weight] = torch.einsum("nsgo,nsgi->goi", g.abs(), a.abs())
            elif plan.weight is not None:
                rebuilt[plan.weight] = torch.einsum("nsgi,nsgo->io", a, g)
                bound[plan.weight] = torch.einsum("nsgi,nsgo->io", a.abs(), g.abs())
            if plan.bias is not None:
                rebuilt[plan.bias] = g.sum(dim=(0, 1))
                bound[plan.bias] = g.abs().sum(dim=(0, 1))
        else:
            for role, u in fp.norm_grads(plan, g_calls).items():
                rebuilt[getattr(plan, role)] = u.sum(0)
            for (x, _), g in zip(plan.calls, g_calls):
                for role, u in plan.rule.per_example(plan.module, x, g, plan.roles,
                                                     magnitude=True).items():
                    name = getattr(plan, role)
                    bound[name] = bound[name] + u.sum(0) if name in bound else u.sum(0)
            numel = true[plan.weight or plan.bias].numel()
            rows = -(-sum(int(g.ne(0).sum()) for g in g_calls) // numel)
        for name, r in rebuilt.items():
            t = true[name]
            t = (t.to_dense() if t.is_sparse else t).reshape(-1)  # Embedding(sparse=True)
            tol = 1e-6 * max(1.0, t.abs().max().item())
            unit, low = torch.finfo(t.dtype).eps, eps[id(plan)]
            unit = 2 * (rows + 1) * unit + (4 * low if low > unit else 0.0)
            tol = tol + unit * bound[name].reshape(-1)
            r = r.reshape(-1)
            if not ((r == t) | ((r - t).abs() <= tol + 1e-4 * t.abs())).all():  # inf == inf
                raise ValueError(
                    f"KFAC: the gradient of parameter {name!r} is not accounted for by the "
                    f"calls of module {plan.path!r}: it is used outside the module's forward "
                    "(weight tying or a functional call). Exclude it from params or untie it.")


def check_layers(checks: list[tuple[str, Tensor, Tensor, Tensor]]) -> None:
    """Refuse layers without input weight or with non-finite factors.

    ``checks`` holds per layer ``(path, weight count (1,), A, G)``. The counts and the factors'
    diagonal sums are read back together: one device synchronisation for the whole model, not
    two per layer (each stalls an accelerator's launch queue), and one stack for all of them.
    """
    if not checks:
        return
    dtype = checks[0][1].dtype
    sums = [_diagonal_sum(X) for _, _, A, G in checks for X in (A, G)]
    values = torch.stack([c.reshape(()) if c.dtype == dtype else c.reshape(()).to(dtype)
                          for _, c, _, _ in checks]
                         + [s if s.dtype == dtype else s.to(dtype) for s in sums]).tolist()
    L = len(checks)
    for i, (path, _, _, _) in enumerate(checks):
        count, diagonal = values[i], values[L + 2 * i] + values[L + 2 * i + 1]
        if not count > 0:  # A is a weighted mean over no weight: 0/0
            raise ValueError(f"KFAC: layer {path!r} has no input of nonzero weight in the data "
                             "(the example weights sum to 0); its input factor is undefined.")
        if not math.isfinite(diagonal):
            raise ValueError(f"KFAC: the factors of layer {path!r} are not finite; the data, "
                             "the model's outputs or the loss hold NaN or inf.")


def _diagonal_sum(X: Tensor) -> Tensor:
    """Sum of the diagonals of ``X: (..., d, d)``; a factor placeholder ``(1,)`` as it is."""
    return X.diagonal(dim1=-2, dim2=-1).sum() if X.ndim >= 2 else X.sum()
