"""Symmetric Gram matrices ``mᵀm`` with fewer multiply-adds than a general matmul.

PyTorch has no symmetric rank-k update (BLAS ``syrk``): ``m.T @ m`` does all ``N·d²``
multiply-adds although half of the result mirrors the other half. Three routes, by case:

- **CPU, one torch thread:** NumPy's ``a.T @ a`` on one buffer calls its BLAS's ``syrk``
  (``N·d(d+1)/2``) and fills the mirror half; a CPU tensor and its NumPy array share memory.
  NumPy's BLAS is held to one thread for the call (threadpoolctl, which scikit-learn installs).
- **Several threads or GPU, ``d >= 1024``:** the upper blocks of a 4 × 4 partition, mirrored
  (62.5 % of the work). NumPy is not used here: PyTorch's OpenMP workers and NumPy's BLAS
  threads spin against each other (measured on 2 cores: the KFAC factors of an MLP took 2.3x
  longer than with ``m.T @ m``). Several Grams side by side on Python threads with one
  intra-op thread each were tried too: OpenMP workers still spinning after the backward pass
  delayed them by milliseconds (the MLP's factors got 10 % slower).
- **Otherwise** (autograd, small matrices, other dtypes): ``m.T @ m``, whose two triangles can
  differ by round-off.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

__all__ = ["gram"]

# Below this size the NumPy round trip costs more than the saved multiply-adds (measured on a
# 2-core AVX2 machine, one thread: 1.3-1.9x faster from N·d² = 10⁶ up, d = 16 to 2049;
# 3x slower at 512 x 10).
_MIN_DIM = 16
_MIN_WORK = 1 << 20  # N·d²
# NumPy fills the mirror half after syrk, a transposed copy of d²/2 entries that costs as much
# as a GEMM of ~100 rows (more at power-of-two d, whose stride thrashes the cache): with few
# rows the plain product wins. syrk / GEMM time, one thread, same machine (d = 128 ... 2048):
# N = 16: 0.9-4.1, N = 128: 0.8-1.5, N = 256: 0.7-1.1, N = 512: 0.6-0.9, N = 1024: 0.5-0.7.
_MIN_ROWS = 256
# From this width, upper blocks beat one GEMM on several threads (10-28 % on 3000 x 4160).
_BLOCKED_MIN_DIM = 1024


@functools.lru_cache(maxsize=1)
def _blas_limiter():
    """A threadpoolctl controller for NumPy's BLAS, or ``None`` if threadpoolctl is missing."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - scikit-learn brings threadpoolctl
        return None
    return ThreadpoolController().select(user_api="blas")


def _host_syrk(m: Tensor) -> Tensor:
    # NumPy takes its syrk path for a.T @ a and for a @ a.T on one buffer: use whichever of m
    # and m.T is contiguous (a transposed view is free), copy only if neither is.
    limiter = _blas_limiter()
    with limiter.limit(limits=1) if limiter is not None else contextlib.nullcontext():
        if m.T.is_contiguous() and not m.is_contiguous():
            a = m.T.numpy()
            return torch.from_numpy(a @ a.T)
        a = m.contiguous().numpy()
        return torch.from_numpy(a.T @ a)


def _upper_blocks(m: Tensor, num_blocks: int = 4) -> Tensor:
    """``mᵀ m`` from the upper blocks of a ``b × b`` partition, mirrored.

    ``b(b+1)/2`` of ``b²`` blocks: 62.5 % of the multiply-adds for ``b = 4``, in GEMMs still
    large enough to keep every thread busy.
    """
    d = m.shape[1]
    bounds = [round(i * d / num_blocks) for i in range(num_blocks + 1)]
    out = m.new_empty(d, d)
    for i in range(num_blocks):
        rows = slice(bounds[i], bounds[i + 1])
        for j in range(i, num_blocks):
            cols = slice(bounds[j], bounds[j + 1])
            block = m[:, rows].T @ m[:, cols]
            out[rows, cols] = block
            if j != i:
                out[cols, rows] = block.T
    return out


def gram(m: Tensor) -> Tensor:
    """``mᵀ m`` for ``m: (N, d)``, shape ``(d, d)``.

    Large float32/float64 CPU matrices outside autograd: the host BLAS's symmetric rank-k
    update when PyTorch runs one thread (from 256 rows); otherwise (several threads, GPU) upper blocks mirrored
    from ``d >= 1024``; ``m.T @ m`` for the rest.
    """
    N, d = m.shape
    plain = m.requires_grad and torch.is_grad_enabled()
    if (m.device.type == "cpu" and m.dtype in (torch.float32, torch.float64)
            and d >= _MIN_DIM and N >= _MIN_ROWS and N * d * d >= _MIN_WORK
            and torch.get_num_threads() == 1
            and not plain):
        return _host_syrk(m.detach())
    if d >= _BLOCKED_MIN_DIM and not plain:
        return _upper_blocks(m)
    return m.T @ m
