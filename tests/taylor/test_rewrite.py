import pytest
import torch
from taylor_references import laplacian_reference, standard_laplacian
from torch.fx.experimental.proxy_tensor import make_fx

from curvkit.taylor import rewrite
from curvkit.taylor.rewrite import simplify

aten = torch.ops.aten
R, N, D = 4, 3, 5


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.target is target)


def _capture(fn, *inputs):
    return make_fx(fn)(*inputs)


def _assert_rewrites(fn, inputs, *, fires):
    gm = _capture(fn, *inputs)
    expected = fn(*inputs)
    gm, counts = simplify(gm, inputs, check=True)
    torch.testing.assert_close(gm(*inputs), expected)
    assert (counts["pull_sum"] > 0) == fires, counts
    return gm


def _x():
    return torch.randn(R, N, D)


@pytest.mark.parametrize("fn, fires", [
    (lambda x, c: (x * c).sum(0), True),  # c constant along the summed axis
    (lambda x, c: (c / 2 * x).sum(0), True),
    (lambda x, c: (x / c).sum(0), True),
    (lambda x, c: (x * x).sum(0), False),  # both factors vary along the axis
    (lambda x, c: (x * c.expand(R, N, D)).sum(0), False),  # expanded constant is not pulled
    (lambda x, c: (x + x.sin()).sum(0), True),
    (lambda x, c: (x - c).sum(0), True),  # broadcast: contributes R * c
    (lambda x, c: (-x).sum(0), True),
    (lambda x, c: x.unsqueeze(2).sum(0), True),
    (lambda x, c: x.unsqueeze(0).sum(0), False),  # summing the inserted axis itself
    (lambda x, c: (x.reshape(R * N, D) @ c.T).reshape(R, N, N).sum(0), True),  # batched mm
    (lambda x, c: x.reshape(R // 2, 2, N, D).sum(0), False),  # the view splits the axis
    (lambda x, c: (x.reshape(R * N, D) @ c.T).reshape(R // 2, 2 * N, N).sum(0), False),
])
def test_pull_sum_rule_fires_exactly_where_valid(fn, fires):
    c = torch.randn(N, D)
    _assert_rewrites(fn, [_x(), c], fires=fires)


def test_broadcast_add_scales_by_axis_size():
    c = torch.randn(N, D)
    gm = _assert_rewrites(lambda x, c: (x + c).sum(0), [_x(), c], fires=True)
    assert _count(gm, aten.mul.Tensor) == 1  # R * c


def test_cse_merges_identical_nodes_only():
    def duplicated(x, y):
        return torch.sin(x) + torch.sin(x) * torch.sin(y)

    gm = _capture(duplicated, torch.randn(3), torch.randn(3))
    assert _count(gm, aten.sin.default) == 3
    gm, counts = simplify(gm, [torch.randn(3), torch.randn(3)], check=True)
    assert counts["cse"] == 1 and _count(gm, aten.sin.default) == 2


def test_dce_removes_unused_nodes_only():
    def with_dead(x):
        torch.cos(x)  # result unused
        return torch.sin(x)

    gm = _capture(with_dead, torch.randn(3))
    gm.graph.call_function(aten.exp.default, (next(iter(gm.graph.nodes)),))  # dangling node
    gm.recompile()
    gm, counts = simplify(gm, [torch.randn(3)], check=True)
    assert counts["dce"] >= 1
    assert _count(gm, aten.exp.default) == 0 and _count(gm, aten.sin.default) == 1
    gm, counts = simplify(gm, [torch.randn(3)], check=True)
    assert counts == {"pull_sum": 0, "cse": 0, "dce": 0}


def test_check_catches_a_wrong_rewrite(monkeypatch):
    gm = _capture(lambda x: (x * x.cos()).sum(0), _x())
    monkeypatch.setattr(rewrite, "_size_along", lambda value, axis, rank: 1 if value is not None
                        and getattr(value, "target", None) is aten.cos.default else R)
    with pytest.raises(RuntimeError, match="simplify: rewrite 'pull_sum' changed the outputs"):
        simplify(gm, [_x()], check=True)


def _mlp_params(g, widths=(D, 6, 4, 1)):
    return [(torch.randn(b, a, generator=g), torch.randn(b, generator=g))
            for a, b in zip(widths[:-1], widths[1:])]


def test_collapse_rewrite_turns_standard_into_collapsed_laplacian():
    params = _mlp_params(torch.Generator().manual_seed(0))
    fn = standard_laplacian(params)
    X = torch.randn(N, D)
    directions = torch.eye(D).unsqueeze(1).expand(D, N, D).contiguous()
    inputs = [X, directions, torch.zeros(D, N, D)]
    gm = _capture(fn, *inputs)

    def mm_rows(gm):
        rows = []
        for node in gm.graph.nodes:
            if node.target is aten.mm.default:
                rows.append(node.meta["tensor_meta"].shape[0])
        return sorted(rows)

    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(*inputs)
    before = mm_rows(gm)
    gm, counts = simplify(gm, inputs, check=True)
    after = mm_rows(gm)
    # before: per layer one value matmul (N rows) and two direction matmuls (D * N rows each).
    # after: the second-order matmuls act on the summed coefficient (N rows), and the last
    # layer's value and first-order matmuls are dead (only the second order is returned); the
    # sum ends on the (zero) second-order input, sum(X2, 0).
    L = len(params)
    assert before == sorted([N] * L + [D * N] * 2 * L)
    assert after == sorted([N] * (2 * L - 1) + [D * N] * (L - 1))
    assert counts["pull_sum"] >= 2 * len(params)

    def f(x):
        for i, (W, b) in enumerate(params):
            x = x @ W.T + b
            if i < len(params) - 1:
                x = torch.tanh(x)
        return x

    torch.testing.assert_close(gm(*inputs), laplacian_reference(f, X))
