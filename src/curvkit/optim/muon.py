"""Muon: orthogonalised momentum for hidden matrices, AdamW for everything else."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvkit.optim._common import (
    CurvkitOptimizer,
    adam_direction,
    check_choice,
    check_int,
    check_range,
    check_state_dtype,
    step_generator,
    store,
    working_dtype,
)

__all__ = ["Muon", "muon_param_groups", "newton_schulz"]

QUINTIC = (3.4445, -4.7750, 2.0315)


def newton_schulz(Y: Tensor, *, steps: int = 5, coefficients: tuple[float, float, float] = QUINTIC,
                  eps: float = 1e-7, dtype: torch.dtype | None = torch.bfloat16) -> Tensor:
    """Approximate the orthogonal polar factor ``U Vᵀ`` of ``Y = U Σ Vᵀ`` (quintic Newton–Schulz).

    ``X₀ = Y / (‖Y‖_F + eps)`` (so every singular value is ``<= 1``), then ``steps`` times
    ``A = X Xᵀ``, ``X ← aX + (bA + cA²)X``. The iteration runs on the short side (``Y`` is
    transposed when it has more rows than columns). The quintic's coefficients trade exactness for
    speed: singular values land in a band around 1 (about ``[0.68, 1.13]`` for input singular values
    ``>= 1e-2 ‖Y‖_F``) rather than at 1.

    Args:
        Y: Matrix ``(m, n)``.
        steps: Number of iterations.
        coefficients: ``(a, b, c)``.
        eps: Guard of the normalisation.
        dtype: Compute dtype (``None``: ``Y``'s dtype); bfloat16 as in the reference.

    Returns:
        Matrix ``(m, n)`` in ``Y``'s dtype.

    Raises:
        ValueError: If ``Y`` is not a matrix.

    References:
        Jordan et al. (2024). Muon: An optimizer for hidden layers in neural networks.
    """
    if Y.dim() != 2:
        raise ValueError(f"newton_schulz: Y must be a matrix; got shape {tuple(Y.shape)}.")
    a, b, c = coefficients
    X = Y.to(dtype) if dtype is not None else Y
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    scale = torch.linalg.vector_norm(X) + eps
    # a zero denominator means Y = 0 with eps = 0: divide by 1 (0 ↦ 0) instead of making nan
    X = X / torch.where(scale == 0, torch.ones_like(scale), scale)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * (A @ A)) @ X
    return (X.T if tall else X).to(Y.dtype)


def muon_param_groups(model: nn.Module, *, head: nn.Module | str | None = None,
                      ) -> list[dict[str, Any]]:
    """Split a model's parameters into a Muon group and an AdamW group.

    AdamW gets: embedding tables (``nn.Embedding``), the output head, and every parameter with
    fewer than two dimensions (biases, gains). Muon gets the remaining matrices and conv kernels.

    Args:
        model: The model.
        head: The output layer (a module, or its name in ``model.named_modules()``); ``None``
            picks the last ``nn.Linear`` registered in the model.

    Returns:
        ``[{"params": [...], "use_muon": True}, {"params": [...], "use_muon": False}]`` (a group
        is left out when empty).

    Raises:
        ValueError: If ``head`` names no module of ``model``.
    """
    modules = dict(model.named_modules())
    if isinstance(head, str):
        if head not in modules:
            raise ValueError(f"muon_param_groups: head {head!r} is not a module of the model.")
        head = modules[head]
    elif head is None:
        linears = [m for m in modules.values() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    elif not any(m is head for m in modules.values()):
        # a module outside the model (e.g. a copy) would silently leave the real head to Muon
        raise ValueError(f"muon_param_groups: head {type(head).__name__} is not a module of the "
                         "model (pass the model's own module or its name).")
    adamw_ids = set()
    for m in modules.values():
        if isinstance(m, nn.Embedding) or m is head:
            adamw_ids.update(id(p) for p in m.parameters())
    muon, adamw = [], []
    for p in model.parameters():  # deduplicated, so tied weights appear once
        if not p.requires_grad:
            continue
        (adamw if id(p) in adamw_ids or p.dim() < 2 else muon).append(p)
    groups = [{"params": muon, "use_muon": True}, {"params": adamw, "use_muon": False}]
    return [g for g in groups if g["params"]]


class Muon(CurvkitOptimizer):
    """Muon for hidden matrices, with an AdamW sub-optimizer for the other parameters.

    Muon parameters (matrices; conv kernels are flattened to ``(out, in·kh·kw)``):
    ``B ← μB + (1-μ)G``; ``Y = (1-μ)G + μB`` (Nesterov) or ``B``; ``O = newton_schulz(Y)``;
    ``θ ← θ(1 - ηλ) - η s O`` with the shape scale ``s = sqrt(max(1, m/n))`` (``"original"``) or
    ``0.2 sqrt(max(m, n))`` (``"match_rms_adamw"``, which lets AdamW learning rates transfer).
    AdamW parameters use ``adamw_lr``, ``adamw_betas``, ``adamw_eps``, ``adamw_weight_decay``.

    Learning-rate schedules act on ``lr`` (``torch.optim.lr_scheduler``, ``ReduceLROnPlateau`` or
    edits of ``group["lr"]``); the AdamW parameters follow them: they step with
    ``adamw_lr · lr / base_lr``, where the group option ``base_lr`` is the group's ``lr`` when it
    was created (or added; pass it in a group to choose another reference; ``base_lr = 0`` keeps
    ``adamw_lr`` unscaled). ``OneCycleLR``'s momentum cycling moves ``momentum`` only, not
    ``adamw_betas``.

    Which parameters use Muon is the group option ``use_muon``: ``True``, ``False``, or ``None``
    (automatic: tensors with two or more dimensions). Pass :func:`muon_param_groups` to also send
    embeddings and the output head to AdamW.

    Args:
        params: Parameters or param groups.
        lr: Muon learning rate ``η``.
        momentum: ``μ``.
        nesterov: Use the Nesterov input.
        ns_steps: Newton–Schulz iterations.
        ns_coefficients: ``(a, b, c)`` of the quintic.
        ns_dtype: Compute dtype of Newton–Schulz (``None``: the working dtype).
        eps: Guard of the Frobenius normalisation.
        weight_decay: Decoupled weight decay ``λ`` of the Muon parameters.
        adjust_lr: ``"original"`` or ``"match_rms_adamw"``.
        adamw_lr: AdamW learning rate.
        adamw_betas: AdamW ``(β₁, β₂)``.
        adamw_eps: AdamW ``ε``.
        adamw_weight_decay: AdamW decoupled weight decay.
        use_muon: Default of the group option above.
        state_dtype: Storage dtype of the state (bfloat16 with stochastic rounding).
        nonfinite: ``"raise"`` or ``"skip"`` on nan/inf gradients.
        seed: Seed of the stochastic rounding bits.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        >>> opt = Muon(muon_param_groups(model), lr=0.02)
        >>> model(torch.randn(16, 4)).square().mean().backward()
        >>> opt.step()
    """

    _name = "Muon"

    def __init__(self, params: Iterable, lr: float = 0.02, *, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5,
                 ns_coefficients: tuple[float, float, float] = QUINTIC,
                 ns_dtype: torch.dtype | None = torch.bfloat16, eps: float = 1e-7,
                 weight_decay: float = 0.0,
                 adjust_lr: Literal["original", "match_rms_adamw"] = "original",
                 adamw_lr: float = 3e-4, adamw_betas: tuple[float, float] = (0.9, 0.95),
                 adamw_eps: float = 1e-10, adamw_weight_decay: float = 0.0,
                 use_muon: bool | None = None, state_dtype: torch.dtype | None = None,
                 nonfinite: Literal["raise", "skip"] = "raise", seed: int = 0):
        name = self._name
        check_range(name, "lr", lr, 0.0)
        check_range(name, "momentum", momentum, 0.0, 1.0)
        if not isinstance(nesterov, bool):
            raise TypeError(f"{name}: nesterov must be a bool; got {nesterov!r}.")
        check_int(name, "ns_steps", ns_steps, 1)
        if not isinstance(ns_coefficients, (tuple, list)) or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) for x in ns_coefficients):
            raise TypeError(f"{name}: ns_coefficients must be three real numbers (a, b, c); "
                            f"got {ns_coefficients!r}.")
        if len(ns_coefficients) != 3:
            raise ValueError(f"{name}: ns_coefficients must be three real numbers (a, b, c); "
                             f"got {len(ns_coefficients)} values {tuple(ns_coefficients)}.")
        check_range(name, "eps", eps, 0.0)
        check_range(name, "weight_decay", weight_decay, 0.0)
        check_choice(name, "adjust_lr", adjust_lr, ("original", "match_rms_adamw"))
        check_range(name, "adamw_lr", adamw_lr, 0.0)
        # check_betas would name the option "betas", which Muon does not have
        if not isinstance(adamw_betas, (tuple, list)) or len(adamw_betas) != 2:
            raise TypeError(f"{name}: adamw_betas must be a pair (beta1, beta2); "
                            f"got {adamw_betas!r}.")
        check_range(name, "adamw_betas[0]", adamw_betas[0], 0.0, 1.0)
        check_range(name, "adamw_betas[1]", adamw_betas[1], 0.0, 1.0)
        check_range(name, "adamw_eps", adamw_eps, 0.0)
        check_range(name, "adamw_weight_decay", adamw_weight_decay, 0.0)
        check_choice(name, "use_muon", use_muon, (None, True, False))
        check_state_dtype(name, state_dtype)
        if ns_dtype is not None and (not isinstance(ns_dtype, torch.dtype)
                                     or not ns_dtype.is_floating_point):
            # (check_state_dtype would name the option "state_dtype")
            raise TypeError(f"{name}: ns_dtype must be None or a floating torch.dtype; "
                            f"got {ns_dtype!r}.")
        check_choice(name, "nonfinite", nonfinite, ("raise", "skip"))
        check_int(name, "seed", seed, 0)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        ns_coefficients=tuple(ns_coefficients), ns_dtype=ns_dtype, eps=eps,
                        weight_decay=weight_decay, adjust_lr=adjust_lr, adamw_lr=adamw_lr,
                        adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps,
                        adamw_weight_decay=adamw_weight_decay, use_muon=use_muon,
                        state_dtype=state_dtype, nonfinite=nonfinite, seed=seed)
        super().__init__(params, defaults)

    def _check_param(self, p: Tensor, group: dict[str, Any]) -> None:
        # every group, including those added later by add_param_group; a group's own use_muon
        # is only truth-tested later, so a stray value ("yes", "auto") would pass silently
        check_choice(self._name, "use_muon", group["use_muon"], (None, True, False))
        if group["use_muon"] and p.dim() < 2:
            raise ValueError(f"{self._name}: use_muon=True needs parameters with >= 2 "
                             f"dimensions; got shape {tuple(p.shape)}.")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (as ``torch.optim``); its ``base_lr`` defaults to its ``lr``.

        Raises:
            TypeError: For a parameter that is not a real floating tensor.
            ValueError: For an option out of range.
        """
        if isinstance(param_group, dict) and "base_lr" in param_group:
            check_range(self._name, "base_lr", param_group["base_lr"], 0.0)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("base_lr", group["lr"])

    def _missing_option(self, key: str, saved: dict, group: dict) -> object:
        # a state dict saved before base_lr existed: AdamW stepped with adamw_lr itself there
        return saved["lr"] if key == "base_lr" else super()._missing_option(key, saved, group)

    @staticmethod
    def _adamw_lr(group: dict[str, Any]) -> float:
        """``adamw_lr`` scaled by the group's learning-rate schedule ``lr / base_lr``."""
        lr, base = group["lr"], group["base_lr"]
        if lr == base or base == 0:  # (exactly adamw_lr when nothing was scheduled)
            return group["adamw_lr"]
        return group["adamw_lr"] * (lr / base)

    def _update_param(self, p: Tensor, group: dict[str, Any], index: int) -> None:
        wd = working_dtype(p)
        sd = group["state_dtype"] or wd
        state = self.state[p]
        use_muon = group["use_muon"] if group["use_muon"] is not None else p.dim() >= 2
        if "step" not in state:
            state["step"] = 0
            state.setdefault("skipped_steps", 0)
            state["exp_avg"] = torch.zeros_like(p, dtype=sd)
            if not use_muon:
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=sd)
        gen = step_generator(group["seed"], index, state["step"]) if sd == torch.bfloat16 else None
        G = p.grad.to(wd)
        state["step"] += 1
        if use_muon:
            mu = group["momentum"]
            buf = state["exp_avg"].to(wd).lerp(G, 1 - mu)
            state["exp_avg"] = store(buf, sd, gen)
            Y = G.lerp(buf, mu) if group["nesterov"] else buf
            Y = Y.reshape(Y.shape[0], -1)
            O = newton_schulz(Y, steps=group["ns_steps"], coefficients=group["ns_coefficients"],
                              eps=group["eps"], dtype=group["ns_dtype"])
            m, n = Y.shape
            if group["adjust_lr"] == "original":
                scale = max(1.0, m / n) ** 0.5
            else:
                scale = 0.2 * max(m, n) ** 0.5
            lr, decay, update = group["lr"], group["weight_decay"], O.reshape(p.shape) * scale
        else:
            update, m_, v_ = adam_direction(
                G, state["exp_avg"].to(wd), state["exp_avg_sq"].to(wd), step=state["step"],
                betas=group["adamw_betas"], eps=group["adamw_eps"])
            state["exp_avg"], state["exp_avg_sq"] = store(m_, sd, gen), store(v_, sd, gen)
            lr, decay = self._adamw_lr(group), group["adamw_weight_decay"]
        if decay:
            p.mul_(1 - lr * decay)
        p.add_(update.to(p.dtype), alpha=-lr)
