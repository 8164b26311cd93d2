"""KL-Shampoo and KL-SOAP: Kronecker factors fitted by Kullback–Leibler minimisation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor

from curvkit.optim._basis import gram, gram_ema, rotate
from curvkit.optim._common import check_range
from curvkit.optim._kronecker import KroneckerOptimizer, _Context

__all__ = ["KLSOAP", "KLShampoo", "kl_direction", "kl_factor_terms", "kl_lambda_floor"]


def _along(vec: Tensor, axis: int, order: int) -> Tensor:
    shape = [1] * order
    shape[axis] = -1
    return vec.reshape(shape)


def kl_factor_terms(G_rot: Tensor, eigenvalues: dict[int, Tensor]) -> dict[int, Tensor]:
    """New-data terms of the KL factor updates, in rotated coordinates.

    For axis ``k`` the KL fixed point fits ``S_k`` to the gradient whitened by every other
    factor: ``S_k ← β S_k + (1-β) G_(k) (⊗_{j≠k} Ŝ_j⁻¹) G_(k)ᵀ / ∏_{j≠k} d_j`` with
    ``Ŝ_j = Q_j diag(λ_j) Q_jᵀ``. In rotated coordinates (``G̃ = G ×_j Q_jᵀ``) the term is the
    Gram matrix of ``G̃ ⊙ ⊗_{j≠k} λ_j^{-1/2}``; its diagonal is the eigenvalue statistic
    ``(1/∏d_j) Σ G̃² / ∏λ_j`` of the λ-EMA. All terms use the same (old) eigenvalues.

    Args:
        G_rot: Rotated gradient ``G̃`` of order ``n``.
        eigenvalues: ``{axis: λ_k (d_k,)}`` for the preconditioned axes; other axes count with
            ``λ ≡ 1`` (their factor is the identity).

    Returns:
        ``{axis: term_k (d_k, d_k)}`` in the rotated coordinates of axis ``k``.
    """
    n = G_rot.dim()
    scale = {k: _along(lam.rsqrt(), k, n) for k, lam in eigenvalues.items()}
    terms = {}
    for k in eigenvalues:
        W = G_rot
        for j, s in scale.items():
            if j != k:
                W = W * s
        terms[k] = gram(W, k) * (G_rot.shape[k] / G_rot.numel())
    return terms


def _kl_factor_ema(G_rot: Tensor, P: dict[int, Tensor], eigenvalues: dict[int, Tensor], *,
                   beta: float, whiten: bool) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """``P_k ← β P_k + (1-β) term_k`` of :func:`kl_factor_terms`, fused into one GEMM per axis.

    Equal to forming the terms first up to float round-off, without their ``(d_k, d_k)``
    temporaries.

    Args:
        G_rot: Rotated gradient ``G̃`` of order ``n``.
        P: ``{axis: P_k (d_k, d_k)}`` coordinate matrices (not modified).
        eigenvalues: ``{axis: λ_k (d_k,)}``.
        beta: Retention ``β``.
        whiten: Whiten by the other axes' eigenvalues; ``False`` takes plain Gram matrices
            (``λ ≡ 1``, the step-0 initialisation).

    Returns:
        ``({axis: new P_k}, {axis: diag(term_k) (d_k,)})``.
    """
    n = G_rot.dim()
    scale = {k: _along(lam.rsqrt(), k, n) for k, lam in eigenvalues.items()} if whiten else {}
    new, stats = {}, {}
    for k in P:
        W = G_rot
        for j, s in scale.items():
            if j != k:
                W = W * s
        c = G_rot.shape[k] / G_rot.numel()
        new[k] = gram_ema(P[k], W, k, beta=beta, alpha=(1 - beta) * c)
        Wk = W.movedim(k, 0).reshape(W.shape[k], -1)
        stats[k] = Wk.square().sum(1) * c
    return new, stats


def kl_direction(M_rot: Tensor, eigenvalues: dict[int, Tensor], *, eps: float) -> Tensor:
    """KL-Shampoo's direction in rotated coordinates: ``M̃ ⊙ D / (1 + ε D)``, ``D = ⊗ λ_k^{-1/2}``.

    Equals ``M̃ / (sqrt(⊗λ) + ε)``, the rotated form of ``S_a^{-1/2} M S_b^{-1/2}`` with ``ε``.

    Args:
        M_rot: Rotated momentum ``M̃`` of order ``n``.
        eigenvalues: ``{axis: λ_k (d_k,)}``.
        eps: ``ε``.

    Returns:
        Tensor shaped like ``M_rot``.
    """
    D = torch.ones((), dtype=M_rot.dtype, device=M_rot.device)
    for k, lam in eigenvalues.items():
        D = D * _along(lam.rsqrt(), k, M_rot.dim())
    return M_rot * D / (1 + eps * D)


def kl_lambda_floor(d: int, max_clamp_value: float) -> float:
    """The prototype's clamp ``λ^{-1/2} <= max(10, min(d, max_clamp_value))`` as a floor on λ."""
    return max(10.0, min(float(d), max_clamp_value)) ** -2


