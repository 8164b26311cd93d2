"""Graph rewrites that collapse a standard Taylor-mode graph: pull sums up, CSE, DCE.

The operators in ``curvkit.taylor.operators`` use hand-written collapsed rules (the paper's own
recommendation for a from-scratch library). This module implements the paper's *graph* route on
ATen graphs captured with ``make_fx``: a standard K-jet graph ends in ``sum`` over the direction
axis of the top coefficients; ``simplify`` moves that sum towards the inputs through every node
that is linear in the summed axis, so the top coefficient is carried once instead of ``R`` times,
and removes common subexpressions and dead code, to a fixed point. ``check=True`` re-runs the
graph after every single rewrite and compares it with the original outputs.

Pull-sum rules, for ``sum(y, dim=a)`` where ``y`` is:

* ``mul(x, c)`` with ``c`` constant along ``a`` (size 1 or broadcast there): ``mul(sum(x), c)``;
* ``add/sub(x, z)``: ``sum(x) ± sum(z)``; a ``z`` broadcast along ``a`` contributes
  ``size_a * z``;
* ``neg(x)``: ``neg(sum(x))``;
* ``unsqueeze(x, d)`` with ``d ≠ a``: sum over the matching axis of ``x``, then unsqueeze;
* ``view(mm(view(x, (R*N, D)), W), (R, N, H))`` (how ATen batches ``x @ W`` over a leading
  axis) with ``a = 0``: ``mm(sum(x, 0), W)`` — the sum of a non-contracted axis of a matmul.

A rule never fires on a product of two factors that both vary along ``a`` (``x_r * x_r``), or on a
view that splits or merges the summed axis other than in the batched-matmul pattern.

References:
    Dangel, F., Siebert, T., Zeinhofer, M. and Walther, A. (2025). Collapsing Taylor mode
    automatic differentiation. NeurIPS. arXiv:2505.13644, section 4.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import ShapeProp

aten = torch.ops.aten
_SUMS = (aten.sum.dim_IntList,)


def _shape(node) -> tuple[int, ...] | None:
    if isinstance(node, Node):
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None else None
    if isinstance(node, Tensor):
        return tuple(node.shape)
    return ()  # Python scalar


def _summed_axis(node: Node) -> int | None:
    """The single non-negative axis ``a`` of ``sum(y, [a], keepdim=False)``, else None."""
    if node.op != "call_function" or node.target not in _SUMS:
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if keepdim or node.kwargs.get("dtype") is not None or dims is None or len(dims) != 1:
        return None
    rank = len(_shape(node.args[0]))
    return dims[0] % rank if rank else None


def _size_along(value, axis: int, rank: int) -> int:
    """Size of ``value`` along ``axis`` of a rank-``rank`` broadcast result (1 if broadcast)."""
    shape = _shape(value)
    offset = rank - len(shape)
    return 1 if axis < offset else shape[axis - offset]


def _sum(graph, x, axis, rank=None):
    """``sum(x, [axis])``; with ``rank``, ``axis`` indexes a rank-``rank`` broadcast result.

    It is then mapped onto ``x``'s own (possibly fewer, leading-broadcast) dimensions.
    """
    if rank is not None:
        axis -= rank - len(_shape(x))
    return graph.call_function(aten.sum.dim_IntList, (x, [axis]))


def _squeeze_axis(graph, value, axis, rank):
    """``value`` with the (size-1 or missing) broadcast ``axis`` removed."""
    shape = _shape(value)
    offset = rank - len(shape)
    if axis < offset:
        return value
    return graph.call_function(aten.squeeze.dim, (value, axis - offset))


def _pull_sum(graph, node: Node) -> bool:
    """Try to move ``node = sum(y, a)`` above ``y``; returns whether the graph changed."""
    axis = _summed_axis(node)
    if axis is None:
        return False
    y = node.args[0]
    if not isinstance(y, Node) or y.op != "call_function" or len(y.users) != 1:
        return False
    rank = len(_shape(y))
    target = y.target
    replacement = None
    with graph.inserting_before(node):
        if target in (aten.mul.Tensor, aten.div.Tensor):
            a, b = y.args[:2]
            varying = [_size_along(v, axis, rank) != 1 for v in (a, b)]
            if target is aten.div.Tensor and varying[1]:
                return False
            if varying == [True, False]:
                replacement = graph.call_function(
                    target, (_sum(graph, a, axis, rank), _squeeze_axis(graph, b, axis, rank)))
            elif varying == [False, True]:
                replacement = graph.call_function(
                    target, (_squeeze_axis(graph, a, axis, rank), _sum(graph, b, axis, rank)))
        elif target in (aten.add.Tensor, aten.sub.Tensor) and not y.kwargs:
            parts = []
            for v in y.args[:2]:
                if _size_along(v, axis, rank) == 1:
                    size = _shape(y)[axis]
                    parts.append(graph.call_function(
                        aten.mul.Tensor, (_squeeze_axis(graph, v, axis, rank), size)))
                else:
                    parts.append(_sum(graph, v, axis, rank))
            replacement = graph.call_function(target, tuple(parts))
        elif target is aten.neg.default:
            replacement = graph.call_function(target, (_sum(graph, y.args[0], axis),))
        elif target is aten.unsqueeze.default:
            d = y.args[1] % rank
            if d != axis:
                inner = _sum(graph, y.args[0], axis - (d < axis))
                replacement = graph.call_function(target, (inner, d - (axis < d)))
        elif target in (aten.view.default, aten._unsafe_view.default) and axis == 0:
            replacement = _pull_sum_batched_matmul(graph, y)
    if replacement is None:
        return False
    node.replace_all_uses_with(replacement)
    graph.erase_node(node)
    graph.erase_node(y)
    return True


def _pull_sum_batched_matmul(graph, outer_view: Node):
    """``sum_0 view(mm(view(x, [R*N, D]), W), [R, N, H])`` → ``mm(sum_0 x, W)``."""
    mm = outer_view.args[0]
    if not (isinstance(mm, Node) and mm.target is aten.mm.default and len(mm.users) == 1):
        return None
    inner_view, W = mm.args
    if not (isinstance(inner_view, Node) and len(inner_view.users) == 1
            and inner_view.target in (aten.view.default, aten._unsafe_view.default)):
        return None
    x = inner_view.args[0]
    x_shape, out_shape = _shape(x), _shape(outer_view)
    if len(x_shape) != 3 or len(out_shape) != 3 or x_shape[:2] != out_shape[:2]:
        return None  # the view splits the summed axis some other way: not a batched matmul
    return graph.call_function(aten.mm.default, (_sum(graph, x, 0), W))


def _common_subexpressions(graph) -> bool:
    seen: dict[tuple, Node] = {}
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.is_impure():
            continue
        key = (node.target, _hashable(node.args), _hashable(node.kwargs))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            changed = True
        else:
            seen[key] = node
    return changed


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_hashable(v) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, Tensor):
        return ("tensor", id(value))
    if isinstance(value, (bool, int, float)):
        # 2 == 2.0 == True as keys, but x * 2 and x * 2.0 differ in dtype on an integer x
        # (and x * 0.0 and x * -0.0 in the sign of zero): key scalars by type and repr
        return (type(value).__name__, repr(value))
    return value


def simplify(gm: GraphModule, example_inputs: Sequence[Tensor], *, check: bool = False,
             rtol: float = 1e-10, atol: float = 1e-12, max_iterations: int = 1000
             ) -> tuple[GraphModule, dict[str, int]]:
    """Run pull-sum, common-subexpression and dead-code elimination to a fixed point.

    Args:
        gm: ATen graph from ``make_fx`` (rewritten in place).
        example_inputs: Inputs for shape propagation (and for ``check``).
        check: Re-run the graph after every rewrite and compare with the original outputs.
        rtol: Relative tolerance of the check.
        atol: Absolute tolerance of the check.
        max_iterations: Bound on the number of rewrites.

    Returns:
        ``(gm, counts)`` with the number of times each pass changed the graph.

    Raises:
        RuntimeError: If ``check`` is set and a rewrite changes the outputs.
    """
    reference = gm(*example_inputs) if check else None
    counts = {"pull_sum": 0, "cse": 0, "dce": 0}

    def verify(pass_name):
        gm.recompile()
        if check:
            out = gm(*example_inputs)
            for a, b in zip(torch.utils._pytree.tree_leaves(out),
                            torch.utils._pytree.tree_leaves(reference)):
                if not torch.allclose(a, b, rtol=rtol, atol=atol):
                    raise RuntimeError(f"simplify: rewrite '{pass_name}' changed the outputs "
                                       f"(max difference {(a - b).abs().max().item():.3e}).")

    for _ in range(max_iterations):
        ShapeProp(gm).propagate(*example_inputs)
        graph = gm.graph
        if any(_pull_sum(graph, n) for n in list(graph.nodes)):
            counts["pull_sum"] += 1
            verify("pull_sum")
            continue
        if _common_subexpressions(graph):
            counts["cse"] += 1
            verify("cse")
            continue
        if graph.eliminate_dead_code():
            counts["dce"] += 1
            verify("dce")
            continue
        break
    else:
        raise RuntimeError(f"simplify: no fixed point after {max_iterations} rewrites.")
    gm.recompile()
    return gm, counts
