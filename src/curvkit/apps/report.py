"""A curvature report of (model, loss, data): spectra, traces, diagonals and KFAC/EKFAC quality.

``curvature_report`` computes every number from the operators of ``curvkit.curvature`` and the
algorithms of ``curvkit.linalg``; ``plot_report`` draws them. The ``curvkit report`` command is
a thin wrapper around the two.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from curvkit import linalg
from curvkit.curvature import EKFAC, GGN, KFAC, Hessian
from curvkit.curvature.losses import output_loss

__all__ = ["ReportOptions", "curvature_report", "plot_report"]


@dataclass(frozen=True)
class ReportOptions:
    """Budgets of the report.

    Attributes:
        top_k: Number of extreme eigenpairs of the Hessian and the GGN.
        num_matvecs: Products per trace/diagonal estimate.
        num_directions: Random directions for the KFAC/EKFAC comparison.
        slq_probes, slq_matvecs: Stochastic Lanczos quadrature budget for the densities.
        seed: Seed of every random probe.
        progress: Show progress bars on stderr: one over the report's stages and, below it,
            the curvature operators' bars over the data of each pass.
    """

    top_k: int = 8
    num_matvecs: int = 40
    num_directions: int = 16
    slq_probes: int = 4
    slq_matvecs: int = 40
    seed: int = 0
    progress: bool = True
    steps: list[str] = field(default_factory=list)


_TRACE_METHODS = ("hutchinson", "hutch++", "xtrace")
_DIAGONAL_METHODS = ("hutchinson", "xdiag")
# loss and gradient, two eigsh, traces of two operators, exact and estimated GGN diagonals,
# KFAC and EKFAC factors, two densities
_NUM_STAGES = 1 + 2 + 2 * len(_TRACE_METHODS) + 1 + len(_DIAGONAL_METHODS) + 2 + 2
# The GGN density is of log10(λ + ε); eigenvalues below NEAR_ZERO_FACTOR · ε are reported as
# "near zero" (a log axis would push them off its left end): with ε = 1e-8 λ_max in float64,
# below 1e-6 λ_max.
NEAR_ZERO_FACTOR = 100.0


def _mass_below(grid: Tensor, density: Tensor, epsilon: float, threshold: float) -> float:
    """Fraction of a log-scale SLQ density's mass at ``λ <= threshold``.

    ``density`` is the density of ``u = log10(λ + ε)`` on ``grid`` (λ values), as
    ``spectral_density(..., scale="log")`` returns it; the mass is its trapezoid integral in
    ``u`` up to ``log10(threshold + ε)``, over the integral on the whole grid.
    """
    u = torch.log10(grid.double() + epsilon)
    dens = density.double()
    steps = 0.5 * (dens[1:] + dens[:-1]) * (u[1:] - u[:-1])
    cumulative = torch.cat([steps.new_zeros(1), steps.cumsum(0)])
    total = cumulative[-1].item()
    if not total > 0:
        return math.nan
    cut = math.log10(threshold + epsilon)
    # Linear interpolation of the cumulative mass at the cut; u increases along the grid and the
    # density is >= 0, so the cumulative mass is monotone and the fraction lies in [0, 1].
    mass = float(np.interp(cut, u.cpu().numpy(), cumulative.cpu().numpy()))
    return mass / total


def _rel(a: Tensor, b: Tensor) -> float:
    err, ref = torch.linalg.norm(a - b).item(), torch.linalg.norm(b).item()
    if ref == 0.0:  # a zero reference (e.g. a zero GGN): exact match or infinitely off, not 0/0
        return 0.0 if err == 0.0 else math.inf
    return err / ref


def _loss_and_gradient(
    model: nn.Module, loss_fn: nn.Module, data: Iterable
) -> tuple[float, float, int]:
    """Loss over all data under the loss's reduction, and the gradient norm; one pass.

    Batches contribute their sum-reduced loss; the total is divided by the number of loss terms
    that PyTorch's mean divides by (class-weighted tokens, probability-target rows, output
    entries), exactly as the curvature operators normalise.
    """
    from curvkit import distributed

    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) for p in params]
    wrapped = output_loss(loss_fn, caller="curvature_report", analytic=True)
    total, count = 0.0, 0.0
    for X, y in data:
        output = model(X)
        wrapped.check(output, y)
        loss = wrapped.sum_loss(output, y, y.shape[0])
        for g, gi in zip(grads, torch.autograd.grad(loss, params)):
            g += gi
        total += loss.item()
        count += float(wrapped.count(y, y.shape[0]))
    if distributed.is_distributed():
        # Each rank holds a shard, and the operators below are those of the union of the shards:
        # the loss and the gradient must be of the union too.
        grads = distributed.all_reduce_sum(grads)
        sums = torch.tensor([total, count], dtype=torch.float64, device=grads[0].device)
        total, count = distributed.all_reduce_sum([sums])[0].tolist()
    if loss_fn.reduction == "mean" and count <= 0:
        raise ValueError("curvature_report: data holds no loss terms (no batches, or every "
                         "target ignored).")
    scale = 1.0 / count if loss_fn.reduction == "mean" else 1.0
    grad_norm = math.sqrt(sum((scale * g).pow(2).sum().item() for g in grads))
    return total * scale, grad_norm, sum(p.numel() for p in params)


def curvature_report(
    model: nn.Module,
    loss_fn: nn.Module,
    data: list,
    options: ReportOptions | None = None,
    log=print,
) -> dict:
    """Compute the curvature report of ``model`` under ``loss_fn`` on ``data``.

    Args:
        model: Deterministic module (eval mode), called as ``model(X)``.
        loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss``.
        data: Re-iterable of ``(X, y)`` batches.
        options: Budgets; defaults to ``ReportOptions()``.
        log: Called with one line of text per finished step.

    Returns:
        A JSON-serialisable dict of every number (see the keys below), plus ``"_arrays"``
        holding the eigenvalues and densities for plotting. ``"ggn_density"`` describes the
        GGN's log-scale density: its shift ``epsilon``, and the fraction of the spectrum at
        ``λ <= near_zero_threshold`` (``100 ε``: ``1e-6 λ_max`` in float64), which the log
        scale would otherwise hide at its left end.
    """
    opt = options or ReportOptions()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"curvature_report: the model ({type(model).__name__}) has no trainable parameters; "
            "the curvature is taken with respect to the parameters that require grad."
        )
    g = torch.Generator(device=trainable[0].device).manual_seed(opt.seed)
    gen = lambda: torch.Generator(device=g.device).manual_seed(opt.seed)  # noqa: E731 same probes for every operator
    # The operators' own bars (one per pass over the data) sit below the report's stage bar.
    common = dict(progress=opt.progress, check_deterministic=True)
    timings: dict[str, float] = {}
    bar = None
    if opt.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=_NUM_STAGES, desc="curvature report", unit="stage")

    def timed(name, fn):
        if bar is not None:
            bar.set_postfix_str(name)
        t0 = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t0
        line = f"  {name:<34s} {timings[name]:6.2f} s"
        if bar is None:
            log(line)
        else:
            bar.update(1)
            with tqdm.external_write_mode():  # a printed line would break the bar's line
                log(line)
        return out

    try:
        return _compute(model, loss_fn, data, opt, common, g, gen, timed, timings)
    finally:
        if bar is not None:
            bar.close()


def _compute(model, loss_fn, data, opt, common, g, gen, timed, timings) -> dict:
    """The body of ``curvature_report``: every stage through ``timed``."""
    loss, grad_norm, num_params = timed(
        "loss and gradient", lambda: _loss_and_gradient(model, loss_fn, data)
    )
    H = Hessian(model, loss_fn, data, **common)
    common["check_deterministic"] = False  # checked once above; the model does not change
    G = GGN(model, loss_fn, data, **common)
    # eigsh finds up to all n eigenpairs (k <= n); a one-parameter model has one.
    k = min(opt.top_k, num_params)

    evals_H, evecs_H = timed(
        "Hessian top eigenpairs", lambda: linalg.eigsh(H, k, which="LA", generator=gen(), tol=1e-3)
    )
    evals_G, evecs_G = timed(
        "GGN top eigenpairs", lambda: linalg.eigsh(G, k, which="LA", generator=gen(), tol=1e-3)
    )
    overlap = (torch.linalg.norm(evecs_H.T @ evecs_G) ** 2 / k).item()

    traces = {}
    for name, op in (("hessian", H), ("ggn", G)):
        traces[name] = {
            method: timed(
                f"{name} trace ({method})",
                lambda op=op, m=method: linalg.trace(
                    op, method=m, num_matvecs=opt.num_matvecs, generator=gen()
                ).item(),
            )
            for method in _TRACE_METHODS
        }
    diag_exact = timed("GGN exact diagonal", lambda: G.diagonal())
    traces["ggn"]["exact"] = diag_exact.sum().item()
    diag_est = {
        method: _rel(
            timed(
                f"GGN diagonal ({method})",
                lambda m=method: linalg.diagonal(
                    G, method=m, num_matvecs=opt.num_matvecs, generator=gen()
                ),
            ),
            diag_exact,
        )
        for method in _DIAGONAL_METHODS
    }

    Z = torch.randn(num_params, opt.num_directions, generator=g, dtype=G.dtype, device=G.device)
    GZ, GV = G @ Z, evals_G * evecs_G  # G V = V Λ for the eigenvectors
    kfac_quality = {}
    for name, cls in (("kfac", KFAC), ("ekfac", EKFAC)):
        op = timed(
            f"{name.upper()} factors",
            lambda cls=cls: cls(model, loss_fn, data, fisher="type2", **common),
        )
        kfac_quality[name] = {
            "top_eigenspace_rel_error": _rel(op @ evecs_G, GV),
            "random_directions_rel_error": _rel(op @ Z, GZ),
        }

    # Round-off leaves Ritz values of the PSD GGN slightly below zero (~eps·λ_max); shift the
    # log scale past them rather than reject the spectrum. A zero GGN (e.g. saturated softmax
    # outputs) has no scale: any ε > 0 will do.
    epsilon = max(1e-8, 100 * torch.finfo(G.dtype).eps) * (max(evals_G.max().item(), 0.0) or 1.0)
    grid_G, dens_G = timed(
        "GGN spectral density (log)",
        lambda: linalg.spectral_density(
            G,
            num_probes=opt.slq_probes,
            num_matvecs=opt.slq_matvecs,
            scale="log",
            epsilon=epsilon,
            generator=gen(),
            kernel_width=0.02,
        ),
    )
    # Overparameterised nets put most GGN eigenvalues at ~0, which the log scale maps to its
    # far left end (log10 ε): report that mass as a number, and the plot annotates it.
    threshold = NEAR_ZERO_FACTOR * epsilon
    ggn_density = {
        "scale": "log",
        "epsilon": epsilon,
        "near_zero_threshold": threshold,
        "near_zero_fraction": _mass_below(grid_G, dens_G, epsilon, threshold),
    }
    grid_H, dens_H = timed(
        "Hessian spectral density",
        lambda: linalg.spectral_density(
            H,
            num_probes=opt.slq_probes,
            num_matvecs=opt.slq_matvecs,
            scale="linear",
            generator=gen(),
        ),
    )

    return {
        "num_params": num_params,
        "loss": loss,
        "gradient_norm": grad_norm,
        "hessian_top_eigenvalues": evals_H.sort(descending=True).values.tolist(),
        "ggn_top_eigenvalues": evals_G.sort(descending=True).values.tolist(),
        "top_eigenspace_overlap_hessian_ggn": overlap,
        "trace": traces,
        "ggn_diagonal_rel_error": diag_est,
        "kfac_vs_ggn": kfac_quality,
        "ggn_density": ggn_density,
        "seconds": timings,
        "_arrays": {"ggn_density": (grid_G, dens_G), "hessian_density": (grid_H, dens_H)},
    }


def _plot_ggn_density(ax, report: dict) -> None:
    """The GGN's log-scale density on a symlog λ axis, with its near-zero mass annotated.

    A log axis cannot show λ <= 0 and puts the eigenvalues at ~0 (most of them for an
    overparameterised net) at its far left end, where the eye reads them as a small bump. The
    symlog axis is linear below the report's ``near_zero_threshold``, so that mass appears at
    λ = 0; the shaded band and the text give its fraction (``report["ggn_density"]``).
    """
    grid, dens = (t.cpu() for t in report["_arrays"]["ggn_density"])
    info = report["ggn_density"]
    threshold, fraction = info["near_zero_threshold"], info["near_zero_fraction"]
    ax.plot(grid, dens)
    ax.set_xscale("symlog", linthresh=threshold)
    # Ticks at 0 and at the decades above the linear band: the default locator also marks
    # decades inside the band, whose labels then overprint the 0.
    top = max(float(grid.max()), threshold)
    ax.set_xticks([0.0] + [10.0 ** k for k in range(math.ceil(math.log10(threshold)),
                                                    math.floor(math.log10(top)) + 1)])
    ax.axvspan(min(float(grid.min()), 0.0), threshold, color="0.85", zorder=0)
    ax.text(0.98, 0.95, f"{fraction:.1%} of the spectrum at λ ≤ {threshold:.1e}",
            transform=ax.transAxes, ha="right", va="top",
            bbox=dict(facecolor="white", edgecolor="0.7", alpha=0.9))
    ax.set(
        title="GGN spectral density (SLQ)",
        xlabel=f"eigenvalue (symlog, linear below {threshold:.1e})",
        ylabel="density of log10(λ + ε)",
    )


def plot_report(report: dict, path) -> None:
    """Write a PNG figure of a report: GGN density (log scale), Hessian density, eigenvalue bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    _plot_ggn_density(axes[0], report)
    grid, dens = (t.cpu() for t in report["_arrays"]["hessian_density"])
    axes[1].plot(grid, dens)
    axes[1].set_yscale("log")
    axes[1].set_ylim(bottom=float(dens.max()) * 1e-6)  # below that is kernel tails, not spectrum
    axes[1].set(title="Hessian spectral density (SLQ)", xlabel="eigenvalue", ylabel="density")
    k = len(report["ggn_top_eigenvalues"])
    idx = torch.arange(k)
    axes[2].bar(idx - 0.2, report["hessian_top_eigenvalues"], width=0.4, label="Hessian")
    axes[2].bar(idx + 0.2, report["ggn_top_eigenvalues"], width=0.4, label="GGN")
    values = [*report["hessian_top_eigenvalues"], *report["ggn_top_eigenvalues"]]
    if min(values) > 0:
        axes[2].set_yscale("log")
    elif max(map(abs, values)) > 0:
        # The Hessian's top eigenvalues can be negative (a log axis would drop those bars) and
        # the GGN's can be zero: a symmetric log axis shows them all.
        axes[2].set_yscale("symlog", linthresh=1e-3 * max(map(abs, values)))
    axes[2].set(
        title=f"top-{k} eigenvalues (overlap {report['top_eigenspace_overlap_hessian_ggn']:.2f})",
        xlabel="index",
    )
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
