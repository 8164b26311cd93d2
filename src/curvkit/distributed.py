"""The few helpers over ``torch.distributed`` that the layers above share.

Every function is a no-op on a single process (``torch.distributed`` unavailable or not
initialised), so callers write one code path for both cases.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "world_size", "rank", "all_reduce_sum"]


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is available and initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes in the default group (1 without ``torch.distributed``)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default group (0 without ``torch.distributed``)."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensors: list[Tensor]) -> list[Tensor]:
    """Sum tensors over all ranks in one collective.

    The tensors are flattened into one buffer so that a product costs a single all-reduce
    whatever the number of parameters.

    Args:
        tensors: Tensors of any shapes, sharing one dtype and device.

    Returns:
        New tensors of the same shapes holding the sums over ranks (the inputs themselves on a
        single process).
    """
    if not is_distributed() or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return [p.reshape(t.shape) for p, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
