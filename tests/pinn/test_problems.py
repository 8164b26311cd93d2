import math

import pytest
import torch

from curvkit.pinn.problems import Derivatives, heat, linear_pde, log_fokker_planck, mlp, poisson
from curvkit.pinn.residuals import taylor_derivatives

PROBLEMS = {
    "poisson2": lambda: poisson(2),
    "poisson5": lambda: poisson(5),
    "poisson10": lambda: poisson(10),
    "poisson100": lambda: poisson(100),
    "poisson3_sines": lambda: poisson(3, solution="sines"),
    "heat1": lambda: heat(1),
    "heat4": lambda: heat(4),
    "heat2_kappa": lambda: heat(2, diffusivity=0.7),
    "log_fp9": lambda: log_fokker_planck(9),
}


@pytest.mark.parametrize("name", PROBLEMS)
def test_exact_solution_satisfies_pde(name):
    """Checked by the library's own operators: collapsed Taylor mode (``curvkit.taylor``)."""
    problem = PROBLEMS[name]()
    g = torch.Generator().manual_seed(0)
    X = problem.sample_interior(32, generator=g)
    d = taylor_derivatives(problem.solution, X, laplacian_dims=problem.laplacian_dims)
    r = problem.residual(X, d)
    # The residual is a difference of O(1..100) terms; anything but the exact solution is O(1) off.
    scale = 1.0 + d.laplacian.abs().max()
    assert r.abs().max() < 1e-12 * scale
    # ...and a perturbed solution is not a solution (the check can fail).
    d_bad = taylor_derivatives(
        lambda Z: problem.solution(Z) + 0.1 * Z[:, -1].square(),
        X,
        laplacian_dims=problem.laplacian_dims,
    )
    assert problem.residual(X, d_bad).abs().max() > 1e-2


@pytest.mark.parametrize("name", PROBLEMS)
def test_exact_solution_satisfies_pde_with_taylor_mode_operators(name):
    """The same check with curvkit.taylor's collapsed Taylor-mode operators."""
    from curvkit.taylor import laplacian, weighted_laplacian

    problem = PROBLEMS[name]()
    X = problem.sample_interior(16, generator=torch.Generator().manual_seed(1))
    if problem.laplacian_dims is None:
        op = laplacian(problem.solution, return_value=True, return_gradient=True)
    else:  # Δₓ = tr(S Sᵀ ∇²) with S the selection of the spatial coordinates
        S = torch.eye(problem.dim)[:, list(problem.laplacian_dims)]
        op = weighted_laplacian(problem.solution, S, return_value=True, return_gradient=True)
    res = op(X)
    d = Derivatives(res.value.reshape(-1), res.gradient.reshape(X.shape), res.operator.reshape(-1))
    assert problem.residual(X, d).abs().max() < 1e-12 * (1.0 + d.laplacian.abs().max())


@pytest.mark.parametrize("dim, constant", [(10, 1.34), (100, 33.47)])
def test_normalisation_constants_give_unit_l2_norm(dim, constant):
    problem = poisson(dim)
    X = problem.sample_interior(200_000, generator=torch.Generator().manual_seed(1))
    norm = problem.solution(X).square().mean().sqrt()
    assert abs(norm - 1) < 0.01
    # the spec's constant, rounded to 3-4 digits: u(1, ..., 1) = (d/2 or d) / c
    c = (dim / 2 if dim == 10 else dim) / float(problem.solution(torch.ones(1, dim)))
    assert abs(c - constant) / constant < 3e-3


def test_box_boundary_points_lie_on_faces():
    problem = poisson(5)
    X = problem.sample_boundary(400, generator=torch.Generator().manual_seed(0))
    on_face = ((X == 0) | (X == 1)).sum(dim=1)
    assert (on_face >= 1).all()
    assert ((X >= 0) & (X <= 1)).all()


def test_heat_boundary_is_half_initial_half_lateral():
    problem = heat(4)
    X = problem.sample_boundary(100, generator=torch.Generator().manual_seed(0))
    assert (X[:50, 0] == 0).all()
    lateral = ((X[50:, 1:] == 0) | (X[50:, 1:] == 1)).any(dim=1)
    assert lateral.all()


def test_log_fokker_planck_boundary_is_initial_slice_and_density_normalised():
    problem = log_fokker_planck(2, half_width=8.0)
    X = problem.sample_boundary(50, generator=torch.Generator().manual_seed(0))
    assert (X[:, 0] == 0).all() and (X[:, 1:].abs() <= 8).all()
    # exp(q) integrates to one in x at any t (Monte Carlo on the box)
    Z = problem.sample_interior(400_000, generator=torch.Generator().manual_seed(2))
    Z[:, 0] = 0.6
    mass = problem.solution(Z).exp().mean() * 16**2
    assert abs(mass - 1) < 0.02


