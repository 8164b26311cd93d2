"""Validation, state storage, closures and distributed exchange shared by curvkit optimizers."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch import distributed as dist

from curvkit.optim._basis import stochastic_round

__all__ = [
    "NonFiniteGradientError",
    "adam_direction",
    "check_betas",
    "check_choice",
    "check_int",
    "check_range",
    "exchange_updates",
    "restore_state",
    "run_closure",
    "step_generator",
    "store",
    "world",
]


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds ``nan`` or ``inf`` and the optimizer was told to raise."""


# --------------------------------------------------------------------------- validation
def check_range(caller: str, name: str, value: float, low: float, high: float | None = None,
                *, low_open: bool = False, high_open: bool = True) -> float:
    """Check ``low <= value <(=) high`` and return ``float(value)``.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If it is out of range; the message names the caller and the range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{caller}: {name} must be a real number; got {type(value).__name__}.")
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high or value != value:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        upper = "inf)" if high is None else f"{high}{right}"
        raise ValueError(f"{caller}: {name} must be in {left}{low}, {upper}; got {value}.")
    return float(value)


def check_int(caller: str, name: str, value: int, low: int) -> int:
    """Check that ``value`` is an integer ``>= low``.

    Raises:
        TypeError: If ``value`` is not an ``int``.
        ValueError: If ``value < low``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{caller}: {name} must be an int; got {type(value).__name__}.")
    if value < low:
        raise ValueError(f"{caller}: {name} must be >= {low}; got {value}.")
    return value


def check_betas(caller: str, betas: tuple[float, float]) -> tuple[float, float]:
    """Check a pair ``(beta1, beta2)`` in ``[0, 1)``.

    Raises:
        TypeError: If ``betas`` is not a pair.
        ValueError: If an entry is out of range.
    """
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{caller}: betas must be a pair (beta1, beta2); got {betas!r}.")
    return (check_range(caller, "betas[0]", betas[0], 0.0, 1.0),
            check_range(caller, "betas[1]", betas[1], 0.0, 1.0))


def check_choice(caller: str, name: str, value: object, choices: Iterable[object]) -> object:
    """Check that ``value`` is one of ``choices``.

    Raises:
        ValueError: If it is not.
    """
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{caller}: {name} must be one of {choices}; got {value!r}.")
    return value


def check_state_dtype(caller: str, dtype: torch.dtype | None) -> torch.dtype | None:
    """Check a ``state_dtype`` option (``None`` means the parameter's working dtype).

    Raises:
        TypeError: If ``dtype`` is not ``None`` or a floating ``torch.dtype``.
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"{caller}: state_dtype must be None or a floating torch.dtype; "
                        f"got {dtype!r}.")
    return dtype


# --------------------------------------------------------------------------- steps
def run_closure(closure: Callable[[], Tensor] | None) -> Tensor | None:
    """Evaluate a ``torch.optim`` closure with gradients enabled, as ``torch.optim`` does."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def gradients_finite(params: Iterable[Tensor]) -> bool:
    """Whether every present gradient is finite (one pass per gradient and one sync).

    ``max |g|`` is ``inf`` for an infinite entry and ``nan`` for a ``nan`` (max propagates
    ``nan``), so it is finite exactly when every entry is; this reads each gradient once instead
    of the four passes of ``isfinite(g).all()``.
    """
    # a zero-size gradient is trivially finite (and its inf-norm has no identity to return)
    grads = [p.grad for p in params if p.grad is not None and p.grad.numel() > 0]
    if not grads:
        return True
    # one stack per device: parameters may live on several (as torch.optim allows)
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    return all(
        bool(torch.isfinite(torch.stack(torch._foreach_norm(gs, ord=float("inf")))).all())
        for gs in by_device.values()
    )


