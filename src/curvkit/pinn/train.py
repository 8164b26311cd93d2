"""``train``: fit a PINN to a problem with one of the natural-gradient methods or a baseline."""

from __future__ import annotations

import math
import operator
import time
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from curvkit.pinn.base import Batch, Problem, seeded_stream
from curvkit.pinn.engd import ENGD, HessianFree
from curvkit.pinn.history import History
from curvkit.pinn.residuals import loss as pinn_loss
from curvkit.pinn.solves import SolveError
from curvkit.pinn.woodbury import SPRING, ENGDWoodbury

__all__ = ["train", "METHODS"]

Method = Literal["spring", "engd_woodbury", "engd", "adam", "hessian_free"]
METHODS = {
    "spring": SPRING,
    "engd_woodbury": ENGDWoodbury,
    "engd": ENGD,
    "hessian_free": HessianFree,
    "adam": torch.optim.Adam,
}


def _make_optimizer(method: str, model: nn.Module, problem: Problem, options: dict):
    if method == "adam":
        return torch.optim.Adam(model.parameters(), **{"lr": 1e-3, **options})
    return METHODS[method](model, problem, **options)


def _adam_step(opt, model, problem, batch) -> float:
    opt.zero_grad()
    value = pinn_loss(model, problem, batch)
    value.backward()
    opt.step()
    return float(value.detach())


