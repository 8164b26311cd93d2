"""The Hessian of the loss over all data, as a linear operator over the parameters."""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.curvature._base import (
    COLUMN_BUDGET_BYTES,
    CurvatureOperator,
    SavedBytes,
    column_chunk,
    grad_columns,
)
from curvkit.curvature.engine import Batch

__all__ = ["Hessian"]


class Hessian(CurvatureOperator):
    """``H = ∇²_θ L(θ)`` of the loss ``L`` over all of ``data`` under the loss's reduction.

    Products use reverse-over-reverse differentiation (one gradient with ``create_graph=True``,
    then one backward pass per chunk of the ``k`` tangents, batched through ``is_grads_batched``;
    the chunk size follows the activation memory, see ``_base.column_chunk``). On
    the benchmark models this measured faster than forward-over-reverse (``torch.func.jvp`` of
    ``torch.func.grad``); see ``benchmarks/results/curvature.md``.

    Any twice-differentiable loss module with ``reduction="mean"`` or ``"sum"`` works; for losses
    other than ``MSELoss``, ``CrossEntropyLoss``, ``BCEWithLogitsLoss`` and ``NLLLoss`` (which count
    their terms as PyTorch does) the mean is taken to be over examples.

    Args:
        model: ``nn.Module`` called as ``model(X)``.
        loss_fn: Loss module, called as ``loss_fn(model(X), y)``.
        data: Re-iterable of ``(X, y)`` batches; ``X`` a tensor or a mapping of tensors.
        params: ``None`` (all trainable parameters), a list of the model's parameters, or a
            mapping name → tensor (the point at which the Hessian is taken).
        progress: Show a progress bar over batches.
        check_deterministic: Refuse random layers and shuffling data (two forward passes).
        num_data: Number of examples (only needed by callers of ``engine.for_each_batch``).
        batch_size_fn: ``X ↦ N`` for mapping inputs.
        blocks: ``"layer"``, ``"param"`` or parameter groups: a ``BlockDiagonal`` of Hessian blocks.

    Example:
        >>> H = Hessian(model, nn.CrossEntropyLoss(), [(X, y)])
        >>> Hv = H @ v                      # v: (P,) or a list shaped like the parameters
    """

    _analytic = False
    _column_budget = COLUMN_BUDGET_BYTES

    def _batch_matmat(self, batch: Batch, V: dict[str, Tensor]) -> list[Tensor]:
        params = {n: p.detach().requires_grad_() for n, p in self.engine.params.items()}
        inputs = list(params.values())
        with SavedBytes() as saved:
            loss = self.loss.sum_loss(self._output(batch, params), batch.y, batch.batch_size)
        if not loss.requires_grad:  # no selected parameter reaches the loss
            return [torch.zeros_like(t) for t in V.values()]
        grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True,
                                    materialize_grads=True)
        # A gradient that does not depend on the parameters (e.g. of a last-layer bias under
        # MSE) contributes nothing to the second derivative.
        keep = [i for i, g in enumerate(grads) if g.requires_grad]
        tangents = list(V.values())
        if not keep:
            return [torch.zeros_like(t) for t in tangents]
        k = tangents[0].shape[0]
        outs = [grads[i] for i in keep]
        # Columns in chunks (see _base.column_chunk): one batched double-backward per chunk,
        # the gradient graph shared by all of them.
        c = column_chunk(saved.total, k, self._column_budget)
        parts = []
        for start in range(0, k, c):
            chunk = [tangents[i][start:start + c] for i in keep]
            parts.append(grad_columns(outs, inputs, chunk, retain_graph=start + c < k))
        return [torch.cat(cols) for cols in zip(*parts)]
