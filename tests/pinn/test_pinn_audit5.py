"""Fifth audit of curvkit.pinn: each test above the coverage section failed before its fix."""

import copy
import math

import pytest
import torch

from curvkit.pinn.jacobian import linearize
from curvkit.pinn.problems import Derivatives, linear_pde, mlp, poisson
from curvkit.pinn.solves import kernel_solve
from curvkit.pinn.train import train
from curvkit.pinn.woodbury import ENGDWoodbury

SMALL = dict(num_interior=20, num_boundary=8, num_eval=100)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_nystrom_pcg_with_a_sketch_wider_than_the_rank_of_the_kernel():
    # N = 60 > P = 13, so rank(K) <= 13 < l: nystrom_pcg's own tiny shift could not factor the
    # sketch and raised "A is not PSD"; the shift ν of the other solvers can.
    problem = poisson(2)
    g = torch.Generator().manual_seed(0)
    model = mlp(2, (3,), generator=g)
    batch = problem.sample(40, 20, generator=g)
    lin = linearize(model, problem, batch)
    N, P = lin.shape
    assert N > P
    rhs = -lin.residual
    exact = kernel_solve(lin, rhs, damping=1e-2)
    for rank in (30, N):
        u = kernel_solve(lin, rhs, damping=1e-2, solver="nystrom_pcg", rank=rank,
                         generator=torch.Generator().manual_seed(1))
        assert (u - exact).norm() <= 1e-10 * exact.norm(), rank
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ENGDWoodbury(a, problem, lr=0.5, damping=1e-2).step(batch)
    ENGDWoodbury(b, problem, lr=0.5, damping=1e-2, solver="nystrom_pcg", rank=N).step(batch)
    torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-10, atol=1e-12)


def test_resume_without_further_steps_keeps_the_final_point(tmp_path):
    # Resuming a run that stopped off the eval_every grid with nothing left to do dropped its
    # last point: the history (and the checkpoint written again) lagged the model, and a later
    # resume counted steps from there.
    problem = poisson(2, hidden=(6,))
    opts = {"damping": 1e-6}
    run = dict(method="engd_woodbury", eval_every=2, options=opts, **SMALL)
    full = train(problem, steps=5, **run)
    ckpt = tmp_path / "run.pt"
    first = train(problem, steps=3, checkpoint=ckpt, **run)
    assert first.step == [0, 2, 3]
    again = train(problem, steps=3, checkpoint=ckpt, resume=ckpt, **run)
    assert again.step == first.step and again.loss == first.loss
    resumed = train(problem, steps=5, resume=ckpt, **run)
    assert resumed.step == full.step
    assert resumed.loss == full.loss and resumed.l2_error == full.l2_error


def test_resume_with_a_fixed_batch_leaves_the_global_rng_alone(tmp_path):
    # The checkpoint's fixed batch was rebuilt through problem.sample(1, 1) without a
    # generator, which drew from (and advanced) torch's global RNG.
    problem = poisson(2, hidden=(6,))
    run = dict(method="engd_woodbury", resample=False, options={"damping": 1e-6}, **SMALL)
    ckpt = tmp_path / "run.pt"
    train(problem, steps=1, checkpoint=ckpt, **run)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    train(problem, steps=2, resume=ckpt, **run)
    assert torch.equal(torch.get_rng_state(), state)


def test_sources_and_coefficients_follow_the_points_device():
    # The "harmonic" / "norm_squared" sources and linear_pde's gradient coefficient were built
    # on the CPU whatever the points' device (a crash on GPU points; "meta" shows it on CPU).
    X = torch.rand(4, 6, dtype=torch.float64, device="meta")
    d = Derivatives(X[:, 0], X, X[:, 0])
    problems = [
        poisson(6, solution="harmonic"),
        poisson(6, solution="norm_squared"),
        linear_pde(lambda X: X.sum(1), dim=6, source=lambda X: X[:, 0], gradient=[1.0] * 6),
    ]
    for problem in problems:
        assert problem.interior_residual(X, d).device == X.device, problem.name


