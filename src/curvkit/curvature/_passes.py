"""Module state that the data engine sets for the duration of a pass, and model wrappers.

Exact curvature operators differentiate the model twice or in forward mode, and a product must
not change the model. For a pass (``DataEngine.context()``) some modules are therefore put in a
differentiable, side-effect-free state and restored afterwards: training-mode BatchNorm stops
updating its running statistics, ``sparse=True`` embeddings give dense gradients, weight-norm
parametrizations run as plain tensor operations, and a padded embedding whose weight is tied to
a padded embedding holds its padding row fixed, as PyTorch's gradient does (forward-mode AD would
carry its tangent), for its own lookup only (the weight may be tied to an output layer). ``unwrap`` finds the module
inside ``torch.compile`` and ``(Distributed)DataParallel`` wrappers, which refuse
``torch.func.functional_call``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.parametrizations import _WeightNorm

__all__ = ["restore_pass_state", "set_pass_state", "unwrap"]


def unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The module inside ``torch.compile``/``DataParallel`` wrappers and the names' prefix."""
    prefix = ""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model, prefix = model.module, prefix + "module."
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model, prefix = model._orig_mod, prefix + "_orig_mod."
        else:
            return model, prefix


def _plain_weight_norm(dim: int) -> Callable[[Tensor, Tensor], Tensor]:
    """``(g, v) ↦ g v / ‖v‖`` in plain tensor operations, as ``torch._weight_norm`` computes it.

    The norm runs over all dimensions but ``dim``; ``dim=-1`` (``weight_norm(dim=None)``) means
    over the whole tensor.
    """

    def forward(weight_g: Tensor, weight_v: Tensor) -> Tensor:
        if dim == -1:
            return weight_v * (weight_g / weight_v.norm())
        others = [i for i in range(weight_v.ndim) if i != dim]
        return weight_v * (weight_g / weight_v.norm(dim=others, keepdim=True))

    return forward


def _padding_fixed_embedding(m: nn.Embedding) -> Callable[[Tensor], Tensor]:
    """``m.forward`` with the padding row a constant in this lookup only (tied uses keep it)."""

    def forward(tokens: Tensor) -> Tensor:
        w, i = m.weight, m.padding_idx % m.num_embeddings
        w = torch.cat([w[:i], w[i:i + 1].detach(), w[i + 1:]])
        return F.embedding(tokens, w, m.padding_idx, m.max_norm, m.norm_type,
                           m.scale_grad_by_freq, m.sparse)

    return forward


def set_pass_state(stateful: list[nn.Module], padded: set[int], saved: list) -> None:
    """Put ``stateful`` modules in their pass state, appending ``(module, attribute, old)``.

    ``padded`` holds the ids of the embeddings with a padding row.
    """
    for m in stateful:
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, "track_running_stats", True))
            m.track_running_stats = False
        elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            if m.sparse:
                saved.append((m, "sparse", True))
                m.sparse = False
            if id(m) in padded and "forward" not in vars(m):
                saved.append((m, "forward", None))
                m.forward = _padding_fixed_embedding(m)
        elif isinstance(m, _WeightNorm) and "forward" not in vars(m):  # (nested)
            saved.append((m, "forward", None))
            m.forward = _plain_weight_norm(m.dim)


def restore_pass_state(saved: list) -> None:
    """Undo ``set_pass_state`` (an instance ``forward`` is deleted: the class's again)."""
    for m, name, value in saved:
        if value is None:
            del m.forward
        else:
            setattr(m, name, value)
