"""Matrix-free linear algebra on torch tensors; knows nothing of neural networks."""

from curvkit.linalg.eigen import LowRank, SymmetricEigen
from curvkit.linalg.estimate import diagonal, frobenius_norm, trace
from curvkit.linalg.lsmr import lsmr
from curvkit.linalg.nystrom import nystrom, nystrom_pcg
from curvkit.linalg.operator import LinearOperator
from curvkit.linalg.solve import (
    ConvergenceError,
    ConvergenceWarning,
    SolveOperator,
    SolveResult,
    cg,
    minres,
    neumann,
)
from curvkit.linalg.spectral import LanczosResult, eigsh, lanczos, power_iteration, spectral_density
from curvkit.linalg.structured import (
    BlockDiagonal,
    Dense,
    Diagonal,
    Identity,
    Kronecker,
)

__all__ = [
    "LinearOperator",
    "Dense",
    "Diagonal",
    "Identity",
    "Kronecker",
    "BlockDiagonal",
    "LowRank",
    "SymmetricEigen",
    # solvers
    "cg",
    "minres",
    "lsmr",
    "neumann",
    "nystrom",
    "nystrom_pcg",
    "SolveOperator",
    "SolveResult",
    "ConvergenceError",
    "ConvergenceWarning",
    # estimators
    "trace",
    "diagonal",
    "frobenius_norm",
    # spectra
    "lanczos",
    "LanczosResult",
    "eigsh",
    "power_iteration",
    "spectral_density",
]
