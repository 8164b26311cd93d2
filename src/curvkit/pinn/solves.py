"""Damped solves with the Gramian ``JᵀJ`` (parameter space) or the kernel ``JJᵀ`` (sample space).

Exact solves factor ``M + λI`` by Cholesky in the working precision; if that fails (``λ`` far
below the rounding level of ``M``) the damping is raised tenfold, with a warning, up to
``_MAX_RETRIES`` times (the spec's design note). Randomized kernel solves follow the ENGD-W code
(spec step 6): the "GPU-efficient" Nyström inverse with a fresh Gaussian sketch every step, and
Nyström-preconditioned CG with a few iterations. ``check_dense_memory`` lets a method refuse,
with the sizes and the alternatives, a step whose dense matrices cannot fit on the device
(ENGD's ``P × P`` Gramian at the default log-Fokker–Planck size is 111.7 GB in float64).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Literal

import torch
from torch import Tensor

from curvkit.linalg import ConvergenceWarning, LinearOperator, nystrom, nystrom_pcg
from curvkit.linalg.nystrom import _UnfactorableSketch

__all__ = [
    "KernelSolver",
    "SolveError",
    "damped_cholesky_solve",
    "kernel_solve",
    "KernelOperator",
    "available_memory",
    "check_dense_memory",
]

KernelSolver = Literal["cholesky", "nystrom", "nystrom_stable", "nystrom_pcg"]
_SOLVERS = ("cholesky", "nystrom", "nystrom_stable", "nystrom_pcg")
_MAX_RETRIES = 6
# The Nyström shift ν of the reference code's fast variant (not removed afterwards).
NYSTROM_SHIFT = 1e-7


class SolveError(ValueError):
    """A damped Gramian or kernel solve failed on the step's numbers (not on bad arguments).

    Typically a diverging run: the matrix holds inf/NaN or its scale swamps the damping.
    ``train`` stops on it with a warning and keeps the history.
    """


def available_memory(device: torch.device | str) -> int | None:
    """Bytes that tensors on ``device`` can take at most, or None where that is unknown.

    CUDA: the driver's free memory plus what PyTorch's caching allocator holds unused. CPU: the
    physical memory (``SC_PAGE_SIZE · SC_PHYS_PAGES``), or a smaller cgroup v2 limit
    (``/sys/fs/cgroup/memory.max``, as in a container). Other devices: None.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
    except OSError:
        return physical
    return min(physical, int(limit)) if limit.isdigit() else physical


def check_dense_memory(
    matrices: list[tuple[str, tuple[int, int]]],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    caller: str,
    alternatives: str,
) -> None:
    """Raise before allocating if a step's dense matrices cannot fit on ``device``.

    The sum of the listed matrices is a lower bound of the step's peak (they are alive
    together; temporaries come on top), so the check never refuses a step that would fit.

    Args:
        matrices: ``(description, (rows, cols))`` of every dense matrix the step holds at once.
        dtype: Their dtype.
        device: Where they would be allocated.
        caller: The method, named in the message.
        alternatives: What to use instead, appended to the message.

    Raises:
        ValueError: If they need more bytes than ``available_memory(device)``.
    """
    available = available_memory(device)
    if available is None:
        return
    itemsize = torch.empty((), dtype=dtype).element_size()
    needed = sum(math.prod(shape) for _, shape in matrices) * itemsize
    if needed <= available:
        return
    listed = ", ".join(f"{name} {rows:,} × {cols:,}" for name, (rows, cols) in matrices)
    raise ValueError(
        f"{caller}: a step needs {needed / 2**30:,.1f} GiB ({needed:,} bytes) for its dense "
        f"{str(dtype).removeprefix('torch.')} matrices ({listed}), but {torch.device(device)} "
        f"has {available / 2**30:,.1f} GiB. {alternatives}"
    )


class KernelOperator(LinearOperator):
    """``K = J Jᵀ`` applied matrix-free as ``J (Jᵀ X)``; ``(N, N)``, symmetric PSD."""

    is_symmetric = True
    is_psd = True

    def __init__(self, J: LinearOperator):
        n = J.shape[0]
        super().__init__((n, n), dtype=J.dtype, device=J.device)
        self.J = J

    def _matmat(self, X):
        return self.J._matmat(self.J._rmatmat(X))


def damped_cholesky_solve(M: Tensor, B: Tensor, damping: float, *, caller: str) -> Tensor:
    """Solve ``(M + λI) X = B`` by Cholesky, raising ``λ`` tenfold on failure (with a warning).

    Args:
        M: Symmetric PSD matrix ``(n, n)``.
        B: Right-hand side ``(n,)`` or ``(n, k)``.
        damping: ``λ >= 0``.
        caller: Name used in messages.

    Returns:
        ``X`` shaped like ``B``.

    Raises:
        ValueError: If ``damping < 0`` or no damping up to ``λ·10^6`` (or ``1e-12·tr M / n`` when
            ``λ = 0``) makes the matrix numerically positive definite.
    """
    if damping < 0:
        raise ValueError(f"{caller}: damping must be >= 0; got {damping}.")
    n = M.shape[0]
    lam = float(damping)
    # The damping goes onto M's diagonal in place, which is restored exactly afterwards: M + λI
    # would allocate two more n × n matrices (1.6 GB for ENGD's Gramian at P = 10,065).
    in_place = not (M.requires_grad and torch.is_grad_enabled())
    diag = M.diagonal().clone()
    try:
        for _ in range(_MAX_RETRIES + 1):
            if in_place:
                M.diagonal().copy_(diag + lam)
                L, info = torch.linalg.cholesky_ex(M)
            else:
                L, info = torch.linalg.cholesky_ex(M + lam * torch.eye(n, dtype=M.dtype,
                                                                       device=M.device))
            if not info:
                break
            # Where λ = 0, start from a level relative to the matrix's scale.
            lam = 10.0 * lam if lam > 0 else 1e-12 * float(diag.abs().mean().clamp_min(1e-300))
        else:
            raise SolveError(
                f"{caller}: the damped matrix is not positive definite even with damping "
                f"{lam / 10:.3e} (asked for {damping:.3e}); is the matrix PSD and finite?"
            )
    finally:
        if in_place:
            M.diagonal().copy_(diag)
    if lam != float(damping):
        warnings.warn(
            f"{caller}: Cholesky of the damped matrix failed with damping {damping:.3e}; "
            f"solved with damping {lam:.3e} instead.",
            RuntimeWarning,
            stacklevel=3,
        )
    X = torch.cholesky_solve(B.reshape(n, -1), L)
    return X.reshape(B.shape)


