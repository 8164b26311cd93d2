"""Curvature operators of (model, loss, data).

Exact: ``Hessian``, ``GGN``, ``FisherMC``, ``EmpiricalFisher``, ``Jacobian``; Kronecker-factored:
``KFAC``, ``EKFAC``; symmetry-averaged: ``SymmetryAveraged``. All are
``curvkit.linalg.LinearOperator``s over the parameters, built on one data loop, ``DataEngine``.
"""

from curvkit.curvature.ekfac import EKFAC
from curvkit.curvature.engine import Batch, DataEngine
from curvkit.curvature.fisher import EmpiricalFisher, FisherMC
from curvkit.curvature.ggn import GGN
from curvkit.curvature.hessian import Hessian
from curvkit.curvature.jacobian import Jacobian
from curvkit.curvature.kfac import KFAC
from curvkit.curvature.symmetry import (
    SymmetryAveraged,
    orbit_mean,
    sequential_symmetries,
    symmetry_block_diagonal,
)

__all__ = [
    "Hessian",
    "GGN",
    "FisherMC",
    "EmpiricalFisher",
    "Jacobian",
    "KFAC",
    "EKFAC",
    "SymmetryAveraged",
    "symmetry_block_diagonal",
    "sequential_symmetries",
    "orbit_mean",
    "DataEngine",
    "Batch",
]
