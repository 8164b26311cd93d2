"""PINN residuals: derivatives of the network by collapsed Taylor mode, scaled and stacked.

The interior residual needs the network's value, gradient and (partial) Laplacian at every point.
All of them come from one collapsed second-order Taylor-mode pass (the forward Laplacian; Li et
al. 2023, Dangel et al. 2025) that pushes ``2 + D`` rows per point: the value, the ``D``
directional derivatives along ``e_1..e_D`` (the gradient, for free) and the second-order
coefficients collapsed into one weighted sum, with weight 1 on the problem's ``laplacian_dims``
and 0 elsewhere (so ``Δₓ`` of a space-time problem costs no extra rows).

- **General path** (any model whose operations ``curvkit.taylor`` supports): ``curvkit.taylor``'s
  ``DifferentialOperator`` on the model's captured ATen graph.
- **Fast path** (``Sequential`` MLPs of ``Linear`` and tanh / sigmoid / sin): the same rule
  written for that layer sequence in ``curvkit.pinn._mlp``; it also captures the layer channels
  that the layer-wise Jacobian needs and is measurably faster (see that module).

``torch.func`` nested reverse mode is not used here; it is the independent reference in the tests.

The residual vector is scaled so that the loss is ``½‖r̃‖²`` (spec step 1):
``r̃ = [r_Ω / √N_Ω ; r_∂ / √N_∂]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvkit.pinn._mlp import Sin, forward_laplacian, mlp_derivatives, mlp_structure
from curvkit.pinn.base import Batch, Derivatives, Problem, _check_dims, _check_fits
from curvkit.taylor import DifferentialOperator
from curvkit.taylor.operators import _Plan, _unit_directions

__all__ = [
    "Sin",
    "derivatives",
    "forward_laplacian",
    "loss",
    "mlp_structure",
    "residuals",
    "taylor_derivatives",
    "residual_function",
    "taylor_residuals",
]


def _check_untied(f: object, caller: str) -> None:
    """Refuse modules that register one parameter under two names (e.g. a reused layer).

    Neither Jacobian path supports them: the layer-wise one gives every layer occurrence its
    own columns, and the general one lost the tied parameters' columns (checked against
    ``torch.func``); a clear error instead of a wrong ``J``.
    """
    if not isinstance(f, nn.Module):
        return
    first: dict[int, str] = {}
    for name, p in f.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            raise ValueError(
                f"{caller}: the model registers one parameter under several names ({name!r} is "
                f"also registered as {first[id(p)]!r}, e.g. a layer reused in a Sequential); "
                "this is not supported: call the layer twice from a custom forward instead."
            )


def _check_deterministic(f: object, caller: str) -> None:
    """Refuse a model whose forward changes between calls: active dropout, spectral norm.

    A ``Dropout`` in training mode with ``p > 0`` draws a fresh mask at every call, so the
    residuals, their Jacobian and the line-search losses of one step would belong to different
    networks: a silently wrong step. ``model.eval()`` (or ``p = 0``) makes the forward
    deterministic.
    """
    if not isinstance(f, nn.Module):
        return
    for name, module in f.named_modules():
        # torch.nn.utils.parametrizations.spectral_norm: a power-iteration step on its buffers
        # at every call in training mode (tracing it failed with an obscure autograd error).
        if type(module).__name__ == "_SpectralNorm" and module.training:
            raise ValueError(
                f"{caller}: the model's spectral_norm {name!r} is in training mode: it updates "
                "its power-iteration vectors at every call, so the residuals, their Jacobian and "
                "the line search would see different networks; call model.eval() first."
            )
        if _active_dropout(module):
            raise ValueError(
                f"{caller}: the model's {type(module).__name__} {name or '(root)'!r} is in "
                f"training mode with p={module.p}: it draws a new random mask at every call, so "
                "the residuals, their Jacobian and the line search would see different networks; "
                "call model.eval() or remove the dropout."
            )


def _active_dropout(module: nn.Module) -> bool:
    """Whether ``module`` is a dropout layer that draws a random mask (training mode, ``p > 0``)."""
    return (isinstance(module, nn.modules.dropout._DropoutNd) and module.training
            and module.p > 0)


def _check_rowwise(model: nn.Module, X: Tensor, caller: str) -> None:
    """Refuse a model whose output at a point depends on the other points of the batch.

    Taylor mode, the block-wise Jacobian and the residuals all assume ``u(x)`` is a function of
    the point ``x`` alone; a model that normalises by batch statistics (``x - x.mean(0)``)
    would give derivatives of no function of ``x``, silently.
    Compared on the two halves of ``X: (N, D)`` (forward passes of ``N`` points on the
    general path only, whose Jacobian costs far more), to ``sqrt(eps)`` of the values' scale;
    a fourth pass on all of ``X`` refuses a forward that changes from call to call.
    """
    with torch.no_grad():
        whole = model(X).reshape(-1)
        again = model(X).reshape(-1)
        half = X.shape[0] // 2
        parts = again if half == 0 else torch.cat([model(X[:half]).reshape(-1),
                                                   model(X[half:]).reshape(-1)])
    if whole.shape != parts.shape or not bool(torch.isfinite(whole).all()):
        return  # the output-shape and loss checks report these
    tol = math.sqrt(torch.finfo(whole.dtype).eps) * (1 + float(whole.abs().max()))
    if not float((whole - again).abs().max()) <= tol:
        raise ValueError(
            f"{caller}: the model gives different outputs for the same points at two calls (a "
            "random or stateful forward, e.g. noise, or buffers it updates): the residuals, "
            "their Jacobian and the line search would see different networks."
        )
    gap = float((whole - parts).abs().max())
    if not gap <= tol:
        raise ValueError(
            f"{caller}: the model's output at a point depends on the other points of the batch "
            f"(evaluated on two halves of {X.shape[0]} points it differs by {gap:.3g}), e.g. a "
            "normalisation by batch statistics; PINN derivatives need u(x) to depend on x "
            "alone (normalise with fixed constants, e.g. the domain's bounds)."
        )


def _operator(f: nn.Module | Callable[[Tensor], Tensor], X: Tensor,
              dims: tuple[int, ...] | None, caller: str) -> DifferentialOperator:
    """Value, gradient and the Laplacian over ``dims`` as one ``curvkit.taylor`` operator."""
    D = X.shape[1]
    # Directions e_1..e_D (their first-order rows are the gradient); only the second-order
    # coefficients of e_i, i ∈ dims, enter the collapsed sum (weight 1, the others weight 0).
    # Built here rather than by ``laplacian(f)`` (the same plan for all dims) so that errors,
    # e.g. an operation without a Taylor rule, name the caller instead of "laplacian".
    weights = None
    if dims is not None and len(dims) != D:
        weights = X.new_zeros(D)
        weights[list(dims)] = 1.0

    def planner(Z: Tensor, generator, gradient: bool) -> _Plan:
        return _Plan(_unit_directions(Z), weights, 1.0, False)

    return DifferentialOperator(f, caller=caller, order=2, planner=planner, randomized=False,
                                collapsed=True, return_value=True, return_gradient=True,
                                generator=None)


def taylor_derivatives(
    f: nn.Module | Callable[[Tensor], Tensor],
    X: Tensor,
    *,
    laplacian_dims: Sequence[int] | None = None,
    params: dict[str, Tensor] | None = None,
    caller: str = "taylor_derivatives",
) -> Derivatives:
    """Value, gradient and (partial) Laplacian of a scalar function by ``curvkit.taylor``.

    The general path of ``derivatives``: works for any ``f`` built from operations that
    ``curvkit.taylor`` supports; differentiable w.r.t. ``f``'s parameters (and tensors a plain
    ``f`` closes over).

    Args:
        f: ``nn.Module`` or function mapping ``(N, D)`` to ``(N,)`` or ``(N, 1)`` row by row.
        X: Points, shape ``(N, D)``.
        laplacian_dims: Coordinates in the Laplacian (all when None).
        params: Evaluate the module ``f`` at these ``{name: tensor}`` parameters instead of its
            own (``torch.func.functional_call``), e.g. a line-search candidate.
        caller: Name used in error messages.

    Returns:
        ``Derivatives`` with shapes ``(N,)``, ``(N, D)``, ``(N,)``.

    Raises:
        ValueError: If ``X`` is not 2-d, ``laplacian_dims`` is invalid or ``f`` does not return
            one value per row.
    """
    if not isinstance(X, Tensor) or X.ndim != 2:
        got = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
        raise ValueError(f"{caller}: X must have shape (N, D); got {got}.")
    dims = _check_dims(laplacian_dims, X.shape[1], caller)
    _check_fits(f, X, "X has", caller)
    _check_untied(f, caller)
    if params is not None and not isinstance(f, nn.Module):
        raise TypeError(f"{caller}: params need an nn.Module f; got {type(f).__name__}.")
    op = _operator(f, X, dims, caller)
    if params is not None:
        return _at(f, params, lambda: _evaluate(op, X, caller))
    return _evaluate(op, X, caller)


class _Call(nn.Module):
    """Runs ``fn()`` as the forward of a module that holds ``model``.

    ``functional_call`` on it substitutes ``model``'s parameters for the duration of ``fn`` (a
    ``curvkit.taylor`` operator reads them when called), so one operator — one captured graph —
    serves any number of parameter values, e.g. the 31 line-search candidates of a step.
    """

    def __init__(self, model: nn.Module, fn: Callable[[], object]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self):  # noqa: D102
        return self.fn()


def _at(model: nn.Module, params: dict[str, Tensor], fn: Callable[[], object]):
    """``fn()`` with ``model``'s parameters replaced by ``params`` (``{name: tensor}``)."""
    call = _Call(model, fn)
    return functional_call(call, {f"model.{k}": v for k, v in params.items()}, ())


