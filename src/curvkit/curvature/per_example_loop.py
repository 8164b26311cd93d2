"""Per-example vector-Jacobian products by a loop over the examples, where vmap fails.

Used by KFAC's "other" blocks and by the exact diagonals of the GGN family.
``FactorPass.other_gradients`` gets ``U[n, k] = ∂(v_kᵀ f(x_n))/∂θ`` from ``torch.func.vmap``
over one-example forward passes. PyTorch cannot batch some modules there (``nn.LSTM``,
``nn.GRU``: fused ``_VF`` kernels without a vmap rule) or batches them wrongly (``nn.PReLU``,
see below); for those this module computes the same tensors with plain autograd: per example
one forward pass of that example alone and its ``K`` vector-Jacobian products. The examples are
the loop; the ``K`` products of one example go through one batched backward
(``is_grads_batched``) where PyTorch can batch that backward, else one backward each.

``vmap_unsafe_modules`` names the modules for which the loop must be taken without trying vmap:
PyTorch's batched backward of ``nn.PReLU`` under the two nested vmaps returns wrong gradients,
silently, when the batch holds as many examples as there are vectors (``N = K`` in the cases
seen, e.g. an MSE output of width 3 and a batch of 3), for every parameter whose gradient flows
through it; other shapes raise. Recurrent layers and cells always raise (no batching rule for
their kernels); naming them saves the failed attempt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

if TYPE_CHECKING:
    from curvkit.curvature.engine import Batch, DataEngine

__all__ = ["looped_other_gradients", "vmap_unsafe_modules", "first_example_agrees", "agree"]

# Modules whose one-example passes torch.func.vmap gets wrong (PReLU) or cannot batch (the rest).
_VMAP_UNSAFE = (nn.PReLU, nn.RNNBase, nn.RNNCellBase)


def vmap_unsafe_modules(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` whose "other" gradients need ``looped_other_gradients``.

    A functional ``torch.nn.functional.prelu`` outside an ``nn.PReLU`` module is not seen.
    """
    return [name for name, m in model.named_modules() if isinstance(m, _VMAP_UNSAFE)]


