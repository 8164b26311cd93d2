import pytest
import torch
from cases import (
    INPUT_SHAPES,
    MODELS,
    DictMLP,
    TinyLM,
    dense_ggn,
    dense_hessian,
    lm_data,
    make_data,
)
from torch import nn

from curvkit.curvature import GGN, Hessian
from curvkit.linalg import BlockDiagonal

LOSSES = {
    "mse_mean": lambda: nn.MSELoss(),
    "mse_sum": lambda: nn.MSELoss(reduction="sum"),
    "ce_mean": lambda: nn.CrossEntropyLoss(),
    "ce_sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "bce_mean": lambda: nn.BCEWithLogitsLoss(),
    "bce_sum": lambda: nn.BCEWithLogitsLoss(reduction="sum"),
}


def check_products(op, ref, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = ref.shape[0]
    assert op.shape == (P, P)
    X = torch.randn(P, 3, generator=g)
    torch.testing.assert_close(op @ X, ref @ X)
    torch.testing.assert_close(op @ X[:, 0], ref @ X[:, 0])
    if op.in_shapes is not None:
        parts = list(X[:, 0].split([s.numel() for s in op.in_shapes]))
        listed = [p.reshape(s) for p, s in zip(parts, op.in_shapes)]
        out = op @ listed
        torch.testing.assert_close(torch.cat([o.reshape(-1) for o in out]), ref @ X[:, 0])


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("op_cls,reference", [(GGN, dense_ggn), (Hessian, dense_hessian)])
def test_mlp_all_losses_unequal_batches(loss, op_cls, reference):
    torch.manual_seed(0)
    model, loss_fn = MODELS["mlp"](), LOSSES[loss]()
    data = make_data(model, loss_fn, INPUT_SHAPES["mlp"], sizes=(3, 5, 2))
    check_products(op_cls(model, loss_fn, data), reference(model, loss_fn, data))


@pytest.mark.parametrize("arch", ["cnn2d", "cnn1d", "cnn3d"])
@pytest.mark.parametrize("op_cls,reference", [(GGN, dense_ggn), (Hessian, dense_hessian)])
def test_cnns(arch, op_cls, reference):
    torch.manual_seed(1)
    model, loss_fn = MODELS[arch](), nn.CrossEntropyLoss()
    data = make_data(model, loss_fn, INPUT_SHAPES[arch], sizes=(2, 3))
    check_products(op_cls(model, loss_fn, data), reference(model, loss_fn, data))


@pytest.mark.parametrize("reduction,op_cls,reference", [
    ("mean", GGN, dense_ggn), ("sum", GGN, dense_ggn), ("mean", Hessian, dense_hessian)])
def test_transformer_sequence_ce_ignore_index(reduction, op_cls, reference):
    torch.manual_seed(2)
    model = TinyLM().eval()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction, ignore_index=3)
    data = lm_data(sizes=(2, 3), ignore_index=3)
    assert any((y == 3).any() for _, y in data)
    check_products(op_cls(model, loss_fn, data), reference(model, loss_fn, data))


def test_generic_loss_hessian():
    torch.manual_seed(3)
    model, loss_fn = MODELS["mlp"](), nn.SmoothL1Loss(beta=2.0)
    data = make_data(model, nn.MSELoss(), INPUT_SHAPES["mlp"], sizes=(4, 2))
    # For a generic loss each batch's mean is weighted by its share of the examples, which is
    # PyTorch's mean over the whole data when every example has as many entries.
    check_products(Hessian(model, loss_fn, data), dense_hessian(model, loss_fn, data))
    with pytest.raises(ValueError, match="GGN: supports"):
        GGN(model, loss_fn, data)


@pytest.mark.parametrize("op_cls,reference", [(GGN, dense_ggn), (Hessian, dense_hessian)])
def test_mapping_inputs(op_cls, reference):
    torch.manual_seed(4)
    model, loss_fn = DictMLP(), nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    data = [({"a": torch.randn(n, 3, generator=g), "b": torch.randn(n, 2, generator=g)},
             torch.randint(0, 3, (n,), generator=g)) for n in (3, 4)]
    op = op_cls(model, loss_fn, data, batch_size_fn=lambda X: X["a"].shape[0])
    check_products(op, reference(model, loss_fn, data))


