"""Symmetric Gram matrices ``mᵀm`` with half the multiply-adds of a general matmul.

PyTorch has no symmetric rank-k update (BLAS ``syrk``): ``m.T @ m`` does all ``N·d²``
multiply-adds although half of the result mirrors the other half. NumPy's ``a.T @ a`` on one
buffer calls its BLAS's ``syrk`` (``N·d(d+1)/2``) and fills the mirror half, and a CPU tensor
and its NumPy array share memory; so large CPU Grams go through NumPy, with NumPy's BLAS held to
one thread for the call (threadpoolctl, which scikit-learn already installs). Only when
PyTorch itself runs one thread: with more, PyTorch's OpenMP workers and NumPy's BLAS threads
spin against each other (measured on 2 cores: the KFAC factors of an MLP took 2.3x longer
than with ``m.T @ m``, whose multi-threaded GEMM also leaves less to gain). Everything else
(GPU, autograd, several threads, other dtypes, small matrices) is ``m.T @ m``, whose two
triangles can differ by round-off. (Several Grams side by side on Python threads, one
intra-op thread each, were tried for two threads: PyTorch's OpenMP workers keep spinning after
the backward pass and delayed them by milliseconds, so the MLP's factors got 10 % slower.)
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["gram"]

# Below this size the NumPy round trip costs more than the saved multiply-adds (measured on a
# 2-core AVX2 machine, one thread: 1.3-1.9x faster from N·d² = 10⁶ up, d = 16 to 2049;
# 3x slower at 512 x 10).
_MIN_DIM = 16
_MIN_WORK = 1 << 20  # N·d²


@functools.lru_cache(maxsize=1)
def _blas_limiter():
    """A threadpoolctl controller for NumPy's BLAS, or ``None`` if threadpoolctl is missing."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - scikit-learn brings threadpoolctl
        return None
    return ThreadpoolController().select(user_api="blas")


def _host_syrk(m: Tensor) -> Tensor:
    a = m.contiguous().numpy()
    limiter = _blas_limiter()
    if limiter is None:  # pragma: no cover
        return torch.from_numpy(a.T @ a)
    with limiter.limit(limits=1):
        return torch.from_numpy(a.T @ a)


def gram(m: Tensor) -> Tensor:
    """``mᵀ m`` for ``m: (N, d)``, shape ``(d, d)``.

    Uses the host BLAS's symmetric rank-k update for large float32/float64 CPU matrices outside
    autograd when PyTorch runs one thread, ``m.T @ m`` otherwise.
    """
    N, d = m.shape
    if (m.device.type == "cpu" and m.dtype in (torch.float32, torch.float64)
            and d >= _MIN_DIM and N * d * d >= _MIN_WORK and torch.get_num_threads() == 1
            and not (m.requires_grad and torch.is_grad_enabled())):
        return _host_syrk(m.detach())
    return m.T @ m
