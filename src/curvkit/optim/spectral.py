"""Spectral-factorized curvature learning: ``S = B diag(d) Bᵀ`` learned by Riemannian steps.

Each preconditioner factor is kept as its spectral factors, ``B`` orthogonal and ``d > 0``, and
updated by one natural-gradient step of the Gaussian negative log-likelihood
``ℓ(S) = ½[log det S + tr(S⁻¹ C)]`` in the local coordinates ``B(K) = B Exp(K)`` (``K`` skew)
and ``d(m) = d ⊙ eᵐ``, where the Fisher–Rao metric is diagonal. With ``C̃ = Bᵀ C B``:

* ``m_i = β (C̃_ii / d_i - 1)``;
* ``K_ij = β C̃_ij (d_j - d_i) / ((d_i - d_j)² + κ d_i d_j)`` (``κ = 0``: first-order eigenvector
  perturbation theory; ``κ > 0`` bounds the step when eigenvalues nearly coincide);
* ``d ← d ⊙ eᵐ`` (positive by construction) and ``B ← B Exp(K)`` (orthogonal by construction).

To first order in ``β`` this *is* the EMA ``(1 - β) S + β C``, carried out on the factors, so
any inverse root ``S^{-1/p} = B diag(d^{-1/p}) Bᵀ`` costs two GEMMs and no decomposition
(one ``eigh`` at initialisation only).

The Kronecker version (:class:`SpectralShampoo`) keeps ``S = c S_a ⊗ S_b`` for a matrix
gradient ``G: (d_a, d_b)`` with ``Σ log d_a = Σ log d_b = 0`` (the scale lives in ``c``) and
learns it from the KL-Shampoo statistics ``G S_b⁻¹ Gᵀ / (c d_b)`` and ``Gᵀ S_a⁻¹ G / (c d_a)``,
or independently from ``G Gᵀ`` and ``Gᵀ G`` (Shampoo's statistics), or from any PSD factor pair
the caller passes to ``step(targets=...)`` (e.g. KFAC's ``A`` and ``G`` factors).

The algorithm follows our design note (``papers/spectral_factorized.md``); the paper's exact
equations were not available to us.

References:
    Lin, Dangel, Eschenhagen, Bae, Turner, Grosse (2025). Spectral-factorized positive-definite
    curvature learning for NN training. arXiv:2502.06268.
    Lin et al. (2023). Simplifying momentum-based positive-definite submanifold optimization.
    arXiv:2302.09738.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor

from curvkit.optim._basis import eigh_descending
from curvkit.optim._common import check_choice, check_int, check_range
from curvkit.optim._kronecker import KroneckerOptimizer, _Context

__all__ = ["Retraction", "SpectralShampoo", "inverse_root", "kl_apply", "kl_kronecker_step",
           "kl_targets", "newton_schulz_polar", "spectral_init", "spectral_step"]

Retraction = Literal["exp", "cayley", "taylor"]


# --------------------------------------------------------------------------- kernels
def spectral_init(C: Tensor, *, eps: float) -> tuple[Tensor, Tensor]:
    """Spectral factors of ``C + ε λ_max I`` by one ``eigh`` (the only decomposition).

    Args:
        C: Symmetric PSD matrix ``(n, n)``.
        eps: Relative floor; ``d_i = λ_i + ε max(λ_max, tiny)``.

    Returns:
        ``(B (n, n), d (n,))`` with eigenvalues in descending order.
    """
    lam, B = eigh_descending(C, caller="spectral_init")
    floor = eps * lam.max().clamp_min(torch.finfo(lam.dtype).tiny)
    return B, lam.clamp_min(0) + floor


def _retract(K: Tensor, method: str) -> Tensor:
    """An orthogonal(ish) ``R ≈ Exp(K)`` for skew ``K``."""
    if method == "exp":
        return torch.linalg.matrix_exp(K)
    eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    if method == "cayley":  # (I - K/2)⁻¹ (I + K/2): exactly orthogonal
        return torch.linalg.solve(eye - 0.5 * K, eye + 0.5 * K)
    return eye + K + 0.5 * (K @ K)  # matmul-only; O(‖K‖³) drift, fixed by polar steps


def newton_schulz_polar(B: Tensor, *, steps: int = 1) -> Tensor:
    """Newton–Schulz steps ``X ← X (3I - XᵀX)/2`` towards the polar factor of ``B ≈ orthogonal``.

    Each step squares the orthogonality error (``‖XᵀX - I‖``), using two GEMMs.

    Args:
        B: Matrix ``(n, n)`` with ``‖BᵀB - I‖ < 1``.
        steps: Number of steps.

    Returns:
        Matrix ``(n, n)``.
    """
    for _ in range(steps):
        B = 1.5 * B - 0.5 * B @ (B.T @ B)
    return B


def spectral_step(B: Tensor, d: Tensor, C_rot: Tensor, *, beta: float, kappa: float,
                  max_log_step: float = 1.0, max_rotation: float = 0.1,
                  retraction: Retraction = "exp", zero_mean_log: bool = False
                  ) -> tuple[Tensor, Tensor]:
    """One natural-gradient step of ``(B, d)`` towards the statistic ``C``.

    Args:
        B: Orthogonal basis ``(n, n)``.
        d: Positive eigenvalues ``(n,)`` (column ``i`` of ``B`` carries ``d_i``; no sorting).
        C_rot: The statistic in the basis, ``Bᵀ C B``, symmetric ``(n, n)``.
        beta: Step size ``β`` (an EMA weight, e.g. 0.05).
        kappa: Damping ``κ > 0`` of the rotation metric.
        max_log_step: Clip of ``|m_i|`` (guards against outlier statistics).
        max_rotation: Clip of ``|K_ij|``.
        retraction: ``"exp"`` (``matrix_exp``), ``"cayley"`` or ``"taylor"`` (``I + K + K²/2``).
        zero_mean_log: Project ``m`` to zero mean (keeps ``Σ log d`` fixed: the Kronecker
            determinant constraint).

    Returns:
        ``(B_new (n, n), d_new (n,))``.
    """
    diag = torch.diagonal(C_rot)
    m = (beta * (diag / d - 1)).clamp(-max_log_step, max_log_step)
    if zero_mean_log:
        m = m - m.mean()
    gap = d[None, :] - d[:, None]  # (d_j - d_i)
    denominator = gap.square() + kappa * torch.outer(d, d)
    denominator.diagonal().fill_(1.0)  # K_ii = 0 (gap_ii = 0); avoids 0/0 when κ = 0
    K = beta * C_rot * gap / denominator
    K = K.clamp(-max_rotation, max_rotation)
    K = 0.5 * (K - K.T)  # exact skew-symmetry after round-off (the formula is skew already)
    return B @ _retract(K, retraction), d * torch.exp(m)


def inverse_root(B: Tensor, d: Tensor, v: Tensor, *, p: float, eps: float = 0.0) -> Tensor:
    """``(B diag(d) Bᵀ + εI)^{-1/p} v`` without a decomposition.

    Args:
        B: Orthogonal ``(n, n)``.
        d: Positive ``(n,)``.
        v: Vector ``(n,)`` or matrix ``(n, k)``.
        p: Root ``p > 0``.
        eps: Damping ``ε >= 0``.

    Returns:
        Tensor shaped like ``v``.
    """
    scale = (d + eps).pow(-1.0 / p)
    rotated = B.T @ v
    return B @ (rotated * (scale if v.dim() == 1 else scale[:, None]))


def kl_targets(Ba: Tensor, da: Tensor, Bb: Tensor, db: Tensor, log_c: Tensor, G: Tensor
               ) -> tuple[Tensor, Tensor, Tensor]:
    """The KL-Shampoo statistics of ``G`` in the current bases.

    Args:
        Ba: Basis ``(d_a, d_a)``.
        da: Eigenvalues ``(d_a,)``.
        Bb: Basis ``(d_b, d_b)``.
        db: Eigenvalues ``(d_b,)``.
        log_c: Scalar tensor ``log c``.
        G: Gradient ``(d_a, d_b)``.

    Returns:
        ``(C̃_a (d_a, d_a), C̃_b (d_b, d_b), w)`` with ``C̃_a = G̃ D_b⁻¹ G̃ᵀ / (c d_b)``,
        ``C̃_b = G̃ᵀ D_a⁻¹ G̃ / (c d_a)`` (``G̃ = B_aᵀ G B_b``) and the scalar
        ``w = ‖D_a^{-1/2} G̃ D_b^{-1/2}‖² / (c d_a d_b)``.
    """
    na, nb = G.shape
    c = log_c.exp()
    G_rot = Ba.T @ G @ Bb
    scaled_b = G_rot / db  # G̃ D_b⁻¹
    Ca = scaled_b @ G_rot.T / (c * nb)
    Cb = G_rot.T @ (G_rot / da[:, None]) / (c * na)
    whitened = (G_rot * scaled_b / da[:, None]).sum() / (c * na * nb)
    return 0.5 * (Ca + Ca.T), 0.5 * (Cb + Cb.T), whitened


def kl_apply(Ba: Tensor, da: Tensor, Bb: Tensor, db: Tensor, log_c: Tensor, Ca: Tensor,
             Cb: Tensor, whitened: Tensor, *, beta: float, kappa: float,
             max_log_step: float = 1.0, max_rotation: float = 0.1,
             retraction: Retraction = "exp") -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Step ``(B_a, d_a, B_b, d_b, log c)`` towards (averaged) :func:`kl_targets`.

    ``log c ← log c + β (w - 1)``; each factor takes :func:`spectral_step` with its target and
    ``m`` projected to zero mean (the determinant constraint).

    Args:
        Ba: Basis ``(d_a, d_a)``.
        da: Eigenvalues ``(d_a,)``.
        Bb: Basis ``(d_b, d_b)``.
        db: Eigenvalues ``(d_b,)``.
        log_c: Scalar tensor.
        Ca: Target of factor ``a`` in its basis ``(d_a, d_a)``.
        Cb: Target of factor ``b`` in its basis ``(d_b, d_b)``.
        whitened: The scalar ``w`` of :func:`kl_targets`.
        beta: Step size.
        kappa: Rotation damping.
        max_log_step: Clip of the log-eigenvalue (and ``log c``) steps.
        max_rotation: Clip of ``|K_ij|``.
        retraction: See :func:`spectral_step`.

    Returns:
        ``(Ba, da, Bb, db, log_c)`` updated.
    """
    step_c = (beta * (whitened - 1)).clamp(-max_log_step, max_log_step)
    options = dict(beta=beta, kappa=kappa, max_log_step=max_log_step, max_rotation=max_rotation,
                   retraction=retraction, zero_mean_log=True)
    Ba, da = spectral_step(Ba, da, Ca, **options)
    Bb, db = spectral_step(Bb, db, Cb, **options)
    return Ba, da, Bb, db, log_c + step_c


