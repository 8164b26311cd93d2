"""Seventh audit of the curvature report: progress bars, and the GGN density's mass near zero."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from curvkit.apps.report import _NUM_STAGES, ReportOptions, curvature_report
from report_plots import plotted_axes

TINY = dict(top_k=1, num_matvecs=4, num_directions=2, slq_probes=2, slq_matvecs=6)


def _overparameterised(seed: int = 0):
    """An MLP with P = 33 parameters on N = 6 points with one output: GGN rank <= 6."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    X, y = torch.randn(6, 2, generator=g), torch.randn(6, 1, generator=g)
    return model, [(X[:4], y[:4]), (X[4:], y[4:])], X


def _dense_ggn(model, X):
    """GGN of the mean squared error with one output, ``2/N Σ_n J_nᵀ J_n``, by jacrev."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    J = jacrev(lambda p: functional_call(model, p, (X,)))(params)  # {name: (N, 1, *shape)}
    J = torch.cat([j.reshape(X.shape[0], -1) for j in J.values()], dim=1)  # (N, P)
    return 2.0 / J.shape[0] * J.T @ J


def _linear():
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(6, 3, generator=g), torch.randn(6, 2, generator=g)
    return nn.Linear(3, 2), [(X[:4], y[:4]), (X[4:], y[4:])]


# ------------------------------------------------------------------ progress (item 3)
def test_report_progress_option_controls_the_bars(capsys):
    # ReportOptions.progress was ignored: the report never showed a bar.
    model, data = _linear()
    curvature_report(model, nn.MSELoss(), data, ReportOptions(**TINY, progress=False),
                     log=lambda *a: None)
    quiet = capsys.readouterr()
    assert quiet.err == "" and quiet.out == ""
    curvature_report(model, nn.MSELoss(), data, ReportOptions(**TINY, progress=True),
                     log=lambda *a: None)
    err = capsys.readouterr().err
    assert "curvature report" in err and f"{_NUM_STAGES}/{_NUM_STAGES}" in err  # stage bar
    assert "KFAC" in err and "GGN" in err  # the operators' bars over the data


def test_report_log_lines_are_written_above_the_bar(capsys):
    # (coverage: with a bar open, the timing lines go through tqdm's external write mode)
    model, data = _linear()
    curvature_report(model, nn.MSELoss(), data, ReportOptions(**TINY, progress=True))
    out = capsys.readouterr().out
    assert out.count(" s\n") == _NUM_STAGES  # every stage's timing line, each on its own line


# ------------------------------------------------------------------ GGN mass near zero (item 4)
def test_report_gives_the_ggn_mass_near_zero_that_the_log_axis_hid(tmp_path):
    # The log-scale GGN density put the >= 80 % of eigenvalues at ~0 at the far left end of a
    # log axis; the report gave no number for it.
    model, data, X = _overparameterised()
    options = ReportOptions(top_k=1, num_matvecs=4, num_directions=2, slq_probes=8,
                            slq_matvecs=12, progress=False)
    report = curvature_report(model, nn.MSELoss(), data, options, log=lambda *a: None)
    eigenvalues = torch.linalg.eigvalsh(_dense_ggn(model, X))
    info = report["ggn_density"]
    assert info["epsilon"] == pytest.approx(1e-8 * eigenvalues.max().item(), rel=1e-6)
    assert info["near_zero_threshold"] == pytest.approx(100 * info["epsilon"], rel=1e-12)
    truth = (eigenvalues <= info["near_zero_threshold"]).double().mean().item()
    assert truth >= 27 / 33  # rank <= N = 6
    # The GGN has <= 7 distinct eigenvalues, so 12 Lanczos steps exhaust the Krylov space and
    # each probe's near-zero weight is exactly vᵀΠv/‖v‖² (Π: the null-space projector). Over
    # Rademacher probes its standard deviation is sqrt(2 (‖Π‖_F² − Σ Π_ii²))/n <=
    # sqrt(2 · 6)/33 < 0.105; the mean of 8 probes: < 0.037, and 0.12 is over 3 of those.
    assert abs(info["near_zero_fraction"] - truth) <= 0.12

    ax = plotted_axes(report, tmp_path / "r.png")[0]
    assert ax.get_xscale() == "symlog"
    assert ax.xaxis.get_transform().linthresh == info["near_zero_threshold"]
    texts = [t.get_text() for t in ax.texts]
    assert f"{info['near_zero_fraction']:.1%} of the spectrum at λ ≤" in texts[0]