def step_generator(seed: int, param_index: int, step: int) -> torch.Generator:
    """Generator for stochastic rounding, a pure function of (seed, parameter, step).

    Deriving the random bits from the step counter (not from a long-lived generator) makes a
    resumed run draw exactly the bits of the uninterrupted run.
    """
    mixed = (seed * 1_000_003 + param_index * 7_919 + step * 104_729) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def working_dtype(param: Tensor) -> torch.dtype:
    """Dtype of the transient compute buffers: float64 for float64 parameters, else float32."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def store(value: Tensor, dtype: torch.dtype, generator: torch.Generator | None) -> Tensor:
    """Write a working-precision value to storage dtype ``dtype``.

    bfloat16 storage uses stochastic rounding when a generator is given (EMA state) and
    round-to-nearest otherwise (bases).
    """
    if dtype == torch.bfloat16 and value.dtype != torch.bfloat16 and generator is not None:
        return stochastic_round(value, generator)
    return value.to(dtype)


def adam_direction(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: int,
                   betas: tuple[float, float], eps: float, bias_correction: bool = True
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """One Adam direction (no learning rate) from working-precision moments.

    Args:
        grad: Gradient, any shape.
        exp_avg: First moment, shaped like ``grad``.
        exp_avg_sq: Second moment, shaped like ``grad``.
        step: 1-based step count used for bias correction.
        betas: ``(beta1, beta2)``.
        eps: Added to ``sqrt(v_hat)``.
        bias_correction: Divide the moments by ``1 - beta^step``.

    Returns:
        ``(direction, new exp_avg, new exp_avg_sq)``, all shaped like ``grad``.
    """
    beta1, beta2 = betas
    exp_avg = exp_avg.lerp(grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad.square()
    c1 = 1 - beta1**step if bias_correction else 1.0
    c2 = 1 - beta2**step if bias_correction else 1.0
    direction = (exp_avg / c1) / ((exp_avg_sq / c2).sqrt() + eps)
    return direction, exp_avg, exp_avg_sq


# --------------------------------------------------------------------------- state dicts
def restore_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Put the saved state back with its saved dtypes after ``Optimizer.load_state_dict``.

    ``torch.optim`` casts every floating state tensor to its parameter's dtype on load, which
    would turn bfloat16 state into float32 (and float32 state of float64 parameters into
    float64) and break bit-for-bit resume; this undoes that cast.
    """
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved = state_dict["state"]
    for index, param in zip(saved_ids, params):
        if index in saved:
            optimizer.state[param] = _to_device(copy.deepcopy(saved[index]), param.device)


def _to_device(value, device):
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def conform_state(state: dict, wd: torch.dtype, state_dtype: torch.dtype | None) -> None:
    """Cast state left in another working dtype to ``wd`` (the parameter's dtype changed).

    After ``model.to(dtype)`` a parameter keeps its identity and state, but the state held in
    the old working dtype would stay there in part (each tensor is re-stored in the new dtype
    only when it is next written, the exact ``d`` of SpectralShampoo never), mixing precisions.
    Every floating tensor in neither ``wd`` nor ``state_dtype`` is cast, as ``torch.optim``'s
    ``load_state_dict`` casts state to its parameter's dtype; a fixed ``state_dtype`` (e.g.
    bfloat16) is kept. Nothing changes while the dtype stays (so resume stays bit-for-bit).
    """
    for key, value in state.items():
        if isinstance(value, Tensor):
            if value.is_floating_point() and value.dtype not in (wd, state_dtype):
                state[key] = value.to(wd)
        elif isinstance(value, dict):
            conform_state(value, wd, state_dtype)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    conform_state(item, wd, state_dtype)


