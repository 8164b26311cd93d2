"""Symo: an optimizer preconditioned by symmetry-averaged curvature.

Each parameter block names the weight-space symmetry group of each of its axes (see
:mod:`curvkit.curvature.symmetry`). The optimizer keeps the momentum ``M = EMA_β₁(G)`` and an EMA
(retention ``β₂``) of the orbit-averaged outer product of the debiased momentum,
``S = EMA(R₂(M̂, M̂))``, stored only as its commutant factors ``F_ℓ``; the step is the Symo
direction of the practical solution (Eq. 11 of the paper), ``H_g = S^{1/2}``:

    ``θ ← θ(1 - ηλ) - η (S + ρ s_max I)^{-1/2} M̂``,

with the damping relative to the largest eigenvalue ``s_max`` of the block's factors. The inverse
root is computed factor by factor (small batched ``eigh``), every ``precondition_frequency`` steps.

The group sets the method: ``("orthogonal", "identity")`` on a weight ``(h, f)`` (``h >= f``) is
one-sided Shampoo with exponent ``-1/2`` on the small side, i.e. Muon's ``√h U Vᵀ`` when the EMA
keeps only the last step (``β₂ = 0``); ``("sign",)`` on a vector is an Adam-like diagonal
(``|M̂| / sqrt(EMA(M̂²))``); ``("perm", "identity")`` is the ReLU-unit structure (mean and
centred parts preconditioned separately). ``groups="auto"`` picks the Muon/Shampoo choice for
matrices (the larger axis gets ``"orthogonal"``) and ``"sign"`` for vectors.

The orbit centre ``R₁(M̂)`` is *not* removed from the statistic: for ``perm`` axes the mean
direction would otherwise be pure damping (the paper's handling of that block is unknown).

References:
    Artemev, Xia, Boyd, Yu, Dangel, Hennequin, Bernacchia (2026). Exploiting weight-space
    symmetries for approximating curvature. ICML. arXiv:2606.00442.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from curvkit.curvature.symmetry import GROUPS, SymmetryAveraged, _factor_shape
from curvkit.optim._common import (
    CurvkitOptimizer,
    check_betas,
    check_choice,
    check_int,
    check_range,
    check_state_dtype,
    step_generator,
    store,
    working_dtype,
)

__all__ = ["Symo", "auto_groups", "symo_direction"]

GroupSpec = Literal["auto"] | Sequence[str] | Callable[[tuple[int, ...]], Sequence[str]]


def auto_groups(shape: tuple[int, ...]) -> tuple[str, ...]:
    """The default groups: ``"orthogonal"`` on a matrix's larger axis, ``"sign"`` on a vector.

    Args:
        shape: Working shape, ``(n,)`` or ``(m, n)``.

    Returns:
        One group name per axis.

    Raises:
        ValueError: For a shape that is neither a vector nor a matrix.
    """
    if len(shape) not in (1, 2):  # shape[0] / shape[1] below would misread any other shape
        raise ValueError(f"auto_groups: expected a working shape (n,) or (m, n); got "
                         f"{tuple(shape)}.")
    if len(shape) == 1:
        return ("sign",)
    return ("orthogonal", "identity") if shape[0] >= shape[1] else ("identity", "orthogonal")


def _working_shape(shape: torch.Size) -> tuple[int, ...]:
    """Scalars and vectors stay; higher orders are viewed as ``(shape[0], rest)``."""
    if len(shape) <= 1:
        return (max(1, shape.numel()),)
    return (shape[0], math.prod(shape[1:]))  # not numel // shape[0]: shape[0] may be 0


def symo_direction(M: Tensor, factors: SymmetryAveraged, *, damping: float) -> Tensor:
    """``(S + ρ s_max I)^{-1/2} M`` for a symmetry-averaged ``S``.

    Args:
        M: Parameter-shaped tensor (the working shape of ``factors``).
        factors: The averaged statistic ``S``.
        damping: Relative damping ``ρ > 0``.

    Returns:
        Tensor shaped like ``M``.

    Raises:
        ValueError: If ``damping`` is not positive (zero gives inf, negative nan).
    """
    check_range("symo_direction", "damping", damping, 0.0, low_open=True)
    root = _inverse_root(factors, damping)
    return (root @ M.reshape(-1)).reshape(M.shape)


def _inverse_root(S: SymmetryAveraged, damping: float) -> SymmetryAveraged:
    def fn(s: Tensor) -> Tensor:
        if not s.max() > 0:  # an all-zero statistic has no scale to damp against: no step
            return torch.zeros_like(s)
        # round-off can leave tiny negative eigenvalues of a PSD average: damping dominates them
        shift = damping * s.max().clamp_min(torch.finfo(s.dtype).tiny)
        return (s.clamp_min(0) + shift).rsqrt()

    return S.map_factors(fn, caller="Symo")


class Symo(CurvkitOptimizer):
    """Symmetry-averaged curvature preconditioning (see the module docstring).

    Args:
        params: Parameters or param groups.
        lr: Learning rate ``η``.
        betas: ``(β₁, β₂)``: momentum and the retention of the averaged statistic.
        damping: Damping ``ρ`` relative to the largest eigenvalue of the block's statistic.
        groups: ``"auto"``, one tuple of group names used for every parameter of the group, or a
            callable from the working shape (``(n,)`` or ``(m, n)``; higher orders are viewed as
            ``(shape[0], rest)``) to the names. A callable is code, not state: ``state_dict``
            leaves it out (so ``torch.load`` loads the dict with its default
            ``weights_only=True``) and the loading optimizer keeps its own ``groups``.
        precondition_frequency: Steps between recomputations of the inverse root.
        weight_decay: Decoupled weight decay ``λ``.
        state_dtype: Storage dtype of the state (bfloat16 with stochastic rounding).
        nonfinite: ``"raise"`` or ``"skip"`` on nan/inf gradients.
        seed: Seed of the stochastic-rounding bits.

    Raises:
        ValueError: For out-of-range options or groups that do not fit a parameter.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                             torch.nn.Linear(8, 2))
        >>> opt = Symo(model.parameters(), lr=1e-2)
        >>> model(torch.randn(16, 4)).square().mean().backward()
        >>> opt.step()
    """

    _name = "Symo"

    def __init__(self, params: Iterable, lr: float = 1e-3, *,
                 betas: tuple[float, float] = (0.9, 0.99), damping: float = 1e-3,
                 groups: GroupSpec = "auto", precondition_frequency: int = 1,
                 weight_decay: float = 0.0, state_dtype: torch.dtype | None = None,
                 nonfinite: Literal["raise", "skip"] = "raise", seed: int = 0):
        name = self._name
        check_range(name, "lr", lr, 0.0)
        check_betas(name, betas)
        check_range(name, "damping", damping, 0.0, low_open=True)
        check_int(name, "precondition_frequency", precondition_frequency, 1)
        check_range(name, "weight_decay", weight_decay, 0.0)
        check_state_dtype(name, state_dtype)
        check_choice(name, "nonfinite", nonfinite, ("raise", "skip"))
        check_int(name, "seed", seed, 0)
        defaults = dict(lr=lr, betas=tuple(betas), damping=damping, groups=groups,
                        precondition_frequency=precondition_frequency,
                        weight_decay=weight_decay, state_dtype=state_dtype, nonfinite=nonfinite,
                        seed=seed)
        super().__init__(params, defaults)

    def _check_param(self, p: Tensor, group: dict[str, Any]) -> None:
        # fail at construction (or add_param_group), not inside a step
        self._groups_for(p, group)

    def _moment_shapes(self, p: Tensor, group: dict[str, Any]) -> list[tuple[int, ...]]:
        return [_working_shape(p.shape)]

    def _groups_for(self, p: Tensor, group: dict[str, Any]) -> tuple[str, ...]:
        shape = _working_shape(p.shape)
        spec = group["groups"]
        if isinstance(spec, str):
            if spec != "auto":
                raise ValueError(f"{self._name}: groups must be 'auto', a tuple of names or a "
                                 f"callable; got {spec!r}.")
            names = auto_groups(shape)
        elif callable(spec):
            names = spec(shape)
            if isinstance(names, str):  # tuple("sign") would be ('s', 'i', 'g', 'n')
                raise ValueError(f"{self._name}: the groups callable must return a sequence of "
                                 f"names for working shape {shape}; got the string {names!r}.")
            names = tuple(names)
        else:
            names = tuple(spec)
        if len(names) != len(shape) or any(n not in GROUPS for n in names):
            raise ValueError(f"{self._name}: groups for working shape {shape} must be "
                             f"{len(shape)} names from {GROUPS}; got {names}.")
        return names

    def _update_param(self, p: Tensor, group: dict[str, Any], index: int) -> None:
        wd = working_dtype(p)
        sd = group["state_dtype"] or wd
        shape = _working_shape(p.shape)
        names = self._groups_for(p, group)
        state = self.state[p]
        if "step" not in state:
            empty = SymmetryAveraged.from_samples(torch.zeros(1, *shape, dtype=wd), groups=names)
            state["step"] = 0
            state.setdefault("skipped_steps", 0)
            state["exp_avg"] = torch.zeros(shape, dtype=sd, device=p.device)
            state["factors"] = empty.factors.to(device=p.device, dtype=sd)
            state["root"] = torch.zeros_like(state["factors"])
        expected = _factor_shape(shape, names)
        if tuple(state["factors"].shape) != expected:
            # state of other groups (another state dict, a changed groups callable) would be
            # broadcast silently into this statistic, or fail with a bare size mismatch
            raise ValueError(f"{self._name}.step: the state of a parameter of shape "
                             f"{tuple(p.shape)} holds factors of shape "
                             f"{tuple(state['factors'].shape)}, but its groups {names} on "
                             f"working shape {shape} expected {expected}; was the state saved "
                             "with other groups?")
        t = state["step"] + 1
        gen = step_generator(group["seed"], index, state["step"]) if sd == torch.bfloat16 else None
        beta1, beta2 = group["betas"]
        G = p.grad.to(wd).reshape(shape)
        M = state["exp_avg"].to(wd).lerp(G, 1 - beta1)
        M_hat = M / (1 - beta1**t)
        sample = SymmetryAveraged.from_samples(M_hat[None], groups=names).factors
        F = state["factors"].to(wd) * beta2 + (1 - beta2) * sample
        state["exp_avg"], state["factors"] = store(M, sd, gen), store(F, sd, gen)
        # a zero root (from an all-zero statistic, e.g. a zero first gradient) is replaced as
        # soon as there is curvature, not only at the next scheduled refresh
        if (t - 1) % group["precondition_frequency"] == 0 or not state["root"].any():
            S = SymmetryAveraged(shape, names, F / (1 - beta2**t))
            state["root"] = store(_inverse_root(S, group["damping"]).factors, sd, None)
        root = SymmetryAveraged(shape, names, state["root"].to(wd))
        update = (root @ M_hat.reshape(-1)).reshape(p.shape)
        state["step"] = t
        lr, decay = group["lr"], group["weight_decay"]
        if decay:
            p.mul_(1 - lr * decay)
        p.add_(update.to(p.dtype), alpha=-lr)