def train(
    problem: Problem,
    model: nn.Module | None = None,
    method: Method = "spring",
    *,
    steps: int | None = None,
    time_budget: float | None = None,
    options: dict | None = None,
    num_interior: int | None = None,
    num_boundary: int | None = None,
    resample: bool = True,
    num_eval: int | None = None,
    eval_every: int = 1,
    seed: int = 0,
    progress: bool = False,
    checkpoint: str | Path | None = None,
    resume: str | Path | None = None,
    device: torch.device | str | None = None,
) -> History:
    """Train a PINN and record loss, L2 error and wall-clock time.

    Args:
        problem: The PDE problem.
        model: The network (trained in place); None builds ``problem.default_model`` seeded by
            ``seed`` in float64. Points are sampled in the model's parameter dtype.
        method: ``"spring"``, ``"engd_woodbury"``, ``"engd"``, ``"hessian_free"`` or ``"adam"``.
        steps: Stop after this many steps (in total, counting resumed ones).
        time_budget: Stop once this many seconds of training time have passed (in total);
            the step under way finishes. At least one of ``steps`` and ``time_budget`` is needed.
        options: Keyword options of the optimizer (e.g. ``{"damping": 1e-10, "momentum": 0.5}``;
            for Adam ``{"lr": 1e-3}``).
        num_interior: Interior points per step (the problem's default when None).
        num_boundary: Boundary points per step.
        resample: Draw fresh points every step (else one fixed batch).
        num_eval: Held-out interior points of the L2 error (default ``10 × num_interior``).
        eval_every: Record every this many steps (and always the last one).
        seed: Seeds the default model, the sampler and the held-out points.
        progress: Show a tqdm progress bar.
        checkpoint: Write ``{model, optimizer, sampler, history}`` here at the end (``torch.save``).
        resume: Continue from a checkpoint written by an earlier call (same problem, method,
            options, sizes, seed, ``resample``, dtype, model structure (its ``repr``: layers and
            activations) and trainable parameters, else ``ValueError``);
            the history continues where it stopped, as an uninterrupted run's would (a point
            recorded only because the earlier run ended off the ``eval_every`` grid is dropped
            once training goes on).
        device: Where to train. None: the model's device (the CPU for the default model). The
            default model is initialised on the CPU and moved, and points are drawn on the CPU
            and moved, so a seed gives the same run on every device up to rounding (except the
            randomized Nyström solves, whose sketches are drawn on the device: reproducible on
            one device); a given ``model`` must already be on ``device``.

    Returns:
        The ``History`` (``loss``, ``l2_error``, ``time``, ``step``, ``step_size``).

    Raises:
        TypeError: If ``problem`` is not a ``Problem`` or ``model`` not an ``nn.Module``.
        ValueError: Unknown method, no or a bad stopping criterion, bad sizes, or a ``resume``
            checkpoint written by another run.
    """
    if not isinstance(problem, Problem):
        raise TypeError(
            f"train: problem must be a curvkit.pinn Problem; got {type(problem).__name__}."
        )
    if method not in METHODS:
        raise ValueError(f"train: method must be one of {sorted(METHODS)}; got {method!r}.")
    if steps is None and time_budget is None:
        raise ValueError("train: pass steps=... or time_budget=... (got neither).")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"train: steps must be an int >= 0; got {steps!r}.")
    if time_budget is not None and (
        isinstance(time_budget, bool)
        or not isinstance(time_budget, (int, float))
        or not time_budget >= 0
    ):
        raise ValueError(f"train: time_budget must be a number >= 0; got {time_budget!r}.")
    if eval_every < 1:
        raise ValueError(f"train: eval_every must be >= 1; got {eval_every}.")
    if num_eval is not None and (isinstance(num_eval, bool) or not isinstance(num_eval, int)
                                 or num_eval < 1):
        raise ValueError(f"train: num_eval must be an int >= 1; got {num_eval!r}.")
    options = dict(options or {})
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"train: model must be an nn.Module or None; got {type(model).__name__}.")
    if model is not None and not any(p.requires_grad for p in model.parameters()):
        # Adam would fail at its first backward pass with autograd's "does not require grad".
        raise ValueError("train: the model has no trainable parameters (requires_grad=True).")
    if model is None:
        model = problem.default_model(generator=torch.Generator().manual_seed(seed))
        if device is not None:
            model = model.to(device)
    # Points in the model's precision and on its device, so a float32 model trains in float32.
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = torch.float64 if param is None else param.dtype
    model_device = torch.device("cpu") if param is None else param.device
    if device is not None and not _same_device(device, model_device):
        raise ValueError(
            f"train: device={str(device)!r} but the model's parameters are on {model_device}; "
            "move the model (model.to(device)) or leave device=None."
        )
    device = model_device
    n_in = problem.num_interior if num_interior is None else _count(num_interior, "num_interior")
    n_bd = problem.num_boundary if num_boundary is None else _count(num_boundary, "num_boundary")
    sampler = seeded_stream(seed, 1)
    X_eval = problem.sample_interior(
        10 * n_in if num_eval is None else int(num_eval),
        generator=seeded_stream(seed, 2),
        dtype=dtype,
        device=device,
    )
    optimizer = _make_optimizer(method, model, problem, options)
    if method != "adam":
        # Before the first evaluation: ENGD at the default log-Fokker–Planck size would
        # otherwise evaluate the model and then fail asking for ~100 GB for the Gramian.
        optimizer._check_memory(n_in + n_bd)
    fixed_batch = None
    if not resample:
        fixed_batch = problem.sample(n_in, n_bd, generator=sampler, dtype=dtype, device=device)
    meta = {
        "problem": problem.name,
        "method": method,
        "options": options,
        "num_interior": n_in,
        "num_boundary": n_bd,
        "seed": seed,
        "resample": resample,
        "dtype": str(dtype).removeprefix("torch."),  # else resuming would cast silently
        # The module structure (layers, activations): parameter names and shapes alone would let
        # a checkpoint of a SiLU network resume into a tanh one with the same Linear layers.
        "model": repr(model),
    }

    def next_batch():
        if fixed_batch is not None:
            return fixed_batch
        return problem.sample(n_in, n_bd, generator=sampler, dtype=dtype, device=device)

    def done() -> bool:
        return (steps is not None and step >= steps) or (
            time_budget is not None and elapsed >= time_budget
        )

    if resume is not None:
        # On the CPU, whichever device wrote it: load_state_dict moves each tensor to its
        # parameter's device (and leaves Adam's step counter on the CPU, where torch keeps it).
        state = torch.load(resume, map_location="cpu", weights_only=False)
        # load_state_dict would keep the checkpoint's hyperparameters over ``options`` (or fail
        # with a KeyError for another method), and another problem or batch would go unnoticed.
        # Decoded: the checkpoint holds the history's JSON form, where an infinite option
        # (e.g. SPRING's norm_constraint) is the string "inf".
        history = History.from_dict(state["history"])
        saved = history.meta
        differing = [
            f"{key} (checkpoint {saved[key]!r}, now {value!r})"
            for key, value in meta.items()
            if key in saved and saved[key] != value
        ]
        if differing:
            raise ValueError(
                f"train: cannot resume from {str(resume)!r}, written by another run; it differs "
                f"in {', '.join(differing)}."
            )
        _load_states(model, optimizer, state, resume)
        sampler.set_state(state["sampler"])
        if state["fixed_batch"] is not None:
            fixed_batch = Batch(*(X.to(device) for X in state["fixed_batch"]))
        step, elapsed = history.step[-1], history.time[-1]
        if step % eval_every and math.isfinite(history.loss[-1]) and not done():
            # Recorded only because the earlier run stopped there: without it the history
            # matches an uninterrupted run's. Kept if no step follows, as the model's last point.
            history.pop()
    else:
        history = History(meta=meta)
        with torch.no_grad():
            first = problem.sample(
                n_in, n_bd, generator=seeded_stream(seed, 3), dtype=dtype, device=device
            )
            initial = float(pinn_loss(model, problem, first))
        history.append(step=0, time=0.0, loss=initial, l2_error=problem.l2_error(model, X_eval))
        step, elapsed = 0, 0.0

    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = steps if steps is not None else None
        bar = tqdm(total=total, initial=step, desc=f"{problem.name} {method}", unit="step")

    last = None  # (loss, step size) of the last step taken here
    while not done():
        start = time.perf_counter()
        batch = next_batch()
        if method == "adam":
            value = _adam_step(optimizer, model, problem, batch)
            eta = optimizer.param_groups[0]["lr"]
        else:
            try:
                value = optimizer.step(batch)
            except SolveError as error:
                # The step's solve failed on its numbers (a diverging run) before anything
                # moved: keep the history, ending at the model's step as for a non-finite loss.
                warnings.warn(f"train: step {step + 1} failed ({error}); stopping.",
                              RuntimeWarning, stacklevel=2)
                if last is not None and history.step[-1] != step:
                    history.append(step=step, time=elapsed, loss=last[0],
                                   l2_error=problem.l2_error(model, X_eval), step_size=last[1])
                break
            eta = optimizer.state[optimizer.param_groups[0]["params"][0]]["step_size"]
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's kernels may still run: time to their end
        elapsed += time.perf_counter() - start
        step += 1
        last = (value, eta)
        # A non-finite loss ends the run: record that step too, so that the history (and the
        # checkpoint's step count) matches the model.
        if step % eval_every == 0 or done() or not math.isfinite(value):
            error = problem.l2_error(model, X_eval)
            history.append(step=step, time=elapsed, loss=value, l2_error=error, step_size=eta)
            if bar is not None:
                bar.set_postfix(loss=f"{value:.2e}", l2=f"{error:.2e}")
        if bar is not None:
            bar.update(1)
        if not math.isfinite(value):
            warnings.warn(
                f"train: the loss is {value} at step {step}; stopping.",
                RuntimeWarning,
                stacklevel=2,
            )
            break
    if bar is not None:
        bar.close()
    if checkpoint is not None:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "sampler": sampler.get_state(),
                "fixed_batch": None if fixed_batch is None else tuple(fixed_batch),
                "history": history.to_dict(),
            },
            checkpoint,
        )
    return history