def _evaluate(op: DifferentialOperator, X: Tensor, caller: str) -> Derivatives:
    """``op(X)`` as ``Derivatives`` of a scalar function, shapes ``(N,)``, ``(N, D)``, ``(N,)``."""
    value, gradient, lap = op(X)
    N, D = X.shape
    if value.shape not in ((N,), (N, 1)):
        raise ValueError(f"{caller}: f must map (N, D) = {(N, D)} to (N,) or (N, 1); "
                         f"got output shape {tuple(value.shape)}.")
    return Derivatives(value.reshape(N), gradient.reshape(N, D), lap.reshape(N))


def derivatives(
    f: nn.Module | Callable[[Tensor], Tensor],
    X: Tensor,
    *,
    laplacian_dims: Sequence[int] | None = None,
) -> Derivatives:
    """Value, gradient and (partial) Laplacian of a scalar function on a batch.

    ``f`` maps ``(N, D)`` to ``(N,)`` or ``(N, 1)`` row by row (an ``nn.Module`` or a plain
    function). Supported ``Sequential`` MLPs take the forward-Laplacian fast path
    (``curvkit.pinn._mlp``); anything else goes through ``curvkit.taylor``
    (``taylor_derivatives``). Both are collapsed Taylor mode and differentiable w.r.t. the
    parameters.

    Args:
        f: The function.
        X: Points, shape ``(N, D)``.
        laplacian_dims: Coordinates in the Laplacian (all when None).

    Returns:
        ``Derivatives`` with shapes ``(N,)``, ``(N, D)``, ``(N,)``.

    Raises:
        ValueError: If ``X`` is not 2-d or ``laplacian_dims`` is invalid.
    """
    if not isinstance(X, Tensor) or X.ndim != 2:
        got = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
        raise ValueError(f"derivatives: X must have shape (N, D); got {got}.")
    dims = _check_dims(laplacian_dims, X.shape[1], "derivatives")
    _check_untied(f, "derivatives")
    _check_fits(f, X, "X has", "derivatives")
    structure = mlp_structure(f) if isinstance(f, nn.Module) else None
    if structure is not None:
        return mlp_derivatives(structure, list(f.parameters()), X, dims)
    return taylor_derivatives(f, X, laplacian_dims=dims, caller="derivatives")


