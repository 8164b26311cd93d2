"""``curvkit report --device``: the whole report runs on the device and agrees with the CPU run.

In-process (``curvkit.cli.main``) on a tiny user problem; the ``device`` fixture picks the device
(``CURVKIT_TEST_DEVICE``, default ``cuda``; ``cpu`` checks the test itself without a GPU).
"""

import json
import math

import pytest
import torch

from curvkit.cli import main

PROBLEM = """
import torch


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def data():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 4, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    return [(X[:25], y[:25]), (X[25:], y[25:])]
"""


def report(tmp_path, device):
    out = tmp_path / f"report-{device.type}"
    args = ["report", "--model", "cli_device_problem:model", "--data", "cli_device_problem:data"]
    args += ["--out", str(out), "--device", str(device), "--dtype", "float64", "--top-k", "1"]
    args += ["--num-matvecs", "4", "--no-progress"]
    assert main(args) == 0
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    return json.loads((out / "report.json").read_text())


def test_report_on_device_matches_cpu(tmp_path, monkeypatch, capsys, device):
    (tmp_path / "cli_device_problem.py").write_text(PROBLEM)
    monkeypatch.syspath_prepend(str(tmp_path))
    on_cpu, on_device = report(tmp_path, torch.device("cpu")), report(tmp_path, device)
    assert on_device["num_params"] == on_cpu["num_params"] == 4 * 6 + 6 + 6 * 3 + 3
    # Exact numbers agree to round-off; the iterative ones draw their probes from a generator
    # on the device, so they agree to the solvers' tolerance (eigsh tol=1e-3).
    for key in ("loss", "gradient_norm"):
        assert math.isclose(on_device[key], on_cpu[key], rel_tol=1e-8), key
    exact = on_cpu["trace"]["ggn"]["exact"]
    assert math.isclose(on_device["trace"]["ggn"]["exact"], exact, rel_tol=1e-8)
    for key in ("hessian_top_eigenvalues", "ggn_top_eigenvalues"):
        assert on_device[key] == pytest.approx(on_cpu[key], rel=1e-2), key
    assert "wrote" in capsys.readouterr().out
