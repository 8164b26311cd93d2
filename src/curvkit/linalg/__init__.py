"""Matrix-free linear algebra on torch tensors; knows nothing of neural networks."""

from curvkit.linalg.operator import LinearOperator
from curvkit.linalg.structured import (
    BlockDiagonal,
    Dense,
    Diagonal,
    Identity,
    Kronecker,
    LowRank,
    SymmetricEigen,
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
]
