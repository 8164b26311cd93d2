"""The layer-capturing forward Laplacian for ``Sequential`` MLPs (the PINN fast path).

This is a specialised instance of the collapsed second-order Taylor rule that
``curvkit.taylor`` implements for any captured ATen graph (Li et al. 2023; Dangel et al. 2025):
``C = 2 + D`` channels per point — the value, the ``D`` directional derivatives along the unit
vectors and the summed second-order coefficient — through every layer; an elementwise ``φ`` maps
``(v, d_i, s)`` to ``(φ(v), φ'(v) d_i, φ'(v) s + φ''(v) Σ_{i∈S} d_i²)`` and a ``Linear`` applies
``W`` to every channel (the bias to the value only). The activation derivatives ``φ, φ', φ''``
are ``curvkit.taylor``'s own tables (``curvkit.taylor._series``); the tests check that both
implementations agree to round-off.

Why it exists next to ``curvkit.taylor``:

- **Capture.** ``linearize`` needs every ``Linear`` layer's input channels and the gradients
  w.r.t. its output channels to build the layer-wise Jacobian and kernel
  (``curvkit.pinn.jacobian``) without materialising ``J``; the generic interpreter of
  ``curvkit.taylor`` does not expose per-layer channels.
- **Speed.** The channels stay separate tensors (no packed concatenation per layer), and the
  first layer's directional derivatives are ``Wᵀ`` broadcast over the batch (the identity seed is
  never multiplied). Measured on the benchmark network 5→64→64→48→48→1, 3000 points, float64,
  ``OMP_NUM_THREADS=1``, interleaved in one process, medians of 11–15 repeats (2026-11-28, on
  the loaded 2-core box): value + gradient + Laplacian without autograd 125–147 ms here vs
  360 ms by a reused ``curvkit.taylor.laplacian`` operator (423 ms including its capture), and
  295–410 ms vs 640–700 ms with a backward pass, i.e. 2–3× faster; the line search evaluates
  this 31 times per step.

Models that are not such a ``Sequential`` take the general path in ``curvkit.pinn.residuals``
(``curvkit.taylor``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvkit.pinn.base import Derivatives
from curvkit.taylor import _series

__all__ = ["MLPStructure", "Sin", "forward_laplacian", "mlp_derivatives", "mlp_structure"]


class Sin(nn.Module):
    """Elementwise ``sin``, supported by the forward Laplacian (a common PINN activation)."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return torch.sin(x)


# Activation -> curvkit.taylor's derivative table [φ, φ', φ''] (the same functions its Faà di
# Bruno rule uses for aten.tanh / aten.sigmoid / aten.sin).
_ACTIVATIONS: dict[type, Callable[[Tensor, int], list]] = {
    nn.Tanh: _series.tanh_derivatives,
    nn.Sigmoid: _series.sigmoid_derivatives,
    Sin: _series.sin_derivatives,
}