def kl_kronecker_step(Ba: Tensor, da: Tensor, Bb: Tensor, db: Tensor, log_c: Tensor, G: Tensor,
                      *, beta: float, kappa: float, max_log_step: float = 1.0,
                      max_rotation: float = 0.1, retraction: Retraction = "exp"
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One step of ``S = c S_a ⊗ S_b`` towards the KL-Shampoo statistics of ``G``.

    Minimises ``½[d_b log det S_a + d_a log det S_b + d_a d_b log c + tr(S_a⁻¹ G S_b⁻¹ Gᵀ)/c]``
    under ``Σ log d_a = Σ log d_b = 0`` with a block-diagonal metric over ``(a, b, c)``: the
    targets (:func:`kl_targets`) come from the current factors and both factors step at once
    (:func:`kl_apply`).

    Args:
        Ba: Basis ``(d_a, d_a)``.
        da: Eigenvalues ``(d_a,)`` with ``Σ log da = 0``.
        Bb: Basis ``(d_b, d_b)``.
        db: Eigenvalues ``(d_b,)`` with ``Σ log db = 0``.
        log_c: Scalar tensor ``log c``.
        G: Gradient ``(d_a, d_b)``.
        beta: Step size.
        kappa: Rotation damping.
        max_log_step: Clip of the log-eigenvalue (and ``log c``) steps.
        max_rotation: Clip of ``|K_ij|``.
        retraction: See :func:`spectral_step`.

    Returns:
        ``(Ba, da, Bb, db, log_c)`` updated.
    """
    Ca, Cb, w = kl_targets(Ba, da, Bb, db, log_c, G)
    return kl_apply(Ba, da, Bb, db, log_c, Ca, Cb, w, beta=beta, kappa=kappa,
                    max_log_step=max_log_step, max_rotation=max_rotation, retraction=retraction)


# --------------------------------------------------------------------------- optimizer
class SpectralShampoo(KroneckerOptimizer):
    """Two-sided Kronecker preconditioning with spectral-factorized factors (no decompositions).

    For a matrix block ``G: (d_a, d_b)`` the preconditioner is ``S = c S_a ⊗ S_b`` with
    ``S_k = B_k diag(d_k) B_kᵀ`` learned by :func:`kl_kronecker_step` (``target="kl"``: a
    decomposition-free KL-Shampoo) or by two independent :func:`spectral_step` on ``G Gᵀ`` and
    ``Gᵀ G`` (``target="shampoo"``; then ``c = 1``); ``step(targets={p: (C_a, C_b)})`` replaces
    the statistics of parameter ``p`` by caller-supplied PSD factors (e.g. KFAC's), learned
    independently like ``"shampoo"``. The update is

        ``θ ← θ(1 - ηλ) - η · B_a [(c d_a ⊗ d_b + ε)^{-1/p} ⊙ (B_aᵀ M B_b)] B_bᵀ``,

    the exact ``(S + εI)^{-1/p}`` applied to the momentum ``M = EMA_β₁(G)``. The factors are
    initialised by one ``eigh`` of the first statistics; after that each step costs a few GEMMs.
    Tensors of order 1 get Adam; larger orders are viewed as matrices/tensors as in
    :class:`~curvkit.optim.Shampoo` (every preconditioned axis of a tensor of order > 2 is learned
    independently, like ``"shampoo"``).

    Storage: ``B_k``, the momentum and Adam's moments in ``state_dtype``; ``d_k`` and ``log c`` in
    float32 (they are tiny, and multiplicative updates need their precision). A bfloat16 ``B`` is
    re-orthonormalised by two Newton–Schulz polar steps each time it is loaded, which keeps the
    basis actually used orthogonal to working precision; in float32 one polar step runs every
    ``orthogonalize_frequency`` steps against the slow drift of round-off.

    Args:
        params: Parameters or param groups.
        lr: Learning rate ``η``.
        betas: ``(β₁, β₂)``: momentum, and Adam's second-moment retention for order-1 tensors.
        beta: Step size of the factor learning (an EMA weight).
        kappa: Damping of the rotation metric.
        eps: ``ε`` added to the eigenvalues of ``S`` (of each factor for ``"shampoo"``).
        root: ``p`` of ``S^{-1/p}``; ``None`` means 2 for ``"kl"`` and ``2 · order`` otherwise.
        target: ``"kl"`` or ``"shampoo"``.
        retraction: ``"exp"``, ``"cayley"`` or ``"taylor"``.
        max_log_step: Clip of the log-eigenvalue steps.
        max_rotation: Clip of the rotation entries.
        init_eps: Relative eigenvalue floor at the ``eigh`` initialisation (the first statistic
            is rank-deficient; a tiny floor would amplify its null space until ``d`` adapts).
        update_frequency: Steps over which the statistics are averaged between two factor
            updates (each update is one Riemannian step; 1 updates every step).
        orthogonalize_frequency: Factor updates between polar corrections of float32/float64
            bases.
        weight_decay: Decoupled weight decay ``λ``.
        max_preconditioner_dim: Largest factor; larger axes are split into blocks.
        state_dtype: Storage dtype of ``B`` and the moments (e.g. ``torch.bfloat16``).
        nonfinite: ``"raise"`` or ``"skip"`` on nan/inf gradients.
        seed: Seed of the stochastic-rounding bits.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = SpectralShampoo(model.parameters(), lr=1e-2)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    _name = "SpectralShampoo"

    def __init__(self, params: Iterable, lr: float = 3e-3, *,
                 betas: tuple[float, float] = (0.9, 0.999), beta: float = 0.05,
                 kappa: float = 1e-3, eps: float = 1e-8, root: float | None = None,
                 target: Literal["kl", "shampoo"] = "kl", retraction: Retraction = "exp",
                 max_log_step: float = 1.0, max_rotation: float = 0.1, init_eps: float = 1e-2,
                 update_frequency: int = 1, orthogonalize_frequency: int = 20,
                 weight_decay: float = 0.0,
                 max_preconditioner_dim: int = 4096, state_dtype: torch.dtype | None = None,
                 nonfinite: Literal["raise", "skip"] = "raise", seed: int = 0):
        defaults = self._common_defaults(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, precondition_frequency=1,
            start_preconditioning_step=0, max_preconditioner_dim=max_preconditioner_dim,
            merge_dims=False, large_dims="block", basis_update="eigh", subspace_rank=None,
            state_dtype=state_dtype, nonfinite=nonfinite, orthogonality_tolerance=1e-2,
            seed=seed)
        name = self._name
        check_range(name, "beta", beta, 0.0, 1.0, low_open=True)
        check_range(name, "kappa", kappa, 0.0, low_open=True)
        if root is not None:
            check_range(name, "root", root, 0.0, low_open=True)
        check_choice(name, "target", target, ("kl", "shampoo"))
        check_choice(name, "retraction", retraction, ("exp", "cayley", "taylor"))
        check_range(name, "max_log_step", max_log_step, 0.0, low_open=True)
        check_range(name, "max_rotation", max_rotation, 0.0, low_open=True)
        check_range(name, "init_eps", init_eps, 0.0, low_open=True)
        check_int(name, "update_frequency", update_frequency, 1)
        check_int(name, "orthogonalize_frequency", orthogonalize_frequency, 1)
        defaults.update(beta=beta, kappa=kappa, root=root, target=target,
                        retraction=retraction, max_log_step=max_log_step,
                        max_rotation=max_rotation, init_eps=init_eps,
                        update_frequency=update_frequency,
                        orthogonalize_frequency=orthogonalize_frequency)
        super().__init__(params, defaults)

    @torch.compiler.disable  # runs eagerly under torch.compile, as CurvkitOptimizer.step
    @torch.no_grad()
    def step(self, closure=None, *, targets: Mapping[Tensor, tuple[Tensor, Tensor]] | None = None):
        """Perform one optimization step.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss.
            targets: Optional ``{param: (C_a, C_b)}`` of PSD curvature factors
                (``(d_a, d_a)``, ``(d_b, d_b)``) that replace the gradient statistics of a
                2-d, unblocked parameter without size-1 axes for this step (e.g. KFAC's
                input/output factors).

        Returns:
            The closure's loss, or ``None``.

        Raises:
            ValueError: If a target does not match its parameter.
        """
        self._targets = {}  # transient: read by the kernels during this call only
        for p, pair in (targets or {}).items():
            shapes = tuple(tuple(t.shape) for t in pair)
            rows, cols = (p.shape[0], p.shape[1]) if p.dim() == 2 else (None, None)
            # a size-1 axis is dropped (the parameter gets Adam): its targets would be ignored
            if p.dim() != 2 or shapes != ((rows, rows), (cols, cols)) or 1 in p.shape or \
                    max(p.shape) > self._group_of(p)["max_preconditioner_dim"]:
                raise ValueError(f"{self._name}.step: targets need a 2-d unblocked parameter "
                                 f"without size-1 axes and factors of shapes ((m, m), (n, n)); "
                                 f"got parameter "
                                 f"{tuple(p.shape)} and factors {shapes}.")
            if any(t.device != p.device for t in pair):
                raise ValueError(f"{self._name}.step: targets must be on their parameter's device "
                                 f"{p.device}; got factors on "
                                 f"{', '.join(str(t.device) for t in pair)}.")
            self._targets[id(p)] = pair
        try:
            return super().step(closure)
        finally:
            del self._targets

    def _group_of(self, p: Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError(f"{self._name}.step: a target's parameter is not optimized here.")

    def _update_param(self, p, group, index):
        self._current = self._targets.get(id(p))
        super()._update_param(p, group, index)

    def _init_block(self, shape, axes, group, dtype, device):
        block = {"exp_avg": torch.zeros(shape, dtype=dtype, device=device)}
        if not axes:  # order-1 tensors get Adam
            block["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=device)
        for k in axes:
            block[f"B{k}"] = torch.eye(shape[k], dtype=dtype, device=device)
        return block

    # The d's and log c are kept in float32 (or float64) whatever state_dtype is.
    @staticmethod
    def _exact(block: dict, key: str, ctx: _Context) -> Tensor:
        return block[key].to(ctx.wd)

    def _basis(self, block: dict, k: int, ctx: _Context) -> Tensor:
        B = ctx.load(block, f"B{k}")
        if ctx.sd == torch.bfloat16:  # undo the storage round-off: orthogonal to working precision
            B = newton_schulz_polar(B, steps=2)
        return B

    def _statistics(self, G: Tensor, ctx: _Context) -> dict[int, Tensor]:
        if self._current is not None:
            return {0: self._current[0].to(ctx.wd), 1: self._current[1].to(ctx.wd)}
        stats = {}
        for k in ctx.axes:
            Gk = G.movedim(k, 0).reshape(G.shape[k], -1)
            stats[k] = Gk @ Gk.T
        return stats

    def _block_direction(self, G: Tensor, block: dict, ctx: _Context) -> Tensor:
        group = ctx.group
        kl = group["target"] == "kl" and len(ctx.axes) == 2 and G.dim() == 2 and \
            self._current is None
        order = len(G.shape)
        p = group["root"] or (2.0 if kl else 2.0 * order)
        options = dict(beta=group["beta"], kappa=group["kappa"],
                       max_log_step=group["max_log_step"], max_rotation=group["max_rotation"],
                       retraction=group["retraction"])
        if f"d{ctx.axes[0]}" not in block and not self._initialise(G, block, ctx, kl):
            # an all-zero first statistic has no spectrum to start from (its floor would be
            # ~tiny and blow the first real steps up): wait for a nonzero one
            M = ctx.load(block, "exp_avg").lerp(G, 1 - group["betas"][0])
            ctx.save(block, "exp_avg", M)
            return torch.zeros_like(G)
        B = {k: self._basis(block, k, ctx) for k in ctx.axes}
        d = {k: self._exact(block, f"d{k}", ctx) for k in ctx.axes}
        # Targets in the current bases, averaged over `update_frequency` steps (the bases do
        # not move in between, so the average is exact) before one Riemannian step.
        if kl:
            if "log_c" not in block:
                # the factors were started from caller targets (independent form, no c): move
                # their scale into c, keeping S = c S_a ⊗ S_b, so that Σ log d_k = 0 as KL needs
                # (stored at once: this step may not be a factor update)
                log_scale = {k: d[k].log().mean() for k in ctx.axes}
                for k in ctx.axes:
                    d[k] = d[k] / log_scale[k].exp()
                    block[f"d{k}"] = d[k].to(block[f"d{k}"].dtype)
                block["log_c"] = (log_scale[0] + log_scale[1]).to(block["d0"].dtype)
            log_c = self._exact(block, "log_c", ctx)
            Ca, Cb, w = kl_targets(B[0], d[0], B[1], d[1], log_c, G)
            targets = {0: Ca, 1: Cb, "w": w}
        else:
            stats = self._statistics(G, ctx)
            targets = {k: B[k].T @ stats[k] @ B[k] for k in ctx.axes}
        freq = group["update_frequency"]
        step = ctx.step + 1
        if freq > 1:
            for key, value in targets.items():
                name = f"acc_{key}"
                previous = self._exact(block, name, ctx) if name in block else 0.0
                targets[key] = previous + value / freq
                block[name] = targets[key].to(torch.float64 if ctx.wd == torch.float64
                                              else torch.float32)
        if step % freq == 0:
            for key in list(targets):
                block.pop(f"acc_{key}", None)
            if kl:
                B[0], d[0], B[1], d[1], log_c = kl_apply(
                    B[0], d[0], B[1], d[1], log_c, targets[0], targets[1], targets["w"],
                    **options)
                block["log_c"] = log_c.to(block["log_c"].dtype)
            else:
                for k in ctx.axes:
                    C_rot = targets[k]
                    B[k], d[k] = spectral_step(B[k], d[k], 0.5 * (C_rot + C_rot.T), **options)
            for k in ctx.axes:
                if ctx.sd != torch.bfloat16 and \
                        (step // freq) % group["orthogonalize_frequency"] == 0:
                    B[k] = newton_schulz_polar(B[k])
                block[f"B{k}"] = B[k].to(ctx.sd)
                block[f"d{k}"] = d[k].to(block[f"d{k}"].dtype)
        beta1 = group["betas"][0]
        M = ctx.load(block, "exp_avg").lerp(G, 1 - beta1)
        ctx.save(block, "exp_avg", M)
        return self._precondition(M, B, d, block, ctx, p=p, kl=kl)

    def _precondition(self, M: Tensor, B: dict[int, Tensor], d: dict[int, Tensor], block: dict,
                      ctx: _Context, *, p: float, kl: bool) -> Tensor:
        """``(S + εI)^{-1/p} M`` in the learned eigenbasis (elementwise in rotated coordinates)."""
        eps = ctx.group["eps"]
        M_rot = M
        for k in ctx.axes:
            M_rot = torch.tensordot(B[k].T, M_rot, dims=([1], [k])).movedim(0, k)
        if kl:
            lam = self._exact(block, "log_c", ctx).exp() * torch.outer(d[0], d[1])
            M_rot = M_rot * (lam + eps).pow(-1.0 / p)
        else:
            for k in ctx.axes:
                shape = [1] * M.dim()
                shape[k] = -1
                M_rot = M_rot * (d[k] + eps).pow(-1.0 / p).reshape(shape)
        for k in ctx.axes:
            M_rot = torch.tensordot(B[k], M_rot, dims=([1], [k])).movedim(0, k)
        return M_rot

    def _initialise(self, G: Tensor, block: dict, ctx: _Context, kl: bool) -> bool:
        """One ``eigh`` of the first statistics (``B`` cannot leave a degenerate ``d``).

        Returns:
            ``False`` (and nothing initialised) if a statistic is all zero.
        """
        eps = ctx.group["init_eps"]
        exact = torch.float64 if ctx.wd == torch.float64 else torch.float32
        stats = self._statistics(G, ctx)
        if not all(bool(stats[k].any()) for k in ctx.axes):
            return False
        for k in ctx.axes:
            n_other = G.numel() // G.shape[k]
            Bk, dk = spectral_init(stats[k] / (n_other if kl else 1), eps=eps)
            if kl:  # determinant constraint: the scale moves into c
                dk = dk / dk.log().mean().exp()
            block[f"B{k}"] = Bk.to(ctx.sd)
            block[f"d{k}"] = dk.to(exact)
        if kl:
            Ba, Bb = block["B0"].to(ctx.wd), block["B1"].to(ctx.wd)
            da, db = block["d0"].to(ctx.wd), block["d1"].to(ctx.wd)
            G_rot = Ba.T @ G @ Bb
            whitened = (G_rot.square() / torch.outer(da, db)).sum() / G.numel()
            tiny = torch.finfo(exact).tiny
            block["log_c"] = whitened.clamp_min(tiny).log().to(exact)
        return True
