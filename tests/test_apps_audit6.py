"""Regression tests of the sixth apps/CLI audit: report edge cases (one parameter, zero GGN,
no trainable parameters), strict JSON, the bar plot's scale, user factories (types, mapping
inputs, --seed), --device names, `check --dtype float32`, repeated `train --methods`, and the
report's loss and gradient under torch.distributed."""

import functools
import json
import math
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from curvkit.apps.report import ReportOptions, _loss_and_gradient, curvature_report
from curvkit.cli import main
from curvkit.cli._load import resolve_device
from report_plots import plotted_axes
from two_processes import run_two_processes

FAST = ["--top-k", "2", "--num-matvecs", "4", "--no-progress"]

USER_MODULE = '''
import numpy
import torch
from torch import nn


def model():  # initialised from the global RNG, as most factories are
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))


def data():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(10, 3, generator=g)
    return [(X[:6], torch.randint(0, 3, (6,), generator=g)),
            (X[6:], torch.randint(0, 3, (4,), generator=g))]


def saturated():  # logits so far apart that softmax is exactly one-hot: a zero GGN
    m = nn.Linear(3, 3)
    with torch.no_grad():
        m.weight.zero_()
        m.bias.copy_(torch.tensor([1000.0, 0.0, 0.0]))
    return m


def class_zero():
    return [(torch.randn(5, 3, generator=torch.Generator().manual_seed(2)),
             torch.zeros(5, dtype=torch.long))]


def frozen():
    return nn.Linear(3, 3).requires_grad_(False)


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, batch):
        return self.lin(batch["x"])


def dict_model():
    return DictModel()


def mapping_data():
    return [({"x": X}, y) for X, y in data()]


def one_pair():
    return data()[0]


def nothing():
    return None


def a_tensor():
    return torch.randn(4, 3)


def a_dict():
    return {"X": torch.randn(4, 3), "y": torch.zeros(4, dtype=torch.long)}


def numpy_batches():
    return [(X.numpy(), y.numpy()) for X, y in data()]
'''


@pytest.fixture
def user(tmp_path, monkeypatch):
    """The module of the user factories above, and small SLQ/KFAC budgets for the command."""
    import curvkit.apps.report as app

    (tmp_path / "audit6_user.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(app, "ReportOptions", functools.partial(
        ReportOptions, slq_probes=1, slq_matvecs=4, num_directions=2))
    yield "audit6_user"
    sys.modules.pop("audit6_user", None)


def _strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


# ----------------------------------------------------------------------------- report numbers
def test_report_gives_every_eigenvalue_of_a_tiny_model():
    # P = 1 asked eigsh for k = 0 eigenpairs (an error); P = 2 gave one of the two.
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(7, 2, generator=g), torch.randn(7, 1, generator=g)
    for model in (nn.Linear(1, 1, bias=False), nn.Linear(2, 1, bias=False)):
        Xm = X[:, : model.in_features]
        options = ReportOptions(top_k=8, num_matvecs=4, num_directions=2, slq_probes=1,
                                slq_matvecs=4, progress=False)
        report = curvature_report(
            model, nn.MSELoss(), [(Xm[:4], y[:4]), (Xm[4:], y[4:])], options, log=lambda *a: None
        )
        expected = torch.linalg.eigvalsh(2 * Xm.T @ Xm / 7).flip(0)  # H of the mean squared error
        assert report["hessian_top_eigenvalues"] == pytest.approx(expected.tolist(), rel=1e-8)
        assert report["ggn_top_eigenvalues"] == pytest.approx(expected.tolist(), rel=1e-8)
        assert report["top_eigenspace_overlap_hessian_ggn"] == pytest.approx(1.0, rel=1e-8)


def test_report_of_a_model_without_trainable_parameters_is_a_clear_error(user):
    model = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        curvature_report(model, nn.CrossEntropyLoss(), [(torch.randn(2, 3), torch.tensor([0, 1]))])
    with pytest.raises(ValueError, match="no trainable parameters"):
        curvature_report(nn.Identity(), nn.MSELoss(), [(torch.randn(2, 3), torch.randn(2, 3))])


