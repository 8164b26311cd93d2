"""The generalized Gauss–Newton matrix ``G = Σ_n J_nᵀ (∇²_f ℓ_n) J_n`` and its exact diagonal."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.func import jvp, vjp, vmap
from torch.utils._pytree import tree_map

from curvkit.curvature._base import (
    COLUMN_BUDGET_BYTES,
    CurvatureOperator,
    SavedBytes,
    column_chunk,
    grad_columns,
)
from curvkit.curvature.engine import Batch
from curvkit.curvature.per_example_loop import agree, looped_other_gradients, vmap_unsafe_modules

__all__ = ["GGN", "OutputSpaceCurvature"]

# Upper bound on the entries of one chunk of per-example cotangent columns in ``diagonal()``.
_DIAGONAL_CHUNK_ENTRIES = 2**24


class OutputSpaceCurvature(CurvatureOperator):
    """``c Σ_n J_nᵀ M_n J_n`` for a PSD output-space matrix ``M_n`` given per batch.

    Subclasses implement ``_middle(batch, output)`` returning ``u ↦ M u`` for ``u`` shaped like
    the batch's output (the sum-reduced loss's curvature; the engine applies ``c``).

    One column costs one forward pass carrying its tangent (forward-mode AD on dual tensors, so
    the primal is computed once) and one backward pass. ``k`` columns run in chunks whose size
    follows the activation memory (``_base.column_chunk``): chunks of several columns share
    one recorded forward pass and batch their tangent and backward passes with ``vmap``; for
    large activations (CNNs, transformers at the benchmark's sizes) batched convolution and
    attention kernels were slower than a column at a time, so there the chunk is one column,
    i.e. single products (measured in ``benchmarks/results/curvature.md``).
    """

    is_psd = True
    _column_budget = COLUMN_BUDGET_BYTES
    _saved_per_example: float | None = None

    def _middle(self, batch: Batch, output: Tensor) -> Callable[[Tensor], Tensor]:
        raise NotImplementedError

    def _batch_matmat(self, batch: Batch, V: dict[str, Tensor]) -> list[Tensor]:
        k = next(iter(V.values())).shape[0]
        c = 1 if k == 1 else column_chunk(self._saved_bytes(batch), k, self._column_budget)
        if c == 1:
            # One column at a time: single products, which measured faster than batching the
            # columns of a model with large activations (CNN, transformer) through vmap.
            middle, parts = None, []
            for j in range(k):
                res, middle = self._product(batch, {n: t[j] for n, t in V.items()}, middle)
                parts.append(res)
            return [torch.stack(cols) for cols in zip(*parts)]
        params = {n: p.detach().requires_grad_() for n, p in self.engine.params.items()}
        inputs = list(params.values())
        out = self._output(batch, params)  # the one recorded forward pass all chunks share
        if not out.requires_grad:  # no selected parameter reaches the output
            return [torch.zeros_like(t) for t in V.values()]
        middle = self._middle(batch, out.detach())  # once per batch: FisherMC draws labels here
        detached = self._detached()

        def f(p):
            return self._output(batch, p)

        parts = []
        for start in range(0, k, c):  # chunks of columns: one batched tangent pass + backward
            chunk = {n: t[start:start + c] for n, t in V.items()}
            U = vmap(middle)(vmap(lambda v: jvp(f, (detached,), (v,))[1])(chunk))
            parts.append(grad_columns(out, inputs, U, retain_graph=start + c < k))
        return [torch.cat(cols) for cols in zip(*parts)]

    def _saved_bytes(self, batch: Batch) -> float:
        """Bytes autograd saves in one forward pass of ``batch`` (what each batched column adds).

        Measured once per operator, on the first multi-column product, and scaled by batch size.
        """
        if self._saved_per_example is None:
            params = {n: p.detach().requires_grad_() for n, p in self.engine.params.items()}
            with SavedBytes() as saved:
                self._output(batch, params)
            self._saved_per_example = saved.total / batch.batch_size
        return self._saved_per_example * batch.batch_size

    def _product(self, batch: Batch, v: dict[str, Tensor],
                 middle: Callable[[Tensor], Tensor] | None = None
                 ) -> tuple[list[Tensor], Callable[[Tensor], Tensor] | None]:
        """One column: a forward pass carrying the tangent ``v``, then one backward pass.

        Forward-mode AD with dual tensors in plain autograd rather than ``torch.func.jvp``
        nested in ``vjp``: same arithmetic, but 10-25 % faster on the MLP and the transformer
        (less dispatch through functorch's wrapper levels); see
        ``benchmarks/results/curvature.md``.

        Returns:
            The product (a list in ``params`` order) and the batch's output-space product
            ``middle`` (built here unless given, so that columns of one pass share it).
        """
        params = {n: p.detach().requires_grad_() for n, p in self.engine.params.items()}
        with fwAD.dual_level():
            dual = {n: fwAD.make_dual(p, v[n]) for n, p in params.items()}
            out, Jv = fwAD.unpack_dual(self._output(batch, dual))
        if not out.requires_grad:  # no selected parameter reaches the output
            return [torch.zeros_like(t) for t in v.values()], middle
        if middle is None:
            middle = self._middle(batch, out.detach())
        res = torch.autograd.grad(out, list(params.values()), middle(Jv.detach()),
                                  allow_unused=True, materialize_grads=True)
        return list(res), middle

    # ------------------------------------------------------------------ diagonal
    def _factor(self, batch: Batch, output: Tensor) -> Tensor:
        """``S`` of shape ``(N, T, C, K)`` with ``M`` block diagonal over terms, ``M_t = S Sᵀ``."""
        raise NotImplementedError(f"{type(self).__name__} has no exact diagonal.")

    def diagonal(self) -> Tensor:
        """Exact diagonal ``(P,)``: ``c Σ_n Σ_j (J_nᵀ s_{n,j})²`` over the columns of ``S_n``.

        Per-example vector-Jacobian products, batched over the columns of each example's factor
        and over examples (in chunks that bound memory). Costs about ``T·K`` backward passes per
        example (``T`` terms, ``K`` factor columns: ``C`` for cross-entropy), so it is meant for
        small outputs. Each batch's first example is recomputed by plain autograd and compared:
        a batching rule PyTorch gets wrong (PReLU's) sends the batch to a loop over examples,
        which recurrent and PReLU models take from the start.
        """
        coupled = self.engine.batch_statistics_modules()
        if coupled:
            raise ValueError(
                f"{type(self).__name__}.diagonal: BatchNorm module(s) {coupled} normalise with batch "
                "statistics, so the examples of a batch are coupled and the per-example passes "
                "of the exact diagonal do not apply; call model.eval() or estimate the diagonal "
                "from products (curvkit.linalg.diagonal)."
            )
        params = self._detached()
        loss = self.loss
        # torch.func.vmap over examples cannot batch recurrent layers and batches PReLU wrongly
        # (silently, up to 20 % off): those models take a loop over the examples
        looped = bool(vmap_unsafe_modules(self.engine.model))

        def per_batch(batch: Batch) -> list[Tensor]:
            out = self._output(batch, params).detach()
            S = self._factor(batch, out)  # (N, T, C, K)
            N, T, C, K = S.shape
            if looped:
                return self._looped_diagonal(batch, out, S)
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
            d = list(vmap(per_example, chunk_size=chunk)(batch.X, S).values())
            # A batching rule PyTorch gets wrong would be silent (PReLU's, also through F.prelu,
            # which vmap_unsafe_modules cannot see): the first example is checked by autograd.
            first = dataclasses.replace(batch, batch_size=1, X=tree_map(lambda t: t[:1], batch.X))
            if not agree([t[:1] for t in d], [t[None] for t in
                                               self._looped_diagonal(first, out[:1], S[:1])]):
                return self._looped_diagonal(batch, out, S)
            return [t.sum(0) for t in d]

        parts = self.engine.reduce_over_data(per_batch, desc=f"{type(self).__name__}.diagonal",
                                             defer_checks=self._defer_target_checks)
        return torch.cat([p.reshape(-1) for p in parts])

    def _looped_diagonal(self, batch: Batch, out: Tensor, S: Tensor) -> list[Tensor]:
        """The batch's diagonal terms by plain autograd, one example at a time.

        ``out``: the batch's output; ``S``: its factor ``(N, T, C, K)``. The ``T·K`` columns of
        each example are backpropagated as in ``looped_other_gradients``, over chunks of
        examples that bound the per-example gradients held at once.
        """
        N, T, C, K = S.shape
        eye = torch.eye(T, dtype=S.dtype, device=S.device)
        # column (t, k) of example n: S[n, t, :, k] at term t, in the output's layout
        Z = torch.einsum("ntck,ts->tknsc", S, eye).reshape(T * K, N, T, C)
        V = torch.stack([self.loss.from_terms(z, out.shape) for z in Z])  # (T·K, *out.shape)
        names = list(self.engine.params)
        total = [torch.zeros_like(p) for p in self.engine.params.values()]
        step = max(1, _DIAGONAL_CHUNK_ENTRIES // (T * K * self._numel()))
        for start in range(0, N, step):
            rows = slice(start, min(N, start + step))
            part = dataclasses.replace(batch, batch_size=rows.stop - start, X=tree_map(
                lambda t, rows=rows: t[rows], batch.X))
            U = looped_other_gradients(self.engine, part, V[:, rows], names,
                                       tree_map(lambda t: 0, batch.X))
            for acc, name in zip(total, names):
                acc += U[name].square().sum((0, 1)).reshape(acc.shape)
        return total


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
            Its vectors list the parameters group by group, in the groups' order (which may
            differ from ``params`` order: ``op.in_shapes`` shows the layout), and cover only
            the parameters that some group names.

    Example:
        >>> G = GGN(model, nn.CrossEntropyLoss(), loader)
        >>> G @ torch.randn(G.shape[1], 16)   # 16 columns, batched in memory-sized chunks
        >>> G.diagonal()                      # exact, (P,)
    """

    _defer_target_checks = True  # targets only mask ignored terms (class weights check first)

    def _middle(self, batch, output):
        return self.loss.hessian_product(output, batch.y)

    def _factor(self, batch, output):
        return self.loss.sqrt_factor(output, batch.y)