def kernel_solve(
    J: LinearOperator,
    rhs: Tensor,
    *,
    damping: float,
    solver: KernelSolver = "cholesky",
    rank: int | None = None,
    kernel: Tensor | None = None,
    pcg_iterations: int = 5,
    shift: float = NYSTROM_SHIFT,
    generator: torch.Generator | None = None,
    caller: str = "kernel_solve",
) -> Tensor:
    """Solve ``(J Jᵀ + λI) u = rhs`` in sample space.

    Args:
        J: Residual Jacobian ``(N, P)`` (an operator with ``.kernel()`` for the exact solve).
        rhs: Right-hand side ``(N,)``.
        damping: ``λ``; must be positive for the randomized solvers.
        solver: ``"cholesky"`` (exact; forms ``K`` per layer), ``"nystrom"`` (the spec's
            GPU-efficient Nyström inverse, ``(g - B (BᵀB + λI)^{-1} Bᵀ g) / λ`` with
            ``K + νI ≈ BBᵀ``), ``"nystrom_stable"`` (orthonormal sketch, SVD, shift removed;
            exact Woodbury inverse of the low-rank approximation) or ``"nystrom_pcg"``
            (``pcg_iterations`` CG steps on ``K + λI`` with the Nyström preconditioner).
        rank: Sketch size ``l`` (required by the randomized solvers, ``1 <= l <= N``).
        kernel: A precomputed ``K`` ``(N, N)`` (used by every solver when given).
        pcg_iterations: CG iterations of ``"nystrom_pcg"``.
        shift: The Nyström shift ``ν`` of the randomized solvers' sketches.
        generator: Source of the sketch.
        caller: Name used in messages.

    Returns:
        ``u`` of shape ``(N,)``.

    Raises:
        ValueError: For an unknown solver, a missing, non-int or out-of-range rank, ``λ <= 0``
            with a randomized solver, or a sketch that the shift ``ν`` cannot make factorable.
    """
    if solver not in _SOLVERS:
        raise ValueError(f"{caller}: solver must be one of {_SOLVERS}; got {solver!r}.")
    N = J.shape[0]
    if solver == "cholesky":
        K = J.kernel() if kernel is None else kernel
        return damped_cholesky_solve(K, rhs, damping, caller=caller)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= N:
        # (int(rank) truncated a float rank silently)
        raise ValueError(
            f"{caller}: solver {solver!r} needs rank in [1, N={N}], an int; got {rank!r}."
        )
    if damping <= 0:
        raise ValueError(f"{caller}: solver {solver!r} needs damping > 0; got {damping}.")
    if kernel is None and hasattr(J, "cache_blocks"):
        J.cache_blocks()  # K is applied a few times: build J's layer blocks once
    K_op = KernelOperator(J) if kernel is None else _DenseSymmetric(kernel)
    with _explained_sketch_failure(shift, caller):
        if solver == "nystrom_pcg":
            # A few iterations by design, not to convergence: the truncation is the method. The
            # sketch takes the shift ν like the other solvers: nystrom_pcg's default (~√N·eps·
            # ‖KΩ‖) cannot factor a sketch wider than the rank of K (rank > P).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                return nystrom_pcg(
                    K_op,
                    rhs,
                    rank=rank,
                    damping=damping,
                    method="fast",
                    shift=shift,
                    rtol=1e-14,
                    max_iter=pcg_iterations,
                    generator=generator,
                    on_failure="warn",
                )
        if solver == "nystrom_stable":
            approx = nystrom(K_op, rank, method="stable", shift=shift, generator=generator)
            return approx.inverse(damping) @ rhs
        B = nystrom(K_op, rank, method="fast", shift=shift, generator=generator).U
    # (BBᵀ + λI)^{-1} g = (g - B (BᵀB + λI)^{-1} Bᵀ g) / λ   (Woodbury, an l × l Cholesky)
    small = B.T @ B
    inner = damped_cholesky_solve(small, B.T @ rhs, damping, caller=caller)
    return (rhs - B @ inner) / damping


@contextlib.contextmanager
def _explained_sketch_failure(shift: float, caller: str):
    """Say why a Nyström sketch of ``K = JJᵀ`` failed: ``nystrom`` blames an indefinite ``A``."""
    try:
        yield
    except _UnfactorableSketch as error:
        raise SolveError(
            f"{caller}: the Nyström sketch of the kernel K = JJᵀ cannot be factored with the "
            f"shift ν = {shift}: K is PSD, so its scale is far above ν or it is not finite "
            "(a diverging run?); lower the step size, or use solver='cholesky'."
        ) from error


class _DenseSymmetric(LinearOperator):
    is_symmetric = True
    is_psd = True

    def __init__(self, K: Tensor):
        super().__init__(tuple(K.shape), dtype=K.dtype, device=K.device)
        self.K = K

    def _matmat(self, X):
        return self.K @ X
