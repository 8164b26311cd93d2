"""Shared machinery of the exact curvature operators: construction, blocks, column handling."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from curvkit.curvature.engine import Batch, DataEngine
from curvkit.curvature.losses import output_loss
from curvkit.curvature.params import group_params, resolve_params
from curvkit.linalg import BlockDiagonal, LinearOperator

__all__ = ["CurvatureOperator"]

# Tangents of a k-column product are batched by vmap in chunks whose activations (one copy of
# the forward pass's saved tensors per column) stay under this many bytes. Measured on one CPU
# thread (benchmarks/results/curvature.md): on the MLP (5 MiB of saved tensors at batch 512)
# one 16-column vmap costs 11x one product, at the FLOP floor; on the CNN (70 MiB) and the
# transformer (44 MiB) batching even 2-4 columns through convolution/attention backward is slower
# than one column at a time.
COLUMN_BUDGET_BYTES = 2**26


class SavedBytes:
    """Context counting the bytes autograd saves for backward while it is active.

    It is the size of the activations a backward pass keeps, i.e. what one more batched tangent
    column costs in memory; ``column_chunk`` turns it into a vmap chunk size.
    """

    def __init__(self):
        self.total = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        self.total += t.numel() * t.element_size()
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def column_chunk(saved_bytes: float, k: int, budget: int = COLUMN_BUDGET_BYTES) -> int:
    """Columns per vmap chunk: at most as many as fit ``budget`` at ``saved_bytes`` each.

    The ``k`` columns are then split into equal chunks (16 columns with room for 12 run as two
    chunks of 8, not 12 + 4). Returns a size in ``[1, k]``.
    """
    fit = max(1, min(k, int(budget // max(1, saved_bytes))))
    return int(-(-k // -(-k // fit)))  # ceil(k / number of chunks)


def grad_columns(outputs, inputs: list[Tensor], cotangents, *, retain_graph: bool
                 ) -> list[Tensor]:
    """Vector-Jacobian products of ``c`` cotangent columns: ``(c, *input.shape)`` per input.

    ``cotangents`` is a tensor or a list of tensors (one per output) with a leading column
    dimension. One column skips ``is_grads_batched`` (its ``vmap`` costs without batching
    anything).
    """
    one = (cotangents if isinstance(cotangents, Tensor) else cotangents[0]).shape[0] == 1
    if one:
        first = cotangents[0] if isinstance(cotangents, Tensor) else [t[0] for t in cotangents]
        res = torch.autograd.grad(outputs, inputs, first, retain_graph=retain_graph,
                                  allow_unused=True, materialize_grads=True)
        return [r.unsqueeze(0) for r in res]
    # Not materialize_grads: with is_grads_batched it fills an unused input with zeros of the
    # input's shape, without the column dimension (and the block then fails to reshape).
    c = (cotangents if isinstance(cotangents, Tensor) else cotangents[0]).shape[0]
    res = torch.autograd.grad(outputs, inputs, cotangents, retain_graph=retain_graph,
                              is_grads_batched=True, allow_unused=True)
    return [x.new_zeros((c, *x.shape)) if r is None else r for r, x in zip(res, inputs)]


def split_columns(X: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """``(P, k)`` block → mapping name → ``(k, *shape)`` tangents (columns first, for vmap)."""
    sizes = [p.numel() for p in params.values()]
    return {n: x.T.reshape(X.shape[1], *p.shape)
            for (n, p), x in zip(params.items(), X.split(sizes))}


def join_columns(parts: Iterable[Tensor], k: int) -> Tensor:
    """Tensors ``(k, *shape_i)`` → ``(P, k)`` block."""
    return torch.cat([p.reshape(k, -1) for p in parts], dim=1).T


class CurvatureOperator(LinearOperator):
    """Base of the square curvature operators ``Op(model, loss_fn, data, params=None, **options)``.

    A subclass implements ``_batch_matmat(batch, V)``: the batch's *sum-reduced* contribution
    to ``A @ V`` for tangents ``V`` (mapping name → ``(k, *shape)``), as a list of
    ``(k, *shape)`` tensors in ``params`` order. Normalisation, distributed reduction and the
    data loop live in the engine.

    ``blocks=`` (``"layer"``, ``"param"`` or a list of parameter groups) returns a
    ``curvkit.linalg.BlockDiagonal`` of one operator per group instead.
    """

    is_symmetric = True
    _analytic = True  # needs a closed-form output Hessian (the GGN family)
    _allow_weights = False
    # The targets' checks (and term count) may be read once after a pass, not per batch, where
    # the products never index with the targets: an index out of range would be a device-side
    # assert on a GPU, not an error (the loss's own gradient, as in the Hessian, indexes).
    _defer_target_checks = False

    def __new__(cls, *args, blocks=None, **kwargs):
        if blocks is None:
            return super().__new__(cls)
        return cls._block_diagonal(blocks, args, kwargs)

    @classmethod
    def _block_diagonal(cls, blocks, args, kwargs) -> BlockDiagonal:
        bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        bound.apply_defaults()
        options = dict(bound.arguments)
        options.pop("self")
        options.update(options.pop("kwargs", {}))
        options.pop("blocks", None)
        selected = resolve_params(options["model"], options["params"], cls.__name__)
        groups = group_params(selected, blocks, cls.__name__)
        ops = []
        for i, group in enumerate(groups):  # check the data once, not once per block
            check = options["check_deterministic"] and i == 0
            ops.append(cls(**{**options, "params": group, "check_deterministic": check}))
        return BlockDiagonal(ops, in_shapes=[p.shape for g in groups for p in g.values()])

    def __init__(self, model: nn.Module, loss_fn: nn.Module, data: Iterable, params=None, *,
                 progress: bool = False, check_deterministic: bool = True,
                 num_data: int | None = None, batch_size_fn: Callable | None = None,
                 blocks=None):
        name = type(self).__name__
        loss = output_loss(loss_fn, caller=name, analytic=self._analytic)
        selected = resolve_params(model, params, name)
        self.engine = DataEngine(model, loss, data, selected, caller=name, progress=progress,
                                 check_deterministic=check_deterministic, num_data=num_data,
                                 batch_size_fn=batch_size_fn, allow_weights=self._allow_weights)
        self.loss = loss
        first = next(iter(selected.values()))
        P = sum(p.numel() for p in selected.values())
        super().__init__((P, P), dtype=first.dtype, device=first.device,
                         in_shapes=[p.shape for p in selected.values()])

    @property
    def params(self) -> dict[str, Tensor]:
        """The parameters the operator acts on (name → tensor), in the order of its vectors."""
        return self.engine.params

    def _detached(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.engine.params.items()}

    def _output(self, batch: Batch, params: dict[str, Tensor]) -> Tensor:
        out = self.engine.forward(batch.X, params)
        self.loss.check(out, batch.y)
        return out

    def _batch_matmat(self, batch: Batch, V: dict[str, Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def _matmat(self, X: Tensor) -> Tensor:
        k = X.shape[1]
        V = split_columns(X, self.engine.params)
        parts = self.engine.reduce_over_data(lambda b: self._batch_matmat(b, V),
                                             desc=f"{type(self).__name__} @ ({k} columns)",
                                             defer_checks=self._defer_target_checks)
        return join_columns(parts, k)

    def _numel(self) -> int:
        return sum(math.prod(s) for s in self.in_shapes)

    def _to(self, dtype, device):
        raise not_movable(self)


def not_movable(op: LinearOperator) -> NotImplementedError:
    """The error of ``.to()`` on an operator that evaluates a model on data at every product."""
    return NotImplementedError(
        f"{type(op).__name__} cannot be moved: every product evaluates the model on the data; "
        "move the model and the data (model.to(...)) and build a new operator."
    )
