"""The axes ``plot_report`` draws on, for tests that inspect them (it closes its figure)."""

from __future__ import annotations

import pytest

from curvkit.apps.report import plot_report


def plotted_axes(report: dict, path):
    """Write ``report``'s PNG to ``path`` and return its three axes."""
    import matplotlib.pyplot as plt

    created, real_subplots = [], plt.subplots

    def spy(*args, **kwargs):
        fig, axes = real_subplots(*args, **kwargs)
        created.append(axes)
        return fig, axes

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt, "subplots", spy)
        plot_report(report, path)
    return created[0]
