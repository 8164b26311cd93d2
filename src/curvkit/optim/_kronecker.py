"""The parameter loop shared by the Kronecker-factored optimizers.

:class:`KroneckerOptimizer` turns each parameter into a working tensor (size-1 axes dropped,
adjacent axes merged on request, large axes blocked or left unpreconditioned), keeps one state
dict per block, and hands each block to a method-specific kernel (``_block_direction``) that
returns the update direction. It also owns what every Kronecker method shares: the basis
refresh schedule, the dependent-state bookkeeping of :class:`~curvkit.optim._basis.BasisChange`,
bfloat16 storage, the non-finite-gradient policy, decoupled weight decay, resume-exact state
dicts and the distributed split of the work.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor

from curvkit.optim import _basis
from curvkit.optim._common import (
    CurvkitOptimizer,
    adam_direction,
    check_betas,
    check_choice,
    check_int,
    check_range,
    check_state_dtype,
    step_generator,
    store,
    working_dtype,
)

__all__ = ["SECOND_MOMENT", "KroneckerOptimizer", "Layout", "layout"]

#: Choices of the ``second_moment`` option of ``SOAP`` and ``KLSOAP`` (how Adam's ``Ṽ`` follows a
#: basis refresh): ``"keep"`` permutes it with the columns only (the references), ``"map"``
#: carries it into the new basis (:meth:`curvkit.optim._basis.BasisChange.second_moments`).
SECOND_MOMENT: tuple[str, ...] = ("keep", "map")


class Layout:
    """How a parameter is viewed by a Kronecker method (derived from shape and options only).

    Attributes:
        shape: Working shape (size-1 axes dropped, adjacent axes merged if asked).
        axes: Axes of the working shape that carry a Kronecker factor.
        blocks: Tuples of slices into the working tensor, one per block.
    """

    __slots__ = ("shape", "axes", "blocks")

    def __init__(self, shape: tuple[int, ...], axes: tuple[int, ...],
                 blocks: list[tuple[slice, ...]]):
        self.shape, self.axes, self.blocks = shape, axes, blocks


def layout(shape: torch.Size | tuple[int, ...], *, max_dim: int, merge_dims: bool,
           large_dims: str) -> Layout:
    """Plan the working view of a parameter.

    Args:
        shape: Parameter shape.
        max_dim: Largest axis that gets its own ``(d, d)`` factor.
        merge_dims: Greedily merge adjacent axes, starting from the last, while their product
            stays ``<= max_dim`` (a conv kernel ``(64, 32, 3, 3)`` becomes ``(64, 288)``).
        large_dims: ``"block"`` splits axes above ``max_dim`` into blocks of at most ``max_dim``;
            ``"identity"`` leaves them unpreconditioned (one-sided, or diagonal if no axis
            remains).

    Returns:
        The :class:`Layout`. Tensors of order 1 (biases, gains) get no preconditioned axis.
    """
    dims = [d for d in shape if d != 1] or [1]
    if merge_dims and len(dims) > 1:
        # from the last axis backwards, so a conv kernel's (in, kh, kw) merge before out joins
        merged = [dims[-1]]
        for d in reversed(dims[:-1]):
            if merged[0] * d <= max_dim:
                merged[0] *= d
            else:
                merged.insert(0, d)
        dims = merged
    work = tuple(dims)
    if len(work) < 2:
        return Layout(work, (), [tuple(slice(None) for _ in work)])
    axes = tuple(k for k, d in enumerate(work) if d <= max_dim or large_dims == "block")
    per_axis = []
    for d in work:
        if d > max_dim and large_dims == "block":
            per_axis.append([slice(a, min(a + max_dim, d)) for a in range(0, d, max_dim)])
        else:
            per_axis.append([slice(None)])
    return Layout(work, axes, [tuple(b) for b in itertools.product(*per_axis)])


class KroneckerOptimizer(CurvkitOptimizer):
    """Base class of ``Shampoo``, ``SOAP``, ``KLShampoo`` and ``KLSOAP`` (not public).

    Subclasses set ``_name``, ``_sort_on_refresh``, ``_coordinate_keys`` (state held in rotated
    coordinates, mapped at every basis change), ``_column_keys`` (per-column state, permuted only)
    and implement ``_init_block`` and ``_block_direction``.
    """

    _name = "KroneckerOptimizer"
    _sort_on_refresh = True
    _coordinate_keys: tuple[str, ...] = ()
    _column_keys: tuple[str, ...] = ()

    # ------------------------------------------------------------------ construction
    @classmethod
    def _common_defaults(cls, *, lr, betas, eps, weight_decay, precondition_frequency,
                         start_preconditioning_step, max_preconditioner_dim, merge_dims,
                         large_dims, basis_update, subspace_rank, state_dtype, nonfinite,
                         orthogonality_tolerance, seed) -> dict[str, Any]:
        name = cls._name
        check_range(name, "lr", lr, 0.0)
        check_betas(name, betas)
        check_range(name, "eps", eps, 0.0)
        check_range(name, "weight_decay", weight_decay, 0.0)
        check_int(name, "precondition_frequency", precondition_frequency, 1)
        check_int(name, "start_preconditioning_step", start_preconditioning_step, 0)
        check_int(name, "max_preconditioner_dim", max_preconditioner_dim, 1)
        check_choice(name, "large_dims", large_dims, ("block", "identity"))
        check_choice(name, "basis_update", basis_update, ("eigh", "qr", "subspace"))
        if subspace_rank is not None:
            check_int(name, "subspace_rank", subspace_rank, 1)
        check_state_dtype(name, state_dtype)
        check_choice(name, "nonfinite", nonfinite, ("raise", "skip"))
        check_range(name, "orthogonality_tolerance", orthogonality_tolerance, 0.0, low_open=True)
        check_int(name, "seed", seed, 0)
        if not isinstance(merge_dims, bool):
            raise TypeError(f"{name}: merge_dims must be a bool; got {merge_dims!r}.")
        return dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                    precondition_frequency=precondition_frequency,
                    start_preconditioning_step=start_preconditioning_step,
                    max_preconditioner_dim=max_preconditioner_dim, merge_dims=merge_dims,
                    large_dims=large_dims, basis_update=basis_update,
                    subspace_rank=subspace_rank, state_dtype=state_dtype, nonfinite=nonfinite,
                    orthogonality_tolerance=orthogonality_tolerance, seed=seed)

    @classmethod
    def _check_second_moment(cls, second_moment: str) -> str:
        return check_choice(cls._name, "second_moment", second_moment, SECOND_MOMENT)

    def _check_param(self, p: Tensor, group: dict[str, Any]) -> None:
        # a param group may override the constructor's value: a misspelt one would act as "keep"
        if "second_moment" in group:
            self._check_second_moment(group["second_moment"])

    # ------------------------------------------------------------------ torch.optim API
    def _moment_shapes(self, p: Tensor, group: dict[str, Any]) -> list[tuple[int, ...]]:
        plan = self._layout(p, group)
        return [tuple(len(range(*s.indices(d))) for s, d in zip(slices, plan.shape))
                for slices in plan.blocks]

    # ------------------------------------------------------------------ per parameter
    def _layout(self, p: Tensor, group: dict[str, Any]) -> Layout:
        return layout(p.shape, max_dim=group["max_preconditioner_dim"],
                      merge_dims=group["merge_dims"], large_dims=group["large_dims"])

    def _update_param(self, p: Tensor, group: dict[str, Any], index: int) -> None:
        plan = self._layout(p, group)
        wd = working_dtype(p)
        sd = group["state_dtype"] or wd
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["skipped_steps"] = state.get("skipped_steps", 0)
            state["blocks"] = []
            for slices in plan.blocks:
                shape = tuple(len(range(*s.indices(d))) for s, d in zip(slices, plan.shape))
                if plan.axes:
                    block = self._init_block(shape, plan.axes, group, wd, p.device)
                else:  # no preconditioned axis: Adam's state (see _adam_block)
                    block = {key: torch.zeros(shape, dtype=wd, device=p.device)
                             for key in ("exp_avg", "exp_avg_sq")}
                state["blocks"].append({k: v.to(sd) if isinstance(v, Tensor) else v
                                        for k, v in block.items()})
        s = state["step"]
        gen = step_generator(group["seed"], index, s) if sd == torch.bfloat16 else None
        G = p.grad.to(wd).reshape(plan.shape)
        update = torch.empty_like(G) if len(plan.blocks) > 1 else None
        skip = False
        for slices, block in zip(plan.blocks, state["blocks"]):
            ctx = _Context(group=group, step=s, axes=plan.axes, wd=wd, sd=sd, gen=gen)
            if plan.axes:
                direction = self._block_direction(G[slices], block, ctx)
            else:
                direction = self._adam_block(G[slices], block, ctx)
            if direction is None:
                skip = True
            elif update is None:
                update = direction
            else:
                update[slices] = direction
        state["step"] = s + 1
        if skip:
            return
        lr, decay = group["lr"], group["weight_decay"]
        if decay:
            p.mul_(1 - lr * decay)
        p.add_(update.reshape(p.shape).to(p.dtype), alpha=-lr)

    def _adam_block(self, G: Tensor, block: dict, ctx: _Context) -> Tensor:
        """Parameters without a preconditioned axis (biases, gains, vectors) get Adam.

        A group's ``bias_correction`` option (SOAP's) applies to them too.
        """
        direction, m, v = adam_direction(
            G, ctx.load(block, "exp_avg"), ctx.load(block, "exp_avg_sq"), step=ctx.step + 1,
            betas=ctx.group["betas"], eps=ctx.group["eps"],
            bias_correction=ctx.group.get("bias_correction", True))
        ctx.save(block, "exp_avg", m)
        ctx.save(block, "exp_avg_sq", v)
        return direction

    # ------------------------------------------------------------------ shared pieces
    def _init_block(self, shape, axes, group, dtype, device) -> dict[str, Any]:
        raise NotImplementedError

    def _block_direction(self, G: Tensor, block: dict, ctx: _Context) -> Tensor | None:
        raise NotImplementedError

    @staticmethod
    def _basis_state(shape, axes, dtype, device) -> dict[str, Tensor]:
        state = {}
        for k in axes:
            state[f"Q{k}"] = torch.eye(shape[k], dtype=dtype, device=device)
            state[f"P{k}"] = torch.zeros(shape[k], shape[k], dtype=dtype, device=device)
        return state

    def _refresh_due(self, ctx: _Context) -> bool:
        start = ctx.group["start_preconditioning_step"]
        return ctx.step >= start and (ctx.step - start) % ctx.group["precondition_frequency"] == 0

    def _refresh(self, block: dict, ctx: _Context, P: dict[int, Tensor],
                 Q: dict[int, Tensor]) -> None:
        """Refresh every axis's basis, map dependent state, and store ``Q`` and ``P``.

        Per-column second moments (``_column_keys``) are carried into the new basis
        (:meth:`~curvkit.optim._basis.BasisChange.second_moments`) at the first eigenbasis after
        a late ``start_preconditioning_step`` (they were accumulated in the identity basis, so
        column ``i`` of the new basis has no relation to parameter coordinate ``i``) and, with
        ``second_moment="map"``, at every refresh; otherwise they are only permuted with the
        columns, as in the SOAP and KL-SOAP references.
        """
        group = ctx.group
        first = ctx.step == group["start_preconditioning_step"]
        # at step 0 nothing has been accumulated yet (the moments are zero): nothing to map
        late_start = first and ctx.step > 0
        map_columns = late_start or group.get("second_moment", "keep") == "map"
        for k in ctx.axes:
            if first:  # the identity is a poor start for power iteration: diagonalise exactly
                evals, O = _basis.eigh_descending(P[k], caller=f"{self._name}.step")
                Qk, Pk = Q[k] @ O, torch.diag(evals)  # Oᵀ P O up to round-off
                change = _basis.BasisChange(coord_map=O.T)
                if late_start and f"lam{k}" in block:
                    # eigenvalue estimates gathered in the old basis (steps before a later
                    # start_preconditioning_step) follow it: diag(Oᵀ diag(λ) O), not column i
                    lam = ctx.load(block, f"lam{k}")
                    block[f"lam{k}"] = store(change.second_moments(lam, 0), ctx.sd, None)
            else:
                d = P[k].shape[0]
                rank = group["subspace_rank"] or max(64, math.ceil(d / 4))
                Qk, Pk, change = _basis.refresh(Q[k], P[k], method=group["basis_update"],
                                                sort=self._sort_on_refresh, rank=min(rank, d))
            self._apply_change(block, ctx, k, change, map_columns=map_columns)
            if ctx.sd == torch.bfloat16 and self._drifted(Qk, ctx):
                Qk, Pk, change = _basis.orthonormalize(Qk, Pk)
                self._apply_change(block, ctx, k, change, map_columns=map_columns)
            Q[k], P[k] = Qk, 0.5 * (Pk + Pk.T)
            block[f"Q{k}"] = store(Qk, ctx.sd, None)
            block[f"P{k}"] = store(P[k], ctx.sd, ctx.gen)

    @staticmethod
    def _drifted(Q: Tensor, ctx: _Context) -> bool:
        # A random probe costs 2 d^2 instead of the d^3 of forming QᵀQ.
        Qs = Q.to(torch.bfloat16).to(Q.dtype)  # what will be stored
        x = torch.randn(Q.shape[0], generator=ctx.gen, dtype=Q.dtype).to(Q.device)
        err = torch.linalg.vector_norm(Qs.T @ (Qs @ x) - x) / torch.linalg.vector_norm(x)
        return bool(err > ctx.group["orthogonality_tolerance"])

    def _apply_change(self, block: dict, ctx: _Context, axis: int,
                      change: _basis.BasisChange, *, map_columns: bool) -> None:
        for key in self._coordinate_keys:
            block[key] = store(change.coordinates(ctx.load(block, key), axis), ctx.sd, ctx.gen)
        for key in self._column_keys:
            if map_columns:
                block[key] = store(change.second_moments(ctx.load(block, key), axis), ctx.sd,
                                   ctx.gen)
            elif change.perm is not None:
                block[key] = change.columns(block[key], axis)
        if f"lam{axis}" in block and change.perm is not None:
            block[f"lam{axis}"] = change.columns(block[f"lam{axis}"], 0)


class _Context:
    """Per-step, per-parameter values passed to the kernels (never stored)."""

    __slots__ = ("group", "step", "axes", "wd", "sd", "gen")

    def __init__(self, *, group, step, axes, wd, sd, gen):
        self.group, self.step, self.axes = group, step, axes
        self.wd, self.sd, self.gen = wd, sd, gen

    def load(self, block: dict, key: str) -> Tensor:
        """Working-precision copy (or alias; kernels never write in place) of a state tensor."""
        return block[key].to(self.wd)

    def save(self, block: dict, key: str, value: Tensor) -> None:
        """Store an EMA-type value (stochastic rounding under bfloat16 storage)."""
        block[key] = store(value, self.sd, self.gen)

    def bases(self, block: dict) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """Working copies of ``{axis: Q}`` and ``{axis: P}``."""
        return ({k: self.load(block, f"Q{k}") for k in self.axes},
                {k: self.load(block, f"P{k}") for k in self.axes})
