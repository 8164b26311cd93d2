"""The Jacobian ``J = ∂r̃/∂θ`` of the stacked PINN residuals, layer by layer, and its kernel.

For a ``Linear`` layer ``z = W a + b`` inside the forward Laplacian, every channel ``c`` (value,
directional derivatives, Laplacian) of the output is ``W a_c`` (plus ``b`` on the value), so the
Jacobian row of point ``n`` w.r.t. ``W`` is ``Σ_c g_{n,c} a_{n,c}ᵀ`` with
``g_{n,c} = ∂r̃_n/∂z_{n,c}`` (one backward pass gives every ``g``), and w.r.t. ``b`` it is
``g_{n,0}`` (spec step 3). Hence

- ``J v``, ``Jᵀ u`` are contractions of ``g`` and ``a`` (no ``N × P`` matrix);
- the layer's kernel block ``J_l J_lᵀ`` is either ``Σ_{c,c'} (g_{n,c}·g_{m,c'})(a_{n,c}·a_{m,c'})
  + g_{n,0}·g_{m,0}`` (small Gram matrices; cheap when ``C² (in + out) < in·out``, e.g. for the
  single-channel boundary points) or ``J_l J_lᵀ`` from that layer's ``N × P_l`` block alone.

``J`` of the whole net is never formed, except by ``to_dense()`` (ENGD needs ``Jᵀ J`` anyway).
Models the forward Laplacian does not support fall back to ``DenseResidualJacobian``: the
residuals by ``curvkit.taylor`` and ``J`` by reverse mode over them, block of points by block.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from curvkit.linalg import LinearOperator
from curvkit.linalg.gram import gram
from curvkit.pinn._mlp import forward_laplacian, mlp_structure
from curvkit.pinn.base import Batch, Derivatives, Problem, _check_dims
from curvkit.pinn.residuals import (
    _check_batch,
    _check_deterministic,
    _check_rowwise,
    _check_untied,
    _evaluate,
    _operator,
)

__all__ = ["ResidualJacobian", "DenseResidualJacobian", "linearize"]

# Intermediate Gram blocks are computed in row chunks of at most this many entries (8 MiB in
# float64): fresh buffers of hundreds of MB cost more in first-touch page faults than their
# products (the 5-d Poisson kernel took 4.5 s with 256 MiB chunks, 3.8 s with these).
_CHUNK_ENTRIES = 1 << 20
# ``cache_blocks`` keeps the per-layer blocks only while the whole J fits in this many bytes.
_CACHE_BYTES = 1 << 30


class ResidualJacobian(LinearOperator):
    """``J = ∂r̃/∂θ`` of shape ``(N, P)`` at the current parameters, stored per layer.

    Build it with ``linearize``. Holds the residual ``r̃`` (``residual``, ``(N,)``) and, per
    ``Linear`` layer and per point group (interior, boundary), the input channels
    ``a: (N_g, C_g, in)`` and backpropagated output gradients ``g: (N_g, C_g, out)``.
    Products accept flat ``(P, k)`` blocks or lists shaped like the parameters.
    """

    def __init__(self, residual: Tensor, layers: list[dict], param_shapes: list[torch.Size]):
        P = sum(math.prod(s) for s in param_shapes)
        super().__init__(
            (residual.shape[0], P),
            dtype=residual.dtype,
            device=residual.device,
            in_shapes=param_shapes,
        )
        self.residual = residual
        self.layers = (
            layers  # each: {"a": [per group], "g": [...], "bias": bool, "sizes": (out, in)}
        )
        self.group_sizes = [a.shape[0] for a in layers[0]["a"]]
        self._blocks: list[Tensor] | None = None

    # ------------------------------------------------------------------ per-layer blocks
    def cache_blocks(self) -> bool:
        """Keep every layer's ``(N, P_l)`` block for repeated products with many columns.

        Solvers that apply ``J`` and ``Jᵀ`` several times per step (the randomized kernel
        solves) then build each block once instead of once per product. Skipped, returning
        False, when the whole ``J`` would exceed ``_CACHE_BYTES`` (1 GiB).
        """
        if self._blocks is None:
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            if math.prod(self.shape) * itemsize > _CACHE_BYTES:
                return False
            self._blocks = [self._layer_block(layer) for layer in self.layers]
        return True

    def _block(self, index: int) -> Tensor:
        if self._blocks is not None:
            return self._blocks[index]
        return self._layer_block(self.layers[index])

    def _layer_block(self, layer: dict) -> Tensor:
        """That layer's ``(N, P_l)`` Jacobian block: ``[vec(Σ_c g_c a_cᵀ), g_0]`` per row."""
        rows = []
        for a, g in zip(layer["a"], layer["g"]):
            Jw = torch.einsum("nco,nci->noi", g, a).reshape(a.shape[0], -1)
            rows.append(torch.cat([Jw, g[:, 0]], dim=1) if layer["bias"] else Jw)
        return torch.cat(rows, dim=0)

    def _split(self, X: Tensor) -> list[tuple[Tensor, Tensor | None]]:
        """Split a ``(P, k)`` block into per-layer ``(W: (out, in, k), b: (out, k) | None)``."""
        out, start = [], 0
        for layer in self.layers:
            o, i = layer["sizes"]
            W = X[start : start + o * i].reshape(o, i, -1)
            start += o * i
            b = None
            if layer["bias"]:
                b = X[start : start + o]
                start += o
            out.append((W, b))
        return out

    def _matmat(self, X: Tensor) -> Tensor:  # (P, k) -> (N, k)
        result = X.new_zeros(self.shape[0], X.shape[1])
        start = 0
        for index, (layer, (W, b)) in enumerate(zip(self.layers, self._split(X))):
            C = max(a.shape[1] for a in layer["a"])
            P_l = W.shape[0] * W.shape[1] + (0 if b is None else b.shape[0])
            start += P_l
            # Many columns (or a cached block): one (N, P_l) block and a matmul is cheaper.
            if self._blocks is not None or X.shape[1] > C:
                result.addmm_(self._block(index), X[start - P_l : start])
                continue
            parts = []
            for a, g in zip(layer["a"], layer["g"]):
                # (J v)_n = Σ_c g_{n,c}ᵀ W a_{n,c} + g_{n,0}ᵀ b
                Wa = torch.einsum("nci,oik->ncok", a, W)
                y = torch.einsum("nco,ncok->nk", g, Wa)
                if b is not None:
                    y = y + g[:, 0] @ b
                parts.append(y)
            result += torch.cat(parts, dim=0)
        return result

    def _rmatmat(self, Y: Tensor) -> Tensor:  # (N, k) -> (P, k)
        blocks = []
        for index, layer in enumerate(self.layers):
            C = max(a.shape[1] for a in layer["a"])
            if self._blocks is not None or Y.shape[1] > C:
                blocks.append(self._block(index).T @ Y)
                continue
            W = 0
            b = 0
            start = 0
            for a, g in zip(layer["a"], layer["g"]):
                U = Y[start : start + a.shape[0]]
                start += a.shape[0]
                # Jᵀu for W: Σ_n u_n Σ_c g_{n,c} a_{n,c}ᵀ
                W = W + torch.einsum("nk,nco,nci->oik", U, g, a)
                if layer["bias"]:
                    b = b + g[:, 0].T @ U
            o, i = layer["sizes"]
            blocks.append(W.reshape(o * i, -1))
            if layer["bias"]:
                blocks.append(b)
        return torch.cat(blocks, dim=0)

    def to_dense(self) -> Tensor:
        """The ``(N, P)`` Jacobian, built from the per-layer blocks."""
        return torch.cat([self._block(i) for i in range(len(self.layers))], dim=1)

    # ------------------------------------------------------------------ kernel
    def kernel(self, *, method: str = "auto") -> Tensor:
        """The sample-space kernel ``K = J Jᵀ = Σ_l J_l J_lᵀ``, shape ``(N, N)``.

        Args:
            method: ``"auto"`` picks, per layer and pair of point groups, the cheaper of
                ``"gram"`` (contract Gram matrices of ``g`` and ``a``) and ``"block"``
                (``J_l J_lᵀ`` from the layer's Jacobian block); either may be forced.

        Returns:
            ``K`` of shape ``(N, N)``, symmetric positive semi-definite.

        Raises:
            ValueError: For an unknown method.
        """
        if method not in ("auto", "gram", "block"):
            raise ValueError(
                "ResidualJacobian.kernel: method must be 'auto', 'gram' or 'block'; "
                f"got {method!r}."
            )
        N = self.shape[0]
        K = self.residual.new_zeros(N, N)
        offsets = [0]
        for n in self.group_sizes:
            offsets.append(offsets[-1] + n)
        for layer in self.layers:
            o, i = layer["sizes"]
            P_l = o * i + (o if layer["bias"] else 0)
            blocks: list[Tensor | None] = [None] * len(self.group_sizes)
            for gi, (ai, gri) in enumerate(zip(layer["a"], layer["g"])):
                for gj, (aj, grj) in enumerate(zip(layer["a"], layer["g"])):
                    if gj < gi:
                        continue
                    use_gram = method == "gram" or (
                        method == "auto" and ai.shape[1] * aj.shape[1] * (o + i) < P_l
                    )
                    rows = slice(offsets[gi], offsets[gi + 1])
                    cols = slice(offsets[gj], offsets[gj + 1])
                    if use_gram:
                        block = _gram_block(ai, gri, aj, grj, layer["bias"])
                    else:
                        for g_ in {gi, gj}:
                            if blocks[g_] is None:
                                blocks[g_] = _group_block(
                                    layer["a"][g_], layer["g"][g_], layer["bias"]
                                )
                        if gi == gj:
                            block = gram(blocks[gi].T)
                        else:
                            block = blocks[gi] @ blocks[gj].T
                    K[rows, cols] += block
                    if gj != gi:
                        K[cols, rows] += block.T
        return K


