"""Taylor-mode automatic differentiation and (collapsed) PDE operators.

``jet(f, order)`` pushes K-jets through ``f``'s captured ATen graph; ``laplacian``,
``weighted_laplacian`` and ``biharmonic`` build batched PDE operators on collapsed jets.

Supported operators (anything else raises ``NotImplementedError`` naming the ATen op):
linear ``mm``/``addmm``/``bmm``/``mv``/``dot`` (``nn.Linear``), ``add``/``sub``/``mul``/``div``/
``neg``, ``pow`` with a scalar exponent, ``exp``, ``expm1``, ``log``, ``log1p``, ``sqrt``,
``rsqrt``, ``reciprocal``, ``sin``, ``cos``, ``tanh``, ``sigmoid``, ``softplus``, the
piecewise-linear ``relu``, ``leaky_relu``, ``abs``, ``hardtanh``, ``clamp`` (zero higher
derivatives away from kinks), ``sum``, ``mean``, ``view``/``reshape``/``unsqueeze``/``squeeze``/
``t``/``transpose``/``permute``/``expand``/``flip``, ``cat``/``stack``/``split``/``unbind``,
slicing and indexing, ``where`` with a constant condition, and piecewise-constant functions of
the value (comparisons, ``sign``, ``floor``, ``*_like``).
"""

from curvkit.taylor.jet import jet
from curvkit.taylor.operators import (
    DifferentialOperator,
    DifferentialResult,
    biharmonic,
    laplacian,
    split_indefinite,
    weighted_laplacian,
)

__all__ = [
    "DifferentialOperator",
    "DifferentialResult",
    "biharmonic",
    "jet",
    "laplacian",
    "split_indefinite",
    "weighted_laplacian",
]