def looped_other_gradients(engine: DataEngine, batch: Batch, V: Tensor, names: Sequence[str],
                           x_dims: Any) -> dict[str, Tensor]:
    """Per-example, per-vector gradients ``{name: (N, K, numel)}`` of parameters ``names``.

    The same tensors as ``FactorPass.other_gradients`` (layout, dtype and device of the
    parameters), without ``torch.func.vmap`` over the examples: example ``n`` alone runs one
    forward pass, ``engine.forward(X[n:n+1], params)``, and autograd gives
    ``∂(v_kᵀ f(x_n))/∂θ`` for its ``K`` vectors ``V[:, n]``. Only one example's graph is alive
    at a time. Cost per example: one forward and ``K`` vector-Jacobian products (one batched
    backward, or ``K`` backward passes where the model's backward cannot be batched); the first
    example also runs the ``K`` plain backward passes, which check the batched one.

    Args:
        engine: The data engine (``engine.params``: all selected parameters, at their values).
        batch: The batch; ``batch.X`` a tensor or a mapping of tensors.
        V: Backpropagated vectors ``(K, N, *out_per_example)``.
        names: The parameters to differentiate, a subset of ``engine.params``.
        x_dims: Per leaf of ``batch.X``, 0 where it holds the examples in front, else ``None``
            (shared by every example); as ``kfac_pass._example_dims`` gives it.

    Returns:
        ``{name: U}`` with ``U[n, k]`` the flattened gradient, shape ``(N, K, numel)``.

    Raises:
        ValueError: If a one-example output does not have the shape ``(1, *V.shape[2:])``.
    """
    base = {n: p.detach() for n, p in engine.params.items()}
    leaves = {n: base[n].detach().requires_grad_(True) for n in names}
    inputs = list(leaves.values())
    N, K = batch.batch_size, V.shape[0]
    U = {n: base[n].new_zeros(N, K, base[n].numel()) for n in names}
    if K == 0:  # no vectors (forward-only): nothing to backpropagate
        return U
    batched = True  # until PyTorch refuses to batch this model's backward
    for i in range(N):
        x1 = tree_map(lambda t, d, i=i: t if d is None else t[i:i + 1], batch.X, x_dims)
        with torch.enable_grad():
            out = engine.forward(x1, {**base, **leaves})
        if out.shape[:1] != (1,) or out.shape[1:] != V.shape[2:]:
            raise ValueError(
                f"looped_other_gradients: example {i} alone gives an output of shape "
                f"{tuple(out.shape)}; expected (1, {', '.join(map(str, V.shape[2:]))}) to match "
                f"the vectors of shape {tuple(V.shape)} (K, N, ...).")
        v = V[:, i:i + 1]
        if v.dtype != out.dtype:  # autocast: the vectors come in the factors' dtype
            v = v.to(out.dtype)
        grads = None
        if batched:
            try:
                # retain_graph: a refused batched backward leaves the graph for the loop below
                grads = torch.autograd.grad(out, inputs, v, retain_graph=True, allow_unused=True,
                                            is_grads_batched=True)
            except RuntimeError:  # a backward kernel without a batching rule (e.g. cuDNN RNN)
                batched = False
            else:
                # PyTorch's batching rules are not all right (PReLU's, see above): the first
                # example checks them against plain backward passes, once per call.
                if i == 0 and not agree(grads, plain := _one_by_one(out, inputs, v)):
                    batched, grads = False, plain
        if grads is None:
            grads = _one_by_one(out, inputs, v)
        for name, g in zip(leaves, grads):
            if g is not None:  # a parameter this example's output does not use: zeros
                U[name][i] = g.reshape(K, -1)
        del out, grads  # the next example's graph replaces this one
    return U


def first_example_agrees(engine: DataEngine, batch: Batch, V: Tensor, names: Sequence[str],
                         x_dims: Any, U: dict[str, Tensor]) -> bool:
    """Whether vmapped per-example gradients ``U`` (``{name: (N, K, numel)}``) are right.

    Checks the first example against ``looped_other_gradients`` (plain autograd): a batching
    rule that PyTorch gets wrong (PReLU's, also through ``F.prelu``, which
    ``vmap_unsafe_modules`` cannot see) shows there. Costs one example's forward and ``K``
    backward passes.
    """
    first = dataclasses.replace(batch, batch_size=1, X=tree_map(
        lambda t, d: t if d is None else t[:1], batch.X, x_dims))
    ref = looped_other_gradients(engine, first, V[:, :1], names, x_dims)
    return agree([U[n][:1] for n in names], [ref[n] for n in names])


def _one_by_one(out: Tensor, inputs: list[Tensor], v: Tensor) -> list[Tensor | None]:
    """``[(K, *input.shape)]``: ``vᵀ ∂out/∂input`` for the ``K`` vectors ``v``, one backward each."""
    per_k = [torch.autograd.grad(out, inputs, v[k], retain_graph=True, allow_unused=True)
             for k in range(v.shape[0])]
    return [None if g[0] is None else torch.stack(g) for g in zip(*per_k)]


def agree(batched: Sequence[Tensor | None], plain: Sequence[Tensor | None]) -> bool:
    """Whether a batched backward's gradients match the plain ones up to rounding.

    Orders of summation differ between the two, so they may differ by rounding; a wrong batching
    rule gives errors of the order of the gradients (5% to 100% for PReLU's). The tolerance is
    ``sqrt(eps)`` relative to the largest gradient.
    """
    for a, b in zip(batched, plain):
        if (a is None) != (b is None):
            return False
        if a is not None:
            tol = torch.finfo(b.dtype).eps ** 0.5 * max(b.abs().max().item(), 1e-30)
            if not bool(((a - b).abs() <= tol).all()):
                return False
    return True
