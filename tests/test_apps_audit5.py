"""Regression tests of the apps/CLI audit: report loss normalisation, LM windows, CLI validation."""

import math

import pytest
import torch
from torch import nn

from curvkit.apps.lm import load_stdlib_bytes, sample_batch
from curvkit.apps.report import _loss_and_gradient
from curvkit.cli import main


def _dense_loss_and_gradient_norm(model, loss_fn, X, y):
    loss = loss_fn(model(X), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.item(), math.sqrt(sum(g.pow(2).sum().item() for g in grads))


@pytest.mark.parametrize(
    "loss_fn, targets",
    [
        (lambda: nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0, 4.0])), "classes"),
        (nn.CrossEntropyLoss, "probabilities"),
        (lambda: nn.CrossEntropyLoss(ignore_index=2, label_smoothing=0.1), "classes"),
        (nn.MSELoss, "values"),
        (lambda: nn.BCEWithLogitsLoss(pos_weight=torch.tensor([0.5, 1.0, 2.0, 3.0])), "bits"),
    ],
)
def test_report_loss_and_gradient_match_the_full_batch_loss(loss_fn, targets):
    loss_fn = loss_fn()  # built under the tests' float64 default
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 4)
    X = torch.randn(10, 3, generator=g)
    y = {
        "classes": torch.randint(0, 4, (10,), generator=g),
        "probabilities": torch.softmax(torch.randn(10, 4, generator=g), dim=1),
        "values": torch.randn(10, 4, generator=g),
        "bits": torch.randint(0, 2, (10, 4), generator=g).double(),
    }[targets]
    data = [(X[:6], y[:6]), (X[6:], y[6:])]
    loss, grad_norm, num_params = _loss_and_gradient(model, loss_fn, data)
    ref_loss, ref_grad_norm = _dense_loss_and_gradient_norm(model, loss_fn, X, y)
    assert num_params == 16
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert grad_norm == pytest.approx(ref_grad_norm, rel=1e-12)


def test_sample_batch_reaches_the_last_window():
    stream = torch.arange(6, dtype=torch.uint8)
    x, y = sample_batch(stream, 200, 4, torch.Generator().manual_seed(0))
    assert set(x[:, 0].tolist()) == {0, 1}  # both windows of 5 tokens are drawn
    assert y.max().item() == 5  # the last token is a target
    assert torch.equal(y, x + 1)
    x, _ = sample_batch(stream[:5], 3, 4, torch.Generator().manual_seed(0))  # exactly one window
    assert x[:, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="context \\+ 1 = 5"):
        sample_batch(stream[:4], 3, 4, torch.Generator().manual_seed(0))


def test_load_stdlib_bytes_without_validation_share():
    train, val, info = load_stdlib_bytes(validation_fraction=0.0, max_bytes=1000)
    assert val.numel() == 0 and val.dtype == torch.uint8 and info["val_files"] == 0
    assert train.numel() == 1000
    with pytest.raises(ValueError, match="validation_fraction"):
        load_stdlib_bytes(validation_fraction=1.5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--eval-every", "0"], "--eval-every must be >= 1"),
        (["train", "--steps", "0"], "--steps must be >= 1"),
        (["train", "--width", "10", "--heads", "4"], "multiple of --heads"),
        (["train", "--vocab", "100", "--steps", "1"], "token ids in [0, --vocab 100)"),
        (["report", "--limit", "0"], "--limit must be >= 1"),
        (["report", "--top-k", "0"], "--top-k must be >= 1"),
        (["report", "--num-matvecs", "0"], "--num-matvecs must be >= 1"),
        (["report", "--loss", "mse"], "--loss mse needs --model and --data"),
        (["check", "--size", "2"], "--size must be >= 3"),
    ],
)
def test_cli_bad_arguments_are_clear_errors(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "o")] if argv[0] != "check" else argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"curvkit {argv[0]}: error:")


def test_cli_train_data_factory_must_return_a_pair(tmp_path, capsys, monkeypatch):
    (tmp_path / "userlm.py").write_text("import torch\ndef data():\n    return torch.arange(100)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["train", "--data", "userlm:data", "--out", str(tmp_path / "o")]) == 2
    assert "(train, validation) pair" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--methods", "adamw", "--steps", "1", "--layers", "1", "--width", "8",
         "--heads", "2", "--context", "8", "--batch", "2"],
        ["pinn", "poisson", "--dim", "2", "--steps", "1", "--num-interior", "20",
         "--num-boundary", "10", "--no-progress"],
    ],
)
def test_cli_out_that_is_a_file_is_a_clear_error(tmp_path, capsys, argv):
    (tmp_path / "taken").write_text("not a folder")
    assert main([*argv, "--out", str(tmp_path / "taken")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_byte_lm_names_sequences_longer_than_its_context():
    from curvkit.apps.lm import ByteLM

    model = ByteLM(layers=1, width=8, heads=2, context=4)
    assert model(torch.zeros(2, 4, dtype=torch.long)).shape == (2, 4, 256)
    with pytest.raises(ValueError, match="sequences of 5 tokens exceed the context of 4"):
        model(torch.zeros(2, 5, dtype=torch.long))
