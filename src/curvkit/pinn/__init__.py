"""Physics-informed networks trained by energy natural gradients (ENGD, ENGD-Woodbury, SPRING)."""

from curvkit.pinn.base import Batch, Derivatives, Problem, mlp
from curvkit.pinn.engd import ENGD, HessianFree, line_search
from curvkit.pinn.history import History, plot_histories
from curvkit.pinn.jacobian import DenseResidualJacobian, ResidualJacobian, linearize
from curvkit.pinn.problems import heat, linear_pde, log_fokker_planck, poisson
from curvkit.pinn.residuals import Sin, derivatives, loss, residuals, taylor_derivatives
from curvkit.pinn.solves import SolveError, kernel_solve
from curvkit.pinn.train import train
from curvkit.pinn.woodbury import SPRING, ENGDWoodbury

__all__ = [
    "Batch",
    "Derivatives",
    "Problem",
    "poisson",
    "heat",
    "log_fokker_planck",
    "linear_pde",
    "mlp",
    "Sin",
    "derivatives",
    "taylor_derivatives",
    "residuals",
    "loss",
    "linearize",
    "ResidualJacobian",
    "DenseResidualJacobian",
    "ENGD",
    "ENGDWoodbury",
    "SPRING",
    "HessianFree",
    "line_search",
    "kernel_solve",
    "SolveError",
    "train",
    "History",
    "plot_histories",
]
