"""Data-engine behaviour: normalisation, determinism checks, progress, errors."""

import pytest
import torch
from cases import INPUT_SHAPES, MODELS, dense_ggn, make_data
from torch import nn

from curvkit.curvature import GGN, DataEngine, EmpiricalFisher, FisherMC, Hessian
from curvkit.curvature.engine import resolve_params
from curvkit.curvature.losses import output_loss


def _setup(loss_fn=None):
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    return model, loss_fn, make_data(model, loss_fn, INPUT_SHAPES["mlp"], sizes=(3, 5, 2))


def test_dropout_in_training_mode_raises_and_eval_passes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 3))
    _, loss_fn, data = _setup()
    with pytest.raises(ValueError, match=r"GGN: module '1' \(Dropout, p=0.5\) is in training mode"):
        GGN(model, loss_fn, data)
    GGN(model.eval(), loss_fn, data)


def test_batchnorm_in_training_mode_raises():
    model = MODELS["cnn2d"]().train()
    loss_fn = nn.CrossEntropyLoss()
    data = make_data(model, loss_fn, INPUT_SHAPES["cnn2d"], sizes=(2,))
    with pytest.raises(ValueError, match="BatchNorm2d.*training mode"):
        Hessian(model, loss_fn, data)


class _Shuffled:
    """A loader that returns its batches in a new order at every pass."""

    def __init__(self, data):
        self.data, self.calls = data, 0

    def __iter__(self):
        self.calls += 1
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.calls))
        return iter([self.data[i] for i in order])


class _Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        return self.lin(x) + torch.randn(x.shape[0], 3)


def test_shuffling_and_random_models_raise():
    model, loss_fn, data = _setup()
    with pytest.raises(ValueError, match="differs between two passes"):
        GGN(model, loss_fn, _Shuffled(data))
    with pytest.raises(ValueError, match="different outputs"):
        GGN(_Noisy(), loss_fn, data)
    GGN(_Noisy(), loss_fn, data, check_deterministic=False)  # the user's explicit choice


def test_bad_inputs_have_clear_errors():
    model, loss_fn, data = _setup()
    with pytest.raises(ValueError, match="GGN: supports MSELoss"):
        GGN(model, nn.NLLLoss(), data)
    with pytest.raises(ValueError, match="reduction='mean' or 'sum'; got 'none'"):
        Hessian(model, nn.MSELoss(reduction="none"), data)
    with pytest.raises(TypeError, match="re-iterable"):
        GGN(model, loss_fn, (b for b in data))
    with pytest.raises(ValueError, match="is not a parameter of the model"):
        GGN(model, loss_fn, data, params=[torch.zeros(3)])
    with pytest.raises(ValueError, match="'nope' is not a parameter"):
        GGN(model, loss_fn, data, params={"nope": torch.zeros(3)})
    with pytest.raises(ValueError, match="each batch must be a tuple"):
        GGN(model, loss_fn, [data[0][0]])
    with pytest.raises(ValueError, match="targets must be integer class indices"):
        GGN(model, loss_fn, [(data[0][0], data[0][1].double())], check_deterministic=False) @ \
            torch.zeros(GGN(model, loss_fn, data).shape[1])
    with pytest.raises(ValueError, match="weighted"):
        GGN(model, loss_fn, [(*data[0], torch.ones(3))])
    with pytest.raises(ValueError, match="blocks must be"):
        GGN(model, loss_fn, data, blocks="rows")
    with pytest.raises(ValueError, match="appears in two blocks"):
        GGN(model, loss_fn, data, blocks=[["0.weight"], ["0.weight"]])
    with pytest.raises(ValueError, match="no loss terms"):
        GGN(model, loss_fn, [(data[0][0], torch.full((3,), -100))])


def test_model_that_cannot_be_differentiated_twice_is_named():
    class NoDoubleBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.tanh()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (1 - x.tanh().detach() ** 2)  # not differentiable again

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            return NoDoubleBackward.apply(self.lin(x))

    _, loss_fn, data = _setup()
    with pytest.raises(RuntimeError, match="GGN: the model cannot be differentiated"):
        GGN(Model(), loss_fn, data) @ torch.zeros(18)