def run_step(optimizer: torch.optim.Optimizer, name: str,
             update: Callable[[Tensor, dict, int], None]) -> None:
    """The parameter loop every curvkit optimizer shares.

    Checks all gradients first (so a raise leaves parameters and state untouched), splits the
    parameters round-robin between ranks under ``torch.distributed`` (rank ``i % world_size``
    owns parameter ``i`` and keeps its state), calls ``update(p, group, index)`` for the owned
    parameters with a gradient (zero-size parameters have nothing to update and are passed
    over), counts skipped steps, and all-gathers the new values. A nan/inf gradient in any
    group skips the step for every group (each group's ``nonfinite="raise"`` raises first).

    Raises:
        NonFiniteGradientError: If a group with ``nonfinite="raise"`` has a nan/inf gradient.
        TypeError: For a sparse gradient.
    """
    rank, size = world()
    for group in optimizer.param_groups:  # before any update: nothing is half-written
        for p in group["params"]:
            if p.grad is not None and p.grad.is_sparse:
                raise TypeError(f"{name}.step: sparse gradients are not supported; got a "
                                f"sparse gradient for a parameter of shape {tuple(p.shape)}.")
    finite = [gradients_finite(g["params"]) for g in optimizer.param_groups]
    for group, ok in zip(optimizer.param_groups, finite):
        if not ok and group["nonfinite"] == "raise":
            raise NonFiniteGradientError(
                f"{name}.step: a gradient contains nan or inf; pass nonfinite='skip' to skip "
                "such steps (they are counted in state['skipped_steps']).")
    # A non-finite gradient anywhere skips the whole step, in every group (as torch.amp's
    # GradScaler does): updating only the finite groups would apply half a step.
    ok = all(finite)
    params, owners, index = [], [], 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            owner = index % size
            params.append(p)
            owners.append(owner)
            if p.grad is not None and owner == rank and p.numel() > 0:
                if ok:
                    state = optimizer.state.get(p)
                    if state:
                        conform_state(state, working_dtype(p), group.get("state_dtype"))
                    update(p, group, index)
                else:
                    state = optimizer.state[p]
                    state["skipped_steps"] = state.get("skipped_steps", 0) + 1
            index += 1
    exchange_updates(params, owners)


# --------------------------------------------------------------------------- distributed
def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def exchange_updates(params: list[Tensor], owners: list[int]) -> None:
    """All-gather the parameters each rank updated, so that every rank holds all of them.

    Rank ``r`` updated exactly the parameters with ``owners[i] == r``; their new values are packed
    into one flat buffer per dtype (padded to the longest rank's buffer) and all-gathered.

    Args:
        params: Every parameter, in the same order on every rank.
        owners: Owning rank of each parameter.
    """
    rank, size = world()
    if size == 1:
        return
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(p.dtype, []).append(i)
    for dtype, indices in by_dtype.items():
        counts = [sum(params[i].numel() for i in indices if owners[i] == r) for r in range(size)]
        length = max(max(counts), 1)
        device = params[indices[0]].device
        mine = [params[i].detach().reshape(-1) for i in indices if owners[i] == rank]
        buffer = torch.zeros(length, dtype=dtype, device=device)
        if mine:
            flat = torch.cat(mine)
            buffer[: flat.numel()] = flat
        gathered = [torch.empty_like(buffer) for _ in range(size)]
        dist.all_gather(gathered, buffer)
        offsets = [0] * size
        for i in indices:
            r = owners[i]
            if r == rank:
                continue
            n = params[i].numel()
            params[i].data.copy_(gathered[r][offsets[r]: offsets[r] + n].view_as(params[i]))
            offsets[r] += n


# --------------------------------------------------------------------------- base class
#: torch.optim flags a param group may carry; set to True they are refused (with the reason)
#: instead of being ignored. (``foreach`` only picks an implementation and is accepted.)
_TORCH_FLAGS = {
    "maximize": " (minimise the negated loss instead)",
    "capturable": " (CUDA-graph capture of the step)",
    "differentiable": " (the step runs under torch.no_grad)",
    "fused": "",
}


class CurvkitOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` with the step loop and state loading every curvkit optimizer shares.

    Subclasses set ``_name`` and implement ``_update_param(p, group, index)``, the update of one
    parameter that has a gradient; ``step`` runs the closure, checks gradients, splits work
    between ranks and exchanges the updates (``run_step``).

    Under ``torch.compile`` the step is not traced: a compiled training function breaks its
    graph at ``optimizer.step()`` and runs the step eagerly (its data-dependent basis refreshes
    and checks would otherwise recompile or graph-break inside the step).
    """

    _name = "CurvkitOptimizer"

    def _update_param(self, p: Tensor, group: dict, index: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _update_param.")

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group (as ``torch.optim``), checking its parameters like the constructor.

        Raises:
            TypeError: For a parameter that is not a real floating tensor.
            ValueError: For a torch.optim flag this optimizer does not implement
                (``maximize``, ``capturable``, ``differentiable``, ``fused`` set to ``True``).
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for flag in _TORCH_FLAGS:
                if group.get(flag, False):
                    raise ValueError(
                        f"{self._name}: the torch.optim option {flag}=True is not supported"
                        f"{_TORCH_FLAGS[flag]}; got it in a param group.")
            for p in group["params"]:
                if p.is_complex() or not p.is_floating_point():
                    raise TypeError(f"{self._name}: parameters must be real floating tensors; "
                                    f"got dtype {p.dtype}.")
                self._check_param(p, group)
        except Exception:
            self.param_groups.pop()  # a refused group is not half-added
            raise

    def _check_param(self, p: Tensor, group: dict) -> None:
        """Optimizer-specific check of one parameter of a new group (raise on misfit)."""

    def _moment_shapes(self, p: Tensor, group: dict) -> list[tuple[int, ...]]:
        """Shapes of the ``exp_avg`` state of ``p`` (one per block), to validate loaded state."""
        return [tuple(p.shape)]

    def state_dict(self) -> dict:
        """The state dict of ``torch.optim``, loadable with ``torch.load(weights_only=True)``.

        Option values that are functions (e.g. :class:`~curvkit.optim.Symo`'s ``groups``
        callable) are code, not state: they are left out (``weights_only`` loading refuses
        them, as ``LambdaLR.state_dict`` leaves out its lambdas) and the loading optimizer keeps
        its own value.
        """
        state_dict = super().state_dict()
        state_dict["param_groups"] = [{k: v for k, v in g.items() if not callable(v)}
                                      for g in state_dict["param_groups"]]
        return state_dict

    def _missing_option(self, key: str, saved: dict, group: dict) -> object:
        """Value of option ``key`` for a saved group that lacks it (an older or filtered dict)."""
        return group[key]

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict, keeping the saved state dtypes (e.g. bfloat16) bit-for-bit.

        Load-state-dict pre-hooks run first (their result is what is loaded) and post-hooks
        last (they see the loaded state), as in ``torch.optim``. Options missing from a saved
        group (functions, see :meth:`state_dict`; options added in later versions) keep this
        optimizer's values.

        Args:
            state_dict: As returned by :meth:`state_dict`.

        Raises:
            ValueError: If the saved state does not fit the parameters (another order or
                shape); nothing is loaded then.
        """
        state_dict = state_dict.copy()
        for hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) == len(self.param_groups):
            saved_groups = [
                {**{k: self._missing_option(k, s, g) for k in g if k not in s}, **s}
                for s, g in zip(saved_groups, self.param_groups)]
            state_dict = {**state_dict, "param_groups": saved_groups}
        if len(saved_groups) == len(self.param_groups) and all(
                len(s["params"]) == len(g["params"])
                for s, g in zip(saved_groups, self.param_groups)):
            for position, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
                options = {**group, **{k: v for k, v in saved.items() if k != "params"}}
                for index, p in zip(saved["params"], group["params"]):
                    state = state_dict["state"].get(index)
                    if not state:
                        continue
                    blocks = state.get("blocks", [state])
                    if not all(isinstance(b.get("exp_avg"), Tensor) for b in blocks):
                        continue
                    found = [tuple(b["exp_avg"].shape) for b in blocks]
                    expected = self._moment_shapes(p, options)
                    if found != expected:
                        raise ValueError(
                            f"{self._name}.load_state_dict: the saved state of parameter "
                            f"{index} (group {position}) has moment shapes {found}, but the "
                            f"parameter in that position has shape {tuple(p.shape)} (moment "
                            f"shapes {expected}); were the parameters created in another "
                            "order or with other shapes?")
        # torch's loader would run the hooks again, and its post-hooks before the saved dtypes
        # are restored (so a hook's edits of the state were overwritten): run it without them
        pre, post = (self._optimizer_load_state_dict_pre_hooks,
                     self._optimizer_load_state_dict_post_hooks)
        self._optimizer_load_state_dict_pre_hooks = type(pre)()
        self._optimizer_load_state_dict_post_hooks = type(post)()
        try:
            super().load_state_dict(state_dict)  # also checks the group and parameter counts
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre
            self._optimizer_load_state_dict_post_hooks = post
        restore_state(self, state_dict)
        for hook in list(post.values()):
            hook(self)

    @torch.compiler.disable  # see the class docstring
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None``.

        Raises:
            NonFiniteGradientError: If a gradient is not finite and the group's ``nonfinite``
                option is ``"raise"``; no parameter or state is changed then.
        """
        loss = run_closure(closure)
        run_step(self, self._name, self._update_param)
        return loss
