"""Two gloo processes, each with half the data, give the KFAC / EKFAC of all the data."""

import os

import torch
import torch.distributed as dist
from torch import nn

from curvkit.curvature.ekfac import EKFAC
from curvkit.curvature.kfac import KFAC
from two_processes import run_two_processes


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4),
                         nn.LayerNorm(4), nn.Linear(4, 3))


def make_data():
    g = torch.Generator().manual_seed(0)
    # unequal batches; weighted; the ranks get (batch 0, batch 2) and (batch 1)
    return [(torch.randn(n, 2, 6, generator=g), torch.randint(0, 3, (n,), generator=g),
             torch.rand(n, generator=g)) for n in (3, 5, 2)]


def dense(cls, data, **kwargs):
    return cls(make_model(), nn.CrossEntropyLoss(), data, **kwargs).to_dense()


CASES = {
    "kfac_type2": (KFAC, {}),
    "kfac_reduce_sum": (KFAC, {"approx": "reduce"}),
    "ekfac": (EKFAC, {}),
}


def worker(rank, init_method, out_dir):
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        data = make_data()
        shard = [data[0], data[2]] if rank == 0 else [data[1]]
        results = {name: dense(cls, shard, **kw) for name, (cls, kw) in CASES.items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_single_process(tmp_path):
    run_two_processes(worker, str(tmp_path))
    data = make_data()
    for name, (cls, kw) in CASES.items():
        expected = dense(cls, data, **kw)
        for rank in range(2):
            got = torch.load(tmp_path / f"rank{rank}.pt")[name]
            torch.testing.assert_close(got, expected, msg=f"{name} rank {rank}")
