"""The data pass of KFAC and EKFAC: which modules get which block, hooks, backpropagated vectors.

One forward pass per batch records, for every call of every planned module, its input and the
autograd edge of its output (``torch.autograd.graph.get_gradient_edge``, which stays valid when
a later in-place operation rewrites the output tensor). Then one backward pass per
backpropagated vector ``v_k`` asks autograd for the gradients at those edges only, so the
weight gradients themselves are never computed. A module called several times in one forward
pass (a shared layer) contributes all its calls as extra weight-sharing positions.

Backpropagated vectors ``v_k`` (shaped like the model output, ``K`` of them per batch):

- ``"type2"``: columns of the symmetric square root of the output Hessian of the sum-reduced
  loss; all positions (tokens) of an example are backpropagated together, one vector per class
  (cross-entropy) or per entry of the last output dimension (MSE/BCE);
- ``"mc"``: gradients at ``mc_samples`` labels drawn from the model's likelihood, over ``√M``;
- ``"empirical"``: the gradient at the true labels;
- ``"forward_only"``: none (``G = I``).

A weighted batch ``(X, y, w)`` scales example ``n``'s vectors by ``√w_n`` and its inputs'
contribution to ``A`` by ``w_n``, so that the operator approximates the curvature of
``c Σ_n w_n ℓ_n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.func import vjp, vmap
from torch.utils._pytree import tree_map

from curvkit.curvature.engine import Batch, DataEngine
from curvkit.curvature.kfac_layers import (
    KroneckerRule,
    NormRule,
    batch_statistics_norms,
    rule_for,
)
from curvkit.curvature.kfac_verify import verify_coverage
from curvkit.curvature.losses import OutputLoss
from curvkit.curvature.per_example_loop import (
    first_example_agrees,
    looped_other_gradients,
    vmap_unsafe_modules,
)

__all__ = ["LayerPlan", "plan_layers", "FactorPass", "type2_positions"]

FISHER_TYPES = ("type2", "mc", "empirical", "forward_only")


@dataclass
class LayerPlan:
    """One module whose parameters get a structured block.

    Attributes:
        path: The module's name in ``model.named_modules()``.
        module: The module.
        rule: Its ``KroneckerRule`` or ``NormRule``.
        weight: Name of its selected weight parameter, or ``None``.
        bias: Name of its selected bias parameter, or ``None``.
        joint: Bias joined with the weight (an input column of ones / one dense block).
        calls: Per call in the current forward pass: ``(input, output gradient edge)``.
    """

    path: str
    module: nn.Module
    rule: KroneckerRule | NormRule
    weight: str | None
    bias: str | None
    joint: bool
    calls: list = field(default_factory=list)

    @property
    def is_kron(self) -> bool:
        """Whether the module gets Kronecker blocks (else a dense norm block)."""
        return isinstance(self.rule, KroneckerRule)

    @property
    def roles(self) -> tuple[str, ...]:
        """The selected roles among ``("weight", "bias")``."""
        return tuple(r for r in ("weight", "bias") if getattr(self, r) is not None)


def plan_layers(model: nn.Module, params: dict[str, Tensor], *, separate_bias: bool
                ) -> tuple[list[LayerPlan], list[str]]:
    """Assign the selected parameters to modules with a rule; the rest are "other".

    Raises:
        ValueError: If one parameter belongs to two modules with rules (weight tying across
            modules, e.g. an embedding tied to the output layer).
    """
    if isinstance(model, nn.DataParallel):
        raise ValueError(f"KFAC: the model is wrapped in {type(model).__name__}, whose forward "
                         "cannot run with substituted parameters (torch.func.functional_call); "
                         "pass the module it wraps, model.module.")
    # Match modules to selected parameters by the model's own parameter names (``params`` may
    # hold other tensors of the same shapes, e.g. a different point), deduplicated as
    # ``named_parameters`` does, so a tensor shared by two modules has one name.
    name_of = {id(p): n for n, p in model.named_parameters()}
    owner: dict[str, str] = {}
    layers, seen = [], set()
    for path, module in model.named_modules(remove_duplicate=False):
        rule = rule_for(module)
        if rule is None or id(module) in seen:
            continue  # a module registered under two names is one layer: its calls all count
        seen.add(id(module))
        roles = {}
        for role in ("weight", "bias"):
            p = module._parameters.get(role)
            name = None if p is None else name_of.get(id(p))
            if name not in params:
                continue
            if name in owner:
                raise ValueError(
                    f"KFAC: parameter {name!r} is shared by modules {owner[name]!r} and {path!r} "
                    "(weight tying); per-layer Kronecker factors would count it twice. Exclude it "
                    "from params, or untie the weights."
                )
            roles[role] = name
            owner[name] = path
        if roles:
            if hasattr(rule, "check_module"):
                rule.check_module(module)
            has_both = "weight" in roles and "bias" in roles
            layers.append(LayerPlan(path, module, rule, roles.get("weight"), roles.get("bias"),
                                    joint=has_both and not separate_bias))
    others = [n for n in params if n not in owner]
    return layers, others


def backprop_vectors(loss: OutputLoss, fisher: str, out: Tensor, batch: Batch, mc_samples: int,
                     generator: torch.Generator) -> Tensor:
    """The vectors ``(K, *out.shape)`` to backpropagate for one batch (see the module docstring)."""
    out = out.detach()
    if fisher == "type2":
        if loss.class_dim is not None:
            S = loss.sqrt_factor(out, batch.y)  # (N, T, C, K)
            V = torch.stack([loss.from_terms(S[..., k], out.shape) for k in range(S.shape[-1])])
        else:  # one vector per entry of the last output dimension, positions together
            root = loss.sqrt_factor(out, batch.y).reshape(out.shape)
            if out.ndim == 1:
                V = root.unsqueeze(0)
            else:
                D = out.shape[-1]
                eye = torch.eye(D, dtype=out.dtype, device=out.device)
                V = root.unsqueeze(0) * eye.reshape(D, *([1] * (out.ndim - 1)), D)
    elif fisher == "mc":
        V = loss.sample_gradients(out, batch.y, mc_samples, generator)
        if mc_samples > 1:
            V = V / math.sqrt(mc_samples)
    elif fisher == "empirical":
        o = out.clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(loss.sum_loss(o, batch.y, batch.batch_size), o)
        V = g.unsqueeze(0)
    else:
        raise ValueError(f"KFAC: fisher must be one of {FISHER_TYPES}; got {fisher!r}.")
    if batch.weights is not None:
        w = batch.weights.to(dtype=out.dtype, device=out.device)
        V = V * w.sqrt().reshape(1, -1, *([1] * (out.ndim - 1)))
    return V


def type2_positions(loss: OutputLoss, out: Tensor) -> int:
    """Positions per example that share one type-2 vector (see ``backprop_vectors``)."""
    if loss.class_dim is not None:
        return loss.to_terms(out).shape[1]
    return math.prod(out.shape[1:-1])


def _cat(parts: list[Tensor]) -> Tensor:
    """Calls of one module joined along the positions (no copy for the usual single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _example_dims(batch: Batch):
    """Per leaf of ``batch.X``: 0 where it holds the examples in front, else None.

    Entries of a mapping input that are not batched (flags, numbers, 0-d tensors) belong to
    every example unchanged.
    """
    N = batch.batch_size
    return tree_map(lambda t: 0 if isinstance(t, Tensor) and t.ndim and t.shape[0] == N
                    else None, batch.X)


def _probe_inputs(batch: Batch):
    """``(examples, input)`` probes that tell layer inputs per example from shared ones.

    The first example alone, then, for models that cannot run one example (a ``squeeze()`` of
    the batch dimension, a BatchNorm1d in training mode), the batch twice over (``2N``
    examples, the same batch statistics). A generator: the doubled batch is built only if the
    first probe fails.
    """
    dims = _example_dims(batch)
    yield 1, tree_map(lambda t, d: t if d is None else t[:1], batch.X, dims)
    yield (2 * batch.batch_size,
           tree_map(lambda t, d: t if d is None else torch.cat([t, t]), batch.X, dims))


class FactorPass:
    """Hooks and per-batch accumulation shared by KFAC and EKFAC.

    Args:
        engine: The data engine (model, loss, data, selected parameters).
        layers: Planned modules (``plan_layers``); modules never called in the first batch are
            moved to ``others`` (their parameters are used outside their ``forward``, as
            ``nn.MultiheadAttention`` does with ``out_proj``).
        others: Names of selected parameters without a rule.
        fisher, mc_samples, approx: As in ``KFAC``.
        other: ``"diagonal"``, ``"dense"`` or ``"error"``.
        check: Verify on the first batch that the hooked calls account for the whole gradient
            of every planned parameter (catches weight tying and functional reuse).
        per_example: Require batch-first inputs for every layer (EKFAC needs per-example data).
    """

    def __init__(self, engine: DataEngine, layers: list[LayerPlan], others: list[str], *,
                 fisher: str, mc_samples: int, approx: str, other: str, check: bool,
                 per_example: bool = False):
        self.engine, self.loss = engine, engine.loss
        self.layers, self.others = layers, others
        self.fisher, self.mc_samples, self.approx = fisher, mc_samples, approx
        self.other, self.check = other, check
        self.per_example = per_example or approx == "reduce"
        self._active = False
        self._first = True
        # Paths of the modules called on a tensor shared by all examples: found on the first
        # batch, or given by an earlier pass over the same model (EKFAC's correction pass).
        self.shared_paths: list[str] | None = None
        # Paths of the modules whose input does not hold the examples in front (found with the
        # shared ones).
        self.unbatched_paths: list[str] = []
        # Set when no probe pass slices the output as it slices the input's first dimension.
        self.input_not_batch_first = False
        self._out_numel = 0  # the first batch's output size, for the probes
        # Whether other_gradients vmaps over the examples (None: not decided yet), or loops
        self._vmap_others: bool | None = None
        # On CPU, 2-d/3-d convolutions and pooling run about twice as fast channels last; the
        # pass feeds image batches in that layout (the same values), unless the model refuses
        # it on the first batch (e.g. ``x.view`` on a non-contiguous activation).
        first = next(iter(engine.params.values()))
        device = first.device
        # Layers run under autocast see and return lower-precision tensors: their inputs and
        # output gradients are brought to the factors' (the parameters') dtype.
        self.dtype = first.dtype
        self._channels_last = device.type == "cpu" and any(
            isinstance(p.module, (nn.Conv2d, nn.Conv3d)) for p in layers)
        # Leaves of our own: gradients never reach the user's tensors, and ``params`` given
        # as detached tensors still build a graph.
        self.params = {n: p.detach().requires_grad_(True) for n, p in engine.params.items()}

    # ------------------------------------------------------------------ the loop
    def reduce(self, fn, *, desc: str, normalise: bool = True) -> list[Tensor]:
        """Sum ``fn(batch)`` over batches and ranks, times ``1/T`` (mean) or 1 (sum).

        ``fn`` must return new tensors (they are summed and scaled in place).

        KFAC differentiates once, so it keeps PyTorch's fast attention kernels
        (``math_sdpa=False``); ``T``, the number of loss terms, is counted in the same pass.
        Only the empirical Fisher feeds the targets to the loss: the other kinds defer the
        term count and the target checks to one device read after the pass.
        """
        return self.engine.reduce_over_data(fn, desc=desc, math_sdpa=False, owned=True,
                                            normalise=normalise,
                                            defer_checks=self.fisher != "empirical")

    # ------------------------------------------------------------------ hooks
    def _hook(self, plan: LayerPlan):
        def record(module, args, kwargs, output):
            if self._active:
                edge = get_gradient_edge(output) if output.requires_grad else None
                # The supported layers take one input, which may come by keyword
                # (``lin(input=x)``, ``rms_norm(x=x)``).
                x = args[0] if args else next(iter(kwargs.values()))
                if isinstance(x, Tensor):
                    if x.requires_grad:  # (the factors are built outside autograd)
                        x = x.detach()
                    if x.is_floating_point() and x.dtype != self.dtype:
                        x = x.to(self.dtype)  # under autocast
                plan.calls.append((x, edge))
        return record

    def forward(self, batch: Batch) -> Tensor:
        """Model output for ``batch`` with every planned module's calls recorded."""
        w = batch.weights
        if w is not None:
            def message() -> str:
                got = type(w).__name__
                if isinstance(w, Tensor):
                    got = f"shape {tuple(w.shape)}" + (f", min {w.min().item():.3g}, max "
                                                       f"{w.max().item():.3g}" if w.numel() else "")
                return (f"KFAC: batch weights must be a tensor of shape ({batch.batch_size},) "
                        f"with finite entries >= 0; batch {batch.index} has {got}.")

            if not isinstance(w, Tensor) or w.shape != (batch.batch_size,):
                raise ValueError(message())
            # NaN fails w >= 0; the values are only multiplied in, so the check may wait
            self.loss.require(~((w >= 0) & w.isfinite()).all(), message)
        X = self._layout(batch.X)
        try:
            out = self._record(X)
        except RuntimeError:
            if X is batch.X or not self._first:
                raise
            self._channels_last = False  # the model needs its own layout: keep it
            out = self._record(batch.X)
        self.loss.check(out, batch.y)
        if self._first:
            self._out_numel = out.numel()
            self._finalise_plan(batch)
        elif missing := [p.path for p in self.layers if not p.calls]:
            raise ValueError(f"KFAC: modules {missing} were called in the first batch but not in "
                             f"batch {batch.index} (data-dependent control flow); every layer "
                             "with a Kronecker or norm block must run in every batch. Exclude "
                             "their parameters via params=.")
        return out

    def _layout(self, X):
        """``X`` channels last where that is the faster layout (``_channels_last``)."""
        if not (self._channels_last and isinstance(X, Tensor) and X.ndim in (4, 5)
                and X.is_floating_point()):
            return X
        fmt = torch.channels_last if X.ndim == 4 else torch.channels_last_3d
        return X.contiguous(memory_format=fmt)

    def _record(self, X) -> Tensor:
        """The model output for ``X`` with every planned module's calls in ``plan.calls``."""
        for plan in self.layers:
            plan.calls = []
        handles = [p.module.register_forward_hook(self._hook(p), with_kwargs=True)
                   for p in self.layers]
        self._active = True
        try:
            return self.engine.forward(X, self.params)
        finally:
            self._active = False
            for h in handles:
                h.remove()

    def _shared_input_layers(self, batch: Batch) -> list[LayerPlan]:
        """Planned modules called on a tensor that holds no example dimension.

        Also sets ``unbatched_paths``: the modules whose input holds the examples elsewhere
        than in front.

        A positional embedding of ``torch.arange(S)`` is the common shared case: its output is
        broadcast over the examples, so autograd hands back its output gradient already summed
        over them and no Kronecker factor of per-example quantities can be formed — whatever
        the shapes say (``S`` may well be a multiple of ``N``). A sequence-first input
        ``(S, N, D)`` passes for batch-first when ``S = N``, and per-example quantities would
        then be taken over positions. Both are told by one forward pass of the first example
        alone (or of the batch twice over, for a model that cannot run one example; see
        ``_probe_inputs``): a shared call's input is as large as with the whole batch, and a
        batch-first one has as many leading rows as the probe has examples. Skipped with one
        example (then every factor is exact, and the shapes tell the rest). BatchNorm layers in
        training mode get their running statistics back afterwards, as if the extra pass had
        not happened. Given by an earlier pass over the same model (EKFAC's correction pass),
        nothing is run.
        """
        if self.shared_paths is not None:
            return [p for p in self.layers if p.path in self.shared_paths]
        self.unbatched_paths = []
        N = batch.batch_size
        if N < 2:
            return []
        full = {id(p): p.calls for p in self.layers}
        # The pass updates copies: the originals may be saved for the batch's backward pass.
        statistics = [(m, name, b) for m in batch_statistics_norms(self.engine.model)
                      for name, b in m.named_buffers(recurse=False)]
        for module, name, b in statistics:
            setattr(module, name, b.clone())
        probed, size, ran, valid = {}, 0, False, False  # neither probe runs: cannot tell
        try:
            for examples, probe in _probe_inputs(batch):
                try:
                    with torch.no_grad():
                        out = self._record(probe)
                except Exception:  # noqa: BLE001, S112  (the next probe may run)
                    continue
                ran = True
                # Slicing the examples slices the output in proportion (tokens flattened into
                # rows), or keeps one output row per example (outputs that couple the examples,
                # a model trimming to the longest sequence); neither means that the input's
                # first dimension does not hold the examples (a sequence-first input of N
                # positions).
                if isinstance(out, Tensor) and (
                        out.numel() * N == self._out_numel * examples
                        or (out.ndim > 0 and out.shape[0] == examples)):
                    probed, size, valid = {id(p): p.calls for p in self.layers}, examples, True
                    break
        finally:
            for p in self.layers:
                p.calls = full[id(p)]
            for module, name, b in statistics:
                setattr(module, name, b)
        if ran and not valid:  # no layer input can be trusted to hold the examples in front
            self.input_not_batch_first = True
            self.unbatched_paths = [p.path for p in self.layers]
        shared = []
        for plan in self.layers:
            calls = probed.get(id(plan), [])
            if len(calls) != len(plan.calls):
                continue
            pairs = [(x, y) for (x, _), (y, _) in zip(plan.calls, calls)
                     if isinstance(x, Tensor) and isinstance(y, Tensor)]
            if any(x.numel() == y.numel() for x, y in pairs):
                shared.append(plan)
            elif any(y.ndim == 0 or y.shape[0] != size for _, y in pairs):
                self.unbatched_paths.append(plan.path)
        return shared

    def _finalise_plan(self, batch: Batch) -> None:
        shared = self._shared_input_layers(batch)
        self.shared_paths = [p.path for p in shared]
        if shared and self.other == "error":
            raise ValueError(f"KFAC: modules {[p.path for p in shared]} are called on a tensor "
                             "shared by all examples (e.g. positional embeddings of "
                             "torch.arange), which has no Kronecker factor; pass "
                             "other='diagonal' or 'dense' for their parameters, or exclude them.")
        for plan in shared:  # exact per-example treatment as an "other" parameter instead
            self.others.extend(getattr(plan, r) for r in plan.roles)
        shared_ids = {id(p) for p in shared}
        self.layers = [p for p in self.layers if id(p) not in shared_ids]
        unused = [p for p in self.layers if not p.calls]
        for plan in unused:  # parameters used outside the module's own forward
            self.others.extend(getattr(plan, r) for r in plan.roles)
        self.layers = [p for p in self.layers if p.calls]
        order = list(self.engine.params)
        self.others.sort(key=order.index)
        if self.others and self.input_not_batch_first:
            raise ValueError(f"KFAC: parameters {self.others} get exact per-example blocks from "
                             "forward passes of single examples, taken along the first dimension "
                             "of the model's input; there it does not hold the examples (the "
                             "first example alone does not give one example's share of the "
                             "output: sequence-first input?). Pass batch-first inputs or exclude "
                             "them via params=.")
        if self.others and self.other == "error":
            raise ValueError(f"KFAC: parameters {self.others} belong to no supported layer "
                             "(Linear, Conv1d/2d/3d, Embedding, LayerNorm, RMSNorm, GroupNorm, "
                             "BatchNorm); pass other='diagonal' or 'dense', or exclude them.")
        if self.others and (coupling := batch_statistics_norms(self.engine.model)):
            # Each one-example pass would normalise its example by that example's own
            # statistics, not the batch's the factors were computed with.
            raise ValueError(f"KFAC: parameters {self.others} get exact per-example blocks from "
                             "one-example forward passes, which a BatchNorm normalising with "
                             f"batch statistics ({type(coupling[0]).__name__}: training mode or "
                             "track_running_stats=False) does not allow; call model.eval() with "
                             "running statistics or exclude them via params=.")
        uncovered = self.others + [n for p in self.layers if not p.is_kron
                                   for n in (p.weight, p.bias) if n is not None]
        if uncovered and self.fisher == "forward_only":
            raise ValueError(f"KFAC: fisher='forward_only' has no curvature for parameters "
                             f"{uncovered} outside Linear/Conv/Embedding layers; exclude them "
                             "via params=.")
        for plan in self.layers:
            per_example = not plan.is_kron or self.per_example or batch.weights is not None
            for x, edge in plan.calls:
                if edge is None:
                    raise ValueError(f"KFAC: the output of module {plan.path!r} does not require "
                                     "grad; cannot backpropagate to it.")
                if per_example and (x.shape[0] != batch.batch_size
                                    or plan.path in self.unbatched_paths):
                    N = batch.batch_size
                    why = (f"is not the batch size {N}" if x.shape[0] != N else
                           f"equals the batch size {N} but does not hold the examples (a "
                           "one-example pass gives it another size: sequence-first?)")
                    raise ValueError(
                        f"KFAC: module {plan.path!r} got an input of shape {tuple(x.shape)} whose "
                        f"first dimension {why}; per-example quantities (reduce, weights, norm "
                        "layers, EKFAC) need batch-first layers.")
        self._first = False

    # ------------------------------------------------------------------ per-layer pieces
    def layer_inputs(self, plan: LayerPlan, *, ones: bool = True) -> Tensor:
        """``a`` of shape ``(N, S, groups, d_in [+1])`` over all calls.

        With ``ones`` a joint layer's ``a`` gets its trailing column of ones.
        """
        a = _cat([plan.rule.inputs(plan.module, x) for x, _ in plan.calls])
        if ones and plan.joint:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        return a

    def layer_grads(self, plan: LayerPlan, grads: list[Tensor]) -> Tensor:
        """``g`` of shape ``(N, S, groups, d_out)`` over all calls."""
        return _cat([plan.rule.grads(plan.module, g) for g in grads])

    def norm_grads(self, plan: LayerPlan, grads: list[Tensor]) -> dict[str, Tensor]:
        """Per-example affine gradients ``{role: (N, numel)}`` summed over the calls."""
        total: dict[str, Tensor] = {}
        for (x, _), g in zip(plan.calls, grads):
            for role, u in plan.rule.per_example(plan.module, x, g, plan.roles).items():
                total[role] = total[role] + u if role in total else u
        return total

    def vectors(self, batch: Batch, out: Tensor, generator: torch.Generator) -> Tensor:
        """Backpropagated vectors ``(K, *out.shape)``; ``K = 0`` for ``forward_only``."""
        if self.fisher == "forward_only":
            return out.new_zeros((0, *out.shape))
        return backprop_vectors(self.loss, self.fisher, out, batch, self.mc_samples, generator)

    def edges(self) -> list:
        """Gradient edges of all recorded calls, layer by layer."""
        return [edge for plan in self.layers for _, edge in plan.calls]

    def backward(self, out: Tensor, v: Tensor, extra: list[Tensor] = (), *, retain: bool,
                 cast: bool = True):
        """Gradients at every recorded call (grouped per layer) and at ``extra`` tensors.

        With ``cast`` the calls' gradients come in the parameters' dtype (not in autocast's).
        """
        edges = self.edges()
        if not edges and not extra:  # only "other" parameters selected: nothing to ask autograd
            return [], []
        grads = torch.autograd.grad(out, [*edges, *extra], grad_outputs=v, retain_graph=retain,
                                    allow_unused=True, materialize_grads=True)
        per_layer, i, dtype = [], 0, self.dtype
        for plan in self.layers:
            calls = grads[i:i + len(plan.calls)]
            per_layer.append([g.to(dtype) if cast and g.dtype != dtype else g for g in calls])
            i += len(plan.calls)
        return per_layer, list(grads[len(edges):])

    # ------------------------------------------------------------------ other parameters
    def other_gradients(self, batch: Batch, V: Tensor) -> dict[str, Tensor]:
        """Per-example, per-vector gradients ``{name: (N, K, numel)}`` of the other parameters.

        ``∂(v_kᵀ f(x_n))/∂θ`` by ``vjp`` of a one-example forward, ``vmap``-ed over vectors and
        examples: exact for the same vectors as the Kronecker factors. Models that vmap cannot
        batch (RNNs) or batches wrongly (PReLU) take ``looped_other_gradients`` instead.
        """
        base = {n: p.detach() for n, p in self.engine.params.items()}
        sub = {n: base[n] for n in self.others}
        x_dims = _example_dims(batch)

        def per_example(x, v):  # v: (K, *out_n)
            def f(p):
                x1 = tree_map(lambda t, d: t if d is None else t.unsqueeze(0), x, x_dims)
                return self.engine.forward(x1, {**base, **p}).squeeze(0)

            _, vjp_fn = vjp(f, sub)
            return vmap(vjp_fn)(v)[0]

        U = None
        if self._vmap_others is None:  # decided on the first batch, kept for the pass
            self._vmap_others = not vmap_unsafe_modules(self.engine.model)
        if self._vmap_others:
            try:
                U = vmap(per_example, in_dims=(x_dims, 1))(batch.X, V)
            except Exception:  # noqa: BLE001  (no vmap rule, or a one-example failure: the loop)
                self._vmap_others = False
            else:
                U = {n: u.reshape(u.shape[0], u.shape[1], -1) for n, u in U.items()}
                # a wrong batching rule would be silent: the first example is checked
                if not first_example_agrees(self.engine, batch, V, self.others, x_dims, U):
                    U, self._vmap_others = None, False
        if U is None:
            try:
                return looped_other_gradients(self.engine, batch, V, self.others, x_dims)
            except Exception as err:
                raise ValueError(
                    f"KFAC: the exact blocks of parameters {self.others} (no Kronecker or norm "
                    "rule for their use) come from torch.func.vmap over one-example forward "
                    "passes (or a loop over the examples where vmap fails), which fail for this "
                    f"model ({type(err).__name__}: {err}). Exclude them via params=.") from err
        return U

    # ------------------------------------------------------------------ consistency check
    def verify(self, out: Tensor, v: Tensor, a_list: list[Tensor | None]) -> None:
        """Raise if the hooked calls do not reproduce a planned parameter's gradient ``Jᵀv``.

        ``a_list``: per layer its inputs without the column of ones (``layer_inputs(ones=False)``).
        See ``kfac_verify.verify_coverage``.
        """
        verify_coverage(self, out, v, a_list)
