"""SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor

from curvkit.optim._basis import gram_ema, rotate
from curvkit.optim._common import check_range
from curvkit.optim._kronecker import KroneckerOptimizer, _Context

__all__ = ["SOAP", "soap_direction"]


def soap_direction(G_rot: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: int,
                   betas: tuple[float, float], eps: float, bias_correction: bool = True
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Adam direction in rotated coordinates, with SOAP's step-size bias correction.

    ``M̃ ← β₁M̃ + (1-β₁)G̃``, ``Ṽ ← β₂Ṽ + (1-β₂)G̃²``, direction
    ``M̃ / (sqrt(Ṽ) + ε) · sqrt(1-β₂ᵗ)/(1-β₁ᵗ)`` (the correction multiplies the step, not
    ``Ṽ``, as in the SOAP reference).

    Args:
        G_rot: Rotated gradient ``G̃``, any shape.
        exp_avg: Rotated first moment ``M̃``, shaped like ``G_rot``.
        exp_avg_sq: Rotated second moment ``Ṽ``, shaped like ``G_rot``.
        step: 1-based count of update steps, for the bias correction.
        betas: ``(β₁, β₂)``.
        eps: Added to ``sqrt(Ṽ)``.
        bias_correction: Apply the step-size correction.

    Returns:
        ``(direction in rotated coordinates, M̃, Ṽ)``.
    """
    beta1, beta2 = betas
    exp_avg = exp_avg.lerp(G_rot, 1 - beta1)
    exp_avg_sq = exp_avg_sq.mul(beta2).addcmul_(G_rot, G_rot, value=1 - beta2)
    scale = (1 - beta2**step) ** 0.5 / (1 - beta1**step) if bias_correction else 1.0
    # in-place on fresh temporaries only: the inputs are never written
    direction = torch.div(exp_avg, exp_avg_sq.sqrt().add_(eps))
    return (direction.mul_(scale) if scale != 1.0 else direction), exp_avg, exp_avg_sq


