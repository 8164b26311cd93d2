"""ENGD in sample space (ENGD-Woodbury) and with SPRING momentum.

By the push-through identity ``(JᵀJ + λI)^{-1} Jᵀ = Jᵀ (JJᵀ + λI)^{-1}`` the ENGD direction is
``Jᵀ (K + λI)^{-1} ε`` with the ``N × N`` kernel ``K = JJᵀ`` and ``ε = -r̃`` — ``O(N² P)`` instead
of ``O(N P² + P³)``. The kernel is built layer by layer (``ResidualJacobian.kernel``) or, for the
randomized solvers, only applied (``K Ω = Σ_l J_l (J_lᵀ Ω)``).

References:
    Guzmán-Cordero, Dangel, Goldshlager & Zeinhofer (2025), "Improving Energy Natural Gradient
    Descent through Woodbury, Momentum, and Randomization", NeurIPS (arXiv 2505.12149).
    Goldshlager, Abrahamsen & Lin (2024), "A Kaczmarz-inspired approach to accelerate the
    optimization of neural network wavefunctions" (SPRING), arXiv 2401.10190.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from curvkit.pinn.base import Problem, seeded_stream
from curvkit.pinn.engd import NaturalGradientBase, _check_nonneg
from curvkit.pinn.solves import _SOLVERS, KernelSolver, kernel_solve

__all__ = ["ENGDWoodbury", "SPRING"]


def _check_solver(solver, rank, damping, pcg_iterations, seed, caller: str) -> None:
    if solver not in _SOLVERS:
        raise ValueError(f"{caller}: solver must be one of {_SOLVERS}; got {solver!r}.")
    if solver != "cholesky" and not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"{caller}: solver {solver!r} needs an int rank >= 1; got {rank!r}.")
    # Checked here as well as in kernel_solve, so that a bad setting fails before training.
    if solver != "cholesky" and not damping > 0:
        raise ValueError(f"{caller}: solver {solver!r} needs damping > 0; got {damping!r}.")
    if isinstance(pcg_iterations, bool) or not (
        isinstance(pcg_iterations, int) and pcg_iterations >= 1
    ):
        raise ValueError(f"{caller}: pcg_iterations must be an int >= 1; got {pcg_iterations!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{caller}: seed must be an int; got {seed!r}.")


class _KernelMixin:
    """Kernel solves; the randomized ones draw a fresh sketch every step from ``(seed, step)``.

    Deriving the sketch seed from the step count (instead of storing a generator state) keeps
    ``state_dict()`` to numbers and tensors, and resumed runs draw the same sketches.
    """

    _alternatives = (
        "Use a randomized Nyström solver (solver='nystrom', 'nystrom_stable' or 'nystrom_pcg' "
        "with rank=...), whose sketch is N × rank, or fewer points per step (num_interior / "
        "num_boundary)."
    )

    def _dense_matrices(self, N, P, group):
        if group["solver"] == "cholesky":  # the kernel and its factor are alive together
            return [("kernel JJᵀ", (N, N)), ("its Cholesky factor", (N, N))]
        # The sketch Ω and its product K Ω (the Nyström factor replaces one of them).
        return [("Nyström sketch and its product", (N, 2 * group["rank"]))]

    def _solve(self, lin, rhs: Tensor, group: dict, params: list[Tensor]) -> Tensor:
        generator = None
        if group["solver"] != "cholesky":
            step = self.state[params[0]].get("step", 0)
            generator = seeded_stream(group["seed"], step, device=rhs.device)
        return kernel_solve(
            lin,
            rhs,
            damping=group["damping"],
            solver=group["solver"],
            rank=group["rank"],
            pcg_iterations=group["pcg_iterations"],
            generator=generator,
            caller=type(self).__name__,
        )


class ENGDWoodbury(_KernelMixin, NaturalGradientBase):
    """ENGD solved in sample space: ``θ ← θ + η Jᵀ (JJᵀ + λI)^{-1} ε``, ``ε = -r̃``.

    Args:
        model: The network.
        problem: The PDE problem.
        lr: ``"line_search"`` (grid ``2^-30..2^0``) or a fixed step size.
        damping: ``λ >= 0`` (``> 0`` for the randomized solvers).
        solver: ``"cholesky"`` (exact), ``"nystrom"``, ``"nystrom_stable"`` or ``"nystrom_pcg"``
            (see ``curvkit.pinn.solves.kernel_solve``).
        rank: Nyström sketch size for the randomized solvers.
        pcg_iterations: CG iterations of ``"nystrom_pcg"``.
        seed: Seed of the sketches (a fresh sketch every step, reproducible from the state).
    """

    _caller = "ENGDWoodbury"

    def __init__(
        self,
        model: nn.Module,
        problem: Problem,
        *,
        lr: float | str = "line_search",
        damping: float = 1e-10,
        solver: KernelSolver = "cholesky",
        rank: int | None = None,
        pcg_iterations: int = 5,
        seed: int = 0,
    ):
        _check_nonneg(damping, "damping", self._caller)
        _check_solver(solver, rank, damping, pcg_iterations, seed, self._caller)
        super().__init__(
            model,
            problem,
            dict(
                lr=lr,
                damping=damping,
                solver=solver,
                rank=rank,
                pcg_iterations=pcg_iterations,
                seed=seed,
            ),
        )

    def _direction(self, lin, group, params):
        return lin.T @ self._solve(lin, -lin.residual, group, params)


class SPRING(_KernelMixin, NaturalGradientBase):
    """ENGD-Woodbury with SPRING momentum in sample space.

    With ``ε = -r̃`` and momentum ``μ``, step ``k`` (from 0) computes (spec step 4)

    - ``ζ = ε - μ J φ_{k-1}``,
    - ``φ_k = μ φ_{k-1} + Jᵀ (JJᵀ + λI)^{-1} ζ``, the minimiser of
      ``‖J φ - ε‖² + λ ‖φ - μ φ_{k-1}‖²``,
    - the bias-corrected direction ``d_k = φ_k / sqrt(1 - μ^{2(k+1)})``,

    then ``θ ← θ + s d_k`` with ``s`` from the line search, or ``s = min(lr, sqrt(C) / ‖φ_k‖)``
    for a fixed ``lr`` (the norm constraint ``C``; the reference code measures the uncorrected
    ``φ_k``). ``μ = 0`` is exactly ENGD-Woodbury.

    Args:
        model: The network.
        problem: The PDE problem.
        lr: ``"line_search"`` or a fixed step size.
        momentum: ``μ ∈ [0, 1)``.
        damping: ``λ >= 0``.
        norm_constraint: ``C > 0`` for a fixed ``lr``; None disables the constraint.
        solver: Kernel solver, as in ``ENGDWoodbury``.
        rank: Nyström sketch size for the randomized solvers.
        pcg_iterations: CG iterations of ``"nystrom_pcg"``.
        seed: Seed of the sketches.
    """

    _caller = "SPRING"

    def __init__(
        self,
        model: nn.Module,
        problem: Problem,
        *,
        lr: float | str = "line_search",
        momentum: float = 0.5,
        damping: float = 1e-10,
        norm_constraint: float | None = 1e-3,
        solver: KernelSolver = "cholesky",
        rank: int | None = None,
        pcg_iterations: int = 5,
        seed: int = 0,
    ):
        _check_nonneg(damping, "damping", self._caller)
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"SPRING: momentum must be in [0, 1); got {momentum!r}.")
        if norm_constraint is not None and not (
            isinstance(norm_constraint, (int, float))
            and not isinstance(norm_constraint, bool)
            and norm_constraint > 0
        ):
            raise ValueError(
                f"SPRING: norm_constraint must be > 0 or None; got {norm_constraint!r}."
            )
        _check_solver(solver, rank, damping, pcg_iterations, seed, self._caller)
        super().__init__(
            model,
            problem,
            dict(
                lr=lr,
                momentum=momentum,
                damping=damping,
                norm_constraint=norm_constraint,
                solver=solver,
                rank=rank,
                pcg_iterations=pcg_iterations,
                seed=seed,
            ),
        )

    def _direction(self, lin, group, params):
        mu = float(group["momentum"])
        prev = [self.state[p].get("momentum_buffer") for p in params]
        phi_prev = None if prev[0] is None else torch.cat([t.reshape(-1) for t in prev])
        zeta = -lin.residual
        if phi_prev is not None and mu > 0:
            zeta = zeta - mu * (lin @ phi_prev)
        phi = lin.T @ self._solve(lin, zeta, group, params)
        if phi_prev is not None:
            phi = phi + mu * phi_prev
        for p, t in zip(params, phi.split([q.numel() for q in params])):
            self.state[p]["momentum_buffer"] = t.reshape(p.shape).clone()
        k = self.state[params[0]].get("step", 0)
        self.state[params[0]]["phi_norm"] = float(phi.norm())
        correction = math.sqrt(1 - mu ** (2 * (k + 1)))
        return phi / correction

    def _step_size(self, direction, group, params, batch, current):
        if group["lr"] == "line_search" or group["norm_constraint"] is None:
            return super()._step_size(direction, group, params, batch, current)
        phi_norm = self.state[params[0]]["phi_norm"]
        if phi_norm == 0:
            return float(group["lr"])
        return min(float(group["lr"]), math.sqrt(group["norm_constraint"]) / phi_norm)