def _group_block(a: Tensor, g: Tensor, bias: bool) -> Tensor:
    Jw = torch.einsum("nco,nci->noi", g, a).reshape(a.shape[0], -1)
    return torch.cat([Jw, g[:, 0]], dim=1) if bias else Jw


def _gram_block(ai: Tensor, gi: Tensor, aj: Tensor, gj: Tensor, bias: bool) -> Tensor:
    """``Σ_{c,c'} (g_{n,c}·g_{m,c'}) (a_{n,c}·a_{m,c'}) [+ g_{n,0}·g_{m,0}]``, ``(N_i, N_j)``."""
    Ni, Ci, _ = ai.shape
    Nj, Cj, _ = aj.shape
    A_j = aj.reshape(Nj * Cj, -1)
    G_j = gj.reshape(Nj * Cj, -1)
    chunk = max(1, _CHUNK_ENTRIES // max(1, Ci * Nj * Cj))
    out = []
    for start in range(0, Ni, chunk):
        a = ai[start : start + chunk]
        g = gi[start : start + chunk]
        n = a.shape[0]
        AA = (a.reshape(n * Ci, -1) @ A_j.T).reshape(n, Ci, Nj, Cj)
        GG = (g.reshape(n * Ci, -1) @ G_j.T).reshape(n, Ci, Nj, Cj)
        block = (AA * GG).sum(dim=(1, 3))
        if bias:
            block = block + g[:, 0] @ gj[:, 0].T
        out.append(block)
    return torch.cat(out, dim=0)


class DenseResidualJacobian(LinearOperator):
    """``J`` of shape ``(N, P)`` as a dense matrix (any model).

    The general path, for models the forward Laplacian does not support: ``r̃`` by
    ``curvkit.taylor`` and ``J`` by reverse mode over it, batched over rows of the identity.
    """

    def __init__(self, residual: Tensor, J: Tensor, param_shapes: list[torch.Size]):
        super().__init__(tuple(J.shape), dtype=J.dtype, device=J.device, in_shapes=param_shapes)
        self.residual, self.J = residual, J

    def _matmat(self, X):
        return self.J @ X

    def _rmatmat(self, Y):
        return self.J.T @ Y

    def to_dense(self) -> Tensor:  # noqa: D102
        return self.J

    def kernel(self, *, method: str = "auto") -> Tensor:
        """``J Jᵀ``, shape ``(N, N)`` (``method`` is accepted for interface parity)."""
        return self.J @ self.J.T


# The general path differentiates the residuals of this many points at a time: one vmapped
# backward pass over a block's graph per block, so J costs O(N · block) point-passes, not O(N²).
_POINTS_PER_BLOCK = 64


def _dense_linearize(model: nn.Module, problem: Problem, batch: Batch,
                     params: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``r̃`` and the dense ``J = ∂r̃/∂θ`` by ``curvkit.taylor`` and reverse mode, for any model.

    Residuals of different points do not interact, so ``J`` is built block of points by block of
    points: the block's residuals by collapsed Taylor mode, its rows of ``J`` by one backward
    pass batched over the rows of the identity.
    """
    X_in, X_bd = batch
    op = _operator(model, X_in, _check_dims(problem.laplacian_dims, problem.dim, "linearize"),
                   "linearize")
    r_blocks, J_blocks = [], []
    for X, interior in ((X_in, True), (X_bd, False)):
        scale = math.sqrt(X.shape[0])
        for start in range(0, X.shape[0], _POINTS_PER_BLOCK):
            Xb = X[start : start + _POINTS_PER_BLOCK]
            with torch.enable_grad():
                if interior:
                    r = problem.interior_residual(Xb, _evaluate(op, Xb, "linearize")) / scale
                else:
                    r = (model(Xb).reshape(-1) - problem.boundary_target(Xb)) / scale
                seeds = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)
                grads = torch.autograd.grad(r, params, grad_outputs=seeds, is_grads_batched=True,
                                            allow_unused=True, materialize_grads=True)
            r_blocks.append(r.detach())
            J_blocks.append(torch.cat([g.reshape(r.shape[0], -1) for g in grads], dim=1))
    return torch.cat(r_blocks), torch.cat(J_blocks)


def linearize(
    model: nn.Module, problem: Problem, batch: Batch, *, dense: bool = False
) -> ResidualJacobian | DenseResidualJacobian:
    """Residuals ``r̃`` and their Jacobian ``J = ∂r̃/∂θ`` at the model's current parameters.

    Args:
        model: The network; trainable parameters define ``θ`` (in ``model.parameters()`` order).
        problem: The PDE problem.
        batch: Interior and boundary points.
        dense: Take the general path (``curvkit.taylor`` residuals, dense ``J``) even for a
            ``Sequential`` MLP that the layer-wise Jacobian supports.

    Returns:
        A ``(N, P)`` operator with ``.residual`` (``(N,)``) and ``.kernel()``.

    Raises:
        ValueError: If the batch does not match the problem.
    """
    return linearize_checked(model, problem, _check_batch(problem, batch, "linearize", model),
                             dense=dense)


def linearize_checked(model: nn.Module, problem: Problem, batch: Batch, *, dense: bool = False
                      ) -> ResidualJacobian | DenseResidualJacobian:
    """``linearize`` of a batch its caller has checked (``residuals._check_batch``)."""
    _check_untied(model, "linearize")
    params = [p for p in model.parameters() if p.requires_grad]
    shapes = [p.shape for p in params]
    structure = None if dense else mlp_structure(model)
    if structure is None:
        # Only here: the fast path's exact layer types exclude dropout.
        _check_deterministic(model, "linearize")
        _check_rowwise(model, batch[1], "linearize")
        return DenseResidualJacobian(*_dense_linearize(model, problem, batch, params), shapes)

    detached = [p.detach() for p in params]
    X_in, X_bd = batch
    with torch.enable_grad():
        Y_in, cap_in = forward_laplacian(
            structure, detached, X_in, laplacian_dims=problem.laplacian_dims, capture=True
        )
        Y_bd, cap_bd = forward_laplacian(structure, detached, X_bd, order=0, capture=True)
        d = Derivatives(Y_in[:, 0, 0], Y_in[:, 1:-1, 0], Y_in[:, -1, 0])
        r_in = problem.interior_residual(X_in, d) / math.sqrt(X_in.shape[0])
        r_bd = (Y_bd[:, 0, 0] - problem.boundary_target(X_bd)) / math.sqrt(X_bd.shape[0])
        # Residuals of different points do not interact, so the gradient of the sum w.r.t. each
        # layer output holds every point's own backpropagated vector g_{n,c}.
        g_in = torch.autograd.grad(r_in.sum(), [z for _, z in cap_in])
        g_bd = torch.autograd.grad(r_bd.sum(), [z for _, z in cap_bd])
    layers = []
    for (out, inp, bias), (a_i, _), gi, (a_b, _), gb in zip(
        structure.linear_shapes, cap_in, g_in, cap_bd, g_bd
    ):
        layers.append(
            {"a": [a_i.detach(), a_b.detach()], "g": [gi, gb], "bias": bias, "sizes": (out, inp)}
        )
    return ResidualJacobian(torch.cat([r_in, r_bd]).detach(), layers, shapes)