def test_report_of_a_zero_ggn_writes_strict_json_and_a_png(user, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["report", "--model", f"{user}:saturated", "--data", f"{user}:class_zero", *FAST]
    assert main([*argv, "--out", str(out), "--dtype", "float64"]) == 0, capsys.readouterr().err
    report = _strict_json(out / "report.json")
    assert report["ggn_top_eigenvalues"] == [0.0, 0.0] and report["loss"] == 0.0
    # Zero GGN, zero KFAC and zero estimates: exact matches, not 0/0.
    assert report["ggn_diagonal_rel_error"] == {"hutchinson": 0.0, "xdiag": 0.0}
    assert report["kfac_vs_ggn"]["kfac"]["random_directions_rel_error"] == 0.0
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_json_writes_undefined_numbers_as_null(user, tmp_path, monkeypatch):
    import curvkit.apps.report as app

    real = app.curvature_report

    def with_nan(*args, **kwargs):
        report = real(*args, **kwargs)
        report["loss"] = math.nan
        report["trace"]["hessian"]["xtrace"] = -math.inf
        return report

    monkeypatch.setattr(app, "curvature_report", with_nan)
    argv = ["report", "--model", f"{user}:model", "--data", f"{user}:data", *FAST]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 0
    report = _strict_json(tmp_path / "r" / "report.json")
    assert report["loss"] is None and report["trace"]["hessian"]["xtrace"] is None


@pytest.mark.parametrize("hessian", [[-1.0, -2.0], [0.5, -0.25]])
def test_plot_report_shows_negative_and_zero_eigenvalues(tmp_path, hessian):
    # A log axis warned ("no positive values", an error here) or silently dropped the bars.
    grid = torch.linspace(-1.0, 1.0, 50)
    dens = torch.exp(-(grid**2))
    report = {
        "hessian_top_eigenvalues": hessian,
        "ggn_top_eigenvalues": [0.0, 0.0],
        "top_eigenspace_overlap_hessian_ggn": 0.5,
        "ggn_density": {"near_zero_threshold": 1e-2, "near_zero_fraction": 0.0},
        "_arrays": {"ggn_density": (grid.abs() + 1e-3, dens), "hessian_density": (grid, dens)},
    }
    axes = plotted_axes(report, tmp_path / "r.png")
    assert axes[2].get_yscale() == "symlog"
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- user factories
@pytest.mark.parametrize(
    "factory, message",
    [
        ("one_pair", "batch 0 must be an (X, y) pair"),
        ("nothing", "must return an iterable of (X, y) batches; got NoneType"),
        ("a_tensor", "must return an iterable of (X, y) batches; got Tensor"),
        ("a_dict", "must return an iterable of (X, y) batches; got dict"),
        ("numpy_batches", "batch 0 must be an (X, y) pair"),
    ],
)
def test_report_data_factory_of_the_wrong_type_is_a_clear_error(user, tmp_path, capsys,
                                                                factory, message):
    argv = ["report", "--model", f"{user}:model", "--data", f"{user}:{factory}", *FAST]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("curvkit report: error:") and message in err
    assert not (tmp_path / "r").exists()


def test_report_frozen_model_from_the_command_line_is_a_clear_error(user, tmp_path, capsys):
    argv = ["report", "--model", f"{user}:frozen", "--data", f"{user}:data", *FAST]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    assert "no trainable parameters" in capsys.readouterr().err


def test_report_mapping_inputs_from_the_command_line(user, tmp_path, capsys):
    # A mapping X (as Hugging Face models take) crashed the dtype cast with an AttributeError.
    argv = ["report", "--model", f"{user}:dict_model", "--data", f"{user}:mapping_data", *FAST]
    assert main([*argv, "--out", str(tmp_path / "r"), "--dtype", "float64"]) == 0, \
        capsys.readouterr().err
    assert _strict_json(tmp_path / "r" / "report.json")["num_params"] == 12


def test_report_seed_makes_a_user_factory_reproducible(user, tmp_path):
    argv = ["report", "--model", f"{user}:model", "--data", f"{user}:data", *FAST]
    reports = []
    for i in range(2):
        torch.manual_seed(i)  # whatever the global RNG holds before the command
        assert main([*argv, "--out", str(tmp_path / f"r{i}"), "--seed", "3"]) == 0
        report = _strict_json(tmp_path / f"r{i}" / "report.json")
        report.pop("seconds")
        reports.append(report)
    assert reports[0] == reports[1]


# ----------------------------------------------------------------------------- devices
@pytest.mark.parametrize(
    "argv",
    [
        ["report", "--model", "json:loads", "--data", "json:loads"],
        ["pinn", "poisson", "--dim", "2", "--steps", "1", "--no-progress"],
    ],
)
def test_meta_device_is_a_clear_error(tmp_path, capsys, argv):
    assert main([*argv, "--device", "meta", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--device meta: the meta device holds no data" in err


def test_unavailable_device_types_are_clear_errors():
    if not torch.xpu.is_available():  # the bare AssertionError escaped as a traceback
        with pytest.raises(ValueError, match="--device xpu: not available on this machine"):
            resolve_device("xpu")
    with pytest.raises(ValueError, match="--device hpu: not available on this machine"):
        resolve_device("hpu")  # torch has no torch.hpu module without the plugin
    # 'cpu:1' is the CPU, as its tensors report it (a device check compared 'cpu:1' with 'cpu').
    assert resolve_device("cpu:1") == torch.device("cpu")


# ----------------------------------------------------------------------------- check, train
def test_check_in_float32_agrees_with_dense(capsys):
    # The CG row compared the solution (error up to cond(A) · rtol ≈ 2e-3) with 1e-3.
    assert main(["check", "--dtype", "float32", "--size", "8"]) == 0
    assert "all exact results agree with dense" in capsys.readouterr().out


def test_train_repeated_method_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--methods", "adamw", "soap", "adamw", "--out", str(tmp_path)]) == 2
    assert "--methods names ['adamw'] more than once" in capsys.readouterr().err


# ----------------------------------------------------------------------------- distributed
def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(9, 3, generator=g), torch.randint(0, 3, (9,), generator=g)
    return model, [(X[:2], y[:2]), (X[2:5], y[2:5]), (X[5:], y[5:])]


def _worker(rank, init_method, path):
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        model, data = _problem()
        shard = data[:2] if rank == 0 else data[2:]  # unequal shards: 5 and 4 examples
        torch.save(_loss_and_gradient(model, nn.CrossEntropyLoss(), shard), f"{path}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_report_loss_and_gradient_under_torch_distributed_are_of_all_shards(tmp_path):
    run_two_processes(_worker, str(tmp_path))
    model, data = _problem()
    expected = _loss_and_gradient(model, nn.CrossEntropyLoss(), data)
    for rank in range(2):
        loss, grad_norm, num_params = torch.load(tmp_path / f"{rank}.pt")
        assert num_params == expected[2]
        assert loss == pytest.approx(expected[0], rel=1e-12)
        assert grad_norm == pytest.approx(expected[1], rel=1e-12)
