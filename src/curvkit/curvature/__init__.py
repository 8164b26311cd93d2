"""Curvature operators of (model, loss, data): Hessian, GGN, Fisher, empirical Fisher, Jacobian."""

from curvkit.curvature.engine import Batch, DataEngine
from curvkit.curvature.fisher import EmpiricalFisher, FisherMC
from curvkit.curvature.ggn import GGN
from curvkit.curvature.hessian import Hessian
from curvkit.curvature.jacobian import Jacobian

__all__ = ["Hessian", "GGN", "FisherMC", "EmpiricalFisher", "Jacobian", "DataEngine", "Batch"]