def _load_states(model: nn.Module, optimizer, state: dict, resume) -> None:
    """Load the checkpoint's model and optimizer states, or neither (``ValueError``).

    Torch's own errors (a ``RuntimeError`` for other parameter shapes, a ``ValueError`` for
    another number of trainable parameters) left the model overwritten when only the optimizer
    state failed to load.
    """
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        model.load_state_dict(before)
        raise ValueError(
            f"train: cannot resume from {str(resume)!r}: the model or its trainable parameters "
            f"differ from the checkpoint's ({error})."
        ) from error


def _same_device(requested: torch.device | str, actual: torch.device) -> bool:
    """Whether ``requested`` (``"cuda"`` means the current CUDA device) names ``actual``."""
    requested = torch.device(requested)
    if requested.type != actual.type:
        return False
    return requested.index is None or requested.index == actual.index


def _count(value, name: str) -> int:
    """A number of points: any integer type (``int(2.5)`` would silently draw 2)."""
    if isinstance(value, bool):
        raise ValueError(f"train: {name} must be an int >= 1; got {value!r}.")
    try:
        n = operator.index(value)
    except TypeError:
        raise ValueError(f"train: {name} must be an int >= 1; got {value!r}.") from None
    if n < 1:
        raise ValueError(f"train: {name} must be an int >= 1; got {value!r}.")
    return n
