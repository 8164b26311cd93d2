"""Shampoo with eigenbasis roots and Adam grafting."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor

from curvkit.optim._basis import gram_ema, rotate
from curvkit.optim._common import adam_direction, check_choice, check_range
from curvkit.optim._kronecker import KroneckerOptimizer, _Context

__all__ = ["Shampoo", "graft", "shampoo_direction"]


def shampoo_direction(M_rot: Tensor, eigenvalues: dict[int, Tensor], *, exponent: float,
                      eps: float) -> Tensor:
    """Shampoo's preconditioned momentum in rotated coordinates.

    For a matrix, ``(L + εI)^{-e} M (R + εI)^{-e}`` with ``L = Q_L Λ_L Q_Lᵀ`` becomes, in rotated
    coordinates, the elementwise product ``M̃ ⊙ (λ_L + ε)^{-e} ⊗ (λ_R + ε)^{-e}``.

    Args:
        M_rot: Momentum in rotated coordinates ``M̃``, any order ``n``.
        eigenvalues: ``{axis: λ_k (d_k,)}`` for the preconditioned axes (non-negative).
        exponent: The per-side exponent ``e`` (``1/4`` for matrices by default).
        eps: ``ε`` added to every eigenvalue; an eigenvalue that is still 0 (``ε = 0``) is left
            out (pseudo-inverse).

    Returns:
        Tensor shaped like ``M_rot``.
    """
    out = M_rot
    for axis, lam in eigenvalues.items():
        shape = [1] * M_rot.dim()
        shape[axis] = -1
        shifted = lam + eps
        # a zero eigenvalue (eps = 0, rank-deficient factor) is dropped, as a pseudo-inverse
        # does, instead of turning the round-off in its direction into inf or nan
        root = torch.where(shifted > 0, shifted.pow(-exponent), torch.zeros_like(shifted))
        out = out * root.reshape(shape)
    return out


def graft(direction: Tensor, graft_direction: Tensor) -> Tensor:
    """Give ``direction`` the Frobenius norm of ``graft_direction`` (zero stays zero).

    Args:
        direction: Shampoo direction, any shape.
        graft_direction: Direction whose norm is borrowed, same shape.

    Returns:
        ``‖graft_direction‖ · direction / ‖direction‖``.
    """
    norm = torch.linalg.vector_norm(direction)
    if norm == 0:
        return direction
    return direction * (torch.linalg.vector_norm(graft_direction) / norm)


class Shampoo(KroneckerOptimizer):
    """Shampoo: one Kronecker factor per tensor axis, inverse roots, Adam grafting.

    For a gradient ``G`` of order ``n`` (a matrix: ``n = 2``) the factors are
    ``S_k = EMA(G_(k) G_(k)ᵀ)`` (retention ``shampoo_beta``, bias-corrected), and the direction is
    ``M ×_1 (S_1 + εI)^{-e} ⋯ ×_n (S_n + εI)^{-e}`` with ``e = 1/(2n)`` unless
    ``exponent_override`` is given, applied to the momentum ``M = EMA_β₁(G)``. The roots come from
    the eigenbases the shared machinery keeps (``Q_k``, refreshed every ``precondition_frequency``
    steps by ``eigh``, a QR power step or a subspace QR); the eigenvalues are ``diag(Q_kᵀ S_k Q_k)``
    at the refresh (exact for ``eigh``), with round-off negatives set to 0. With
    ``grafting="adam"`` the direction takes the Frobenius norm of Adam's direction per block, and
    before ``start_preconditioning_step`` Adam's direction is used alone.

    Each step: the factors take the current gradient, the roots are refreshed when due, then the
    parameter moves: ``θ ← θ(1 - ηλ) - η U``.

    Args:
        params: Parameters or param groups.
        lr: Learning rate ``η``.
        betas: ``(β₁, β₂)``: momentum and the graft's (Adam's) second-moment retention.
        shampoo_beta: Retention of the factor EMA; ``None`` uses ``β₂``.
        eps: ``ε`` added to the factors' eigenvalues.
        graft_eps: Adam's ``ε`` in the graft.
        exponent_override: Per-side root exponent ``e``; ``None`` means ``1/(2n)``.
        grafting: ``"adam"`` or ``"none"``.
        weight_decay: Decoupled weight decay ``λ``.
        precondition_frequency: Steps between root (basis) refreshes.
        start_preconditioning_step: Step index (0-based) of the first root computation.
        max_preconditioner_dim: Largest factor; larger axes follow ``large_dims``.
        merge_dims: Merge adjacent axes while their product is ``<= max_preconditioner_dim``.
        large_dims: ``"block"`` (default) splits large axes into blocks with their own state and
            graft; ``"identity"`` leaves them unpreconditioned.
        basis_update: ``"eigh"`` (default, exact roots), ``"qr"`` or ``"subspace"``.
        subspace_rank: Subspace size; ``None`` means ``max(64, ceil(d/4))`` capped at ``d``.
        state_dtype: Storage dtype of all state (e.g. ``torch.bfloat16``).
        nonfinite: ``"raise"`` or ``"skip"`` on nan/inf gradients.
        orthogonality_tolerance: bfloat16 storage: re-orthonormalisation threshold.
        seed: Seed of the stochastic rounding bits.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = Shampoo(model.parameters(), lr=1e-2)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()

    References:
        Gupta, Koren, Singer (2018). Shampoo. ICML. Shi et al. (2023). A distributed
        data-parallel PyTorch implementation of the distributed Shampoo optimizer.
    """

    _name = "Shampoo"
    _sort_on_refresh = True

    def __init__(self, params: Iterable, lr: float = 1e-2, *,
                 betas: tuple[float, float] = (0.9, 0.999), shampoo_beta: float | None = None,
                 eps: float = 1e-12, graft_eps: float = 1e-8,
                 exponent_override: float | None = None,
                 grafting: Literal["adam", "none"] = "adam", weight_decay: float = 0.0,
                 precondition_frequency: int = 10, start_preconditioning_step: int = 0,
                 max_preconditioner_dim: int = 1024, merge_dims: bool = False,
                 large_dims: Literal["block", "identity"] = "block",
                 basis_update: Literal["eigh", "qr", "subspace"] = "eigh",
                 subspace_rank: int | None = None, state_dtype: torch.dtype | None = None,
                 nonfinite: Literal["raise", "skip"] = "raise",
                 orthogonality_tolerance: float = 1e-2, seed: int = 0):
        defaults = self._common_defaults(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            max_preconditioner_dim=max_preconditioner_dim, merge_dims=merge_dims,
            large_dims=large_dims, basis_update=basis_update, subspace_rank=subspace_rank,
            state_dtype=state_dtype, nonfinite=nonfinite,
            orthogonality_tolerance=orthogonality_tolerance, seed=seed)
        if shampoo_beta is not None:
            check_range(self._name, "shampoo_beta", shampoo_beta, 0.0, 1.0)
        if exponent_override is not None:
            check_range(self._name, "exponent_override", exponent_override, 0.0, low_open=True)
        check_range(self._name, "graft_eps", graft_eps, 0.0)
        check_choice(self._name, "grafting", grafting, ("adam", "none"))
        defaults.update(shampoo_beta=shampoo_beta, graft_eps=graft_eps,
                        exponent_override=exponent_override, grafting=grafting)
        super().__init__(params, defaults)

    def _init_block(self, shape, axes, group, dtype, device):
        block = self._basis_state(shape, axes, dtype, device)
        for k in axes:
            block[f"lam{k}"] = torch.zeros(shape[k], dtype=dtype, device=device)
        block["exp_avg"] = torch.zeros(shape, dtype=dtype, device=device)
        block["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=device)
        return block

    def _block_direction(self, G: Tensor, block: dict, ctx: _Context) -> Tensor | None:
        group = ctx.group
        Q, P = ctx.bases(block)
        beta = group["shampoo_beta"] if group["shampoo_beta"] is not None else group["betas"][1]
        G_rot = rotate(G, Q, to_basis=True)
        for k in ctx.axes:
            P[k] = gram_ema(P[k], G_rot, k, beta=beta, alpha=1 - beta)
        if self._refresh_due(ctx):
            self._refresh(block, ctx, P, Q)
            correction = 1 - beta ** (ctx.step + 1)
            for k in ctx.axes:  # round-off can leave tiny negative eigenvalues: use 0
                lam = torch.diagonal(P[k]).clamp_min(0) / correction
                block[f"lam{k}"] = lam.to(ctx.sd)
        else:
            for k in ctx.axes:
                ctx.save(block, f"P{k}", P[k])
        graft_dir, m, v = adam_direction(
            G, ctx.load(block, "exp_avg"), ctx.load(block, "exp_avg_sq"), step=ctx.step + 1,
            betas=group["betas"], eps=group["graft_eps"])
        ctx.save(block, "exp_avg", m)
        ctx.save(block, "exp_avg_sq", v)
        if ctx.step < group["start_preconditioning_step"]:
            return graft_dir
        order = len(G.shape)
        exponent = group["exponent_override"] or 1.0 / (2 * order)
        lam = {k: ctx.load(block, f"lam{k}") for k in ctx.axes}
        M_rot = rotate(m, Q, to_basis=True)
        direction = rotate(shampoo_direction(M_rot, lam, exponent=exponent, eps=group["eps"]),
                           Q, to_basis=False)
        return graft(direction, graft_dir) if group["grafting"] == "adam" else direction