@pytest.mark.parametrize("op_cls,reference", [(GGN, dense_ggn), (Hessian, dense_hessian)])
def test_parameter_subsets(op_cls, reference):
    torch.manual_seed(5)
    model, loss_fn = MODELS["mlp"](), nn.CrossEntropyLoss()
    data = make_data(model, loss_fn, INPUT_SHAPES["mlp"])
    subset = [model[2].weight, model[0].bias]
    op = op_cls(model, loss_fn, data, params=subset)
    check_products(op, reference(model, loss_fn, data, params=["2.weight", "0.bias"]))
    mapping = {"0.weight": model[0].weight, "2.bias": model[2].bias}
    op = op_cls(model, loss_fn, data, params=mapping)
    check_products(op, reference(model, loss_fn, data, params=list(mapping)))


def test_mapping_params_set_the_point():
    torch.manual_seed(6)
    model, loss_fn = MODELS["mlp"](), nn.MSELoss()
    data = make_data(model, loss_fn, INPUT_SHAPES["mlp"])
    new = {n: p.detach() + 0.3 for n, p in model.named_parameters()}
    H = Hessian(model, loss_fn, data, params=new)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(new[n])
    check_products(H, dense_hessian(model, loss_fn, data))


@pytest.mark.parametrize("blocks", ["layer", "param", "groups"])
@pytest.mark.parametrize("op_cls,reference", [(GGN, dense_ggn), (Hessian, dense_hessian)])
def test_block_diagonal(blocks, op_cls, reference):
    torch.manual_seed(7)
    model, loss_fn = MODELS["mlp"](), nn.CrossEntropyLoss()
    data = make_data(model, loss_fn, INPUT_SHAPES["mlp"])
    names = [n for n, _ in model.named_parameters()]
    groups = {"layer": [names[:2], names[2:]], "param": [[n] for n in names],
              "groups": [[names[3], names[0]], [names[2]]]}[blocks]
    named = dict(model.named_parameters())
    arg = [[named[n] for n in g] for g in groups] if blocks == "groups" else blocks
    op = op_cls(model, loss_fn, data, blocks=arg)
    assert isinstance(op, BlockDiagonal)
    full = reference(model, loss_fn, data, params=[n for g in groups for n in g])
    sizes = [sum(dict(model.named_parameters())[n].numel() for n in g) for g in groups]
    ref = torch.block_diag(*[b.split(sizes, dim=1)[i] for i, b in enumerate(full.split(sizes))])
    check_products(op, ref)


@pytest.mark.parametrize("loss", ["mse_mean", "ce_sum", "bce_mean"])
def test_ggn_diagonal(loss):
    torch.manual_seed(8)
    model, loss_fn = MODELS["cnn1d"](), LOSSES[loss]()
    data = make_data(model, loss_fn, INPUT_SHAPES["cnn1d"], sizes=(3, 2))
    torch.testing.assert_close(GGN(model, loss_fn, data).diagonal(),
                               dense_ggn(model, loss_fn, data).diagonal())


def test_ggn_diagonal_sequence_and_blocks():
    torch.manual_seed(9)
    model, loss_fn = TinyLM().eval(), nn.CrossEntropyLoss(ignore_index=3)
    data = lm_data(sizes=(2, 1), ignore_index=3)
    ref = dense_ggn(model, loss_fn, data).diagonal()
    torch.testing.assert_close(GGN(model, loss_fn, data).diagonal(), ref)
    torch.testing.assert_close(GGN(model, loss_fn, data, blocks="layer").diagonal(), ref)


def test_ggn_is_psd_and_symmetric_flags():
    model, loss_fn = MODELS["mlp"](), nn.MSELoss()
    data = make_data(model, loss_fn, INPUT_SHAPES["mlp"])
    G, H = GGN(model, loss_fn, data), Hessian(model, loss_fn, data)
    assert G.is_symmetric and G.is_psd and H.is_symmetric and not H.is_psd
    assert G.T is G


@pytest.mark.parametrize("op_cls", [GGN, Hessian])
def test_k_columns_take_one_pass_not_k(op_cls):
    model, loss_fn = MODELS["mlp"](), nn.CrossEntropyLoss()
    data = make_data(model, loss_fn, INPUT_SHAPES["mlp"], sizes=(3, 2))
    op = op_cls(model, loss_fn, data, check_deterministic=False)
    op @ torch.randn(op.shape[1], 2)  # the first k-column product also measures activations
    calls = []
    model[0].register_forward_pre_hook(lambda *_: calls.append(1))
    op @ torch.randn(op.shape[1], 2)
    two = len(calls)
    calls.clear()
    op @ torch.randn(op.shape[1], 16)
    assert len(calls) == two  # the forward count does not grow with the number of columns
