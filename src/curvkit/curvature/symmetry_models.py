"""Which weight-space symmetry each parameter of a model has (names for ``SymmetryAveraged``)."""

from __future__ import annotations

from torch import nn

__all__ = ["sequential_symmetries"]


# Elementwise activations: odd ones also commute with sign flips of a hidden unit.
_ODD = (nn.Tanh, nn.Hardtanh, nn.Softsign, nn.Tanhshrink)
_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Softplus,
                nn.Mish, nn.ReLU6, nn.CELU, nn.SELU) + _ODD


def _is_odd(module: nn.Module) -> bool:
    """Whether an elementwise activation is odd (``Hardtanh``, and ``ReLU6``, only if min = -max)."""
    if isinstance(module, nn.Hardtanh):
        return module.min_val == -module.max_val
    return isinstance(module, _ODD)


def sequential_symmetries(model: nn.Sequential) -> dict[str, tuple[str, ...]]:
    """Name the hidden-unit symmetry of every parameter of an MLP (``nn.Sequential``).

    Between two ``nn.Linear`` layers, the hidden units can be permuted (``"perm"``) through any
    elementwise activation, permuted and sign-flipped (``"signed_perm"``) through an odd one
    (``tanh``), and mixed by any invertible map when there is no activation (``"orthogonal"``,
    the compact part of ``GL(h)``). That group acts on the rows of the first layer's weight and
    bias and on the columns of the next layer's weight; input and output axes are free.

    Args:
        model: ``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations.

    Returns:
        ``{parameter name: groups}`` in ``model.named_parameters()`` order (per-parameter blocks).

    Raises:
        TypeError: If ``model`` is not an ``nn.Sequential`` or holds another kind of module.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"sequential_symmetries: expected an nn.Sequential; got "
                        f"{type(model).__name__}.")
    linears: list[tuple[str, nn.Linear]] = []
    between: list[str] = []  # the group of the hidden layer after each linear but the last
    pending = "orthogonal"
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            if linears:
                between.append(pending)
            linears.append((name, module))
            pending = "orthogonal"
        elif _is_odd(module):
            pending = "signed_perm" if pending != "perm" else "perm"
        elif isinstance(module, _ELEMENTWISE):
            pending = "perm"
        else:
            raise TypeError(f"sequential_symmetries: module {name!r} is a "
                            f"{type(module).__name__}; expected nn.Linear or an elementwise "
                            "activation.")
    out = {}
    for i, (name, layer) in enumerate(linears):
        rows = between[i] if i < len(between) else "identity"
        cols = between[i - 1] if i > 0 else "identity"
        out[f"{name}.weight"] = (rows, cols)
        if layer.bias is not None:
            out[f"{name}.bias"] = (rows,)
    return out
