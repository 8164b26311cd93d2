"""PINN residuals: derivatives of the network by collapsed Taylor mode, scaled and stacked.

The interior residual needs the network's value, gradient and Laplacian at every point. For a
``Sequential`` MLP of ``Linear`` layers and elementwise activations these come from the forward
Laplacian (collapsed second-order Taylor mode, Li et al. 2023; Dangel et al. 2025), which pushes
``C = 2 + D`` channels through every layer — the value, the ``D`` directional derivatives along
the unit vectors and the summed second-order coefficient — instead of ``1 + 2D``. The same pass
records every ``Linear`` layer's input channels, which the layer-wise Jacobian in
``curvkit.pinn.jacobian`` needs. Any other model is differentiated by ``torch.func`` (nested
reverse mode), which is also the independent reference in the tests.

The residual vector is scaled so that the loss is ``½‖r̃‖²`` (spec step 1):
``r̃ = [r_Ω / √N_Ω ; r_∂ / √N_∂]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap

from curvkit.pinn.problems import Batch, Derivatives, Problem

__all__ = [
    "derivatives",
    "forward_laplacian",
    "mlp_structure",
    "residuals",
    "loss",
]


# --------------------------------------------------------------------------- activations
def _tanh(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t = torch.tanh(z)
    d1 = 1 - t * t
    return t, d1, -2 * t * d1


def _sigmoid(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(z)
    d1 = s * (1 - s)
    return s, d1, d1 * (1 - 2 * s)


def _sin(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sin(z)
    return s, torch.cos(z), -s


def _identity(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return z, torch.ones_like(z), torch.zeros_like(z)


# Activation -> (φ, φ', φ'') evaluated at once; the Taylor rules below need all three.
_ACTIVATIONS: dict[type, Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]] = {
    nn.Tanh: _tanh,
    nn.Sigmoid: _sigmoid,
    nn.Identity: _identity,
}


class Sin(nn.Module):
    """Elementwise ``sin``, supported by the forward Laplacian (a common PINN activation)."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return torch.sin(x)


_ACTIVATIONS[Sin] = _sin


@dataclass(frozen=True)
class MLPStructure:
    """The layer sequence of a supported ``Sequential``.

    ``ops`` holds ``("linear", (weight_index, bias_index))`` and ``("act", fn)`` entries; the
    indices point into the model's parameter list (``bias_index`` is None without a bias).
    """

    ops: tuple[tuple[str, object], ...]
    linear_shapes: tuple[tuple[int, int, bool], ...]  # (out, in, has_bias) per Linear


def mlp_structure(model: nn.Module) -> MLPStructure | None:
    """The structure of ``model`` if the forward Laplacian supports it, else None.

    Supported: an ``nn.Sequential`` of ``nn.Linear``, ``nn.Tanh``, ``nn.Sigmoid``, ``Sin`` and
    ``nn.Identity`` whose last ``Linear`` has one output, with every parameter trainable.
    """
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        return None
    ops: list[tuple[str, object]] = []
    shapes: list[tuple[int, int, bool]] = []
    index = 0
    for layer in model:
        if isinstance(layer, nn.Linear):
            if not all(p.requires_grad for p in layer.parameters()):
                return None
            has_bias = layer.bias is not None
            ops.append(("linear", (index, index + 1 if has_bias else None)))
            shapes.append((layer.out_features, layer.in_features, has_bias))
            index += 2 if has_bias else 1
        elif type(layer) in _ACTIVATIONS:
            ops.append(("act", _ACTIVATIONS[type(layer)]))
        else:
            return None
    if not shapes or shapes[-1][0] != 1 or ops[0][0] != "linear":
        return None
    return MLPStructure(tuple(ops), tuple(shapes))


