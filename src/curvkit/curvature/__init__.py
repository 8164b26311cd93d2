"""Curvature operators of (model, loss, data).

Exact (Hessian, GGN, Fisher, empirical Fisher, Jacobian), Kronecker-factored (KFAC, EKFAC) and
symmetry-averaged.
"""

from curvkit.curvature.ekfac import EKFAC
from curvkit.curvature.engine import Batch, DataEngine
from curvkit.curvature.fisher import EmpiricalFisher, FisherMC
from curvkit.curvature.ggn import GGN
from curvkit.curvature.hessian import Hessian
from curvkit.curvature.jacobian import Jacobian
from curvkit.curvature.kfac import KFAC
from curvkit.curvature.symmetry import SymmetryAveraged

__all__ = [
    "Hessian",
    "GGN",
    "FisherMC",
    "EmpiricalFisher",
    "Jacobian",
    "KFAC",
    "EKFAC",
    "SymmetryAveraged",
    "DataEngine",
    "Batch",
]