# --------------------------------------------------------------------------- residuals
def _check_batch(problem: Problem, batch: Batch, caller: str, model: object = None) -> Batch:
    """Check the points against the problem (and the model); return them as a ``Batch``."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = f"a {type(batch).__name__}" + (
            f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        )
        raise ValueError(
            f"{caller}: batch must be a pair (interior, boundary) of point tensors; got {got}."
        )
    for name, X in zip(("interior", "boundary"), batch):
        if not isinstance(X, Tensor) or X.ndim != 2 or X.shape[1] != problem.dim or X.shape[0] < 1:
            got = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
            raise ValueError(
                f"{caller}: {name} points must have shape (N, {problem.dim}) with N >= 1; "
                f"got {got}."
            )
        # Non-finite points would otherwise surface as a failed Cholesky or a NaN loss.
        bad = int((~torch.isfinite(X)).sum())
        if bad:
            raise ValueError(
                f"{caller}: {name} points must be finite; got {bad} non-finite coordinate(s)."
            )
        _check_fits(model, X, f"{name} points have", caller)
    return Batch(*batch)


def _stack(problem: Problem, batch: Batch, d: Derivatives, u_boundary: Tensor) -> Tensor:
    X_in, X_bd = batch
    r_in = problem.interior_residual(X_in, d)
    r_bd = u_boundary.reshape(-1) - problem.boundary_target(X_bd)
    return torch.cat([r_in / math.sqrt(X_in.shape[0]), r_bd / math.sqrt(X_bd.shape[0])])


def residuals(model: nn.Module, problem: Problem, batch: Batch) -> Tensor:
    """The scaled, stacked residual ``r̃ = [r_Ω / √N_Ω ; r_∂ / √N_∂]``, shape ``(N_Ω + N_∂,)``.

    Differentiable w.r.t. the model's parameters; the loss is ``½‖r̃‖²``.

    Args:
        model: The network, ``(N, D) -> (N,)`` or ``(N, 1)``.
        problem: The PDE problem.
        batch: Interior ``(N_Ω, D)`` and boundary ``(N_∂, D)`` points.

    Returns:
        ``r̃`` of shape ``(N_Ω + N_∂,)``.

    Raises:
        ValueError: If the batch does not match the problem's dimension.
    """
    batch = _check_batch(problem, batch, "residuals", model)
    # The fast path's MLPs act on each point alone. With active dropout (e.g. Adam training a
    # dropout network, which is stochastic by design) the outputs of two calls differ anyway.
    if mlp_structure(model) is None and not any(map(_active_dropout, model.modules())):
        _check_rowwise(model, batch.boundary, "residuals")
    d = derivatives(model, batch.interior, laplacian_dims=problem.laplacian_dims)
    return _stack(problem, batch, d, model(batch.boundary))


def taylor_residuals(
    model: nn.Module, problem: Problem, batch: Batch, *, params: dict[str, Tensor] | None = None
) -> Tensor:
    """``r̃`` by the general path (``curvkit.taylor``) for any model, shape ``(N_Ω + N_∂,)``.

    Args:
        model: The network.
        problem: The PDE problem.
        batch: Collocation points.
        params: Evaluate at these ``{name: tensor}`` parameters instead of the model's own.

    Returns:
        ``r̃``, differentiable w.r.t. the parameters used.

    Raises:
        ValueError: If the batch does not match the problem's dimension.
    """
    return residual_function(model, problem, batch, caller="taylor_residuals")(params)


def residual_function(
    model: nn.Module, problem: Problem, batch: Batch, *, caller: str = "residual_function"
) -> Callable[[dict[str, Tensor] | None], Tensor]:
    """``params -> r̃`` by the general path, capturing the model's graph once for every call.

    Args:
        model: The network.
        problem: The PDE problem.
        batch: Collocation points.
        caller: Name used in error messages.

    Returns:
        A function of ``{name: tensor}`` parameters (None: the model's own) returning ``r̃`` of
        shape ``(N_Ω + N_∂,)``, differentiable w.r.t. the parameters used.

    Raises:
        ValueError: If the batch does not match the problem's dimension.
    """
    _check_batch(problem, batch, caller, model)
    _check_untied(model, caller)
    X_in, X_bd = batch
    op = _operator(model, X_in, _check_dims(problem.laplacian_dims, problem.dim, caller), caller)

    def r() -> Tensor:
        return _stack(problem, batch, _evaluate(op, X_in, caller), model(X_bd))

    def at(params: dict[str, Tensor] | None = None) -> Tensor:
        return r() if params is None else _at(model, params, r)

    return at


def loss(model: nn.Module, problem: Problem, batch: Batch) -> Tensor:
    """``L = ½‖r̃‖² = 1/(2N_Ω) Σ r_Ω² + 1/(2N_∂) Σ r_∂²`` (a scalar, differentiable)."""
    return 0.5 * residuals(model, problem, batch).square().sum()