class SOAP(KroneckerOptimizer):
    """SOAP: Adam run in the eigenbasis of Shampoo's factors, refreshed every few steps.

    For a matrix parameter with gradient ``G: (m, n)`` the factors are ``L = EMA(G Gᵀ)`` and
    ``R = EMA(Gᵀ G)`` (retention ``shampoo_beta``), stored as coordinates ``P = Qᵀ S Q`` in their
    current bases ``Q_L, Q_R`` (see :mod:`curvkit.optim._basis`). Each step:

    1. ``G̃ = Q_Lᵀ G Q_R``; Adam moments ``M̃, Ṽ`` in rotated coordinates;
    2. ``θ ← θ(1 - η λ) - η · sqrt(1-β₂ᵗ)/(1-β₁ᵗ) · Q_L [M̃ / (sqrt(Ṽ) + ε)] Q_Rᵀ``;
    3. the factors take the current gradient *after* the step (so a gradient never shapes its own
       projection); every ``precondition_frequency`` steps the bases are refreshed (columns sorted
       by ``diag(P)`` with ``Ṽ`` permuted alongside, then one QR power step, or ``eigh``, or a
       subspace QR), and ``M̃`` is re-expressed in the new basis; ``Ṽ`` is kept (the reference)
       or, with ``second_moment="map"``, carried into the new basis (below).

    The very first step only initialises the factors and the bases (by ``eigh``) and does not move
    the parameters, as in the reference. With ``start_preconditioning_step = s > 0`` the first
    ``s + 1`` steps are Adam in the identity basis; the ``eigh`` basis ``Q`` computed at the end of
    step ``s`` then re-expresses ``M̃`` and *maps* ``Ṽ``: ``Ṽ ← (R_L ∘ R_L) Ṽ (R_R ∘ R_R)ᵀ`` with
    ``R = Q_newᵀ Q_old`` (``∘`` elementwise), the diagonal of the accumulated second moment
    rotated into the new basis. Keeping ``Ṽ`` there would give eigendirection ``i`` the variance
    of parameter coordinate ``i``. Tensors of any order get one factor per axis; order-1
    parameters (and parameters whose every axis is unpreconditioned) get Adam.

    Args:
        params: Parameters or param groups.
        lr: Learning rate ``η``.
        betas: Adam's ``(β₁, β₂)``.
        shampoo_beta: Retention of the factor EMA; ``None`` uses ``β₂``.
        eps: Adam's ``ε``.
        weight_decay: Decoupled weight decay ``λ`` (applied as ``θ ← θ(1 - ηλ)``).
        precondition_frequency: Steps between basis refreshes.
        start_preconditioning_step: Step index (0-based) of the first (``eigh``) basis; before
            it the basis is the identity, i.e. plain Adam.
        max_preconditioner_dim: Largest axis with its own factor.
        merge_dims: Merge adjacent axes while their product is ``<= max_preconditioner_dim``.
        large_dims: Axes above ``max_preconditioner_dim``: ``"identity"`` (one-sided, or Adam)
            or ``"block"`` (split into blocks, each with its own state).
        basis_update: ``"qr"`` (one power-iteration step + QR, the reference), ``"eigh"``
            (exact), or ``"subspace"`` (QR in the ``subspace_rank`` most coupled directions).
        subspace_rank: Subspace size; ``None`` means ``max(64, ceil(d/4))`` capped at ``d``.
        bias_correction: Use the step-size bias correction.
        state_dtype: Storage dtype of all state (e.g. ``torch.bfloat16``); decompositions and
            updates run in float32 (float64 for float64 parameters). ``None`` stores in the
            working dtype.
        nonfinite: ``"raise"`` on a nan/inf gradient, or ``"skip"`` the step and count it.
        orthogonality_tolerance: bfloat16 storage only: re-orthonormalise a basis whose probe
            error ``|QᵀQx - x|/|x|`` exceeds this.
        seed: Seed of the stochastic rounding bits (bfloat16 storage).
        second_moment: How ``Ṽ`` follows a basis refresh: ``"keep"`` (the reference: permuted
            with a column sort, values otherwise kept, since a refresh moves the basis little)
            or ``"map"`` (the mapping above at every refresh, including ``eigh``, subspace and
            bfloat16 re-orthonormalisation changes). The first basis after a late start is
            always mapped.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = SOAP(model.parameters(), lr=3e-3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()

    References:
        Vyas et al. (2025). SOAP: Improving and stabilizing Shampoo using Adam. ICLR.
    """

    _name = "SOAP"
    _sort_on_refresh = True
    _coordinate_keys = ("exp_avg",)
    _column_keys = ("exp_avg_sq",)

    def __init__(self, params: Iterable, lr: float = 3e-3, *,
                 betas: tuple[float, float] = (0.95, 0.95), shampoo_beta: float | None = None,
                 eps: float = 1e-8, weight_decay: float = 0.01, precondition_frequency: int = 10,
                 start_preconditioning_step: int = 0, max_preconditioner_dim: int = 10_000,
                 merge_dims: bool = False, large_dims: Literal["identity", "block"] = "identity",
                 basis_update: Literal["qr", "eigh", "subspace"] = "qr",
                 subspace_rank: int | None = None, bias_correction: bool = True,
                 state_dtype: torch.dtype | None = None,
                 nonfinite: Literal["raise", "skip"] = "raise",
                 orthogonality_tolerance: float = 1e-2, seed: int = 0,
                 second_moment: Literal["keep", "map"] = "keep"):
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
        if not isinstance(bias_correction, bool):  # bool("false") would be True
            raise TypeError(f"{self._name}: bias_correction must be a bool; "
                            f"got {bias_correction!r}.")
        defaults.update(shampoo_beta=shampoo_beta, bias_correction=bias_correction,
                        second_moment=self._check_second_moment(second_moment))
        super().__init__(params, defaults)

    def _init_block(self, shape, axes, group, dtype, device):
        block = self._basis_state(shape, axes, dtype, device)
        block["exp_avg"] = torch.zeros(shape, dtype=dtype, device=device)
        block["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=device)
        return block

    def _block_direction(self, G: Tensor, block: dict, ctx: _Context) -> Tensor | None:
        group = ctx.group
        Q, P = ctx.bases(block)
        G_rot = rotate(G, Q, to_basis=True)
        start = group["start_preconditioning_step"]
        direction = None
        if not (ctx.step == 0 and start == 0):  # the reference's first step only initialises
            updates = ctx.step if start == 0 else ctx.step + 1
            d_rot, m, v = soap_direction(
                G_rot, ctx.load(block, "exp_avg"), ctx.load(block, "exp_avg_sq"), step=updates,
                betas=group["betas"], eps=group["eps"], bias_correction=group["bias_correction"])
            ctx.save(block, "exp_avg", m)
            ctx.save(block, "exp_avg_sq", v)
            direction = rotate(d_rot, Q, to_basis=False)
        beta = group["shampoo_beta"] if group["shampoo_beta"] is not None else group["betas"][1]
        for k in ctx.axes:  # S ← βS + (1-β) G_(k) G_(k)ᵀ, in P-coordinates
            P[k] = gram_ema(P[k], G_rot, k, beta=beta, alpha=1 - beta)
        if self._refresh_due(ctx):
            self._refresh(block, ctx, P, Q)
        else:
            for k in ctx.axes:
                ctx.save(block, f"P{k}", P[k])
        return direction
