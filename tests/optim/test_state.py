import io

import pytest
import torch
from torch import nn

from curvkit.optim import KLSOAP, SOAP, KLShampoo, Muon, NonFiniteGradientError, Shampoo
from curvkit.optim._kronecker import layout

MAKERS = {
    "shampoo": lambda p, **kw: Shampoo(p, lr=1e-2, precondition_frequency=2, **kw),
    "soap": lambda p, **kw: SOAP(p, lr=1e-2, precondition_frequency=2, **kw),
    "soap_subspace": lambda p, **kw: SOAP(p, lr=1e-2, precondition_frequency=1,
                                          basis_update="subspace", subspace_rank=2, **kw),
    "klshampoo": lambda p, **kw: KLShampoo(p, lr=1e-3, precondition_frequency=2, **kw),
    "klsoap": lambda p, **kw: KLSOAP(p, lr=1e-3, precondition_frequency=2, **kw),
    "muon": lambda p, **kw: Muon(p, lr=1e-2, **kw),
}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)
        self.fc = nn.Linear(8, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(self.conv(x).flatten(1))))


def batches(n, dtype):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(6, 3, 4, generator=g, dtype=dtype),
             torch.randn(6, 2, generator=g, dtype=dtype)) for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        def closure(x=x, y=y):
            opt.zero_grad()
            loss = (model(x) - y).square().mean()
            loss.backward()
            return loss
        opt.step(closure)


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("name", list(MAKERS))
def test_resume_is_bit_for_bit(name, state_dtype):
    dtype = torch.float32
    data = batches(5, dtype)
    torch.manual_seed(0)
    model = Net().to(dtype)
    opt = MAKERS[name](model.parameters(), state_dtype=state_dtype)
    train(model, opt, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    fresh = Net().to(dtype)
    fresh.load_state_dict(saved["model"])
    fresh_opt = MAKERS[name](fresh.parameters(), state_dtype=state_dtype)
    fresh_opt.load_state_dict(saved["opt"])
    train(model, opt, data[3:])
    train(fresh, fresh_opt, data[3:])
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    if state_dtype is not None:
        state = fresh_opt.state[fresh.fc.weight]
        stored = state["blocks"][0]["Q0"] if "blocks" in state else state["exp_avg"]
        assert stored.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["soap", "klshampoo"])
def test_bfloat16_state_halves_memory(name):
    def state_bytes(opt):
        total = 0
        for s in opt.state.values():
            for block in s["blocks"]:
                total += sum(t.numel() * t.element_size() for t in block.values())
        return total

    data = batches(2, torch.float32)
    sizes = []
    for state_dtype in (None, torch.bfloat16):
        model = Net().float()
        opt = MAKERS[name](model.parameters(), state_dtype=state_dtype)
        train(model, opt, data)
        sizes.append(state_bytes(opt))
    assert sizes[1] == sizes[0] // 2


def test_nonfinite_gradient_raises_without_changes_and_skip_counts():
    p = nn.Parameter(torch.ones(3, 2))
    q = nn.Parameter(torch.ones(2))
    opt = SOAP([p, q], lr=0.1)
    p.grad, q.grad = torch.ones(3, 2), torch.tensor([1.0, float("nan")])
    with pytest.raises(NonFiniteGradientError, match=r"SOAP.step: a gradient contains nan"):
        opt.step()
    assert torch.equal(p, torch.ones(3, 2)) and not opt.state
    opt = SOAP([p, q], lr=0.1, nonfinite="skip")
    opt.step()
    opt.step()
    assert torch.equal(p, torch.ones(3, 2))
    assert opt.state[p]["skipped_steps"] == 2 and "step" not in opt.state[p]
    q.grad = torch.ones(2)
    opt.step()
    assert opt.state[p]["step"] == 1 and opt.state[p]["skipped_steps"] == 2


def test_a_nonfinite_gradient_in_one_group_skips_every_group():
    # as GradScaler: half a step (the finite groups only) would be worse than none
    p, q = nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(2))
    opt = SOAP([{"params": [p]}, {"params": [q]}], lr=0.1, nonfinite="skip")
    p.grad, q.grad = torch.ones(3, 2), torch.tensor([1.0, float("inf")])
    opt.step()
    assert torch.equal(p, torch.ones(3, 2)) and torch.equal(q, torch.ones(2))
    assert opt.state[p]["skipped_steps"] == 1 and opt.state[q]["skipped_steps"] == 1


def test_param_groups_override_options():
    a, b = nn.Parameter(torch.zeros(4, 3)), nn.Parameter(torch.zeros(4, 3))
    opt = SOAP([{"params": [a]}, {"params": [b], "lr": 0.5, "basis_update": "eigh",
                                  "max_preconditioner_dim": 2}], lr=0.1)
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[0]["basis_update"] == "qr"
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        G = torch.randn(4, 3, generator=g)
        a.grad, b.grad = G.clone(), G.clone()
        opt.step()
    assert set(opt.state[b]["blocks"][0]) == {"exp_avg", "exp_avg_sq"}  # no axis <= 2
    assert "Q0" in opt.state[a]["blocks"][0]


def test_layout_merges_conv_dims_and_drops_unit_axes():
    plan = layout((64, 32, 3, 3), max_dim=1024, merge_dims=True, large_dims="identity")
    assert plan.shape == (64, 288) and plan.axes == (0, 1)
    plan = layout((64, 32, 3, 3), max_dim=1024, merge_dims=False, large_dims="identity")
    assert plan.shape == (64, 32, 3, 3) and plan.axes == (0, 1, 2, 3)
    plan = layout((1, 5, 1, 7), max_dim=6, merge_dims=False, large_dims="identity")
    assert plan.shape == (5, 7) and plan.axes == (0,)
    plan = layout((5, 13), max_dim=6, merge_dims=False, large_dims="block")
    assert plan.axes == (0, 1) and len(plan.blocks) == 3
    assert layout((9,), max_dim=6, merge_dims=False, large_dims="block").axes == ()


def test_conv_kernel_with_merged_dims_matches_matrix_parameter():
    g = torch.Generator().manual_seed(1)
    Gs = [torch.randn(4, 2, 3, generator=g) for _ in range(5)]
    conv = nn.Parameter(torch.zeros(4, 2, 3))
    mat = nn.Parameter(torch.zeros(4, 6))
    o1 = KLSOAP([conv], lr=0.01, merge_dims=True, max_preconditioner_dim=8,
                precondition_frequency=2)
    o2 = KLSOAP([mat], lr=0.01, precondition_frequency=2)
    for G in Gs:
        conv.grad, mat.grad = G.clone(), G.reshape(4, 6).clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(conv.detach().reshape(4, 6), mat.detach(), rtol=0, atol=0)
