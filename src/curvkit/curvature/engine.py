"""The data engine: the one place that loops over data for every curvature operator.

``DataEngine`` owns the model, the loss, the data and the parameters an operator acts on, and
handles everything that is the same for all curvature matrices:

- batches ``(X, y)`` (or weighted ``(X, y, w)``, for estimators that accept them) from any
  re-iterable; ``X`` a tensor or a mapping of tensors (Hugging Face style), with the batch size
  from ``batch_size_fn(X)``, ``X.shape[0]`` or ``y.shape[0]``;
- the loss normalisation over **all** data. Every batch contributes its *sum-reduced* quantity,
  and the total is divided by the global number of loss terms ``T`` once at the end (``1`` for
  ``reduction="sum"``). ``T`` counts what PyTorch's mean divides by: tokens that are not
  ``ignore_index`` (class-weighted if the loss has weights) for cross-entropy, output entries for
  MSE/BCE, examples for any other loss. Unequal batches and sequence outputs therefore need no
  special handling;
- ``progress=True`` (a tqdm bar per pass), ``check_deterministic=True`` (Dropout, train-mode
  BatchNorm and shuffling loaders raise at construction), ``num_data`` (skips the counting pass
  for callers that need ``T`` before a pass);
- during every pass (``context()``): the math SDPA kernel and no fused attention fast path, so
  attention can be differentiated twice; autocast off; training-mode BatchNorm without updates of
  its running statistics; dense gradients for ``sparse=True`` embeddings; weight norm in plain
  operations; and a clear error when a module cannot be differentiated as needed;
- models wrapped by ``torch.compile`` or ``(Distributed)DataParallel``: the wrapped module is
  called (under the wrapper's parameter names);
- distributed reduction: with ``torch.distributed`` initialised, each rank's ``data`` is its
  shard, and sums and counts are all-reduced in one collective (the count apart, in float64,
  when the sums are of lower precision).

Interface for estimators built on the engine (KFAC, EKFAC):

- ``engine.params``: ordered mapping name → tensor of the selected parameters.
- ``engine.forward(X, params=None)``: the model output with ``params`` substituted (the other
  parameters held fixed), via ``torch.func.functional_call``.
- ``engine.reduce_over_data(fn, desc=...)``: calls ``fn(batch)`` for every ``Batch`` and returns
  the list of tensors it returns, summed over batches and ranks and multiplied by
  ``engine.scale`` (``1/T`` or 1) — the usual way to build a normalised quantity in one pass.
- ``engine.for_each_batch(callback)``: calls ``callback(batch, output, factor)`` with the model
  output (computed with autograd enabled, so module hooks and a backward pass work) and the
  batch's normalisation factor ``factor = batch.count / T`` for mean reduction (1 for sum), i.e.
  the weight of the batch's own reduced loss in the loss over all data. It needs ``T`` first:
  one counting pass over the targets (no forward), skipped when ``num_data`` is given or a
  determinism check already ran.
- ``engine.num_terms()``, ``engine.loss_scale()``, ``engine.all_reduce(tensors)``,
  ``engine.context()`` (math SDPA + error translation) for custom loops.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.utils.parametrizations import _WeightNorm
from torch.utils._pytree import tree_leaves

from curvkit import distributed
from curvkit.curvature._passes import restore_pass_state, set_pass_state, unwrap
from curvkit.curvature.losses import OutputLoss
from curvkit.curvature.params import group_params, resolve_params

__all__ = ["Batch", "DataEngine", "resolve_params", "group_params"]


# Substrings of PyTorch's messages when an op lacks a second-order or batching rule.
_NOT_TWICE_DIFFERENTIABLE = (
    "derivative for", "not implemented", "double backward", "forward AD", "forward-mode",
    "does not support", "Batching rule not implemented", "backward of backward",
    "functorch transforms", "jvp staticmethod", "forward mode AD",
)


@dataclass
class Batch:
    """One batch as the engine hands it out.

    Attributes:
        X: Model input, a tensor ``(N, ...)`` or a mapping of tensors.
        y: Targets ``(N, ...)``.
        weights: Per-example weights ``(N,)`` for weighted batches ``(X, y, w)``, else ``None``.
        batch_size: ``N``.
        count: Number of loss terms in the batch (what ``reduction="mean"`` divides by); a
            0-d tensor on the targets' device when counted there under ``lazy_count``.
        index: Position of the batch in the data.
    """

    X: Tensor | Mapping[str, Any]
    y: Tensor
    weights: Tensor | None
    batch_size: int
    count: float | Tensor
    index: int


class DataEngine:
    """Loop over data for a curvature operator (see the module docstring).

    Args:
        model: ``nn.Module`` called as ``model(X)``.
        loss: The wrapped loss (``None`` for operators without one, e.g. the Jacobian).
        data: Re-iterable of ``(X, y)`` (or ``(X, y, w)``) batches.
        params: Ordered mapping name → tensor of the selected parameters.
        caller: Operator name for messages and progress bars.
        progress: Show a tqdm bar for every pass.
        check_deterministic: Refuse Dropout/train-mode BatchNorm and check, with two forward
            passes, that data and model give identical batches and losses.
        num_data: Number of examples over all ranks; spares the counting pass.
        batch_size_fn: ``X ↦ N`` for mapping inputs.
        allow_weights: Accept weighted batches ``(X, y, w)``.
    """

    def __init__(self, model: nn.Module, loss: OutputLoss | None, data: Iterable,
                 params: dict[str, Tensor], *, caller: str, progress: bool = False,
                 check_deterministic: bool = True, num_data: int | None = None,
                 batch_size_fn: Callable[[Any], int] | None = None, allow_weights: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{caller}: model must be an nn.Module; got {type(model).__name__}.")
        if not isinstance(data, Iterable):
            raise TypeError(f"{caller}: data must be an iterable of (X, y) batches; got "
                            f"{type(data).__name__}.")
        # An iterator is its own iterator (one pass only). Asked of the type, not by calling
        # iter(): a DataLoader would start its worker processes for nothing.
        if isinstance(data, Iterator):
            raise TypeError(f"{caller}: data must be re-iterable (a list or a DataLoader), since "
                            "every product is a pass over it; got a one-shot iterator.")
        if num_data is not None and (not isinstance(num_data, int) or num_data <= 0):
            raise ValueError(f"{caller}: num_data must be a positive int; got {num_data!r}.")
        self.model, self.loss, self.data, self.caller = model, loss, data, caller
        self.params = params
        self.progress, self.num_data, self.batch_size_fn = progress, num_data, batch_size_fn
        self.allow_weights = allow_weights
        names = set(params)
        self._fixed = {n: p.detach() for n, p in model.named_parameters() if n not in names}
        # torch.compile's OptimizedModule and (Distributed)DataParallel refuse functional_call
        # (or fail deep inside dynamo): call the module they wrap, under the same names less
        # the wrapper's prefix ("_orig_mod.", "module.").
        self._module, self._prefix = unwrap(model)
        if self._prefix:
            self._fixed = self._strip(self._fixed)
        # Modules whose state the passes set for their duration (see context()).
        self._stateful = [m for m in model.modules()
                          if isinstance(m, (_BatchNorm, nn.Embedding, nn.EmbeddingBag, _WeightNorm))]
        # Embeddings with a padding row: PyTorch's gradient holds that row fixed, which passes
        # reproduce for every mode of differentiation (see set_pass_state).
        self._padded = {id(m) for m in self._stateful
                        if type(m) is nn.Embedding and m.padding_idx is not None}
        self._num_terms: float | None = None  # global T once known
        # The one device of the selected parameters (None for a model spread over devices):
        # batches and the loss's tensors must live there, checked before PyTorch fails deep
        # inside a kernel ("Expected all tensors to be on the same device ... index_select").
        devices = {t.device for t in params.values()}
        self.device = devices.pop() if len(devices) == 1 else None
        if self.device is not None and loss is not None:
            for name, t in loss.module.named_buffers():
                if t.device != self.device:
                    raise TypeError(f"{caller}: the loss's {name!r} is on {t.device}, the "
                                    f"model's parameters on {self.device}; move the loss "
                                    "(loss_fn.to(device)).")
        if check_deterministic:
            self._check_deterministic()

    # ------------------------------------------------------------------ model
    def forward(self, X, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """Model output at ``params`` (default: ``self.params``), other parameters fixed."""
        p = self.params if params is None else params
        try:
            out = functional_call(self._module, (self._strip(p) if self._prefix else dict(p),
                                                 self._fixed), (X,))
        except RuntimeError as err:
            # PyTorch's message ("mat1 and mat2 must have the same dtype") names neither the
            # operator nor which side is off: say it when the inputs disagree with the parameters.
            p = next(iter(self.params.values()))
            got = {(t.dtype, t.device) for t in tree_leaves(X)
                   if isinstance(t, Tensor) and t.is_floating_point()}
            if got - {(p.dtype, p.device)}:
                found = ", ".join(sorted(f"{d} on {v}" for d, v in got))
                raise TypeError(f"{self.caller}: the model's parameters are {p.dtype} on "
                                f"{p.device}, its floating-point inputs are {found}; convert the "
                                "data or the model.") from err
            raise
        if not isinstance(out, Tensor):
            raise ValueError(f"{self.caller}: the model must return one output tensor (the "
                             f"loss's input); it returned a {type(out).__name__}. Wrap it in an "
                             "nn.Module that returns that tensor (e.g. model(x)[0]).")
        return out

    def _strip(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        k = len(self._prefix)
        return {n[k:] if n.startswith(self._prefix) else n: t for n, t in params.items()}

    def batch_statistics_modules(self) -> list[str]:
        """Names of BatchNorm modules normalising with batch statistics (coupling examples)."""
        return [n for n, m in self.model.named_modules()
                if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)]

    @property
    def scale(self) -> float | None:
        """``1/T`` for mean reduction once ``T`` is known, 1 for sum, else ``None``."""
        if self.loss is None or self.loss.reduction == "sum":
            return 1.0
        return None if self._num_terms is None else 1.0 / self._num_terms

    # ------------------------------------------------------------------ batches
    def _batch_size(self, X, y) -> int:
        if self.batch_size_fn is not None:
            return int(self.batch_size_fn(X))
        if isinstance(X, Tensor):
            return X.shape[0]
        if isinstance(y, Tensor):
            return y.shape[0]
        leaves = [t for t in tree_leaves(X) if isinstance(t, Tensor) and t.ndim > 0]
        if leaves:  # a mapping input without targets: its first tensor's leading dimension
            return leaves[0].shape[0]
        raise ValueError(f"{self.caller}: cannot infer the batch size of a {type(X).__name__} "
                         "input; pass batch_size_fn=...")

    def batches(self, desc: str | None = None, *, lazy_count: bool = False) -> Iterator[Batch]:
        """Iterate over the data as ``Batch`` objects (with a progress bar if requested).

        ``lazy_count`` leaves a count made on an accelerator there (no synchronisation per
        batch); the caller reads the sum once.
        """
        it = self.data
        if self.progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=desc or self.caller, leave=False)
        for i, item in enumerate(it):
            if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
                length = f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""
                raise ValueError(f"{self.caller}: each batch must be a tuple (X, y) or (X, y, w); "
                                 f"batch {i} is a {type(item).__name__}{length}.")
            X, y = item[0], item[1]
            w = item[2] if len(item) == 3 else None
            if w is not None and not self.allow_weights:
                raise ValueError(f"{self.caller}: batch {i} is weighted (X, y, w); this operator "
                                 "takes unweighted (X, y) batches.")
            if not isinstance(X, (Tensor, Mapping)):
                raise TypeError(f"{self.caller}: X must be a tensor or a mapping of tensors; batch "
                                f"{i} has {type(X).__name__}.")
            if self.loss is not None and not isinstance(y, Tensor):  # counted and fed to the loss
                raise TypeError(f"{self.caller}: targets y must be a tensor; batch {i} has "
                                f"{type(y).__name__}.")
            self._check_devices(i, X, y)
            n = self._batch_size(X, y)
            if n == 0:  # an empty batch adds nothing to any sum (and would divide by zero)
                continue
            count = 0.0 if self.loss is None else self.loss.count(y, n)
            if isinstance(count, Tensor):
                count = (count.double() if lazy_count and count.device.type != "cpu"
                         else float(count))
            yield Batch(X, y, w, n, count, i)

    def _check_devices(self, i: int, X, y) -> None:
        # (example weights are moved to the outputs' device where they are used)
        if self.device is None:
            return
        for what, part in (("inputs", X), ("targets", y)):
            off = {t.device for t in tree_leaves(part) if isinstance(t, Tensor)} - {self.device}
            if off:
                found = ", ".join(sorted(str(d) for d in off))
                raise TypeError(f"{self.caller}: batch {i} has {what} on {found}, the model's "
                                f"parameters are on {self.device}; move the data to the model's "
                                "device.")

    # ------------------------------------------------------------------ normalisation
    def num_terms(self) -> float:
        """Global number of loss terms ``T`` (a counting pass over targets if not yet known)."""
        if self._num_terms is None:
            first, total = None, 0.0
            for batch in self.batches(desc=f"{self.caller}: counting"):
                if self.num_data is not None:
                    first = batch
                    break
                total += batch.count
            if first is not None:  # terms per example from the first batch, times num_data
                total = self.num_data * first.count / first.batch_size
            elif distributed.is_distributed():
                total = self._all_reduce_count(total)
            self._set_num_terms(total, counted=first is None)
        return self._num_terms

    def _all_reduce_count(self, count: float) -> float:
        # On the parameters' device: NCCL reduces CUDA tensors only.
        device = self.device or next(iter(self.params.values())).device
        return self.all_reduce([torch.tensor([count], dtype=torch.float64, device=device)])[0].item()

    def _set_num_terms(self, total: float, *, counted: bool) -> None:
        if self.loss is not None and self.loss.reduction == "mean" and total <= 0:
            raise ValueError(f"{self.caller}: the data hold no loss terms (all targets ignored?); "
                             "the mean-reduced loss is undefined.")
        if counted and self.num_data is not None and self._num_terms is not None and \
                not math.isclose(total, self._num_terms, rel_tol=1e-9):
            raise ValueError(
                f"{self.caller}: num_data={self.num_data} implies {self._num_terms:g} loss terms, "
                f"but the data hold {total:g} (ignored tokens or unequal sequence lengths?); "
                "omit num_data to count them."
            )
        if self._num_terms is None or counted:
            self._num_terms = total

    def loss_scale(self) -> float:
        """``1/T`` for mean reduction, 1 for sum."""
        if self.loss is None or self.loss.reduction == "sum":
            return 1.0
        return 1.0 / self.num_terms()

    def all_reduce(self, tensors: list[Tensor]) -> list[Tensor]:
        """Sum tensors over ranks (identity on one process)."""
        return distributed.all_reduce_sum(tensors)

    # ------------------------------------------------------------------ passes
    @contextlib.contextmanager
    def context(self):
        """Differentiable kernels at the parameters' dtype, and a clear error if the model is not.

        For the duration of a pass: the math SDPA kernel and no fast path of
        ``nn.MultiheadAttention``/``nn.TransformerEncoderLayer`` in eval mode (the fused kernels
        have no forward-mode or double-backward formulas); autocast off (an exact operator
        computes at its parameters' dtype, not bfloat16); dense gradients of ``sparse=True``
        embeddings; training-mode BatchNorm normalising with the batch statistics without
        updating its running statistics (a product must not change the model); weight-norm
        parametrizations as plain tensor operations (the fused ``_weight_norm_interface`` has no
        forward-mode derivative, and its batched double backward is wrong in torch 2.14).
        """
        fastpath = torch.backends.mha.get_fastpath_enabled()
        devices = {d for d in {"cpu"} | {t.device.type for t in self.params.values()}
                   if torch.amp.is_autocast_available(d)}  # (not on "meta")
        saved = []
        with contextlib.ExitStack() as stack:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            for device_type in sorted(devices):
                stack.enter_context(torch.autocast(device_type, enabled=False))
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                set_pass_state(self._stateful, self._padded, saved)
                yield
            except (RuntimeError, NotImplementedError) as err:
                if any(key in str(err) for key in _NOT_TWICE_DIFFERENTIABLE):
                    raise RuntimeError(
                        f"{self.caller}: the model cannot be differentiated as this operator needs "
                        "(forward-mode or second-order derivatives, or vmap over them). "
                        "Replace the offending module by a twice-differentiable one. "
                        f"PyTorch said: {err}"
                    ) from err
                raise
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)
                restore_pass_state(saved)

    def reduce_over_data(self, fn: Callable[[Batch], list[Tensor]], *,
                         desc: str | None = None, math_sdpa: bool = True,
                         owned: bool = False, normalise: bool = True,
                         defer_checks: bool = False) -> list[Tensor]:
        """Sum ``fn(batch)`` over batches and ranks and normalise by the loss reduction.

        Args:
            fn: Maps a batch to a list of tensors holding its sum-reduced contribution.
            desc: Progress-bar label.
            math_sdpa: Run under ``context()`` (math attention kernel, needed to differentiate
                twice). Callers that differentiate once (KFAC) pass ``False`` and keep PyTorch's
                fast attention kernels.
            owned: ``fn`` returns new tensors that nothing else refers to: sum and scale them
                in place (no copies of large factors).
            normalise: Multiply by ``1/T`` (mean) here; ``False`` returns the plain sums (``T``
                is still counted: ``loss_scale()`` gives the factor) for callers that scale
                only some parts, sparing a pass over the others (KFAC's input factors are
                divided by their own count anyway).
            defer_checks: Check the targets on their device and read all batches' answers
                after the pass, with the term count (always summed where it is counted and
                read once), instead of one synchronisation per batch (an accelerator's launch
                queue stalls at each). Only for ``fn`` that never index with the targets:
                until the end of the pass, out-of-range class indices are not yet refused.

        Returns:
            The summed tensors times ``1/T`` (mean) or 1 (sum); ``T`` is counted in the same pass.
        """
        totals: list[Tensor] | None = None
        count: float | Tensor = 0.0
        pending = [] if defer_checks and self.loss is not None else None
        if pending is not None:
            self.loss.pending = pending
        try:
            with self.context() if math_sdpa else contextlib.nullcontext():
                for batch in self.batches(desc, lazy_count=True):  # (no fn reads batch.count)
                    parts = fn(batch)
                    if totals is None:
                        totals = parts
                    elif owned:
                        totals = [a.add_(b) for a, b in zip(totals, parts)]
                    else:
                        totals = [a + b for a, b in zip(totals, parts)]
                    count = count + batch.count
        except Exception:
            if pending:  # a deferred check that failed explains the error better
                _read_deferred(0.0, pending)
            raise
        finally:
            if pending is not None:
                self.loss.pending = None
        count = _read_deferred(count, pending or [])
        if totals is None:
            raise ValueError(f"{self.caller}: data yielded no batches (or only empty ones).")
        if distributed.is_distributed():
            # The count rides along in the one collective only where the totals' dtype holds
            # it exactly: bfloat16 rounds 257 to 256, float32 loses counts above 2**24.
            dtype, device = totals[0].dtype, totals[0].device
            if dtype == torch.float64:
                count_t = torch.tensor([count], dtype=dtype, device=device)
                *totals, count_t = self.all_reduce([*totals, count_t])
            else:
                totals = self.all_reduce(totals)
                (count_t,) = self.all_reduce([torch.tensor([count], dtype=torch.float64,
                                                           device=device)])
            count = count_t.item()
        if self.loss is not None:
            self._set_num_terms(count, counted=True)
        scale = self.loss_scale() if self.loss is not None else 1.0
        if scale == 1.0 or not normalise:
            return totals
        return [t.mul_(scale) for t in totals] if owned else [t * scale for t in totals]

    def for_each_batch(self, callback: Callable[[Batch, Tensor, float], None], *,
                       desc: str | None = None) -> None:
        """Call ``callback(batch, output, factor)`` for every batch (see the module docstring)."""
        scale = self.loss_scale()
        with self.context():
            for batch in self.batches(desc):
                output = self.forward(batch.X)
                factor = batch.count * scale if self.loss.reduction == "mean" else 1.0
                callback(batch, output, factor)

    # ------------------------------------------------------------------ determinism
    def _check_deterministic(self) -> None:
        for name, module in self.model.named_modules():
            if isinstance(module, _DropoutNd) and module.training and module.p > 0:
                raise ValueError(
                    f"{self.caller}: module {name!r} ({type(module).__name__}, p={module.p}) is in "
                    "training mode, so the curvature changes at every product; call model.eval() "
                    "(or pass check_deterministic=False)."
                )
            if isinstance(module, _BatchNorm) and module.training:
                raise ValueError(
                    f"{self.caller}: module {name!r} ({type(module).__name__}) is in training "
                    "mode: it normalises with batch statistics and updates its running "
                    "statistics at every pass; call model.eval() (or pass "
                    "check_deterministic=False: each batch is then normalised by its own "
                    "statistics, and the running statistics are left as they are)."
                )
            if isinstance(module, _BatchNorm) and module.running_mean is None:
                raise ValueError(
                    f"{self.caller}: module {name!r} ({type(module).__name__}) has "
                    "track_running_stats=False, so even in eval mode it normalises with batch "
                    "statistics: examples interact and the curvature depends on the batching "
                    "(pass check_deterministic=False to accept that)."
                )
        first, second = self._fingerprints(), self._fingerprints()
        if not first:
            raise ValueError(f"{self.caller}: data yielded no batches (or only empty ones).")
        if len(first) != len(second):
            raise ValueError(f"{self.caller}: the data gave {len(first)} batches, then "
                             f"{len(second)}; the data must be the same at every pass.")
        for i, (a, b) in enumerate(zip(first, second)):
            # NaN never equals itself: name non-finite data before comparing the passes.
            for k, what in ((0, "inputs"), (1, "targets"), (2, "model outputs")):
                if not a[k].isfinite():
                    raise ValueError(f"{self.caller}: batch {i} has non-finite {what} "
                                     f"(their sum is {a[k].item()}).")
            if not torch.allclose(a[:2], b[:2], rtol=1e-10, atol=0.0):
                raise ValueError(f"{self.caller}: batch {i} differs between two passes over the "
                                 "data (a shuffling DataLoader or random augmentation?); use a "
                                 "fixed order.")
            if not torch.allclose(a[2:], b[2:], rtol=1e-5, atol=1e-8):
                raise ValueError(f"{self.caller}: the model gives different outputs for batch {i} "
                                 "in two passes (random layers?); make it deterministic "
                                 "(model.eval()).")
        if self.loss is not None and self.num_data is None:
            total = float(sum(f[3] for f in first))
            if distributed.is_distributed():
                total = self._all_reduce_count(total)
            self._set_num_terms(total, counted=True)

    def _fingerprints(self) -> list[Tensor]:
        """Per batch: sums of inputs and targets, of the output, and the term count."""
        rows = []
        with torch.no_grad(), self.context():
            for batch in self.batches(desc=f"{self.caller}: determinism check"):
                x_sum = sum(t.double().sum() for t in tree_leaves(batch.X) if isinstance(t, Tensor))
                out = self.forward(batch.X)
                rows.append(torch.stack([
                    torch.as_tensor(x_sum, dtype=torch.float64).cpu(),
                    torch.zeros((), dtype=torch.float64) if batch.y is None
                    else batch.y.double().sum().cpu(),
                    out.double().sum().cpu(),
                    torch.tensor(batch.count, dtype=torch.float64),
                ]))
        return rows


def _read_deferred(count: float | Tensor, pending: list[tuple[Tensor, Callable[[], str]]]
                   ) -> float:
    """The term count as a float, and the deferred checks raised, in one device read.

    Args:
        count: The summed count, a float or a 0-d tensor on the targets' device.
        pending: ``(flag, message)`` per deferred check: a 0-d bool tensor, true where the
            check failed, and a function giving the error message.
    """
    flags = [flag.reshape(1) for flag, _ in pending]
    if isinstance(count, Tensor):
        flags = [count.reshape(1).double(), *(f.double() for f in flags)]
    elif not flags:
        return count
    values = torch.cat(flags).tolist()
    if isinstance(count, Tensor):
        count, *values = values
    for failed, (_, message) in zip(values, pending):
        if failed:
            raise ValueError(message())
    return count

