"""End-to-end tests of the ``curvkit`` command, each run as a subprocess on a tiny configuration."""

import json
import subprocess
import sys

import pytest


def curvkit(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "curvkit", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_version():
    out = curvkit("--version")
    assert out.returncode == 0
    assert out.stdout.startswith("curvkit ")


def test_check_agrees_with_dense():
    out = curvkit("check", "--size", "8")
    assert out.returncode == 0, out.stderr
    assert "all exact results agree with dense" in out.stdout


def test_report_writes_json_and_png(tmp_path):
    out = curvkit(
        "report",
        "--out",
        str(tmp_path / "r"),
        "--limit",
        "256",
        "--top-k",
        "3",
        "--num-matvecs",
        "12",
        "--train-epochs",
        "2",
        "--no-progress",
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert (tmp_path / "r" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(report["hessian_top_eigenvalues"]) == 3
    # The GGN is PSD and its largest eigenvalue is at least the largest of the estimates' scale.
    assert min(report["ggn_top_eigenvalues"]) > 0
    assert 0.0 <= report["top_eigenspace_overlap_hessian_ggn"] <= 1.0 + 1e-9
    assert set(report["kfac_vs_ggn"]) == {"kfac", "ekfac"}


def test_report_user_factories(tmp_path):
    (tmp_path / "userprob.py").write_text(
        "import torch\n"
        "def model():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))\n"
        "    return m\n"
        "def data():\n"
        "    g = torch.Generator().manual_seed(1)\n"
        "    X = torch.randn(40, 4, generator=g)\n"
        "    return [(X[:25], torch.randint(0, 3, (25,), generator=g)), (X[25:], torch.randint(0, 3, (15,), generator=g))]\n"
    )
    out = curvkit(
        "report",
        "--model",
        "userprob:model",
        "--data",
        "userprob:data",
        "--out",
        "r",
        "--top-k",
        "2",
        "--num-matvecs",
        "8",
        "--no-progress",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert (
        json.loads((tmp_path / "r" / "report.json").read_text())["num_params"]
        == 4 * 6 + 6 + 6 * 3 + 3
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("--model", "nosuchmodule:f", "--data", "nosuchmodule:g"),
            "cannot import module 'nosuchmodule'",
        ),
        (("--model", "json:loads"), "--model and --data go together"),
        (("--model", "json"), "go together"),
        (("--device", "cuda:7"), "no such CUDA device"),
    ],
)
def test_report_bad_input_is_a_clear_error(tmp_path, args, message):
    out = curvkit("report", "--out", str(tmp_path), *args)
    assert out.returncode == 2
    assert message in out.stderr


def test_pinn_writes_history(tmp_path):
    out = curvkit(
        "pinn",
        "poisson",
        "--dim",
        "2",
        "--method",
        "spring",
        "--steps",
        "3",
        "--num-interior",
        "60",
        "--num-boundary",
        "20",
        "--out",
        str(tmp_path / "p"),
        "--no-progress",
    )
    assert out.returncode == 0, out.stderr
    history = json.loads((tmp_path / "p" / "history.json").read_text())
    assert len(history["l2_error"]) >= 2 and all(e > 0 for e in history["l2_error"])
    assert (tmp_path / "p" / "history.png").read_bytes()[:4] == b"\x89PNG"
    assert "L2 error" in out.stdout


def test_bench_runs_a_benchmark_script_quickly(tmp_path):
    import shutil
    from pathlib import Path

    (tmp_path / "benchmarks").mkdir()
    shutil.copy(Path(__file__).parents[2] / "benchmarks" / "linalg.py", tmp_path / "benchmarks")
    (tmp_path / "benchmarks" / "results").mkdir()
    recorded = tmp_path / "benchmarks" / "results" / "linalg.json"
    recorded.write_text('{"rows": "the recorded run"}')
    out = curvkit("bench", "linalg", "--quick", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ratio" in out.stdout
    # smoke-test numbers never replace the recorded results
    assert recorded.read_text() == '{"rows": "the recorded run"}'


def test_bench_unknown_name_is_a_clear_error():
    out = curvkit("bench", "nosuch")
    assert out.returncode == 2
    assert "unknown benchmark" in out.stderr


def test_train_compares_optimizers_and_writes_curves(tmp_path):
    out = curvkit("train", "--methods", "adamw", "soap", "muon", "--steps", "4", "--eval-every", "2",
                  "--layers", "1", "--width", "16", "--heads", "2", "--context", "16", "--batch", "4",
                  "--out", str(tmp_path / "t"))
    assert out.returncode == 0, out.stderr
    lines = (tmp_path / "t" / "curves.csv").read_text().splitlines()
    assert lines[0] == "method,step,time,train_loss,val_loss"
    assert {line.split(",")[0] for line in lines[1:]} == {"adamw", "soap", "muon"}
    assert (tmp_path / "t" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_train_unknown_method_is_a_clear_error(tmp_path):
    out = curvkit("train", "--methods", "sgdx", "--out", str(tmp_path))
    assert out.returncode == 2
    assert "unknown method" in out.stderr
