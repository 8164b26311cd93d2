import math
import re

import pytest
import torch

from curvkit.pinn.history import History, plot_histories
from curvkit.pinn.problems import poisson
from curvkit.pinn.train import train

SMALL = dict(num_interior=40, num_boundary=16, num_eval=500)


def _problem():
    return poisson(2, hidden=(8,))


@pytest.mark.parametrize(
    "method, options",
    [
        ("engd_woodbury", {"damping": 1e-6}),
        ("spring", {"damping": 1e-6, "momentum": 0.3}),
        ("engd", {"damping": 1e-6}),
        ("hessian_free", {"damping": 1e-6, "max_iter": 50}),
        ("adam", {"lr": 1e-2}),
    ],
)
def test_train_reduces_the_error_and_records_history(method, options):
    h = train(_problem(), method=method, steps=6, options=options, **SMALL)
    assert h.step == list(range(7))
    assert len(h.loss) == len(h.l2_error) == len(h.time) == 7
    assert all(b >= a for a, b in zip(h.time, h.time[1:]))
    assert h.loss[-1] < h.loss[0]  # the loss on fresh batches falls
    assert all(math.isfinite(e) for e in h.l2_error)
    assert h.meta["method"] == method


def test_resume_continues_bit_for_bit(tmp_path):
    problem = _problem()
    opts = {"damping": 1e-6, "momentum": 0.5, "lr": 0.05}
    full = train(problem, method="spring", steps=4, options=opts, **SMALL)
    ckpt = tmp_path / "run.pt"
    train(problem, method="spring", steps=2, options=opts, checkpoint=ckpt, **SMALL)
    resumed = train(problem, method="spring", steps=4, options=opts, resume=ckpt, **SMALL)
    assert resumed.step == full.step
    assert resumed.loss == full.loss
    assert resumed.l2_error == full.l2_error


def test_resume_off_the_eval_grid_matches_an_uninterrupted_run(tmp_path):
    problem = _problem()
    opts = {"damping": 1e-6}
    full = train(problem, method="engd_woodbury", steps=5, eval_every=2, options=opts, **SMALL)
    assert full.step == [0, 2, 4, 5]
    ckpt = tmp_path / "run.pt"
    first = train(problem, method="engd_woodbury", steps=3, eval_every=2, options=opts,
                  checkpoint=ckpt, **SMALL)
    assert first.step == [0, 2, 3]  # the stopping step is recorded
    resumed = train(problem, method="engd_woodbury", steps=5, eval_every=2, options=opts,
                    resume=ckpt, **SMALL)
    assert resumed.step == full.step  # ... and dropped again when the run goes on
    assert resumed.loss == full.loss
    assert resumed.l2_error == full.l2_error


def test_time_budget_stops_training():
    h = train(_problem(), method="engd_woodbury", time_budget=0.5, **SMALL)
    assert h.time[-1] >= 0.5
    assert h.step[-1] >= 1


def test_fixed_batch_and_eval_every():
    h = train(
        _problem(),
        method="engd_woodbury",
        steps=5,
        resample=False,
        eval_every=2,
        options={"damping": 1e-6},
        **SMALL,
    )
    assert h.step == [0, 2, 4, 5]
    # on a fixed batch the line search makes the batch loss monotone
    assert all(b <= a for a, b in zip(h.loss[1:], h.loss[2:]))


def test_history_roundtrip_and_plot(tmp_path):
    h = History(meta={"method": "x"})
    h.append(step=0, time=0.0, loss=1.0, l2_error=0.5)
    h.append(step=1, time=1.5, loss=0.1, l2_error=0.01, step_size=0.25)
    h.save(tmp_path / "h.json")
    back = History.load(tmp_path / "h.json")
    assert back.step == h.step and back.l2_error == h.l2_error and back.meta == h.meta
    assert math.isnan(back.step_size[0]) and back.step_size[1] == 0.25
    assert h.time_to_reach(0.02) == 1.5 and h.time_to_reach(1e-3) == math.inf
    plot_histories({"a": h, "b": back}, tmp_path / "h.png")
    h.plot(tmp_path / "single.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bar_runs(capsys):
    train(_problem(), method="adam", steps=2, progress=True, **SMALL)
    assert "poisson2d adam" in capsys.readouterr().err


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="train: method must be one of"):
        train(_problem(), method="lbfgs", steps=1)
    with pytest.raises(ValueError, match="train: pass steps"):
        train(_problem(), method="adam")


