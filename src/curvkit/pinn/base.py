"""The PINN problem type: pointwise derivatives, collocation batches, ``Problem`` and its checks.

Also the default network (``mlp``) and seeded random streams. The catalogue of problems with
exact solutions (Poisson, heat, log-Fokker–Planck, user-defined linear PDEs) is
``curvkit.pinn.problems``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["Batch", "Derivatives", "Problem", "mlp", "seeded_stream"]


class Derivatives(NamedTuple):
    """Pointwise derivatives of a scalar function ``u`` on a batch of ``N`` points in ``D`` dims.

    Attributes:
        value: ``u(x)``, shape ``(N,)``.
        gradient: ``∇u(x)``, shape ``(N, D)``.
        laplacian: ``Σ_{i ∈ S} ∂²u/∂x_i²`` over the problem's ``laplacian_dims`` ``S``, ``(N,)``.
    """

    value: Tensor
    gradient: Tensor
    laplacian: Tensor


class Batch(NamedTuple):
    """Collocation points: ``interior`` of shape ``(N_Ω, D)`` and ``boundary`` ``(N_∂, D)``."""

    interior: Tensor
    boundary: Tensor


InteriorResidual = Callable[[Tensor, Derivatives], Tensor]


@dataclass(frozen=True)
class Problem:
    """A PDE on a box with a known solution, for training and evaluating a PINN.

    The interior residual is ``residual(X, Derivatives)`` (zero for the exact solution) and the
    boundary residual is ``u(X) - solution(X)`` on the boundary points.

    Attributes:
        name: Short name used in histories and plots.
        dim: Input dimension ``D`` (for time-dependent problems ``t`` is coordinate 0).
        lower: Lower corner of the domain, shape ``(D,)``.
        upper: Upper corner of the domain, shape ``(D,)``.
        residual: Interior residual ``(X: (N, D), Derivatives) -> (N,)``.
        solution: Exact solution ``(N, D) -> (N,)``.
        boundary_sampler: ``(n, generator, dtype) -> (n, D)`` points where the Dirichlet / initial
            condition is imposed.
        laplacian_dims: Coordinates summed in ``Derivatives.laplacian`` (all when None).
        hidden: Widths of the default network's hidden layers (tanh MLP).
        num_interior: Default number of interior points per step.
        num_boundary: Default number of boundary points per step.
    """

    name: str
    dim: int
    lower: Tensor
    upper: Tensor
    residual: InteriorResidual
    solution: Callable[[Tensor], Tensor]
    boundary_sampler: Callable[[int, torch.Generator | None, torch.dtype], Tensor]
    laplacian_dims: tuple[int, ...] | None = None
    hidden: tuple[int, ...] = (64, 64, 48, 48)
    num_interior: int = 3000
    num_boundary: int = 500
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"{self.name}: dim must be an int >= 1; got {self.dim!r}.")
        if not isinstance(self.lower, Tensor) or not isinstance(self.upper, Tensor):
            raise ValueError(
                f"{self.name}: lower and upper must be tensors; got "
                f"{type(self.lower).__name__} and {type(self.upper).__name__}."
            )
        if self.lower.shape != (self.dim,) or self.upper.shape != (self.dim,):
            raise ValueError(
                f"{self.name}: lower and upper must have shape ({self.dim},); got "
                f"{tuple(self.lower.shape)} and {tuple(self.upper.shape)}."
            )
        # The samplers draw uniformly in the box: an empty, inverted or infinite one would give
        # points outside the domain or inf / NaN coordinates.
        lo, hi = self.lower.double(), self.upper.double()
        if not bool((torch.isfinite(lo) & torch.isfinite(hi) & (lo < hi)).all()):
            raise ValueError(
                f"{self.name}: need finite lower < upper in every coordinate; got lower "
                f"{self.lower.tolist()} and upper {self.upper.tolist()}."
            )
        _check_dims(self.laplacian_dims, self.dim, self.name)

    def interior_residual(self, X: Tensor, d: Derivatives) -> Tensor:
        """``residual(X, d)``, checked to hold one value per point, shape ``(N,)``."""
        return self._checked(self.residual(X, d), X, "interior residual")

    def _checked(self, values: Tensor, X: Tensor, what: str) -> Tensor:
        # An (N, 1) output would broadcast against the (N,) network values into (N, N).
        if not isinstance(values, Tensor) or values.shape != (X.shape[0],):
            got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(
                f"{self.name}: the {what} must return shape ({X.shape[0]},) (one value per "
                f"point); got {got}."
            )
        return values

    @property
    def laplacian_index(self) -> tuple[int, ...]:
        """The Laplacian's coordinates as a tuple (all ``D`` when ``laplacian_dims`` is None)."""
        return tuple(range(self.dim)) if self.laplacian_dims is None else self.laplacian_dims

    def sample_interior(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Uniform points in the box, shape ``(n, D)``, drawn on the CPU and put on ``device``.

        Drawing on the CPU gives the same points for the same seed on every device.
        """
        return _uniform(self.lower, self.upper, n, generator, dtype).to(device)

    def sample_boundary(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Points where the boundary / initial condition holds, shape ``(n, D)``, on ``device``."""
        return self.boundary_sampler(n, generator, dtype).to(device)

    def sample(
        self,
        num_interior: int | None = None,
        num_boundary: int | None = None,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> Batch:
        """A fresh batch of collocation points (the problem's default sizes when None).

        The points are drawn on the CPU (``generator`` is a CPU generator) and put on ``device``.
        """
        n_in = self.num_interior if num_interior is None else num_interior
        n_bd = self.num_boundary if num_boundary is None else num_boundary
        for what, n in (("num_interior", n_in), ("num_boundary", n_bd)):
            try:  # integers of any kind; int() would truncate 2.5 to 2 points
                operator.index(n)
            except TypeError:
                raise ValueError(f"{self.name}.sample: {what} must be an int; got {n!r}.") from None
        n_in, n_bd = operator.index(n_in), operator.index(n_bd)
        if n_in < 1 or n_bd < 1:
            raise ValueError(
                f"{self.name}.sample: need at least one interior and one boundary point; got "
                f"num_interior={n_in}, num_boundary={n_bd}."
            )
        interior = self.sample_interior(n_in, generator=generator, dtype=dtype, device=device)
        boundary = self.sample_boundary(n_bd, generator=generator, dtype=dtype, device=device)
        return Batch(interior, boundary)

    def boundary_target(self, X: Tensor) -> Tensor:
        """Dirichlet / initial data on boundary points ``(N, D)``: the exact solution, ``(N,)``."""
        return self._checked(self.solution(X), X, "solution")

    def default_model(
        self, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
    ) -> nn.Sequential:
        """The problem's default tanh MLP ``D → hidden → 1`` (PyTorch's default initialisation)."""
        return mlp(self.dim, self.hidden, generator=generator, dtype=dtype)

    def l2_error(self, model: Callable[[Tensor], Tensor], X: Tensor) -> float:
        """``sqrt(mean((u_θ(X) - u*(X))²))`` on held-out points ``X: (N, D)``.

        Most solutions here have unit L2 norm on the domain, so this is roughly a relative error.
        """
        _check_fits(model, X, "X has", f"{type(self).__name__}.l2_error")
        with torch.no_grad():
            u = model(X)
            if u.shape not in ((X.shape[0],), (X.shape[0], 1)):
                raise ValueError(
                    f"{type(self).__name__}.l2_error: the model must give one value per point, "
                    f"shape ({X.shape[0]},) or ({X.shape[0]}, 1); got {tuple(u.shape)}."
                )
            u = u.reshape(-1)
            exact = self._checked(self.solution(X), X, "solution")
            return float((u - exact).square().mean().sqrt())


def _check_dims(
    laplacian_dims: Sequence[int] | None, D: int, caller: str
) -> tuple[int, ...] | None:
    if laplacian_dims is None:
        return None
    dims = tuple(laplacian_dims)
    if (not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < D for i in dims)
            or len(set(dims)) != len(dims)):
        raise ValueError(f"{caller}: laplacian_dims must be distinct integers in [0, {D}); "
                         f"got {laplacian_dims!r}.")
    return dims


def _check_fits(model: object, X: Tensor, what: str, caller: str) -> None:
    """Points ``X`` a module can take: its parameters' dtype and device, its input width."""
    if not isinstance(model, nn.Module):
        return
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is not None and X.device != p.device:
        raise ValueError(
            f"{caller}: {what} device {X.device} but the model's parameters are on {p.device}; "
            "sample the points on the model's device (problem.sample(..., device=...)) or move "
            "the model."
        )
    if p is not None and X.dtype != p.dtype:
        raise ValueError(
            f"{caller}: {what} dtype {X.dtype} but the model's parameters {p.dtype}; sample the "
            "points in the model's dtype (problem.sample(..., dtype=...)) or convert the model."
        )
    if isinstance(model, nn.Sequential):
        first = next((m for m in model if type(m) is not nn.Identity), None)
        if isinstance(first, nn.Linear) and first.in_features != X.shape[1]:
            raise ValueError(
                f"{caller}: the model's first Linear takes {first.in_features} inputs but the "
                f"points have {X.shape[1]} coordinates."
            )


def seeded_stream(seed: int, *keys: int, device=None) -> torch.Generator:
    """A generator for one random stream of a seeded run, e.g. ``(seed, purpose, step)``.

    Streams of different ``(seed, *keys)`` are independent (NumPy's ``SeedSequence`` mixes
    them); ``seed + k`` would give seed ``s``'s ``k``-th stream to seed ``s + 1`` as its
    ``(k - 1)``-th, so that runs of neighbouring seeds shared points or sketches.
    """
    entropy = [int(v) % (1 << 64) for v in (seed, *keys)]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def mlp(
    in_dim: int,
    hidden: Sequence[int],
    *,
    out_dim: int = 1,
    activation: type[nn.Module] = nn.Tanh,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    """A ``Linear``/activation MLP ``in_dim → hidden… → out_dim`` with PyTorch's default init.

    Args:
        in_dim: Input dimension.
        hidden: Hidden widths, e.g. ``(64, 64, 48, 48)``.
        out_dim: Output dimension.
        activation: Activation module class placed after every hidden ``Linear``.
        generator: Seeds the initialisation (the global RNG is not touched when given).
        dtype: Parameter dtype.

    Returns:
        The network as an ``nn.Sequential``.
    """
    widths = [int(in_dim), *(int(h) for h in hidden), int(out_dim)]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        if generator is None:
            layer = nn.Linear(fan_in, fan_out, dtype=dtype)
        else:
            # Not initialised by nn.Linear (that would draw from the global RNG), but with the
            # same distribution as nn.Linear.reset_parameters, from the caller's generator.
            layer = nn.utils.skip_init(nn.Linear, fan_in, fan_out, dtype=dtype)
            bound = 1.0 / math.sqrt(fan_in)
            with torch.no_grad():
                for p in (layer.weight, layer.bias):
                    p.copy_(
                        torch.rand(p.shape, generator=generator, dtype=dtype) * 2 * bound - bound
                    )
        layers.append(layer)
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def _uniform(lower: Tensor, upper: Tensor, n: int, generator, dtype) -> Tensor:
    U = torch.rand(n, lower.shape[0], generator=generator, dtype=dtype)
    return lower.to(dtype) + U * (upper - lower).to(dtype)