def test_num_data_and_for_each_batch_factors():
    model, loss_fn, data = _setup(nn.MSELoss())
    loss = output_loss(loss_fn, caller="test", analytic=True)
    params = resolve_params(model, None, "test")
    engine = DataEngine(model, loss, data, params, caller="test", num_data=10,
                        check_deterministic=False)
    assert engine.num_terms() == 30  # 10 examples × 3 outputs, without a counting pass
    factors, total = [], torch.zeros(())

    def callback(batch, output, factor):
        factors.append(factor)
        total.add_(factor * loss_fn(output, batch.y).detach())

    engine.for_each_batch(callback)
    assert factors == pytest.approx([0.3, 0.5, 0.2])
    X = torch.cat([x for x, _ in data])
    y = torch.cat([t for _, t in data])
    torch.testing.assert_close(total, loss_fn(model(X), y).detach())
    # a wrong num_data is caught by the first pass, which counts the terms anyway
    G = GGN(model, loss_fn, data, num_data=11, check_deterministic=False)
    G.engine.num_terms()
    with pytest.raises(ValueError, match="num_data=11 implies 33 loss terms"):
        G @ torch.zeros(G.shape[1])


def test_progress_bar_and_unequal_sum_reduction(capsys):
    model, loss_fn, data = _setup(nn.BCEWithLogitsLoss(reduction="sum"))
    G = GGN(model, loss_fn, data, progress=True)
    v = torch.randn(G.shape[1])
    torch.testing.assert_close(G @ v, dense_ggn(model, loss_fn, data) @ v)
    assert "GGN" in capsys.readouterr().err


def test_weighted_cross_entropy_and_label_smoothing():
    torch.manual_seed(1)
    model = MODELS["mlp"]()
    for loss_fn in (nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0])),
                    nn.CrossEntropyLoss(label_smoothing=0.2, reduction="sum"),
                    nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 0.5, 1.0]))):
        data = make_data(model, loss_fn, INPUT_SHAPES["mlp"], sizes=(3, 4))
        v = torch.randn(sum(p.numel() for p in model.parameters()))
        torch.testing.assert_close(GGN(model, loss_fn, data) @ v,
                                   dense_ggn(model, loss_fn, data) @ v)
    with pytest.raises(ValueError, match="Monte-Carlo Fisher of a weighted"):
        FisherMC(model, loss_fn, data) @ v
    assert EmpiricalFisher(model, loss_fn, data).is_psd


def test_batchnorm_without_running_statistics_raises_in_eval_mode():
    """Without running statistics BatchNorm normalises by the batch even in eval mode."""
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False),
                          nn.Linear(4, 3)).eval()
    _, loss_fn, data = _setup()
    with pytest.raises(ValueError, match="BatchNorm1d.*track_running_stats=False"):
        GGN(model, loss_fn, data)
    GGN(model, loss_fn, data, check_deterministic=False)  # accepted when asked for


@pytest.mark.parametrize("where", ["inputs", "targets", "model outputs"])
def test_non_finite_data_is_named(where):
    model, _, data = _setup()
    loss_fn = nn.MSELoss()
    data = make_data(model, loss_fn, INPUT_SHAPES["mlp"], sizes=(3, 2))
    X, y = data[1]
    if where == "inputs":
        X = X.clone()
        X[0, 1] = float("nan")
    elif where == "targets":
        y = y.clone()
        y[1, 0] = float("inf")
    else:
        with torch.no_grad():
            model[-1].bias[0] = float("inf")
    data[1] = (X, y)
    first = 0 if where == "model outputs" else 1  # an infinite bias spoils every batch
    with pytest.raises(ValueError, match=f"batch {first} has non-finite {where}"):
        GGN(model, loss_fn, data)


def test_empty_batches_are_skipped():
    model, loss_fn, data = _setup()
    X, y = data[0]
    with_empty = [data[0], (X[:0], y[:0]), *data[1:]]
    torch.testing.assert_close(GGN(model, loss_fn, with_empty).to_dense(),
                               GGN(model, loss_fn, data).to_dense())
    with pytest.raises(ValueError, match="no batches"):
        GGN(model, loss_fn, [(X[:0], y[:0])], check_deterministic=False).to_dense()


def test_inputs_of_another_dtype_than_the_model_are_named():
    model, loss_fn, data = _setup()
    other = torch.float32 if model[0].weight.dtype == torch.float64 else torch.float64
    data = [(X.to(other), y) for X, y in data]
    with pytest.raises(TypeError, match=f"parameters are {model[0].weight.dtype}.*inputs are "
                                        f"{other}"):
        GGN(model, loss_fn, data)