def test_a_non_finite_loss_is_recorded_before_stopping(tmp_path):
    # It used to stop without recording the step (unless it fell on eval_every), so the history
    # and the checkpoint's step count lagged behind the model.
    with pytest.warns(RuntimeWarning, match="train: the loss is"):
        h = train(_problem(), method="adam", steps=50, eval_every=100, options={"lr": 1e200},
                  checkpoint=tmp_path / "run.pt", **SMALL)
    assert h.step[0] == 0 and len(h.step) == 2 and 1 <= h.step[-1] < 50
    assert not math.isfinite(h.loss[-1])


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    from curvkit.pinn.problems import heat

    ckpt = tmp_path / "run.pt"
    opts = {"damping": 1e-6}
    train(_problem(), method="engd_woodbury", steps=1, options=opts, checkpoint=ckpt, **SMALL)
    # another method failed with a KeyError inside load_state_dict; other options or another
    # problem of the same shape were silently replaced by the checkpoint's
    with pytest.raises(ValueError, match=r"train: cannot resume .* method \(checkpoint "
                                         r"'engd_woodbury', now 'spring'\)"):
        train(_problem(), method="spring", steps=2, options=opts, resume=ckpt, **SMALL)
    with pytest.raises(ValueError, match=r"train: cannot resume .* options"):
        train(_problem(), method="engd_woodbury", steps=2, options={"damping": 1e-3},
              resume=ckpt, **SMALL)
    with pytest.raises(ValueError, match=r"train: cannot resume .* problem \(checkpoint "
                                         r"'poisson2d', now 'heat1d'\)"):
        train(heat(1, hidden=(8,)), method="engd_woodbury", steps=2, options=opts,
              resume=ckpt, **SMALL)
    with pytest.raises(ValueError, match=r"train: cannot resume .* resample"):
        train(_problem(), method="engd_woodbury", steps=2, options=opts, resample=False,
              resume=ckpt, **SMALL)


def test_a_float32_model_trains_on_float32_points():
    from curvkit.pinn.problems import mlp

    model = mlp(2, (8,), dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    h = train(_problem(), model, method="engd_woodbury", steps=2, options={"damping": 1e-4},
              **SMALL)
    assert h.step == [0, 1, 2] and all(math.isfinite(v) for v in h.loss + h.l2_error)
    assert model[0].weight.dtype == torch.float32


def test_bad_stopping_and_size_arguments_raise():
    with pytest.raises(ValueError, match="train: steps must be an int >= 0; got -1"):
        train(_problem(), method="adam", steps=-1)
    with pytest.raises(ValueError, match="train: steps must be an int >= 0; got 2.5"):
        train(_problem(), method="adam", steps=2.5)
    with pytest.raises(ValueError, match="train: time_budget must be a number >= 0; got -1"):
        train(_problem(), method="adam", time_budget=-1)
    with pytest.raises(ValueError, match="train: num_eval must be an int >= 1; got 0"):
        train(_problem(), method="adam", steps=1, num_eval=0)
    with pytest.raises(TypeError, match="train: problem must be a curvkit.pinn Problem; got str"):
        train("poisson", method="adam", steps=1)


def test_a_failed_kernel_solve_stops_training_and_keeps_the_history():
    # lr 50 diverges; the Nyström sketch of the exploding kernel then cannot be factored
    problem = poisson(dim=2, hidden=[8])
    options = {"lr": 50.0, "damping": 1e-10, "solver": "nystrom_pcg", "rank": 20}
    with pytest.warns(RuntimeWarning, match=r"train: step \d+ failed .*Nyström sketch") as rec:
        h = train(problem, method="engd_woodbury", steps=30, num_interior=60, num_boundary=20,
                  options=options, eval_every=7)
    failed = int(re.search(r"step (\d+) failed", str(rec[-1].message)).group(1))
    assert 1 < failed < 30
    # the history ends at the last step taken (off the eval_every grid too)
    assert h.step[-1] == failed - 1 and h.step == sorted(set(h.step))
    assert math.isfinite(h.l2_error[-1])


@pytest.mark.parametrize("name", ["num_interior", "num_boundary"])
def test_fractional_point_counts_are_refused(name):
    with pytest.raises(ValueError, match=rf"train: {name} must be an int >= 1; got 2.5"):
        train(poisson(dim=2, hidden=[4]), method="adam", steps=1, **{name: 2.5})
