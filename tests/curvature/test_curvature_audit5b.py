"""Regressions from the fifth curvature audit (exact operators, engine, losses, symmetry)."""

import pytest
import torch
from cases import dense_ggn, dense_hessian
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvkit.curvature import GGN, FisherMC, Hessian, Jacobian
from curvkit.curvature.symmetry import sequential_symmetries
from two_processes import run_two_processes


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _dense(op):
    return op @ torch.eye(op.shape[1], dtype=torch.float64)


def test_sequential_symmetries_relu6_and_asymmetric_hardtanh_are_not_odd():
    # ReLU6 subclasses Hardtanh but is not odd: its hidden units only permute.
    for act in (nn.ReLU6(), nn.Hardtanh(0.0, 1.0)):
        groups = sequential_symmetries(nn.Sequential(nn.Linear(2, 3), act, nn.Linear(3, 1)))
        assert groups["0.weight"] == ("perm", "identity")
        assert groups["2.weight"] == ("identity", "perm")
    groups = sequential_symmetries(nn.Sequential(nn.Linear(2, 3), nn.Hardtanh(), nn.Linear(3, 1)))
    assert groups["0.bias"] == ("signed_perm",)


def test_jacobian_accepts_input_only_loaders_and_ignores_targets():
    model = _mlp()
    X = torch.randn(7, 5, dtype=torch.float64)
    loader = DataLoader(TensorDataset(X), batch_size=3)  # yields [X] batches
    J = Jacobian(model, loader)
    ref = Jacobian(model, [X[:3], X[3:6], X[6:]])
    v = torch.randn(J.shape[1], dtype=torch.float64)
    torch.testing.assert_close(J @ v, ref @ v)
    # targets Jacobian never uses need not be tensors
    J2 = Jacobian(model, [(X[:3], ["a", "b", "c"]), (X[3:], list("defg"))])
    torch.testing.assert_close(J2 @ v, J @ v)


def test_empty_data_is_named_as_such():
    model = _mlp()
    with pytest.raises(ValueError, match="data yielded no batches"):
        GGN(model, nn.CrossEntropyLoss(), [])
    with pytest.raises(ValueError, match="data yielded no batches"):
        GGN(model, nn.MSELoss(reduction="sum"), [])
    for check in (True, False):
        with pytest.raises(ValueError, match="Jacobian: data yielded no batches"):
            Jacobian(model, [], check_deterministic=check)


def test_hessian_of_parameters_that_do_not_reach_the_loss_is_zero():
    torch.manual_seed(0)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 2)
            self.aux = nn.Linear(3, 1)  # not used by forward

        def forward(self, x):
            return self.body(x)

    model = TwoHeads().double()
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))]
    loss_fn = nn.MSELoss()
    H = Hessian(model, loss_fn, data, params=[model.aux.weight])
    assert torch.equal(H @ torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, 2,
                                                                              dtype=torch.float64))
    Hb = Hessian(model, loss_fn, data, blocks="layer")
    full = dense_hessian(model, loss_fn, data)
    mask = torch.zeros_like(full)
    mask[:8, :8] = 1
    torch.testing.assert_close(_dense(Hb), full * mask)


@pytest.mark.parametrize("kwargs", [{"weight": True}, {"ignore_index": 1},
                                    {"weight": True, "ignore_index": 0}])
def test_hessian_nll_loss_normalises_over_unequal_batches(kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.LogSoftmax(1)).double()
    if kwargs.pop("weight", False):
        kwargs["weight"] = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
    loss_fn = nn.NLLLoss(**kwargs)
    data = [(torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,)))
            for n in (3, 2, 4)]
    torch.testing.assert_close(_dense(Hessian(model, loss_fn, data)),
                               dense_hessian(model, loss_fn, data))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_probability_targets_that_do_not_sum_to_one(label_smoothing):
    # PyTorch allows any non-negative targets; a zero row masks a token out of the loss.
    torch.manual_seed(0)
    model = _mlp()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    data = []
    for n in (3, 2):
        y = torch.rand(n, 3, dtype=torch.float64).softmax(1)
        y[0] = 0.0
        y[-1] *= 0.5
        data.append((torch.randn(n, 5, dtype=torch.float64), y))
    ref = dense_ggn(model, loss_fn, data)
    G = GGN(model, loss_fn, data)
    torch.testing.assert_close(_dense(G), ref)
    torch.testing.assert_close(G.diagonal(), ref.diagonal())
    # the Monte-Carlo Fisher is unbiased for the same matrix
    F = FisherMC(model, loss_fn, data, mc_samples=20000)
    assert (_dense(F) - ref).abs().max() < 0.02 * ref.abs().max()


def test_params_may_be_any_iterable_as_in_torch_optim():
    model = _mlp()
    data = [(torch.randn(3, 5, dtype=torch.float64), torch.randint(0, 3, (3,)))]
    loss_fn = nn.CrossEntropyLoss()
    ref = _dense(GGN(model, loss_fn, data, params=list(model[2].parameters())))
    torch.testing.assert_close(_dense(GGN(model, loss_fn, data, params=model[2].parameters())),
                               ref)
    Hb = Hessian(model, loss_fn, data, params=model.parameters(), blocks="layer")
    torch.testing.assert_close(_dense(Hb), _dense(Hessian(model, loss_fn, data, blocks="layer")))


def _count_worker(rank, init_method, path):
    import torch.distributed as dist

    from curvkit.curvature import DataEngine
    from curvkit.curvature.losses import output_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        model = nn.Linear(1, 1).to(torch.bfloat16)
        n = 130 if rank == 0 else 127  # 257 terms in all: not a bfloat16 number
        data = [(torch.zeros(n, 1, dtype=torch.bfloat16), torch.zeros(n, 1, dtype=torch.bfloat16))]
        engine = DataEngine(model, output_loss(nn.MSELoss(), caller="t", analytic=True), data,
                            dict(model.named_parameters()), caller="t", check_deterministic=False)
        engine.reduce_over_data(lambda b: [torch.zeros(2, dtype=torch.bfloat16)])
        torch.save(engine.num_terms(), f"{path}/count{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_count_is_exact_for_low_precision_models(tmp_path):
    run_two_processes(_count_worker, str(tmp_path))
    for rank in range(2):
        assert torch.load(tmp_path / f"count{rank}.pt") == 257
