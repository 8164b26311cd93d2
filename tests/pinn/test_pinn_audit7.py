"""Seventh audit of curvkit.pinn: each test failed before its fix."""

import json
import math

import pytest
import torch

from curvkit.cli import main
from curvkit.pinn import engd, solves
from curvkit.pinn.history import History
from curvkit.pinn.problems import poisson
from curvkit.pinn.train import METHODS, train

SMALL = dict(num_interior=30, num_boundary=12, num_eval=200)


def _strict_loads(text: str):
    """``json.loads`` that refuses the non-standard NaN / Infinity tokens, as strict parsers do."""

    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------ History JSON (item 1)
def test_history_json_is_strict_and_round_trips_non_finite_values(tmp_path):
    # save() wrote Infinity for an infinite option in meta (non-strict JSON), and the per-step
    # lists wrote inf as null, which load() read back as NaN.
    h = History(meta={"method": "spring", "options": {"norm_constraint": math.inf, "rank": None,
                                                       "bounds": (-math.inf, 1.0)}})
    h.append(step=0, time=0.0, loss=1.0, l2_error=0.5)
    h.append(step=1, time=0.5, loss=math.inf, l2_error=math.nan, step_size=-math.inf)
    h.save(tmp_path / "h.json")
    text = (tmp_path / "h.json").read_text()
    raw = _strict_loads(text)  # raised on "Infinity" before the fix
    # the policy: NaN -> null (as report.json), inf -> "inf", -inf -> "-inf"
    assert raw["loss"] == [1.0, "inf"]
    assert raw["l2_error"] == [0.5, None]
    assert raw["step_size"] == [None, "-inf"]
    assert raw["meta"]["options"] == {"norm_constraint": "inf", "rank": None,
                                      "bounds": ["-inf", 1.0]}
    back = History.load(tmp_path / "h.json")
    assert back.loss == [1.0, math.inf]
    assert back.l2_error[0] == 0.5 and math.isnan(back.l2_error[1])
    assert math.isnan(back.step_size[0]) and back.step_size[1] == -math.inf
    assert back.meta["options"] == {"norm_constraint": math.inf, "rank": None,
                                    "bounds": [-math.inf, 1.0]}
    assert back.time_to_reach(0.1) == math.inf


def test_history_from_dict_names_a_bad_string():
    data = {"step": [0], "time": [0.0], "loss": ["Infinity"], "l2_error": [1.0]}
    with pytest.raises(ValueError, match=r"History.from_dict: loss holds the string 'Infinity'"):
        History.from_dict(data)


def test_train_with_an_infinite_option_saves_strict_json_and_resumes(tmp_path):
    # SPRING accepts norm_constraint=inf; train put it into meta, which save() wrote as Infinity.
    # The checkpoint holds the encoded history, so resume must compare the decoded options.
    problem = poisson(2, hidden=(6,))
    options = {"damping": 1e-6, "lr": 0.05, "norm_constraint": math.inf}
    first = train(problem, method="spring", steps=1, options=options,
                  checkpoint=tmp_path / "c.pt", **SMALL)
    first.save(tmp_path / "h.json")
    assert _strict_loads((tmp_path / "h.json").read_text())["meta"]["options"][
        "norm_constraint"] == "inf"
    assert History.load(tmp_path / "h.json").meta == first.meta
    resumed = train(problem, method="spring", steps=2, options=options,
                    resume=tmp_path / "c.pt", **SMALL)
    assert resumed.step == [0, 1, 2]


# ------------------------------------------------------------------ dense-memory check (item 2)
def _tiny():
    problem = poisson(2, hidden=(5,))
    model = problem.default_model(generator=torch.Generator().manual_seed(0))
    batch = problem.sample(7, 3, generator=torch.Generator().manual_seed(1))
    return problem, model, batch


@pytest.mark.parametrize(
    "method, options, shapes",
    [
        ("engd", {}, lambda N, P: [(N, P), (P, P), (P, P)]),
        ("hessian_free", {}, lambda N, P: [(N, P)]),
        ("engd_woodbury", {}, lambda N, P: [(N, N), (N, N)]),
        ("spring", {"solver": "nystrom", "rank": 4, "damping": 1e-3}, lambda N, P: [(N, 8)]),
    ],
)
def test_step_refuses_dense_matrices_that_cannot_fit_before_allocating(monkeypatch, method,
                                                                       options, shapes):
    # ENGD at the default log-Fokker–Planck size died in PyTorch's allocator asking for the
    # 111,665,928,200 bytes of its P × P Gramian (P = 118,145), after building the 3.8 GB J.
    problem, model, batch = _tiny()
    N, P = 10, sum(p.numel() for p in model.parameters())
    needed = 8 * sum(r * c for r, c in shapes(N, P))  # float64, the listed matrices together
    optimizer = METHODS[method](model, problem, **options)
    monkeypatch.setattr(solves, "available_memory", lambda device: needed - 1)

    def no_linearize(*args, **kwargs):
        raise AssertionError("linearize ran before the memory check")

    monkeypatch.setattr(engd, "linearize_checked", no_linearize)
    caller = optimizer._caller
    with pytest.raises(ValueError, match=rf"{caller} \(N = 10 points, P = {P} parameters\): a "
                       rf"step needs .* \({needed:,} bytes\) for its dense float64 matrices"):
        optimizer.step(batch)
    # exactly enough memory: the check passes and the step runs
    monkeypatch.undo()  # (also restores linearize)
    monkeypatch.setattr(solves, "available_memory", lambda device: needed)
    assert math.isfinite(optimizer.step(batch))


def test_engd_at_the_default_log_fokker_planck_size_fails_early_with_the_alternatives(
        monkeypatch, tmp_path, capsys):
    # The command exited with "DefaultCPUAllocator: can't allocate memory: you tried to allocate
    # 111665928200 bytes" after half a minute; now train refuses before evaluating anything.
    monkeypatch.setattr(solves, "available_memory", lambda device: 64 * 2**30)
    rc = main(["pinn", "log_fokker_planck", "--method", "engd", "--steps", "1", "--no-progress",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    P = 10 * 256 + 256 + 256 * 256 + 256 + 256 * 128 + 128 + 128 * 128 + 128 + 128 + 1
    assert P == 118_145
    needed = 8 * (4000 * P + 2 * P * P)
    assert f"ENGD (N = 4,000 points, P = {P:,} parameters)" in err
    assert f"({needed:,} bytes)" in err and "Gramian JᵀJ 118,145 × 118,145" in err
    assert "but cpu has 64.0 GiB" in err
    assert "'engd_woodbury' / 'spring'" in err and "solver='nystrom'" in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_available_memory_reports_the_physical_memory_on_cpu():
    import os

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = solves.available_memory("cpu")
    assert 0 < available <= physical
