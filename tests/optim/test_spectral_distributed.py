"""SpectralShampoo and Symo under torch.distributed (two gloo processes) equal one process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from curvkit.optim.spectral import SpectralShampoo
from curvkit.optim.symmetry_precond import Symo
from two_processes import run_two_processes

BUILDERS = {
    "spectral_kl": lambda p: SpectralShampoo(p, lr=1e-2),
    "spectral_shampoo_bf16": lambda p: SpectralShampoo(p, lr=1e-2, target="shampoo",
                                                       state_dtype=torch.bfloat16),
    "symo": lambda p: Symo(p, lr=1e-2, precondition_frequency=2),
}


def run(name, steps=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = BUILDERS[name](model.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)
        opt.zero_grad()
        (model(x) - y).square().mean().backward()  # the same gradient on every rank
        opt.step()
    holding = sum(1 for s in opt.state.values() if s)
    return [p.detach().clone() for p in model.parameters()], holding


def _worker(rank, init_method, out_dir):
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        torch.save({name: run(name) for name in BUILDERS}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_and_split_the_state(tmp_path):
    run_two_processes(_worker, str(tmp_path))
    for name in BUILDERS:
        expected, holding = run(name)
        assert holding == 6
        per_rank = []
        for rank in range(2):
            params, count = torch.load(tmp_path / f"{rank}.pt")[name]
            per_rank.append(count)
            for got, want in zip(params, expected):
                assert torch.equal(got, want), (name, rank)
        assert per_rank == [3, 3]
