"""The generalized Gauss–Newton matrix ``G = Σ_n J_nᵀ (∇²_f ℓ_n) J_n`` and its exact diagonal."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from curvkit.curvature._base import CurvatureOperator
from curvkit.curvature.engine import Batch

__all__ = ["GGN", "OutputSpaceCurvature"]

# Upper bound on the entries of one chunk of per-example cotangent columns in ``diagonal()``.
_DIAGONAL_CHUNK_ENTRIES = 2**24


class OutputSpaceCurvature(CurvatureOperator):
    """``c Σ_n J_nᵀ M_n J_n`` for a PSD output-space matrix ``M_n`` given per batch.

    Subclasses implement ``_middle(batch, output)`` returning ``u ↦ M u`` for ``u`` shaped like
    the batch's output (the sum-reduced loss's curvature; the engine applies ``c``).

    One column costs one forward pass carrying its tangent (``torch.func.jvp`` nested in
    ``torch.func.vjp``, so the primal is computed once) and one backward pass. ``k`` columns
    share one forward pass; their tangents and cotangents are batched by ``vmap``.
    """

    is_psd = True

    def _middle(self, batch: Batch, output: Tensor) -> Callable[[Tensor], Tensor]:
        raise NotImplementedError

    def _batch_matmat(self, batch: Batch, V: dict[str, Tensor]) -> list[Tensor]:
        params = self._detached()
        k = next(iter(V.values())).shape[0]

        def f(p):
            return self._output(batch, p)

        if k == 1:
            v = {n: t[0] for n, t in V.items()}

            def f_and_jvp(p):
                return jvp(f, (p,), (v,))

            out, vjp_fn, Jv = vjp(f_and_jvp, params, has_aux=True)
            (res,) = vjp_fn(self._middle(batch, out.detach())(Jv))
            return [r.unsqueeze(0) for r in res.values()]
        out, vjp_fn = vjp(f, params)
        JV = vmap(lambda v: jvp(f, (params,), (v,))[1])(V)  # (k, *out)
        (res,) = vmap(vjp_fn)(vmap(self._middle(batch, out.detach()))(JV))
        return list(res.values())

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
