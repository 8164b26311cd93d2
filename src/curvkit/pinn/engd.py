"""Energy natural gradient descent for PINNs: the shared step machinery, ENGD and Hessian-free.

Every optimizer here is a ``torch.optim.Optimizer`` over the model's parameters whose
``step(batch)`` takes the collocation points (not a closure): it linearises the residuals at the
current parameters (``curvkit.pinn.linearize``), computes a direction ``d`` from ``J`` and ``r̃``,
picks a step size — the grid line search over ``η ∈ {2^-30, …, 2^0}`` on the batch's loss, or a
fixed ``lr`` — and updates ``θ ← θ + η d`` in place. Hyperparameters live in the param group, the
only state is tensors and numbers in ``self.state``, so ``state_dict()`` round-trips.

References:
    Müller & Zeinhofer (2023), "Achieving High Accuracy with PINNs via Energy Natural
    Gradients", ICML (arXiv 2302.13163).
    Martens (2010), "Deep learning via Hessian-free optimization", ICML.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from curvkit.linalg import ConvergenceWarning, LinearOperator, cg
from curvkit.linalg.gram import gram
from curvkit.pinn._mlp import mlp_derivatives, mlp_structure
from curvkit.pinn.base import Batch, Problem
from curvkit.pinn.jacobian import linearize_checked
from curvkit.pinn.residuals import _check_batch, _check_deterministic, residual_function
from curvkit.pinn.solves import check_dense_memory, damped_cholesky_solve

__all__ = ["ENGD", "HessianFree", "LINE_SEARCH_GRID", "line_search"]

# The grid of ENGD (2023) and rla-pinns: 2^k for k = -30..0, largest first.
LINE_SEARCH_GRID = tuple(2.0**k for k in range(0, -31, -1))


def _loss_fn(model: nn.Module, problem: Problem, batch: Batch) -> Callable[[list[Tensor]], Tensor]:
    """``params -> ½‖r̃(params)‖²`` (a 0-d tensor) on a fixed batch, without building a graph.

    The forward-Laplacian fast path for supported MLPs, ``curvkit.taylor`` for any other model.
    A tensor, not a float: the line search reads all its values at once (one device sync).
    """
    structure = mlp_structure(model)
    X_in, X_bd = batch
    if structure is not None:
        target = problem.boundary_target(X_bd)  # once, not at each of the 31 evaluations

        def loss(params: list[Tensor]) -> Tensor:
            with torch.no_grad():
                d = mlp_derivatives(structure, params, X_in, problem.laplacian_dims)
                r_in = problem.interior_residual(X_in, d)
                u_bd = mlp_derivatives(structure, params, X_bd, None, order=0).value
                r_bd = u_bd - target
                return 0.5 * (r_in.square().mean() + r_bd.square().mean())

        return loss

    names = [k for k, v in model.named_parameters() if v.requires_grad]
    residual_at = residual_function(model, problem, batch, caller="line_search")

    def loss(params: list[Tensor]) -> Tensor:
        with torch.no_grad():
            return 0.5 * residual_at(dict(zip(names, params))).square().sum()

    return loss


def line_search(
    loss: Callable[[list[Tensor]], float | Tensor],
    params: list[Tensor],
    direction: list[Tensor],
    current: float,
    *,
    caller: str,
) -> float:
    """The step size on ``LINE_SEARCH_GRID`` with the lowest loss along ``direction``.

    Args:
        loss: ``params -> loss`` on the step's batch, a float or a 0-d tensor (tensors are read
            together after every candidate ran: on a GPU one sync instead of one each).
        params: Current parameters (not modified).
        direction: Update direction, shaped like ``params``.
        current: The loss at ``params``.
        caller: Name used in the warning.

    Returns:
        The best step size, or ``0.0`` (with a ``RuntimeWarning``) if no step lowers the loss.
    """
    values = [loss([p + eta * d for p, d in zip(params, direction)]) for eta in LINE_SEARCH_GRID]
    if all(isinstance(v, Tensor) for v in values):
        values = torch.stack([v.reshape(()) for v in values]).tolist()
    best, best_eta = current, 0.0
    for eta, value in zip(LINE_SEARCH_GRID, values):
        value = float(value)
        if value < best:  # NaN never compares smaller, so diverging steps are skipped
            best, best_eta = value, eta
    if best_eta == 0.0:
        warnings.warn(
            f"{caller}: no step size in 2^-30..2^0 lowers the loss {current:.6e}; taking no step.",
            RuntimeWarning,
            stacklevel=3,
        )
    return best_eta


def _unflatten(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    return [t.reshape(p.shape) for t, p in zip(flat.split([p.numel() for p in like]), like)]


def _check_lr(lr, caller: str) -> None:
    if isinstance(lr, bool):  # bool is an int to Python: lr=True would be a step of 1
        raise ValueError(f"{caller}: lr must be 'line_search' or a positive float; got {lr!r}.")
    if isinstance(lr, str):
        if lr != "line_search":
            raise ValueError(f"{caller}: lr must be 'line_search' or a positive float; got {lr!r}.")
    elif not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"{caller}: lr must be 'line_search' or a positive float; got {lr!r}.")


def _check_nonneg(value, name: str, caller: str) -> None:
    if isinstance(value, bool) or not (
        isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)
    ):
        raise ValueError(f"{caller}: {name} must be a finite number >= 0; got {value!r}.")


class NaturalGradientBase(Optimizer):
    """Shared ``step(batch)``: linearise, get a direction, choose the step size, update.

    Subclasses implement ``_direction(lin, group, params) -> flat (P,)``; they may override
    ``_step_size`` (SPRING's norm constraint).
    """

    _caller = "NaturalGradientBase"
    # What to suggest when a step's dense matrices do not fit (see ``_check_memory``).
    _alternatives = "Use fewer points per step (num_interior / num_boundary) or a smaller network."

    def __init__(self, model: nn.Module, problem: Problem, defaults: dict):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{self._caller}: model must be an nn.Module; got {type(model).__name__}."
            )
        if not isinstance(problem, Problem):
            raise TypeError(
                f"{self._caller}: problem must be a curvkit.pinn Problem; "
                f"got {type(problem).__name__}."
            )
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{self._caller}: the model has no trainable parameters.")
        _check_lr(defaults["lr"], self._caller)
        _check_deterministic(model, self._caller)
        super().__init__(params, defaults)
        # The model and problem define the residuals; they are configuration, not state.
        self.model = model
        self.problem = problem

    def add_param_group(self, param_group: dict) -> None:  # noqa: D102
        if self.param_groups:
            raise ValueError(f"{self._caller}: one parameter group only (the model's parameters).")
        super().add_param_group(param_group)

    def _direction(self, lin: LinearOperator, group: dict, params: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def _dense_matrices(self, N: int, P: int, group: dict) -> list[tuple[str, tuple[int, int]]]:
        """The dense matrices a step holds at once, ``(description, shape)``, for ``N`` points."""
        return []

    def _check_memory(self, N: int) -> None:
        """Refuse a step on ``N`` points whose dense matrices cannot fit, before allocating any.

        ``step`` calls it, and ``train`` once before its first evaluation.
        """
        group = self.param_groups[0]
        params = group["params"]
        P = sum(p.numel() for p in params)
        check_dense_memory(
            self._dense_matrices(N, P, group),
            dtype=params[0].dtype,
            device=params[0].device,
            caller=f"{self._caller} (N = {N:,} points, P = {P:,} parameters)",
            alternatives=self._alternatives,
        )

    def _step_size(
        self,
        direction: list[Tensor],
        group: dict,
        params: list[Tensor],
        batch: Batch,
        current: float,
    ) -> float:
        if group["lr"] == "line_search":
            return line_search(
                _loss_fn(self.model, self.problem, batch),
                [p.detach() for p in params],
                direction,
                current,
                caller=type(self).__name__,
            )
        return float(group["lr"])

    @torch.no_grad()
    def step(self, batch: Batch) -> float:  # type: ignore[override]
        """One update on the collocation points ``batch``.

        Args:
            batch: ``Batch(interior (N_Ω, D), boundary (N_∂, D))``.

        Returns:
            The loss ``½‖r̃‖²`` at the parameters before the update; if it is not finite the
            parameters are left as they are (``train`` then records it and stops).
        """
        group = self.param_groups[0]
        params = group["params"]
        # Checked once, as linearize checks it (and named so): N is needed before linearising.
        batch = _check_batch(self.problem, batch, "linearize", self.model)
        self._check_memory(batch[0].shape[0] + batch[1].shape[0])
        lin = linearize_checked(self.model, self.problem, batch)
        current = 0.5 * float(lin.residual.square().sum())
        eta = 0.0
        if math.isfinite(current):  # else nothing to solve for: reported, parameters kept
            direction = _unflatten(self._direction(lin, group, params), params)
            eta = self._step_size(direction, group, params, batch, current)
            for p, d in zip(params, direction):
                p.add_(d, alpha=eta)
        state = self.state[params[0]]
        state["step"] = state.get("step", 0) + 1
        state["step_size"] = eta
        return current


class ENGD(NaturalGradientBase):
    """Energy natural gradient descent: ``θ ← θ - η (JᵀJ + λI)^{-1} Jᵀ r̃`` (parameter space).

    Forms the ``P × P`` Gramian ``G = JᵀJ`` — which is ``Σ_points ⟨T ∂_i u, T ∂_j u⟩`` with ``T``
    the PDE operator inside and the trace on the boundary, scaled as the loss — and solves by
    Cholesky: ``O(N P² + P³)`` per step. The 2023 code solves by least squares without damping;
    a tiny ``λ`` and Cholesky is the same where ``G`` is well conditioned, and is what
    ``ENGDWoodbury`` must equal.

    Args:
        model: The network.
        problem: The PDE problem.
        lr: ``"line_search"`` (grid ``2^-30..2^0``) or a fixed step size.
        damping: ``λ >= 0``.
    """

    _caller = "ENGD"
    _alternatives = (
        "ENGD's P × P Gramian grows with the square of the network size: use ENGD-Woodbury or "
        "SPRING (an N × N kernel instead; method 'engd_woodbury' / 'spring'), their randomized "
        "Nyström solvers (solver='nystrom', rank=...), Hessian-free (matrix-free Gramian), or "
        "a smaller network or batch."
    )

    def __init__(
        self,
        model: nn.Module,
        problem: Problem,
        *,
        lr: float | str = "line_search",
        damping: float = 1e-10,
    ):
        _check_nonneg(damping, "damping", self._caller)
        super().__init__(model, problem, dict(lr=lr, damping=damping))

    def _dense_matrices(self, N, P, group):
        # J, the Gramian and its Cholesky factor are alive together in the solve.
        return [("Jacobian J", (N, P)), ("Gramian JᵀJ", (P, P)),
                ("its Cholesky factor", (P, P))]

    def _direction(self, lin, group, params):
        J = lin.to_dense()
        G = gram(J)
        return -damped_cholesky_solve(G, J.T @ lin.residual, group["damping"], caller="ENGD")


class HessianFree(NaturalGradientBase):
    """Hessian-free Gauss–Newton: ``(JᵀJ + λI) d = -Jᵀ r̃`` by truncated CG (GGN products).

    The PINN loss is ``½‖r̃‖²``, so its generalized Gauss–Newton matrix is ``JᵀJ`` — the ENGD
    Gramian — applied here matrix-free as ``Jᵀ(J v)`` with the layer-wise Jacobian; CG stops at
    ``max_iter`` iterations or relative residual ``rtol``, whichever comes first (truncation is
    the method, so it is not a failure).

    Args:
        model: The network.
        problem: The PDE problem.
        lr: ``"line_search"`` or a fixed step size.
        damping: ``λ >= 0``.
        max_iter: CG iterations per step (the ENGD-W baseline allows up to 350).
        rtol: CG relative tolerance.
    """

    _caller = "HessianFree"
    _alternatives = (
        "Use SPRING or ENGD-Woodbury with a randomized Nyström solver (solver='nystrom', "
        "rank=...), or fewer points per step (num_interior / num_boundary) or a smaller network."
    )

    def __init__(
        self,
        model: nn.Module,
        problem: Problem,
        *,
        lr: float | str = "line_search",
        damping: float = 1e-8,
        max_iter: int = 350,
        rtol: float = 1e-10,
    ):
        _check_nonneg(damping, "damping", self._caller)
        if not (isinstance(max_iter, int) and max_iter >= 1):
            raise ValueError(f"HessianFree: max_iter must be an int >= 1; got {max_iter!r}.")
        _check_nonneg(rtol, "rtol", self._caller)
        super().__init__(model, problem, dict(lr=lr, damping=damping, max_iter=max_iter, rtol=rtol))

    def _dense_matrices(self, N, P, group):
        return [("Jacobian J", (N, P))]

    def _direction(self, lin, group, params):
        # Up to max_iter products with JᵀJ: forming J's per-layer blocks once per step makes each
        # product two (N, P) matvecs instead of re-contracting all C Taylor channels each time.
        gramian = _Gramian(_DenseJacobian(lin.to_dense()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            info = cg(
                gramian,
                -(lin.T @ lin.residual),
                damping=group["damping"],
                rtol=group["rtol"],
                max_iter=group["max_iter"],
                on_failure="warn",
                return_info=True,
            )
        self.state[params[0]]["cg_iterations"] = info.iterations
        return info.x


class _DenseJacobian(LinearOperator):
    def __init__(self, J: Tensor):
        super().__init__(tuple(J.shape), dtype=J.dtype, device=J.device)
        self.J = J

    def _matmat(self, X):
        return self.J @ X

    def _rmatmat(self, Y):
        return self.J.T @ Y


class _Gramian(LinearOperator):
    """``JᵀJ`` applied as ``Jᵀ(J V)``, ``(P, P)``."""

    is_symmetric = True
    is_psd = True

    def __init__(self, J: LinearOperator):
        P = J.shape[1]
        super().__init__((P, P), dtype=J.dtype, device=J.device)
        self.J = J

    def _matmat(self, X):
        return self.J._rmatmat(self.J._matmat(X))
