"""Taylor-mode automatic differentiation and (collapsed) PDE operators.

``jet(f, order)`` pushes K-jets through ``f``'s captured ATen graph; ``laplacian``,
``weighted_laplacian`` and ``biharmonic`` build batched PDE operators on collapsed jets.

Supported operators (anything else raises ``NotImplementedError`` naming the ATen op): linear
``mm``/``addmm``/``bmm``/``mv``/``dot`` (``nn.Linear``), ``add``/``sub``/``mul``/``div``/``neg``,
``pow`` with a scalar exponent, ``exp``, ``expm1``, ``log``, ``log1p``, ``sqrt``, ``rsqrt``,
``reciprocal``, ``sin``, ``cos``, ``tanh``, ``sigmoid``, ``softplus``, ``logsigmoid``, ``erf``,
``gelu`` (exact and ``approximate="tanh"``), ``silu``, ``mish``, ``elu``/``selu``/``celu`` (smooth
branches; at the kink the left slope and zero higher derivatives, as torch's autograd), the
piecewise-linear ``relu``, ``leaky_relu``, ``abs``, ``hardtanh``, ``clamp`` (zero higher
derivatives away from kinks), ``hardswish``, ``hardsigmoid``, ``softshrink``/``hardshrink``,
``frac``, ``clamp_min``/``clamp_max`` and ``maximum``/``minimum`` (tied operands share the jet, as
in torch's autograd), ``tan``, ``sinh``, ``cosh``, ``atan``/``asin``/``acos``,
``asinh``/``acosh``/``atanh``, ``exp2``, ``log2``, ``log10``, ``sinc``, ``logit``, ``atan2``,
``hypot``, ``logaddexp``, ``addcmul``/``addcdiv``, ``lerp``, ``linalg_vector_norm`` of any order
(``F.normalize``, ``cosine_similarity``), ``cumsum``, ``roll``, ``repeat``, ``gather``,
``masked_fill``, ``tril``/``triu``, ``diagonal``/``diag_embed``/``trace``, ``unfold``,
``F.pad``, ``baddbmm``, ``sort``/``topk``/``cummax``/``cummin``, ``softmax``/``log_softmax``
along any dim, ``batch_norm`` in eval mode, ``layer_norm`` (``nn.LayerNorm``, with or without
affine, over any number of last dims),
``nn.RMSNorm``, ``group_norm``, ``scaled_dot_product_attention`` (CPU kernel and math path:
``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``; no dropout), ``sum``, ``mean``,
``prod``, ``logsumexp``, ``var``/``std`` (and ``var_mean``/``std_mean``),
``amax``/``amin``/``max``/``min`` (the jet of the selected entry; ties as torch's autograd),
``view``/``reshape``/``unsqueeze``/``squeeze``/``t``/``transpose``/
``permute``/``expand``/``flip``, ``cat``/``stack``/``split``/``unbind``, slicing and indexing,
``where`` with a constant condition, and piecewise-constant functions of the value (comparisons,
``sign``, ``floor``, ``*_like``). In-place operators are accepted only on a fresh tensor that
nothing else reads (as in ``RMSNorm``'s ``+ eps``).
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
