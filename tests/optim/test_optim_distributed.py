import os

import torch
import torch.distributed as dist
from torch import nn

from curvkit.optim import SOAP, KLShampoo, Muon, Shampoo
from two_processes import run_two_processes


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))


OPTIMIZERS = {
    "shampoo": lambda p: Shampoo(p, lr=1e-2, precondition_frequency=2),
    "soap": lambda p: SOAP(p, lr=1e-2, precondition_frequency=2, state_dtype=torch.bfloat16),
    "klshampoo": lambda p: KLShampoo(p, lr=1e-3, precondition_frequency=2,
                                     basis_update="subspace", subspace_rank=2),
    "muon": lambda p: Muon(p, lr=1e-2, ns_dtype=None),
}


def train(name, steps=5):
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)
        opt.zero_grad()
        (model(x) - y).square().mean().backward()  # every rank sees the (all-reduced) gradient
        opt.step()
    owned = sum(1 for s in opt.state.values() if s)
    return [p.detach().clone() for p in model.parameters()], owned


def worker(rank, init_method, out_dir):
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        results = {name: train(name) for name in OPTIMIZERS}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_single_process(tmp_path):
    run_two_processes(worker, str(tmp_path))
    for name in OPTIMIZERS:
        expected, owned_all = train(name)
        assert owned_all == 6
        owned = []
        for rank in range(2):
            params, n = torch.load(tmp_path / f"rank{rank}.pt")[name]
            owned.append(n)
            for got, want in zip(params, expected):
                assert torch.equal(got, want), (name, rank)
        assert owned == [3, 3]  # the preconditioner work was split
