"""The generalized Gauss–Newton matrix ``G = Σ_n J_nᵀ (∇²_f ℓ_n) J_n`` and its exact diagonal."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.func import jvp, vjp, vmap

from curvkit.curvature._base import COLUMN_BUDGET_BYTES, CurvatureOperator, SavedBytes, column_chunk
from curvkit.curvature.engine import Batch

__all__ = ["GGN", "OutputSpaceCurvature"]

# Upper bound on the entries of one chunk of per-example cotangent columns in ``diagonal()``.
_DIAGONAL_CHUNK_ENTRIES = 2**24


class OutputSpaceCurvature(CurvatureOperator):
    """``c Σ_n J_nᵀ M_n J_n`` for a PSD output-space matrix ``M_n`` given per batch.

    Subclasses implement ``_middle(batch, output)`` returning ``u ↦ M u`` for ``u`` shaped like
    the batch's output (the sum-reduced loss's curvature; the engine applies ``c``).

    One column costs one forward pass carrying its tangent (forward-mode AD on dual tensors, so
    the primal is computed once) and one backward pass. ``k`` columns share one recorded
    forward pass; their tangent passes and backward passes run in chunks of columns batched by
    ``vmap``, the chunk size set by the activation memory (``_base.column_chunk``): for large
    activations batched convolution/attention kernels are slower than a column at a time.
    """

    is_psd = True
    _column_budget = COLUMN_BUDGET_BYTES

    def _middle(self, batch: Batch, output: Tensor) -> Callable[[Tensor], Tensor]:
        raise NotImplementedError

    def _batch_matmat(self, batch: Batch, V: dict[str, Tensor]) -> list[Tensor]:
        k = next(iter(V.values())).shape[0]
        if k == 1:
            return [r.unsqueeze(0) for r in self._product(batch, {n: t[0] for n, t in V.items()})]
        params = {n: p.detach().requires_grad_() for n, p in self.engine.params.items()}
        inputs = list(params.values())
        with SavedBytes() as saved:  # the one forward pass all columns share
            out = self._output(batch, params)
        if not out.requires_grad:  # no selected parameter reaches the output
            return [torch.zeros_like(t) for t in V.values()]
        middle = self._middle(batch, out.detach())  # once per batch: FisherMC draws labels here
        c = column_chunk(saved.total, k, self._column_budget)
        detached = self._detached()

        def tangents(chunk: dict[str, Tensor]) -> Tensor:  # (c, *out)
            if c == 1:  # forward-mode without vmap: the cheapest single tangent pass
                return self._tangent(batch, {n: t[0] for n, t in chunk.items()}).unsqueeze(0)
            f = lambda p: self._output(batch, p)  # noqa: E731
            return vmap(lambda v: jvp(f, (detached,), (v,))[1])(chunk)

        parts = []
        for start in range(0, k, c):  # chunks of columns: each one tangent pass + one backward
            chunk = {n: t[start:start + c] for n, t in V.items()}
            U = vmap(middle)(tangents(chunk))
            last = start + c >= k
            if U.shape[0] == 1:
                res = torch.autograd.grad(out, inputs, U[0], retain_graph=not last,
                                          allow_unused=True, materialize_grads=True)
                res = [r.unsqueeze(0) for r in res]
            else:
                res = torch.autograd.grad(out, inputs, U, retain_graph=not last,
                                          is_grads_batched=True, allow_unused=True,
                                          materialize_grads=True)
            parts.append(res)
        return [torch.cat(cols) for cols in zip(*parts)]

    def _product(self, batch: Batch, v: dict[str, Tensor]) -> list[Tensor]:
        """One column: a forward pass carrying the tangent ``v``, then one backward pass.

        Forward-mode AD with dual tensors in plain autograd rather than ``torch.func.jvp``
        nested in ``vjp``: same arithmetic, but 10-25 % faster on the benchmark models (less
        per-op dispatch through functorch's wrapper levels).
        """
        params = {n: p.detach().requires_grad_() for n, p in self.engine.params.items()}
        with fwAD.dual_level():
            dual = {n: fwAD.make_dual(p, v[n]) for n, p in params.items()}
            out, Jv = fwAD.unpack_dual(self._output(batch, dual))
        if not out.requires_grad:
            return [torch.zeros_like(t) for t in v.values()]
        u = self._middle(batch, out.detach())(Jv.detach())
        return list(torch.autograd.grad(out, list(params.values()), u, allow_unused=True,
                                        materialize_grads=True))

    def _tangent(self, batch: Batch, v: dict[str, Tensor]) -> Tensor:
        """``J v`` (shaped like the output) by forward-mode AD, recording no autograd graph."""
        with torch.no_grad(), fwAD.dual_level():
            dual = {n: fwAD.make_dual(p, v[n]) for n, p in self._detached().items()}
            out, Jv = fwAD.unpack_dual(self._output(batch, dual))
        return torch.zeros_like(out) if Jv is None else Jv

    # ------------------------------------------------------------------ diagonal
    def _factor(self, batch: Batch, output: Tensor) -> Tensor:
        """``S`` of shape ``(N, T, C, K)`` with ``M`` block diagonal over terms, ``M_t = S Sᵀ``."""
        raise NotImplementedError(f"{type(self).__name__} has no exact diagonal.")

    def diagonal(self) -> Tensor:
        """Exact diagonal ``(P,)``: ``c Σ_n Σ_j (J_nᵀ s_{n,j})²`` over the columns of ``S_n``.

        Per-example vector-Jacobian products, batched over the columns of each example's factor
        and over examples (in chunks that bound memory). Costs about ``T·K`` backward passes per
        example (``T`` terms, ``K`` factor columns: ``C`` for cross-entropy), so it is meant for
        small outputs.
        """
        params = self._detached()
        loss = self.loss

        def per_batch(batch: Batch) -> list[Tensor]:
            out = self._output(batch, params).detach()
            S = self._factor(batch, out)  # (N, T, C, K)
            N, T, C, K = S.shape
            eye = torch.eye(T, dtype=S.dtype, device=S.device)

            def per_example(x, s):  # x: one example; s: (T, C, K)
                def f1(p):
                    x1 = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), x)
                    return self.engine.forward(x1, p)

                o, vjp_fn = vjp(f1, params)
                # column (t, k) is S[t, :, k] placed at term t, zero elsewhere
                Z = torch.einsum("tck,ts->tksc", s, eye).reshape(T * K, 1, T, C)
                Z = vmap(lambda z: loss.from_terms(z, o.shape))(Z)
                (g,) = vmap(vjp_fn, chunk_size=column_chunk)(Z)
                return {n: (t**2).sum(0) for n, t in g.items()}

            column_chunk = max(1, _DIAGONAL_CHUNK_ENTRIES // self._numel())
            chunk = max(1, _DIAGONAL_CHUNK_ENTRIES // (T * K * self._numel()))
            d = vmap(per_example, chunk_size=chunk)(batch.X, S)
            return [t.sum(0) for t in d.values()]

        parts = self.engine.reduce_over_data(per_batch, desc=f"{type(self).__name__}.diagonal")
        return torch.cat([p.reshape(-1) for p in parts])


class GGN(OutputSpaceCurvature):
    """Generalized Gauss–Newton ``G = c Σ_n J_nᵀ ∇²_f ℓ(f_n, y_n) J_n`` over all of ``data``.

    ``J_n`` is the Jacobian of the model output for example ``n`` with respect to the selected
    parameters, ``∇²_f ℓ`` the analytic output Hessian of the loss (``losses.py``), ``c`` the
    reduction factor (``1/T`` for mean over ``T`` loss terms, 1 for sum). Positive
    semi-definite for the supported (convex) losses.

    Args:
        model: ``nn.Module`` called as ``model(X)``.
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` (also over sequences, with
            ``ignore_index``) or ``nn.BCEWithLogitsLoss``; reduction ``"mean"`` or ``"sum"``.
        data: Re-iterable of ``(X, y)`` batches; ``X`` a tensor or a mapping of tensors.
        params: ``None`` (all trainable parameters), a list of the model's parameters, or a
            mapping name → tensor.
        progress: Show a progress bar over batches.
        check_deterministic: Refuse random layers and shuffling data (two forward passes).
        num_data: Number of examples (only needed by callers of ``engine.for_each_batch``).
        batch_size_fn: ``X ↦ N`` for mapping inputs.
        blocks: ``"layer"``, ``"param"`` or parameter groups: a ``BlockDiagonal`` of GGN blocks.

    Example:
        >>> G = GGN(model, nn.CrossEntropyLoss(), loader)
        >>> G @ torch.randn(G.shape[1], 16)   # one batched pass for 16 columns
        >>> G.diagonal()                      # exact, (P,)
    """

    def _middle(self, batch, output):
        return self.loss.hessian_product(output, batch.y)

    def _factor(self, batch, output):
        return self.loss.sqrt_factor(output, batch.y)
