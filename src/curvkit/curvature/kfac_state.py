"""What a saved KFAC state holds per layer, and the checks that it is this operator's."""

from __future__ import annotations

from dataclasses import dataclass

from curvkit.curvature.kfac_pass import LayerPlan, plan_layers


@dataclass
class LayerSpec:
    """What a layer's factors mean, without the module (enough to rebuild from a state dict)."""

    path: str
    kind: str  # "kron" or "norm"
    order: str  # "GA" or "AG" for kron
    weight: str | None
    bias: str | None
    joint: bool

    @classmethod
    def of(cls, plan: LayerPlan) -> LayerSpec:
        """The spec of a planned layer."""
        order = plan.rule.order if plan.is_kron else ""
        return cls(plan.path, "kron" if plan.is_kron else "norm", order, plan.weight, plan.bias,
                   plan.joint)


def check_header(op, state: dict) -> None:
    """Refuse a state of another operator type, options or parameters than ``op``'s."""
    name = type(op).__name__
    if state.get("type") != name:
        raise ValueError(f"{name}.load_state_dict: state is of {state.get('type')!r}.")
    missing = {"options", "params", "layers", "others", "factors"} - set(state)
    if missing:
        raise ValueError(f"{name}.load_state_dict: the state lacks {sorted(missing)}.")
    mine = op._options()
    if state["options"] != mine:
        raise ValueError(f"{name}.load_state_dict: options differ: saved {state['options']}, "
                         f"this operator {mine}.")
    shapes = {n: tuple(p.shape) for n, p in op.engine.params.items()}
    if dict(state["params"]) != shapes:
        raise ValueError(f"{name}.load_state_dict: parameters differ: saved "
                         f"{state['params']}, this operator {shapes}.")


def check_state(op, specs: list[LayerSpec], others: list[str], factors: dict) -> None:
    """Refuse a state whose layers or factor shapes are not the model's of ``op`` (a KFAC).

    Equal parameter names and shapes do not make the same blocks: a bias-free ``Linear``
    and an ``Embedding``, a convolution with other ``groups``, a norm layer and a custom
    module all hold a ``weight`` of one shape, and their factors would be read wrongly.
    """
    name = type(op).__name__
    params = op.engine.params
    plans = {p.path: p for p in plan_layers(op.model, params, separate_bias=op.separate_bias)[0]}
    covered = others + [n for s in specs for n in (s.weight, s.bias) if n is not None]
    if sorted(covered) != sorted(params):
        raise ValueError(f"{name}.load_state_dict: the saved blocks cover {sorted(covered)}; "
                         f"this operator's parameters are {sorted(params)}.")

    def check(label: str, want: dict[str, tuple]) -> None:
        got = factors.get(label)
        saved = None if got is None else {k: tuple(t.shape) for k, t in got.items()}
        if saved != want:
            raise ValueError(f"{name}.load_state_dict: the factors of {label!r} are not this "
                             f"model's: saved {saved}, expected {want}.")

    for spec in specs:
        plan = plans.get(spec.path)
        if plan is None or LayerSpec.of(plan) != spec:
            raise ValueError(
                f"{name}.load_state_dict: saved layer {spec.path!r} ({spec.kind} block of "
                f"{[n for n in (spec.weight, spec.bias) if n]}) is not this model's "
                f"{'layer ' + repr(LayerSpec.of(plan)) if plan else 'structure'}.")
        check(spec.path, op._factor_shapes(spec, plan))  # EKFAC adds its eigenbases
    for n in others:
        numel = params[n].numel()
        check(n, {op.other: (numel,) if op.other == "diagonal" else (numel, numel)})
