"""Capturing a function's ATen graph and interpreting it on packed jets.

Graphs are captured with ``make_fx`` (real tensors, no decompositions beyond what dispatch does
anyway). A module's parameters and buffers are explicit graph inputs (``functional_call``), so each
call reads their *current* values and autograd flows into them; tensors that a plain function
closes over are kept by identity as graph constants, so in-place updates (an optimizer step) are
seen too and gradients flow into them as well.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from curvkit.taylor import _aten_rules_nn  # noqa: F401  (registers its rules into RULES)
from curvkit.taylor._aten_rules import PRIMAL_ONLY, RULES
from curvkit.taylor._propagation import Context, Jet

RULES[operator.getitem] = lambda ctx, seq, index: seq[index]


# make_fx records ``x.detach()`` as ``aten.alias``, which is indistinguishable from a genuine
# alias (``x[...]``), so the jet would flow through a stop-gradient. While tracing, ``detach`` is
# rerouted to this op instead; its rule keeps the value and drops every derivative.
@torch.library.custom_op("curvkit::stop_gradient", mutates_args=())
def _stop_gradient(x: Tensor) -> Tensor:
    return x.detach().clone()


@_stop_gradient.register_fake
def _(x):
    return torch.empty_like(x)


RULES[torch.ops.curvkit.stop_gradient.default] = lambda ctx, x: ctx.constant(x.primal.detach())


class _RecordDetach(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (func in (Tensor.detach, torch.detach) or _reads_data(func)) and not kwargs:
            return _stop_gradient(*args)
        out = func(*args, **(kwargs or {}))
        if not torch.is_grad_enabled() and any(
                isinstance(a, Tensor) for a in pytree.tree_leaves((args, kwargs))):
            # f switched autograd off (``torch.no_grad``, ``inference_mode``; tracing itself runs
            # with grad enabled): like autograd, treat what it computes there as a constant.
            out = pytree.tree_map_only(Tensor, _stop_gradient, out)
        return out


def _reads_data(func) -> bool:
    """``x.data`` (a property: the mode sees its getter), recorded as an alias like ``detach``."""
    return getattr(func, "__self__", None) is torch._C.TensorBase.data


class _Program:
    """A captured graph plus, per node, the values that die after it runs (to free memory)."""

    def __init__(self, gm: GraphModule):
        gm.graph.eliminate_dead_code()
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        last_use: dict[Node, Node] = {}
        for node in self.nodes:
            for source in node.all_input_nodes:
                last_use[source] = node
        self.dead_after: dict[Node, list[Node]] = {n: [] for n in self.nodes}
        for source, user in last_use.items():
            self.dead_after[user].append(source)


def _has_jet(values) -> bool:
    return any(isinstance(v, Jet) for v in pytree.tree_leaves(values))


def _primal(value):
    return value.primal if isinstance(value, Jet) else value


def _check_in_place(node: Node, caller: str) -> None:
    """Refuse an in-place op on a jet unless its rule may compute a new jet instead.

    Rules are out of place: the result replaces the mutated tensor only for the in-place node's
    own users. That is exact when the mutated tensor is a fresh (non-view) result read by nothing
    else, as in RMSNorm's ``mean(x²).add_(eps)``; otherwise a later reader would see stale values.
    """
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return
    target = node.args[0] if node.args else None
    producer = getattr(target, "target", None)
    returns = producer._schema.returns if hasattr(producer, "_schema") else None
    fresh = (isinstance(target, Node) and returns is not None and len(target.users) == 1
             and all(r.alias_info is None for r in returns))
    if not fresh:
        raise NotImplementedError(
            f"{caller}: in-place ATen operator '{node.target}' mutates a tensor that is a view, "
            "an input or read elsewhere; Taylor mode needs it out of place (e.g. x = x + c).")


def interpret(program: _Program, ctx: Context, inputs: list, *, caller: str):
    """Run ``program`` with the given flat inputs (tensors or ``Jet``); returns the output pytree.

    Raises:
        NotImplementedError: If an operator that a jet reaches has no Taylor rule.
    """
    env: dict[Node, object] = {}
    placeholders = iter(inputs)
    for node in program.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders)
        elif node.op == "get_attr":
            value = program.gm
            for attr in node.target.split("."):
                value = getattr(value, attr)
            env[node] = value
        elif node.op == "call_function":
            args = torch.fx.node.map_arg(node.args, env.__getitem__)
            kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
            if not _has_jet((args, kwargs)):
                env[node] = node.target(*args, **kwargs)
            elif node.target in RULES:
                _check_in_place(node, caller)
                env[node] = RULES[node.target](ctx, *args, **kwargs)
            elif node.target in PRIMAL_ONLY:
                args, kwargs = pytree.tree_map(_primal, (args, kwargs))
                env[node] = node.target(*args, **kwargs)
            else:
                raise NotImplementedError(
                    f"{caller}: no Taylor-mode rule for ATen operator '{node.target}' "
                    "(it is neither a registered linear, elementwise (Faà di Bruno) nor "
                    "bilinear (Leibniz) rule); rewrite the function with supported operations."
                )
        elif node.op == "output":
            return torch.fx.node.map_arg(node.args[0], env.__getitem__)
        else:
            raise NotImplementedError(f"{caller}: unexpected graph node kind '{node.op}'.")
        for dead in program.dead_after[node]:
            env.pop(dead, None)
    raise RuntimeError(f"{caller}: captured graph has no output node.")


class CapturedFunction:
    """``f`` with its ATen graphs, captured lazily and cached per input signature.

    The cache key is the input's shape, dtype and device plus, for modules, the names, shapes,
    dtypes and devices of parameters and buffers and the submodules' train/eval modes, so a
    training loop that calls with the same batch shape traces once. Graphs bake in shapes: a new
    batch size triggers a new capture.

    Args:
        f: An ``nn.Module`` or a function of one tensor.
        caller: Public name used in error messages.
    """

    def __init__(self, f: nn.Module | Callable[[Tensor], Tensor], *, caller: str):
        if not callable(f):
            raise TypeError(f"{caller}: f must be an nn.Module or a callable; got {type(f)}.")
        self.f = f
        self.caller = caller
        self.programs: dict[tuple, _Program] = {}

    def _state(self) -> dict[str, Tensor]:
        if isinstance(self.f, nn.Module):
            return {**dict(self.f.named_parameters()), **dict(self.f.named_buffers())}
        return {}

    def program(self, x: Tensor, state: dict[str, Tensor]) -> _Program:
        """The cached program for inputs like ``x`` (capturing it on first use)."""
        key = (tuple(x.shape), x.dtype, x.device,
               tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in state.items()),
               # train/eval mode changes the traced code (dropout, user branches on .training)
               tuple(m.training for m in self.f.modules()) if isinstance(self.f, nn.Module)
               else ())
        if key not in self.programs:
            if isinstance(self.f, nn.Module):
                module = self.f

                def traced(state, x):
                    return torch.func.functional_call(module, state, (x,))
            else:
                f = self.f

                def traced(state, x):
                    return f(x)

            detached = {k: v.detach() for k, v in state.items()}
            # functional_call swaps tensors into the module and back; a submodule registered
            # under two names (a reused layer) is swapped twice and ends up holding the traced
            # stand-ins instead of its Parameters. Put the originals back whatever happens.
            saved = []
            if isinstance(self.f, nn.Module):
                saved = [(m, dict(m._parameters), dict(m._buffers)) for m in self.f.modules()]
            try:
                x_detached = x.detach()
                # grad enabled so that _RecordDetach can tell f's own no_grad regions apart;
                # the traced inputs are detached, so no autograd graph is built
                with torch.enable_grad(), _RecordDetach():
                    gm = make_fx(traced)(detached, x_detached)
            finally:
                for m, parameters, buffers in saved:
                    m._parameters.update(parameters)
                    m._buffers.update(buffers)
            self.programs[key] = _Program(gm)
        return self.programs[key]

    def run(self, ctx: Context, x: Tensor, data: Tensor):
        """Propagate the packed jet ``data`` (shape ``(P, *x.shape)``) through ``f``."""
        if torch._C._are_functorch_transforms_active():
            # make_fx would capture the transforms' wrapped tensors as plain constants and the
            # jets would silently carry wrong values: refuse instead.
            raise RuntimeError(
                f"{self.caller}: cannot run inside torch.func transforms (vmap, grad, jacrev, "
                "jvp, ...); call it outside and differentiate its result with torch.autograd "
                "(autograd flows through the Taylor-mode pass), or batch the points along "
                "their first dimension instead of vmap.")
        state = self._state()
        program = self.program(x, state)
        leaves, _ = pytree.tree_flatten((state, x))
        leaves[-1] = Jet(data)
        out = interpret(program, ctx, leaves, caller=self.caller)
        # make_fx may wrap a single returned tensor in a one-element list
        if isinstance(out, (list, tuple)) and len(out) == 1:
            out = out[0]
        return out