def test_linear_pde_user_defined():
    # u = exp(x) sin(y): Δu = 0, so a Δu + b·∇u + c u = f with b = (1, 0), c = -1 gives f = 0.
    u = lambda X: torch.exp(X[:, 0]) * torch.sin(X[:, 1])  # noqa: E731
    problem = linear_pde(
        u,
        dim=2,
        source=lambda X: torch.zeros(X.shape[0]),
        gradient=[1.0, 0.0],
        value=-1.0,
        lower=[-1, 0],
        upper=[1, 2],
    )
    X = problem.sample_interior(20, generator=torch.Generator().manual_seed(0))
    assert ((X[:, 0] >= -1) & (X[:, 1] <= 2)).all()
    r = problem.residual(X, taylor_derivatives(u, X))
    assert r.abs().max() < 1e-12
    with pytest.raises(ValueError, match="linear_pde: gradient coefficient"):
        linear_pde(u, dim=2, source=lambda X: X[:, 0], gradient=[1.0])
    with pytest.raises(ValueError, match="linear_pde: need lower < upper"):
        linear_pde(u, dim=2, source=lambda X: X[:, 0], lower=[0, 0], upper=[0, 1])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="poisson: the 'harmonic' solution"):
        poisson(3, solution="harmonic")
    with pytest.raises(ValueError, match="poisson: solution must be one of"):
        poisson(3, solution="waves")
    with pytest.raises(ValueError, match="at least one interior"):
        poisson(2).sample(0, 3)
    with pytest.raises(ValueError, match="heat: need dim >= 1"):
        heat(2, diffusivity=0.0)


def test_l2_error_and_default_model():
    problem = poisson(5)
    X = problem.sample_interior(100, generator=torch.Generator().manual_seed(0))
    assert problem.l2_error(problem.solution, X) == 0.0
    model = problem.default_model(generator=torch.Generator().manual_seed(0))
    widths = [m.out_features for m in model if isinstance(m, torch.nn.Linear)]
    assert widths == [64, 64, 48, 48, 1]
    assert sum(p.numel() for p in model.parameters()) == 10065
    err = problem.l2_error(model, X)
    with torch.no_grad():
        expected = math.sqrt(float((model(X).reshape(-1) - problem.solution(X)).square().mean()))
    assert err == pytest.approx(expected, rel=1e-14)
    # points the model cannot take are named (it was torch's matmul dtype error)
    with pytest.raises(ValueError, match=r"l2_error: X has dtype torch.float64 but the model's "
                                         r"parameters torch.float32"):
        problem.l2_error(model.float(), X)
    with pytest.raises(ValueError, match="first Linear takes 5 inputs but the points have 4"):
        problem.l2_error(model.double(), X[:, :4])


def test_mlp_generator_is_reproducible():
    a = mlp(3, (5,), generator=torch.Generator().manual_seed(3))
    b = mlp(3, (5,), generator=torch.Generator().manual_seed(3))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert (a[0].weight.abs() <= 1 / math.sqrt(3)).all()


def test_user_problem_outputs_of_the_wrong_shape_raise():
    from curvkit.pinn.jacobian import linearize
    from curvkit.pinn.residuals import loss

    u = lambda X: X[:, 0] * X[:, 1]  # noqa: E731
    zero = lambda X: torch.zeros(X.shape[0], dtype=X.dtype)  # noqa: E731
    model = mlp(2, (3,), generator=torch.Generator().manual_seed(0))
    # A solution of shape (N, 1) broadcast against the (N,) prediction into an (N, N) matrix:
    # the L2 error was silently wrong.
    column = linear_pde(lambda X: u(X)[:, None], dim=2, source=zero, name="col")
    X = column.sample_interior(6, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"col: the solution must return shape \(6,\) .*; got \(6, 1\)"):
        column.l2_error(model, X)
    with pytest.raises(ValueError, match=r"col: the solution must return shape \(3,\)"):
        loss(model, column, column.sample(4, 3))
    flat = linear_pde(u, dim=2, source=lambda X: zero(X)[:, None], name="src")
    for call in (loss, linearize):
        with pytest.raises(ValueError, match=r"src: the interior residual must return shape "
                                             r"\(4,\) .*; got \(4, 4\)"):
            call(model, flat, flat.sample(4, 3))


def test_problem_fields_are_validated():
    import dataclasses

    u = lambda X: X[:, 0]  # noqa: E731
    # Duplicates used to count a coordinate once in the Jacobian's forward Laplacian but twice
    # in the line search's.
    with pytest.raises(ValueError, match=r"laplacian_dims must be distinct integers in \[0, 3\)"):
        linear_pde(u, dim=3, source=u, laplacian_dims=[0, 0])
    with pytest.raises(ValueError, match=r"laplacian_dims must be distinct integers in \[0, 2\)"):
        dataclasses.replace(heat(1), laplacian_dims=(1, 1))
    with pytest.raises(ValueError, match="dim must be an int >= 1; got 0"):
        linear_pde(u, dim=0, source=u)