def test_mlp_with_a_generator_leaves_the_global_rng_alone():
    # nn.Linear initialised itself from the global RNG before the generator's values replaced
    # its parameters (the docstring promises the global RNG is not touched).
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = mlp(3, (4, 5), generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(1)
    b = mlp(3, (4, 5), generator=torch.Generator().manual_seed(7))
    assert torch.equal(_flat(a), _flat(b))


def test_a_failed_nystrom_sketch_is_not_blamed_on_an_indefinite_kernel():
    # With one huge direction in the PSD kernel (as in a diverging run) the sketch's Cholesky
    # fails at the shift ν = 1e-7; the error said "A is not PSD", which K = JJᵀ never is.
    problem = poisson(2)
    g = torch.Generator().manual_seed(0)
    lin = linearize(mlp(2, (3,), generator=g), problem, problem.sample(6, 4, generator=g))
    K = lin.kernel() + 1e16 * torch.ones(10, 10, dtype=torch.float64)
    for solver in ("nystrom", "nystrom_stable", "nystrom_pcg"):
        with pytest.raises(ValueError, match=r"kernel_solve: the Nyström sketch of the kernel "
                                             r"K = JJᵀ cannot be factored with the shift"):
            kernel_solve(lin, -lin.residual, damping=1e-6, solver=solver, rank=5, kernel=K,
                         generator=torch.Generator().manual_seed(3))


def test_kernel_solve_refuses_a_rank_that_is_not_an_int():
    # int(rank) silently truncated 2.5 to 2 (and took True for 1).
    problem = poisson(2)
    g = torch.Generator().manual_seed(0)
    lin = linearize(mlp(2, (3,), generator=g), problem, problem.sample(6, 4, generator=g))
    for rank in (2.5, True):
        with pytest.raises(ValueError, match=r"needs rank in \[1, N=10\], an int; got"):
            kernel_solve(lin, -lin.residual, damping=1e-3, solver="nystrom", rank=rank)


# ---------------------------------------------------------------- coverage (passed before)
def test_every_optimizer_resumes_bit_for_bit_through_torch_save(tmp_path):
    from curvkit.pinn.engd import ENGD, HessianFree
    from curvkit.pinn.woodbury import SPRING

    problem = poisson(2)
    g = torch.Generator().manual_seed(0)
    model = mlp(2, (4,), generator=g)
    batches = [problem.sample(10, 6, generator=g) for _ in range(4)]
    cases = [
        (ENGD, dict(damping=1e-6)),
        (HessianFree, dict(lr=0.5, damping=1e-6, max_iter=4)),
        (ENGDWoodbury, dict(lr=0.02, damping=1e-1, solver="nystrom_stable", rank=5, seed=3)),
        (ENGDWoodbury, dict(lr=0.02, damping=1e-1, solver="nystrom_pcg", rank=5, seed=3)),
        (SPRING, dict(momentum=0.9, damping=1e-6)),  # line search, bias correction
        (SPRING, dict(lr=0.02, momentum=0.9, damping=1e-1, solver="nystrom", rank=5)),
    ]
    for cls, options in cases:
        a = copy.deepcopy(model)
        opt_a = cls(a, problem, **options)
        for batch in batches[:2]:
            opt_a.step(batch)
        torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "s.pt")
        state = torch.load(tmp_path / "s.pt", weights_only=False)
        b = copy.deepcopy(model)
        b.load_state_dict(state["model"])
        opt_b = cls(b, problem, **options)
        opt_b.load_state_dict(state["opt"])
        for batch in batches[2:]:
            assert opt_a.step(batch) == opt_b.step(batch), cls.__name__
        assert torch.equal(_flat(a), _flat(b)), (cls.__name__, options)


def test_seeded_streams_are_reproducible_and_not_shared_by_neighbouring_seeds():
    from curvkit.pinn.base import seeded_stream

    def draw(*key):
        return torch.rand(8, generator=seeded_stream(*key))

    assert torch.equal(draw(0, 2), draw(0, 2))
    # seed + k gave seed 0's stream 2 to seed 1 as its stream 1 (its training points were the
    # other run's held-out points; Nyström sketches repeated one step apart)
    assert not torch.equal(draw(0, 2), draw(1, 1))
    assert not torch.equal(draw(0, 5), draw(1, 4))
    assert not torch.equal(draw(-1, 0), draw(0, 0))


def test_linear_pde_refuses_fractional_laplacian_dims():
    import numpy as np

    from curvkit.pinn.problems import linear_pde

    zero = lambda X: X.new_zeros(X.shape[0])  # noqa: E731
    with pytest.raises(ValueError, match=r"laplacian_dims must be integers; got \[0.5, 1\]"):
        linear_pde(zero, dim=3, source=zero, laplacian_dims=[0.5, 1])  # was read as (0, 1)
    assert linear_pde(zero, dim=3, source=zero, laplacian_dims=np.array([0, 2])).laplacian_dims \
        == (0, 2)


def test_resume_into_a_model_of_another_dtype_is_refused(tmp_path):
    problem = poisson(2, hidden=(6,))
    ckpt = tmp_path / "run.pt"
    opts = {"damping": 1e-6}
    train(problem, method="engd_woodbury", steps=1, options=opts, checkpoint=ckpt, **SMALL)
    model32 = problem.default_model(generator=torch.Generator().manual_seed(0)).float()
    with pytest.raises(ValueError, match=r"dtype \(checkpoint 'float64', now 'float32'\)"):
        train(problem, model32, method="engd_woodbury", steps=2, options=opts, resume=ckpt,
              **SMALL)


@pytest.mark.parametrize("method", ["engd", "engd_woodbury", "spring", "hessian_free"])
def test_a_non_finite_loss_is_reported_not_solved_for(method):
    # The solvers refuse non-finite right-hand sides; the step reports the loss instead, and
    # train records it and stops (as it does for Adam).
    problem = poisson(2, hidden=(6,))
    model = problem.default_model(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model[0].bias[0] = float("nan")
    before = [p.clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="the loss is nan at step 1; stopping"):
        h = train(problem, model, method=method, steps=3, options={"damping": 1e-6}, **SMALL)
    assert h.step == [0, 1] and math.isnan(h.loss[-1])
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
