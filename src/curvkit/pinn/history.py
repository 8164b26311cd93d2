"""Training histories: the per-step record of a PINN run, saved as JSON and plotted as PNG."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["History", "plot_histories"]

_SERIES = ("step", "time", "loss", "l2_error", "step_size")


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
        """A JSON-serialisable dict (NaN and inf become None)."""
        out = asdict(self)
        for key in ("time", "loss", "l2_error", "step_size"):
            out[key] = [v if math.isfinite(v) else None for v in out[key]]
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> History:
        """Inverse of ``to_dict``."""
        nan = lambda xs: [math.nan if v is None else float(v) for v in xs]  # noqa: E731
        history = cls(
            step=[int(s) for s in data["step"]],
            time=nan(data["time"]),
            loss=nan(data["loss"]),
            l2_error=nan(data["l2_error"]),
            step_size=nan(data.get("step_size", [None] * len(data["step"]))),
            meta=dict(data.get("meta", {})),
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
        """Write the history as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

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