# --------------------------------------------------------------------------- forward Laplacian
def forward_laplacian(
    structure: MLPStructure,
    params: Sequence[Tensor],
    X: Tensor,
    *,
    laplacian_dims: Sequence[int] | None = None,
    order: int = 2,
    capture: bool = False,
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """Propagate collapsed Taylor channels through a ``Linear``/activation MLP.

    Channels along axis 1: ``0`` the value; ``1..D`` the derivatives along ``e_1..e_D`` (with
    ``order >= 1``); ``D + 1`` the Laplacian over ``laplacian_dims`` (with ``order == 2``). An
    elementwise ``φ`` maps ``(v, d_i, s)`` to ``(φ(v), φ'(v) d_i, φ'(v) s + φ''(v) Σ_{i∈S} d_i²)``
    (the collapsed 2-jet rule); a ``Linear`` applies ``W`` to every channel and adds the bias to
    the value only.

    Args:
        structure: From ``mlp_structure(model)``.
        params: The model's parameters in ``model.parameters()`` order (may be any tensors with
            those shapes, e.g. detached copies or ``torch.func`` batched tensors).
        X: Points, shape ``(N, D)``.
        laplacian_dims: Coordinates in the Laplacian (all when None).
        order: 0 (value only), 1 (value and gradient) or 2 (value, gradient, Laplacian).
        capture: Also return every ``Linear`` layer's ``(input channels (N, C, in), output
            channels (N, C, out))`` — the outputs are graph nodes when the caller differentiates.

    Returns:
        ``(Y, captured)`` with ``Y`` of shape ``(N, C, 1)``, ``C = 1``, ``1 + D`` or ``2 + D``.
    """
    N, D = X.shape
    channels = [X.unsqueeze(1)]
    if order >= 1:
        channels.append(torch.eye(D, dtype=X.dtype, device=X.device).expand(N, D, D))
    if order >= 2:
        channels.append(X.new_zeros(N, 1, D))
    H = torch.cat(channels, dim=1)  # (N, C, D)
    C = H.shape[1]
    bias_mask = X.new_zeros(C, 1)
    bias_mask[0] = 1.0
    mask = None
    if order >= 2:
        mask = X.new_zeros(D, 1)
        mask[list(range(D)) if laplacian_dims is None else list(laplacian_dims)] = 1.0
    captured: list[tuple[Tensor, Tensor]] = []
    first = True
    for kind, item in structure.ops:
        if kind == "linear":
            w_index, b_index = item
            Z = H @ params[w_index].T
            if b_index is not None:
                Z = Z + bias_mask * params[b_index]
            if capture:
                if first:
                    # The first output is a leaf, so that gradients w.r.t. every layer's output
                    # exist even when the parameters and X do not require grad.
                    Z = Z.detach().requires_grad_(True)
                captured.append((H, Z))
            first = False
            H = Z
        else:
            f0, f1, f2 = item(H[:, 0])
            parts = [f0.unsqueeze(1)]
            if order >= 1:
                grads = H[:, 1 : 1 + D]
                parts.append(f1.unsqueeze(1) * grads)
            if order >= 2:
                second = (grads.square() * mask).sum(dim=1)  # Σ_{i∈S} d_i²
                parts.append((f1 * H[:, -1] + f2 * second).unsqueeze(1))
            H = torch.cat(parts, dim=1)
    return H, captured


def _mlp_derivatives(structure: MLPStructure, params: Sequence[Tensor], X: Tensor,
                     laplacian_dims: Sequence[int] | None, order: int = 2) -> Derivatives:
    """Value, gradient and Laplacian by the forward Laplacian, with the channels kept apart.

    Same arithmetic as ``forward_laplacian`` but without concatenating channels or multiplying
    the identity directions into the first layer (its directional derivatives are ``Wᵀ``
    broadcast over the batch): the line search evaluates this 31 times per step.
    """
    N, D = X.shape
    value, grads, lap = X, None, None  # grads: (N | 1, D, width); lap: (N | 1, width)
    first = True
    subset = None if laplacian_dims is None or len(laplacian_dims) == D else list(laplacian_dims)
    for kind, item in structure.ops:
        if kind == "linear":
            w_index, b_index = item
            W = params[w_index]
            value = value @ W.T
            if b_index is not None:
                value = value + params[b_index]
            if order >= 1:
                grads = W.T.unsqueeze(0) if first else grads @ W.T
            if order >= 2:
                lap = None if first else lap @ W.T  # the input has no second-order part
            first = False
        else:
            f0, f1, f2 = item(value)
            value = f0
            if order >= 1:
                if order >= 2:
                    sq = grads if subset is None else grads[:, subset]
                    second = f2 * sq.square().sum(dim=1)
                    lap = second if lap is None else f1 * lap + second
                grads = f1.unsqueeze(1) * grads
    value = value.reshape(N)
    gradient = grads.expand(N, D, 1).reshape(N, D) if order >= 1 else None
    laplacian = None
    if order >= 2:
        laplacian = X.new_zeros(N) if lap is None else lap.expand(N, 1).reshape(N)
    return Derivatives(value, gradient, laplacian)


# --------------------------------------------------------------------------- generic path
def _scalar(f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda x: f(x.unsqueeze(0)).reshape(())


def derivatives(
    f: Callable[[Tensor], Tensor], X: Tensor, *, laplacian_dims: Sequence[int] | None = None
) -> Derivatives:
    """Value, gradient and (partial) Laplacian of a scalar function on a batch.

    ``f`` maps ``(N, D)`` to ``(N,)`` or ``(N, 1)`` row by row (an ``nn.Module`` or a plain
    function). Supported MLPs use the forward Laplacian; anything else uses ``torch.func``
    (a vmapped ``jacrev`` and ``hessian``), which stays differentiable w.r.t. parameters that
    ``f`` closes over.

    Args:
        f: The function.
        X: Points, shape ``(N, D)``.
        laplacian_dims: Coordinates in the Laplacian (all when None).

    Returns:
        ``Derivatives`` with shapes ``(N,)``, ``(N, D)``, ``(N,)``.

    Raises:
        ValueError: If ``X`` is not 2-d.
    """
    if X.ndim != 2:
        raise ValueError(f"derivatives: X must have shape (N, D); got {tuple(X.shape)}.")
    structure = mlp_structure(f) if isinstance(f, nn.Module) else None
    if structure is not None:
        return _mlp_derivatives(structure, list(f.parameters()), X, laplacian_dims)
    g = _scalar(f)
    value = f(X).reshape(-1)
    gradient = vmap(jacrev(g))(X)
    H = vmap(hessian(g))(X)
    idx = list(range(X.shape[1])) if laplacian_dims is None else list(laplacian_dims)
    laplacian = H.diagonal(dim1=1, dim2=2)[:, idx].sum(dim=1)
    return Derivatives(value, gradient, laplacian)


# --------------------------------------------------------------------------- residuals
def _check_batch(problem: Problem, batch: Batch, caller: str) -> None:
    for name, X in zip(("interior", "boundary"), batch):
        if not isinstance(X, Tensor) or X.ndim != 2 or X.shape[1] != problem.dim or X.shape[0] < 1:
            got = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
            raise ValueError(
                f"{caller}: {name} points must have shape (N, {problem.dim}) with N >= 1; "
                f"got {got}."
            )


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
    _check_batch(problem, batch, "residuals")
    X_in, X_bd = batch
    d = derivatives(model, X_in, laplacian_dims=problem.laplacian_dims)
    r_in = problem.residual(X_in, d)
    r_bd = model(X_bd).reshape(-1) - problem.boundary_target(X_bd)
    return torch.cat([r_in / math.sqrt(X_in.shape[0]), r_bd / math.sqrt(X_bd.shape[0])])


def loss(model: nn.Module, problem: Problem, batch: Batch) -> Tensor:
    """``L = ½‖r̃‖² = 1/(2N_Ω) Σ r_Ω² + 1/(2N_∂) Σ r_∂²`` (a scalar, differentiable)."""
    return 0.5 * residuals(model, problem, batch).square().sum()


def functional_residuals(
    model: nn.Module, problem: Problem, batch: Batch
) -> Callable[[dict[str, Tensor]], Tensor]:
    """``params -> r̃`` by ``torch.func`` nested autograd; the independent reference path.

    Args:
        model: The network (any architecture).
        problem: The PDE problem.
        batch: Collocation points.

    Returns:
        A function of a ``{name: tensor}`` parameter dict returning ``r̃`` of shape ``(N,)``.
    """
    _check_batch(problem, batch, "functional_residuals")
    X_in, X_bd = batch
    idx = list(problem.laplacian_index)

    def r(params: dict[str, Tensor]) -> Tensor:
        def u(x: Tensor) -> Tensor:  # one point (D,) -> scalar
            return functional_call(model, params, (x.unsqueeze(0),)).reshape(())

        value = vmap(u)(X_in)
        gradient = vmap(jacrev(u))(X_in)
        lap = vmap(hessian(u))(X_in).diagonal(dim1=1, dim2=2)[:, idx].sum(dim=1)
        r_in = problem.residual(X_in, Derivatives(value, gradient, lap))
        r_bd = vmap(u)(X_bd) - problem.boundary_target(X_bd)
        return torch.cat([r_in / math.sqrt(X_in.shape[0]), r_bd / math.sqrt(X_bd.shape[0])])

    return r
