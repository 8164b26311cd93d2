"""The Jacobian of the model outputs over all data with respect to the parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from curvkit.curvature._base import join_columns, not_movable, split_columns
from curvkit.curvature.engine import DataEngine
from curvkit.curvature.params import resolve_params
from curvkit.linalg import LinearOperator

__all__ = ["Jacobian"]


class Jacobian(LinearOperator):
    """``J = ∂ vec(f(X_1), f(X_2), …) / ∂θ`` of shape ``(M, P)``.

    Rows are the model outputs of all batches, each flattened row-major and concatenated in data
    order (``M`` entries in all); columns are the selected parameters. ``J @ V`` runs one forward
    pass per batch with the ``k`` tangents batched by ``vmap``; ``J.T @ U`` one backward pass per
    batch.

    Distributed: each rank's rows are the outputs of its own shard, so ``J @ V`` returns the
    local rows and ``J.T @ U`` (with ``U`` the local rows) is all-reduced: ``Σ_r J_rᵀ U_r``.

    Args:
        model: ``nn.Module`` called as ``model(X)``.
        data: Re-iterable of ``(X, y)`` batches (``y`` is ignored) or of inputs ``X``.
        params: ``None``, a list of the model's parameters, or a mapping name → tensor.
        progress: Show a progress bar over batches.
        check_deterministic: Refuse random layers and shuffling data (two forward passes).
        batch_size_fn: ``X ↦ N`` for mapping inputs.

    Example:
        >>> J = Jacobian(model, loader)
        >>> J @ v             # (M,)
        >>> J.T @ u           # (P,)
    """

    def __init__(self, model: nn.Module, data: Iterable, params=None, *, progress: bool = False,
                 check_deterministic: bool = True, batch_size_fn: Callable | None = None):
        selected = resolve_params(model, params, "Jacobian")
        self.engine = DataEngine(model, None, _Pairs(data), selected, caller="Jacobian",
                                 progress=progress, check_deterministic=check_deterministic,
                                 batch_size_fn=batch_size_fn)
        with torch.no_grad(), self.engine.context():
            self.output_shapes = [self.engine.forward(b.X).shape for b in self.engine.batches()]
        if not self.output_shapes:
            raise ValueError("Jacobian: data yielded no batches (or only empty ones).")
        M = sum(s.numel() for s in self.output_shapes)
        first = next(iter(selected.values()))
        P = sum(p.numel() for p in selected.values())
        super().__init__((M, P), dtype=first.dtype, device=first.device,
                         in_shapes=[p.shape for p in selected.values()])

    def _to(self, dtype, device):
        raise not_movable(self)

    def _matmat(self, X: Tensor) -> Tensor:
        k = X.shape[1]
        V = split_columns(X, self.engine.params)
        params = {n: p.detach() for n, p in self.engine.params.items()}
        rows = []
        with self.engine.context():
            for batch in self.engine.batches("Jacobian @"):
                def f(p, batch=batch):
                    return self.engine.forward(batch.X, p)

                rows.append(vmap(lambda v, f=f: jvp(f, (params,), (v,))[1])(V).reshape(k, -1))
        return torch.cat(rows, dim=1).T

    def _rmatmat(self, Y: Tensor) -> Tensor:
        k = Y.shape[1]
        params = {n: p.detach() for n, p in self.engine.params.items()}
        chunks = iter(Y.split([s.numel() for s in self.output_shapes]))

        def per_batch(batch):
            chunk = next(chunks)
            out, vjp_fn = vjp(lambda p: self.engine.forward(batch.X, p), params)
            if chunk.shape[0] != out.numel():
                raise ValueError(f"Jacobian: batch {batch.index} gives {out.numel()} outputs; "
                                 f"{chunk.shape[0]} were expected (has the data changed?).")
            (res,) = vmap(vjp_fn)(chunk.T.reshape(k, *out.shape))
            return list(res.values())

        return join_columns(self.engine.reduce_over_data(per_batch, desc="Jacobian.T @"), k)


class _Pairs:
    """View data of inputs ``X``, ``(X,)``, ``(X, y)`` or ``(X, y, w)`` as ``(X, None)`` batches."""

    def __init__(self, data: Iterable):
        if iter(data) is data:
            raise TypeError("Jacobian: data must be re-iterable (a list or a DataLoader), since "
                            "every product is a pass over it; got a one-shot iterator.")
        self.data = data

    def __iter__(self):
        for item in self.data:
            # Targets (and weights) are not used: keep the input only, so that a DataLoader
            # over a TensorDataset of inputs ([X] batches) and non-tensor targets work.
            if isinstance(item, (tuple, list)) and 1 <= len(item) <= 3:
                yield item[0], None
            else:
                yield item if isinstance(item, (tuple, list)) else (item, None)