class KLShampoo(KroneckerOptimizer):
    """KL-Shampoo: Kronecker factors fitted by KL minimisation, with per-step eigenvalue EMAs.

    The factors solve the matrix-normal fixed point ``S_a = E[G S_b⁻¹ Gᵀ]/d_b``,
    ``S_b = E[Gᵀ S_a⁻¹ G]/d_a`` (one factor per axis for any order) by an EMA with retention
    ``shampoo_beta``. As in the official prototype, bases ``Q_k`` are refreshed every
    ``precondition_frequency`` steps (one QR power step by default, columns *not* sorted since
    ``λ_i`` belongs to column ``i``) while the eigenvalues ``λ_k`` are re-estimated every step in
    the current basis: ``λ_k ← βλ_k + (1-β) diag(term_k)`` (old ``λ`` on the right). No grafting:
    the KL fit carries the correct overall scale.

    Each step (0-based ``t``): ``G̃ = Q ᵀ-rotated G``; ``M̃ ← β₁M̃ + (1-β₁)G̃`` (rotated coordinates,
    re-expressed at refreshes; equal to the prototype's parameter-space momentum);
    ``θ ← θ(1 - ηλ_wd) - η Q[M̃ ⊙ D/(1+εD)]Qᵀ`` with ``D = ⊗λ_k^{-1/2}``; then the factor and
    eigenvalue updates; then the refresh when due. Step 0 only initialises
    (``S_k = (1-β) G_(k)G_(k)ᵀ/∏_{j≠k}d_j``, bases by ``eigh``, ``λ ≡ init_factor``) without moving
    the parameters. With ``clamp=True`` every ``λ_k`` is floored at
    ``max(10, min(d_k, max_clamp_value))^{-2}`` (the prototype's bound on ``λ^{-1/2}``).

    Args:
        params: Parameters or param groups.
        lr: Learning rate ``η``.
        betas: ``(β₁, β₂)``; ``β₂`` is KL-SOAP's Adam retention and the default factor retention.
        shampoo_beta: Factor and eigenvalue retention ``β``; ``None`` uses ``β₂``.
        eps: ``ε`` of the direction.
        weight_decay: Decoupled weight decay ``λ_wd``.
        precondition_frequency: Steps between basis refreshes.
        start_preconditioning_step: Step index of the ``eigh`` basis initialisation.
        init_factor: Initial eigenvalue estimate.
        clamp: Floor the eigenvalues as described above.
        max_clamp_value: Cap of the clamp bound.
        max_preconditioner_dim: Largest factor; larger axes follow ``large_dims``.
        merge_dims: Merge adjacent axes while their product is ``<= max_preconditioner_dim``.
        large_dims: ``"identity"`` (one-sided / diagonal) or ``"block"``.
        basis_update: ``"qr"`` (default), ``"eigh"`` or ``"subspace"``.
        subspace_rank: Subspace size; ``None`` means ``max(64, ceil(d/4))`` capped at ``d``.
        state_dtype: Storage dtype of all state (e.g. ``torch.bfloat16``).
        nonfinite: ``"raise"`` or ``"skip"`` on nan/inf gradients.
        orthogonality_tolerance: bfloat16 storage: re-orthonormalisation threshold.
        seed: Seed of the stochastic rounding bits.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = KLShampoo(model.parameters(), lr=3e-3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()

    References:
        Lin, Lowe, Dangel, Eschenhagen, Xu, Grosse (2026). Understanding and improving Shampoo and
        SOAP via Kullback-Leibler minimization. ICLR.
    """

    _name = "KLShampoo"
    _sort_on_refresh = False
    _coordinate_keys = ("exp_avg",)
    _column_keys: tuple[str, ...] = ()
    _adam_direction = False

    def __init__(self, params: Iterable, lr: float = 3e-3, *,
                 betas: tuple[float, float] = (0.9, 0.98), shampoo_beta: float | None = None,
                 eps: float = 1e-8, weight_decay: float = 0.01, precondition_frequency: int = 10,
                 start_preconditioning_step: int = 0, init_factor: float = 0.1,
                 clamp: bool = True, max_clamp_value: float = 4000.0,
                 max_preconditioner_dim: int = 10_000, merge_dims: bool = False,
                 large_dims: Literal["identity", "block"] = "identity",
                 basis_update: Literal["qr", "eigh", "subspace"] = "qr",
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
        check_range(self._name, "init_factor", init_factor, 0.0, low_open=True)
        check_range(self._name, "max_clamp_value", max_clamp_value, 0.0, low_open=True)
        if not isinstance(clamp, bool):
            raise TypeError(f"{self._name}: clamp must be a bool; got {clamp!r}.")
        defaults.update(shampoo_beta=shampoo_beta, init_factor=init_factor, clamp=clamp,
                        max_clamp_value=max_clamp_value, **self._method_defaults())
        super().__init__(params, defaults)

    def _method_defaults(self) -> dict:
        """Options of a subclass's direction, added to the param-group defaults."""
        return {}

    def _init_block(self, shape, axes, group, dtype, device):
        block = self._basis_state(shape, axes, dtype, device)
        for k in axes:
            block[f"lam{k}"] = torch.full((shape[k],), group["init_factor"], dtype=dtype,
                                          device=device)
        block["exp_avg"] = torch.zeros(shape, dtype=dtype, device=device)
        if self._adam_direction:
            block["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=device)
        return block

    def _rotated_direction(self, G_rot: Tensor, block: dict, ctx: _Context,
                           lam: dict[int, Tensor]) -> Tensor:
        beta1 = ctx.group["betas"][0]
        m = ctx.load(block, "exp_avg").lerp(G_rot, 1 - beta1)
        ctx.save(block, "exp_avg", m)
        return kl_direction(m, lam, eps=ctx.group["eps"])

    def _block_direction(self, G: Tensor, block: dict, ctx: _Context) -> Tensor | None:
        group = ctx.group
        Q, P = ctx.bases(block)
        lam = {k: ctx.load(block, f"lam{k}") for k in ctx.axes}
        G_rot = rotate(G, Q, to_basis=True)
        direction = None
        if not (ctx.step == 0 and group["start_preconditioning_step"] == 0):
            direction = rotate(self._rotated_direction(G_rot, block, ctx, lam), Q,
                               to_basis=False)
        beta = group["shampoo_beta"] if group["shampoo_beta"] is not None else group["betas"][1]
        # step 0: initial factors are plain Gram matrices, eigenvalues stay init_factor
        P, stats = _kl_factor_ema(G_rot, P, lam, beta=beta, whiten=ctx.step > 0)
        for k in ctx.axes:
            if ctx.step > 0:
                new = beta * lam[k] + (1 - beta) * stats[k]
                if group["clamp"]:
                    floor = kl_lambda_floor(new.shape[0], group["max_clamp_value"])
                    new = new.clamp_min(floor)
                ctx.save(block, f"lam{k}", new)
        if self._refresh_due(ctx):
            self._refresh(block, ctx, P, Q)
        else:
            for k in ctx.axes:
                ctx.save(block, f"P{k}", P[k])
        return direction


class KLSOAP(KLShampoo):
    """KL-SOAP: the KL-fitted factors and bases of :class:`KLShampoo`, with Adam in the eigenbasis.

    Identical to :class:`KLShampoo` (factor, eigenvalue and basis updates, step-0 initialisation)
    except for the direction: ``M̃ ← β₁M̃ + (1-β₁)G̃``, ``Ṽ ← β₂Ṽ + (1-β₂)G̃²`` in rotated
    coordinates without bias correction, and ``U = Q[M̃ / (sqrt(Ṽ) + ε)]Qᵀ``. At refreshes ``M̃``
    is re-expressed in the new basis and ``Ṽ`` is kept (the prototype's convention), or mapped
    with ``second_moment="map"``. After a late ``start_preconditioning_step`` the first ``eigh``
    basis always maps ``Ṽ`` (and ``λ``) out of the identity basis:
    ``Ṽ ← (R_L ∘ R_L) Ṽ (R_R ∘ R_R)ᵀ`` with ``R = Q_newᵀ Q_old``, as described for
    :class:`~curvkit.optim.SOAP`.

    Args:
        params: Parameters or param groups.
        lr: Learning rate ``η``.
        second_moment: ``"keep"`` (default, the prototype) or ``"map"``, as for
            :class:`~curvkit.optim.SOAP`.
        **options: As for :class:`KLShampoo`.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = KLSOAP(model.parameters(), lr=3e-3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    _name = "KLSOAP"
    _column_keys = ("exp_avg_sq",)
    _adam_direction = True

    def __init__(self, params: Iterable, lr: float = 3e-3, *,
                 second_moment: Literal["keep", "map"] = "keep", **options):
        # validated before the groups are built; _method_defaults hands it to KLShampoo
        self._second_moment = self._check_second_moment(second_moment)
        super().__init__(params, lr, **options)

    def _method_defaults(self) -> dict:
        return {"second_moment": self._second_moment}

    def _rotated_direction(self, G_rot, block, ctx, lam):
        beta1, beta2 = ctx.group["betas"]
        m = ctx.load(block, "exp_avg").lerp(G_rot, 1 - beta1)
        v = ctx.load(block, "exp_avg_sq").mul(beta2).addcmul_(G_rot, G_rot, value=1 - beta2)
        ctx.save(block, "exp_avg", m)
        ctx.save(block, "exp_avg_sq", v)
        return torch.div(m, v.sqrt().add_(ctx.group["eps"]))

