"""Two gloo processes, each with its shard, must give the single-process operator of the union."""


import pytest
import torch
import torch.distributed as dist
from cases import INPUT_SHAPES, MODELS, make_data
from torch import nn

from curvkit.curvature import GGN, EmpiricalFisher, Hessian, Jacobian
from two_processes import run_two_processes


def _setup(loss_name):
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    loss_fn = {"ce": nn.CrossEntropyLoss(), "mse": nn.MSELoss()}[loss_name]
    data = make_data(model, loss_fn, INPUT_SHAPES["mlp"], sizes=(3, 2, 4))
    if loss_name == "ce":  # a few ignored targets change the global count unevenly
        data[0][1][0] = -100
    shards = [data[:2], data[2:]]  # unequal shards: 5 and 4 examples
    P = sum(p.numel() for p in model.parameters())
    V = torch.randn(P, 2, generator=torch.Generator().manual_seed(1))
    return model, loss_fn, data, shards, V


def _products(model, loss_fn, data, V):
    out = {cls.__name__: cls(model, loss_fn, data) @ V for cls in (GGN, Hessian, EmpiricalFisher)}
    out["GGN.diagonal"] = GGN(model, loss_fn, data).diagonal()
    return out


LOSSES = ("ce", "mse")


def _worker(rank, init_method, path):
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        for loss_name in LOSSES:
            model, loss_fn, _, shards, V = _setup(loss_name)
            out = _products(model, loss_fn, shards[rank], V)
            J = Jacobian(model, shards[rank])
            U = torch.ones(J.shape[0], 2) * (rank + 1)
            out["Jacobian.T"] = J.T @ U
            torch.save(out, f"{path}/{loss_name}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("distributed")
    run_two_processes(_worker, str(path))
    return path


@pytest.mark.parametrize("loss_name", LOSSES)
def test_two_process_products_equal_single_process(loss_name, distributed_results):
    torch.set_default_dtype(torch.float64)
    model, loss_fn, data, shards, V = _setup(loss_name)
    expected = _products(model, loss_fn, data, V)
    U_parts = [torch.ones(sum(x.shape[0] for x, _ in s) * 3, 2) * (r + 1)
               for r, s in enumerate(shards)]
    expected["Jacobian.T"] = Jacobian(model, data).T @ torch.cat(U_parts)
    for rank in range(2):
        got = torch.load(distributed_results / f"{loss_name}_rank{rank}.pt")
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, msg=f"rank {rank}: {name}")