def _activation(table: Callable[[Tensor, int], list]) -> Callable[[Tensor], tuple]:
    def derivatives(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        f0, f1, f2 = table(z, 2)
        return f0, f1, f2

    return derivatives


@dataclass(frozen=True)
class MLPStructure:
    """The layer sequence of a supported ``Sequential``.

    ``ops`` holds ``("linear", (weight_index, bias_index))`` and ``("act", fn)`` entries; the
    indices point into the model's parameter list (``bias_index`` is None without a bias) and
    ``fn(z)`` returns ``(φ(z), φ'(z), φ''(z))``.
    """

    ops: tuple[tuple[str, object], ...]
    linear_shapes: tuple[tuple[int, int, bool], ...]  # (out, in, has_bias) per Linear


def _hooked(module: nn.Module) -> bool:
    """Whether hooks or an instance ``forward`` may change what the module computes.

    Forward hooks (the module's own or global ones), or a ``forward`` assigned to the instance
    (``layer.forward = ...``, which the exact-type checks cannot see).
    """
    from torch.nn.modules import module as _module

    return bool(
        "forward" in vars(module)
        or module._forward_hooks
        or module._forward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
    )


def mlp_structure(model: nn.Module) -> MLPStructure | None:
    """The structure of ``model`` if the forward Laplacian supports it, else None.

    Supported: an ``nn.Sequential`` of ``nn.Linear``, ``nn.Tanh``, ``nn.Sigmoid``, ``Sin`` and
    ``nn.Identity`` (skipped) — exactly these types, without forward hooks — whose first layer
    is a ``Linear`` and whose last ``Linear`` has one output, with every parameter trainable and
    no ``Linear`` used twice.
    """
    if type(model) is not nn.Sequential or len(model) == 0 or _hooked(model):
        return None
    ops: list[tuple[str, object]] = []
    shapes: list[tuple[int, int, bool]] = []
    index = 0
    seen: set[int] = set()
    for layer in model:
        if _hooked(layer):
            return None
        # Exact types: a subclass (or a parametrized Linear, which is one) may compute
        # something else than the formula below from its weights.
        if type(layer) is nn.Linear:
            # A reused Linear shares parameters, which model.parameters() lists only once: the
            # per-occurrence indices below would be wrong (the general path handles sharing).
            if id(layer) in seen or not all(p.requires_grad for p in layer.parameters()):
                return None
            seen.add(id(layer))
            has_bias = layer.bias is not None
            ops.append(("linear", (index, index + 1 if has_bias else None)))
            shapes.append((layer.out_features, layer.in_features, has_bias))
            index += 2 if has_bias else 1
        elif type(layer) in _ACTIVATIONS:
            ops.append(("act", _activation(_ACTIVATIONS[type(layer)])))
        elif type(layer) is not nn.Identity:
            return None
    if not shapes or shapes[-1][0] != 1 or ops[0][0] != "linear":
        return None
    return MLPStructure(tuple(ops), tuple(shapes))


def forward_laplacian(
    structure: MLPStructure,
    params: Sequence[Tensor],
    X: Tensor,
    *,
    laplacian_dims: Sequence[int] | None = None,
    order: int = 2,
    capture: bool = False,
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """Propagate the collapsed Taylor channels, optionally capturing every ``Linear`` layer.

    The layer-capturing instance of ``curvkit.taylor``'s collapsed 2-jet rule (module docs).

    Channels along axis 1: ``0`` the value; ``1..D`` the derivatives along ``e_1..e_D`` (with
    ``order >= 1``); ``D + 1`` the Laplacian over ``laplacian_dims`` (with ``order == 2``).

    Args:
        structure: From ``mlp_structure(model)``.
        params: The model's parameters in ``model.parameters()`` order (may be any tensors with
            those shapes, e.g. detached copies).
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


# Points per chunk of ``mlp_derivatives``: its largest temporaries, the directional derivatives
# ``(rows, D, width)``, stay within about 1 MiB, so that each layer's products and activations
# run in cache instead of streaming fresh buffers (each first touched through page faults).
# Measured on the benchmark network, float64, one thread, no autograd (2026-11-28): 3000 points
# in 5-d 54 -> 32 ms, in 10-d 106 -> 42 ms; 1000 points in 100-d 523 -> 103 ms; budgets of
# 256 KiB (Python overhead per chunk) and 4 MiB were slower.
_CHUNK_BYTES = 1 << 20


def _chunk_rows(structure: MLPStructure, X: Tensor) -> int:
    if X.device.type != "cpu":
        # Chunks help a CPU's cache; on an accelerator they only add kernel launches (each
        # chunk one per layer op): one pass, as its memory allows.
        return max(1, X.shape[0])
    width = max(max(out, in_) for out, in_, _ in structure.linear_shapes)
    return max(1, _CHUNK_BYTES // max(1, X.shape[1] * width * X.element_size()))


def mlp_derivatives(
    structure: MLPStructure,
    params: Sequence[Tensor],
    X: Tensor,
    laplacian_dims: Sequence[int] | None,
    order: int = 2,
) -> Derivatives:
    """Value, gradient and Laplacian by the forward Laplacian, with the channels kept apart.

    The fast instance of ``curvkit.taylor``'s collapsed 2-jet rule (module docs give the timing).

    Same arithmetic as ``forward_laplacian`` without concatenating channels or multiplying the
    identity directions into the first layer (its directional derivatives are ``Wᵀ`` broadcast
    over the batch). Differentiable w.r.t. ``params``.

    Returns:
        ``Derivatives`` with shapes ``(N,)``, ``(N, D)``, ``(N,)`` (gradient / Laplacian None
        below their order). Large batches run in row chunks (``_CHUNK_BYTES``).
    """
    N, D = X.shape
    rows = _chunk_rows(structure, X)
    if N > rows:
        parts = [mlp_derivatives(structure, params, x, laplacian_dims, order)
                 for x in X.split(rows)]
        return Derivatives(*(None if p[0] is None else torch.cat(p) for p in zip(*parts)))
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
                # Contiguous: a transposed view would pass its layout on to f1 * grads, whose
                # next product would then run as N tiny batched matmuls instead of one GEMM.
                grads = W.T.contiguous().unsqueeze(0) if first else grads @ W.T
            if order >= 2:
                lap = None if lap is None else lap @ W.T  # no activation yet: no 2nd order
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
