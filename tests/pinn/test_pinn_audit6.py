"""Sixth audit of curvkit.pinn: each test above the coverage section failed before its fix."""

import dataclasses
import math
import warnings

import pytest
import torch
from pinn_references import reference_residuals
from torch import nn

from curvkit.pinn.history import History, plot_histories
from curvkit.pinn.jacobian import linearize
from curvkit.pinn.problems import (
    heat,
    linear_pde,
    log_fokker_planck,
    mlp,
    poisson,
)
from curvkit.pinn.residuals import Sin, residuals

U = lambda X: X[:, 0]  # noqa: E731


def test_problem_factories_refuse_non_finite_parameters():
    # A NaN diffusivity or half-width passed the "> 0" checks (NaN compares False): the problem
    # was built and training failed later on NaN points or a NaN loss; an infinite box or NaN
    # coefficient of linear_pde likewise.
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match=rf"heat: .*finite diffusivity > 0.*got.*{bad}"):
            heat(2, diffusivity=bad)
        with pytest.raises(ValueError, match=rf"log_fokker_planck: .*finite half_width.*{bad}"):
            log_fokker_planck(2, half_width=bad)
        with pytest.raises(ValueError, match=r"linear_pde: need lower < upper, both finite"):
            linear_pde(U, dim=2, source=U, upper=[1.0, bad])
        for key in ("laplacian", "value"):
            with pytest.raises(ValueError, match=rf"linear_pde: {key} must be finite; got {bad}"):
                linear_pde(U, dim=2, source=U, **{key: bad})
        with pytest.raises(ValueError, match=r"linear_pde: gradient coefficient must be finite"):
            linear_pde(U, dim=2, source=U, gradient=[bad, 1.0])


@pytest.mark.parametrize("dim", [2.0, 1.5, "3", -1])
def test_problem_factories_refuse_a_dim_that_is_not_a_positive_int(dim):
    # A float dim failed inside torch.zeros ("argument 'size' must be tuple of ints"), a string
    # at "<", and linear_pde(dim=-1) with torch's "Dimension size must be non-negative".
    factories = [poisson, heat, log_fokker_planck, lambda dim: linear_pde(U, dim=dim, source=U)]
    for factory in factories:
        with pytest.raises(ValueError, match=rf"dim must be an int >= 1; got {dim!r}"):
            factory(dim)


def test_sample_refuses_fractional_point_counts():
    # int(2.5) silently drew 2 interior points.
    problem = poisson(2)
    with pytest.raises(ValueError, match=r"poisson2d.sample: num_interior must be an int; got 2.5"):
        problem.sample(2.5, 3)
    with pytest.raises(ValueError, match=r"num_boundary must be an int; got 3.0"):
        problem.sample(2, 3.0)
    batch = problem.sample(torch.tensor(2), 3)  # any integer type
    assert batch.interior.shape == (2, 2) and batch.boundary.shape == (3, 2)


def test_problem_refuses_a_box_that_is_not_finite_tensors_with_lower_below_upper():
    base = heat(1)
    # A list failed with "'list' object has no attribute 'shape'"; an empty or inverted box was
    # accepted and sampled points outside the intended domain.
    with pytest.raises(ValueError, match=r"heat1d: lower and upper must be tensors; got list"):
        dataclasses.replace(base, lower=[0.0, 0.0])
    with pytest.raises(ValueError, match=r"heat1d: need finite lower < upper in every coordinate"):
        dataclasses.replace(base, lower=base.upper.clone())
    with pytest.raises(ValueError, match=r"need finite lower < upper"):
        dataclasses.replace(base, upper=torch.tensor([1.0, math.inf]))


def test_history_from_dict_refuses_lists_of_different_lengths():
    # A corrupted or hand-edited history loaded silently; time_to_reach then paired errors with
    # the wrong times (zip stops at the shorter list).
    data = History(step=[0, 1], time=[0.0, 1.0], loss=[1.0, 0.5], l2_error=[1.0, 0.1],
                   step_size=[math.nan, 1.0]).to_dict()
    data["time"] = [0.0]
    with pytest.raises(ValueError, match=r"History.from_dict: .*same length.*step: 2.*time: 1"):
        History.from_dict(data)


def test_plots_of_empty_or_non_positive_histories_do_not_warn(tmp_path):
    # matplotlib warned "No artists with labels found to put in legend" for no histories, and
    # "Data has no positive values" for a run whose losses were all zero (exact fit).
    zero = History(step=[0, 1], time=[0.0, 1.0], loss=[0.0, 0.0], l2_error=[0.0, 0.0],
                   step_size=[math.nan, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_histories({}, tmp_path / "none.png")
        zero.plot(tmp_path / "zero.png")
    assert (tmp_path / "zero.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- coverage
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_jacobians_of_unusual_mlps_match_torch_func(dtype):
    # Two Linears in a row, an activation after the last Linear, Identity layers, sigmoid / sin,
    # one point per group, a gradient term and a Laplacian over a subset of coordinates.
    problem = linear_pde(lambda X: X[:, 0] * X[:, 2], dim=3, source=lambda X: X[:, 1],
                         gradient=[1.0, -2.0, 0.5], value=0.3, laplacian_dims=(0, 2))
    torch.manual_seed(0)  # test-only: nn.Linear draws from the global RNG
    models = [
        nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 1), nn.Tanh()),
        nn.Sequential(nn.Identity(), nn.Linear(3, 5), Sin(), nn.Identity(),
                      nn.Linear(5, 1, bias=False)),
        mlp(3, (2, 7), generator=torch.Generator().manual_seed(1)),
    ]
    tol = dict(rtol=1e-11, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    g = torch.Generator().manual_seed(2)
    for model in models:
        model = model.to(dtype)
        for n_in, n_bd in ((1, 1), (3, 2)):
            batch = problem.sample(n_in, n_bd, generator=g, dtype=dtype)
            r_ref, J_ref = reference_residuals(model, problem, batch)
            torch.testing.assert_close(residuals(model, problem, batch), r_ref, **tol)
            # the general path (dense=True) is checked in float64 only, to keep the test fast
            for dense in (False, True) if dtype == torch.float64 else (False,):
                lin = linearize(model, problem, batch, dense=dense)
                torch.testing.assert_close(lin.residual, r_ref, **tol)
                torch.testing.assert_close(lin.to_dense(), J_ref, **tol)
                torch.testing.assert_close(lin.kernel(), J_ref @ J_ref.T, **tol)


def test_heat_and_fokker_planck_boundary_points_lie_where_their_conditions_hold():
    g = torch.Generator().manual_seed(0)
    for problem in (heat(1), heat(4), log_fokker_planck(9)):
        X = problem.sample_boundary(201, generator=g)
        lo, hi = problem.lower, problem.upper
        assert ((X >= lo) & (X <= hi)).all()
        initial = X[:, 0] == lo[0]
        spatial = ((X[:, 1:] == lo[1:]) | (X[:, 1:] == hi[1:])).any(dim=1)
        if problem.name.startswith("heat"):
            assert int(initial.sum()) == 101 and bool(spatial[~initial].all())
        else:
            assert bool(initial.all())


def test_l2_error_names_a_model_with_several_outputs():
    problem = poisson(2)
    model = mlp(2, (4,), out_dim=2, generator=torch.Generator().manual_seed(0))
    X = problem.sample_interior(5, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"l2_error: the model must give one value per point.*"
                       r"got \(5, 2\)"):
        problem.l2_error(model, X)
