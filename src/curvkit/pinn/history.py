"""Training histories: the per-step record of a PINN run, saved as JSON and plotted as PNG.

The JSON is strict (no ``NaN`` or ``Infinity`` tokens, which most parsers other than Python's
reject). A float JSON cannot hold is written as ``null`` when it is NaN — an undefined value, as
``curvkit report`` writes undefined numbers — and as the string ``"inf"`` or ``"-inf"`` when it
is infinite (``float("inf")`` reads it back). This holds for the per-step lists and for ``meta``
alike; ``load`` restores NaN and ±inf in the lists and ±inf in ``meta``, where ``null`` reads
back as ``None`` (``meta`` holds the run's options, which may be ``None`` or infinite, e.g.
SPRING's ``norm_constraint``, but never NaN: every optimizer rejects NaN options).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["History", "plot_histories"]

_SERIES = ("step", "time", "loss", "l2_error", "step_size")
_INFINITIES = {"inf": math.inf, "-inf": -math.inf}


def _encode(value):
    """``value`` with NaN as ``None`` and ±inf as ``"inf"``/``"-inf"``, nested containers too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {key: _encode(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):  # the type is kept: resume compares options exactly
        return type(value)(_encode(v) for v in value)
    return value


def _decode(value):
    """Inverse of ``_encode`` for ``meta``: ``"inf"``/``"-inf"`` back to floats (None stays)."""
    if isinstance(value, str):
        return _INFINITIES.get(value, value)
    if isinstance(value, Mapping):
        return {key: _decode(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_decode(v) for v in value)
    return value


def _decode_series(values, key: str) -> list[float]:
    """A per-step list read back: ``None`` is NaN, ``"inf"``/``"-inf"`` are ±inf."""
    out = []
    for v in values:
        if v is None:
            out.append(math.nan)
        elif isinstance(v, str):
            if v not in _INFINITIES:
                raise ValueError(
                    f"History.from_dict: {key} holds the string {v!r}; expected numbers, null "
                    "(NaN), 'inf' or '-inf'."
                )
            out.append(_INFINITIES[v])
        else:
            out.append(float(v))
    return out


@dataclass
class History:
    """What a run did, one entry per recorded step.

    Attributes:
        step: Step index after the update (1-based); ``0`` is the initial model.
        time: Training wall-clock seconds at that point (evaluation time excluded).
        loss: Loss ``½‖r̃‖²`` on the step's batch before the update (for ``step = 0``: the first
            batch's loss at initialisation).
        l2_error: L2 error on the held-out points after the update.
        step_size: The step size the optimizer took (Adam: its learning rate; NaN at step 0).
        meta: Problem, method and options of the run.
    """

    step: list[int] = field(default_factory=list)
    time: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    l2_error: list[float] = field(default_factory=list)
    step_size: list[float] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def append(
        self, *, step: int, time: float, loss: float, l2_error: float, step_size: float = math.nan
    ) -> None:
        """Record one point."""
        self.step.append(int(step))
        self.time.append(float(time))
        self.loss.append(float(loss))
        self.l2_error.append(float(l2_error))
        self.step_size.append(float(step_size))

    def pop(self) -> None:
        """Remove the last point."""
        for values in (self.step, self.time, self.loss, self.l2_error, self.step_size):
            values.pop()

    def time_to_reach(self, l2_error: float) -> float:
        """First time at which the L2 error is ``<= l2_error`` (``inf`` if never)."""
        for t, e in zip(self.time, self.l2_error):
            if e <= l2_error:
                return t
        return math.inf

    def to_dict(self) -> dict:
        """A dict that strict JSON can hold: NaN becomes ``None``, ±inf ``"inf"``/``"-inf"``.

        The same encoding applies inside ``meta`` (see the module docstring).
        """
        return _encode(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping) -> History:
        """Inverse of ``to_dict`` (also reads the raw floats of an unencoded dict).

        Raises:
            ValueError: If the per-step lists differ in length or hold strings other than
                ``"inf"``/``"-inf"``.
        """
        series = {
            key: _decode_series(data[key], key) for key in ("time", "loss", "l2_error")
        }
        step_size = data.get("step_size", [None] * len(data["step"]))
        history = cls(
            step=[int(s) for s in data["step"]],
            step_size=_decode_series(step_size, "step_size"),
            meta=_decode(dict(data.get("meta", {}))),
            **series,
        )
        # One entry per step in every list: zip() in time_to_reach and the plot would otherwise
        # pair values of different steps without a word.
        lengths = {key: len(getattr(history, key)) for key in _SERIES}
        if len(set(lengths.values())) > 1:
            got = ", ".join(f"{key}: {n}" for key, n in lengths.items())
            raise ValueError(
                f"History.from_dict: the per-step lists must have the same length; got {got}."
            )
        return history

    def save(self, path: str | Path) -> None:
        """Write the history as strict JSON (non-finite floats encoded as ``to_dict`` does).

        Raises:
            TypeError: If ``meta`` holds a value JSON cannot represent (e.g. a tensor).
        """
        # allow_nan=False: a non-finite float that escaped the encoding fails here instead of
        # writing a file that strict JSON parsers reject.
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))

    @classmethod
    def load(cls, path: str | Path) -> History:
        """Read a history written by ``save``."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def plot(self, path: str | Path, *, label: str | None = None) -> None:
        """Plot L2 error and loss against wall-clock time into a PNG file."""
        plot_histories({label or self.meta.get("method", "run"): self}, path)


def plot_histories(
    histories: Mapping[str, History], path: str | Path, *, title: str | None = None
) -> None:
    """L2 error and loss against wall-clock time, one line per run, as a PNG.

    Args:
        histories: ``{label: History}``.
        path: Output file (``.png``).
        title: Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A log axis cannot show values <= 0 (e.g. an exact fit's zero loss): NaN leaves a gap
    # where matplotlib would warn "Data has no positive values" for a series without others.
    positive = lambda xs: [x if x > 0 else math.nan for x in xs]  # noqa: E731
    fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for label, h in histories.items():
        t = [max(x, 1e-3) for x in h.time]  # log axis: the initial point sits at t = 1 ms
        ax_err.loglog(t, positive(h.l2_error), label=label)
        ax_loss.loglog(t, positive(h.loss), label=label)
    ax_err.set(xlabel="wall-clock time [s]", ylabel="L2 error")
    ax_loss.set(xlabel="wall-clock time [s]", ylabel="loss")
    for ax in (ax_err, ax_loss):
        ax.grid(True, which="both", alpha=0.3)
    if ax_err.get_legend_handles_labels()[0]:  # else matplotlib warns of an empty legend
        ax_err.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
