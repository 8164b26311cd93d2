"""Curvature operators of (model, loss, data): Hessian, GGN, Fisher, empirical Fisher, Jacobian."""

from curvkit.curvature.engine import Batch, DataEngine
from curvkit.curvature.ggn import GGN
from curvkit.curvature.hessian import Hessian

__all__ = ["Hessian", "GGN", "DataEngine", "Batch"]
