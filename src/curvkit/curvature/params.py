"""The parameters a curvature operator acts on: their selection and their grouping into blocks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from torch import Tensor, nn

__all__ = ["resolve_params", "group_params"]


def resolve_params(model: nn.Module, params, caller: str) -> dict[str, Tensor]:
    """Selected parameters as an ordered mapping name → tensor.

    Args:
        model: The model.
        params: ``None`` (all parameters with ``requires_grad``), a sequence (or iterable, e.g.
            ``model.parameters()``) of the model's parameter tensors, or a mapping from
            parameter names to tensors of their shapes.
        caller: Name used in error messages.

    Returns:
        The mapping, in the order given (model order for ``None``).

    Raises:
        TypeError: If ``params`` is of another kind or holds non-tensors.
        ValueError: If a parameter is not the model's, repeated, misshaped, or none is selected.
    """
    named = dict(model.named_parameters())
    if params is None:
        selected = {n: p for n, p in named.items() if p.requires_grad}
    elif isinstance(params, Mapping):
        selected = {}
        for name, value in params.items():
            if name not in named:
                raise ValueError(f"{caller}: {name!r} is not a parameter of the model; "
                                 f"its parameters are {sorted(named)}.")
            if not isinstance(value, Tensor) or value.shape != named[name].shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{caller}: params[{name!r}] must be a tensor of shape "
                                 f"{tuple(named[name].shape)}; got {got}.")
            selected[name] = value
    elif isinstance(params, Iterable) and not isinstance(params, (Tensor, str)):
        params = list(params)  # also model.parameters() and other iterables, as torch.optim
        by_id = {id(p): n for n, p in named.items()}
        selected = {}
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"{caller}: params[{i}] must be a tensor; got {type(p).__name__}.")
            if id(p) not in by_id:
                raise ValueError(f"{caller}: params[{i}] (shape {tuple(p.shape)}) is not a "
                                 "parameter of the model; pass the model's own tensors or a "
                                 "name → tensor mapping.")
            if by_id[id(p)] in selected:
                raise ValueError(f"{caller}: params[{i}] ({by_id[id(p)]!r}) is listed twice.")
            selected[by_id[id(p)]] = p
    else:
        raise TypeError(f"{caller}: params must be None, a list of tensors or a mapping name → "
                        f"tensor; got {type(params).__name__}.")
    if not selected:
        raise ValueError(f"{caller}: no parameters selected (the model has no trainable parameters "
                         "or params is empty).")
    dtypes = {p.dtype for p in selected.values()}
    devices = {p.device for p in selected.values()}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(f"{caller}: parameters must share one dtype and device; got dtypes "
                         f"{sorted(map(str, dtypes))} on devices {sorted(map(str, devices))}.")
    return selected


def group_params(selected: dict[str, Tensor], blocks, caller: str) -> list[dict[str, Tensor]]:
    """Split the selected parameters into blocks.

    Args:
        selected: Ordered mapping name → tensor (from ``resolve_params``).
        blocks: ``"layer"`` (parameters of one module together), ``"param"`` (one block per
            tensor), or a sequence of groups, each a sequence of parameter names or tensors
            from ``selected``.
        caller: Name used in error messages.

    Returns:
        The groups as mappings name → tensor.

    Raises:
        ValueError: If a group names an unselected parameter or parameters appear twice.
    """
    if blocks == "param":
        return [{n: p} for n, p in selected.items()]
    if blocks == "layer":
        groups: dict[str, dict[str, Tensor]] = {}
        for n, p in selected.items():
            groups.setdefault(n.rpartition(".")[0], {})[n] = p
        return list(groups.values())
    if isinstance(blocks, str) or not isinstance(blocks, Sequence):
        raise ValueError(f"{caller}: blocks must be 'layer', 'param' or a list of parameter "
                         "groups; "
                         f"got {blocks!r}.")
    by_id = {id(p): n for n, p in selected.items()}
    seen: set[str] = set()
    out = []
    for i, group in enumerate(blocks):
        names = []
        for item in group:
            name = item if isinstance(item, str) else by_id.get(id(item))
            if name not in selected:
                what = repr(item) if isinstance(item, str) else "a tensor"
                raise ValueError(f"{caller}: blocks[{i}] holds {what}, which is not among the "
                                 "selected parameters.")
            if name in seen:
                raise ValueError(f"{caller}: parameter {name!r} appears in two blocks.")
            seen.add(name)
            names.append(name)
        if not names:
            raise ValueError(f"{caller}: blocks[{i}] is empty.")
        out.append({n: selected[n] for n in names})
    return out
