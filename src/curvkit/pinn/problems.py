"""PDE problems with exact solutions: Poisson, heat, log-Fokker–Planck, and user-defined ones.

A problem is a residual on the interior (a function of the point and of the network's value,
gradient and Laplacian there), a Dirichlet / initial condition on the boundary, samplers for both
and a default network. Everything is float64 unless the caller asks otherwise.

References:
    Müller & Zeinhofer (2023), "Achieving High Accuracy with PINNs via Energy Natural
    Gradients", ICML (arXiv 2302.13163).
    Guzmán-Cordero, Dangel, Goldshlager & Zeinhofer (2025), "Improving Energy Natural Gradient
    Descent through Woodbury, Momentum, and Randomization", NeurIPS (arXiv 2505.12149).
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

__all__ = [
    "Batch",
    "Derivatives",
    "Problem",
    "poisson",
    "heat",
    "log_fokker_planck",
    "linear_pde",
    "mlp",
]


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
        if self.lower.shape != (self.dim,) or self.upper.shape != (self.dim,):
            raise ValueError(
                f"{self.name}: lower and upper must have shape ({self.dim},); got "
                f"{tuple(self.lower.shape)} and {tuple(self.upper.shape)}."
            )
        dims = self.laplacian_dims
        if dims is not None and (
            not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.dim
                    for i in dims)
            or len(set(dims)) != len(dims)
        ):
            raise ValueError(
                f"{self.name}: laplacian_dims must be distinct integers in [0, {self.dim}); "
                f"got {dims!r}."
            )

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
    ) -> Tensor:
        """Uniform points in the box, shape ``(n, D)``."""
        return _uniform(self.lower, self.upper, n, generator, dtype)

    def sample_boundary(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> Tensor:
        """Points where the boundary / initial condition holds, shape ``(n, D)``."""
        return self.boundary_sampler(n, generator, dtype)

    def sample(
        self,
        num_interior: int | None = None,
        num_boundary: int | None = None,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> Batch:
        """A fresh batch of collocation points (the problem's default sizes when None)."""
        n_in = self.num_interior if num_interior is None else int(num_interior)
        n_bd = self.num_boundary if num_boundary is None else int(num_boundary)
        if n_in < 1 or n_bd < 1:
            raise ValueError(
                f"{self.name}.sample: need at least one interior and one boundary point; got "
                f"num_interior={n_in}, num_boundary={n_bd}."
            )
        interior = self.sample_interior(n_in, generator=generator, dtype=dtype)
        return Batch(interior, self.sample_boundary(n_bd, generator=generator, dtype=dtype))

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
            u = model(X).reshape(-1)
            exact = self._checked(self.solution(X), X, "solution")
            return float((u - exact).square().mean().sqrt())


def _check_fits(model: object, X: Tensor, what: str, caller: str) -> None:
    """Points ``X`` a module can take: its parameters' dtype and device, its input width."""
    if not isinstance(model, nn.Module):
        return
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is not None and (X.dtype != p.dtype or X.device != p.device):
        raise ValueError(
            f"{caller}: {what} dtype {X.dtype} but the model's parameters {p.dtype} (devices "
            f"{X.device}, {p.device}); sample the points in the model's dtype "
            "(problem.sample(..., dtype=...)) or convert the model."
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


# --------------------------------------------------------------------------- samplers
def _uniform(lower: Tensor, upper: Tensor, n: int, generator, dtype) -> Tensor:
    U = torch.rand(n, lower.shape[0], generator=generator, dtype=dtype)
    return lower.to(dtype) + U * (upper - lower).to(dtype)


def _box_boundary_sampler(lower: Tensor, upper: Tensor):
    """Uniform in the box, then one random coordinate set to its lower or upper bound."""

    def sample(n: int, generator, dtype) -> Tensor:
        X = _uniform(lower, upper, n, generator, dtype)
        d = lower.shape[0]
        coord = torch.randint(d, (n,), generator=generator)
        side = torch.randint(2, (n,), generator=generator).bool()
        face = torch.where(side, upper.to(dtype)[coord], lower.to(dtype)[coord])
        X[torch.arange(n), coord] = face
        return X

    return sample


def _space_time_boundary_sampler(lower: Tensor, upper: Tensor, *, lateral: bool):
    """Half the points at ``t = t_0`` (initial condition), half on the spatial boundary.

    Coordinate 0 is time. Without ``lateral`` all points lie on the initial slice.
    """
    spatial = _box_boundary_sampler(lower[1:], upper[1:])

    def sample(n: int, generator, dtype) -> Tensor:
        X = _uniform(lower, upper, n, generator, dtype)
        n_initial = n - n // 2 if lateral else n
        X[:n_initial, 0] = lower[0].to(dtype)
        if n_initial < n:
            X[n_initial:, 1:] = spatial(n - n_initial, generator, dtype)
        return X

    return sample


# --------------------------------------------------------------------------- problems
_POISSON_SOLUTIONS = ("sines", "cosines", "harmonic", "norm_squared")


def poisson(
    dim: int = 5,
    *,
    solution: str | None = None,
    hidden: Sequence[int] | None = None,
    num_interior: int | None = None,
    num_boundary: int | None = None,
) -> Problem:
    """Poisson's equation ``-Δu = f`` on ``[0, 1]^dim`` with Dirichlet data from the solution.

    Solutions (default by dimension, as in the ENGD papers):

    - ``"sines"`` (default for d = 2): ``Π_i sin(π x_i)``, ``f = d π² u``.
    - ``"cosines"`` (default for d = 5 and any other d): ``Σ_i cos(π x_i)``, ``f = π² u``.
    - ``"harmonic"`` (default for d = 10; needs even d): ``Σ_{i} x_{2i-1} x_{2i} / c``, ``f = 0``,
      with ``c`` the L2 norm on the cube (1.34 for d = 10).
    - ``"norm_squared"`` (default for d = 100): ``‖x‖² / c``, ``f = -2d / c``, ``c`` the L2 norm
      on the cube (33.47 for d = 100).

    Args:
        dim: Spatial dimension ``d >= 1``.
        solution: One of the names above, or None for the default.
        hidden: Hidden widths of the default network.
        num_interior: Default interior points per step.
        num_boundary: Default boundary points per step.

    Returns:
        The ``Problem``.

    Raises:
        ValueError: For an unknown solution, ``dim < 1`` or ``"harmonic"`` with odd ``dim``.
    """
    if dim < 1:
        raise ValueError(f"poisson: dim must be >= 1; got {dim}.")
    if solution is None:
        solution = {2: "sines", 10: "harmonic", 100: "norm_squared"}.get(dim, "cosines")
    if solution not in _POISSON_SOLUTIONS:
        raise ValueError(
            f"poisson: solution must be one of {_POISSON_SOLUTIONS}; got {solution!r}."
        )
    pi = math.pi
    if solution == "sines":

        def u(X: Tensor) -> Tensor:
            # A product of columns rather than .prod(): Taylor mode has a rule for mul.
            S = torch.sin(pi * X)
            out = S[:, 0]
            for i in range(1, dim):
                out = out * S[:, i]
            return out

        f = lambda X: dim * pi**2 * u(X)  # noqa: E731
    elif solution == "cosines":
        u = lambda X: torch.cos(pi * X).sum(dim=1)  # noqa: E731
        f = lambda X: pi**2 * u(X)  # noqa: E731
    elif solution == "harmonic":
        if dim % 2:
            raise ValueError(
                f"poisson: the 'harmonic' solution pairs coordinates; dim must be even, got {dim}."
            )
        # E[(Σ_{i≤m} x_{2i-1}x_{2i})²] = m/9 + m(m-1)/16 on the unit cube, m = d/2.
        m = dim // 2
        c = math.sqrt(m / 9 + m * (m - 1) / 16)
        u = lambda X: (X[:, 0::2] * X[:, 1::2]).sum(dim=1) / c  # noqa: E731
        f = lambda X: X.new_zeros(X.shape[0])  # noqa: E731
    else:
        # E[‖x‖⁴] = d/5 + d(d-1)/9 on the unit cube.
        c = math.sqrt(dim / 5 + dim * (dim - 1) / 9)
        u = lambda X: X.square().sum(dim=1) / c  # noqa: E731
        f = lambda X: X.new_full((X.shape[0],), -2.0 * dim / c)  # noqa: E731

    def residual(X: Tensor, d: Derivatives) -> Tensor:
        return -d.laplacian - f(X)

    lower, upper = torch.zeros(dim, dtype=torch.float64), torch.ones(dim, dtype=torch.float64)
    default_hidden = (
        (32, 32) if dim <= 2 else (64, 64, 48, 48) if dim <= 5 else (256, 256, 128, 128)
    )
    return Problem(
        name=f"poisson{dim}d",
        dim=dim,
        lower=lower,
        upper=upper,
        residual=residual,
        solution=u,
        boundary_sampler=_box_boundary_sampler(lower, upper),
        hidden=tuple(default_hidden if hidden is None else hidden),
        num_interior=(900 if dim <= 2 else 3000) if num_interior is None else num_interior,
        num_boundary=(120 if dim <= 2 else 500) if num_boundary is None else num_boundary,
        metadata={"solution": solution, "source": f},
    )


def heat(
    dim: int = 4,
    *,
    diffusivity: float = 0.25,
    hidden: Sequence[int] | None = None,
    num_interior: int | None = None,
    num_boundary: int | None = None,
) -> Problem:
    """The heat equation ``∂ₜu = κ Δₓu`` on ``(t, x) ∈ [0, 1]^{1+dim}``.

    The solution is ``u = exp(-4κ t) Σ_i sin(2 x_i)`` (``exp(-t)`` for the default ``κ = 1/4``).
    Coordinate 0 of each point is ``t``. Half the boundary points lie on ``t = 0`` (initial
    condition) and half on the spatial boundary at random ``t``.

    Args:
        dim: Number of spatial dimensions (1 and 4 in the papers).
        diffusivity: ``κ > 0``.
        hidden: Hidden widths of the default network.
        num_interior: Default interior points per step.
        num_boundary: Default boundary points per step.

    Returns:
        The ``Problem``.

    Raises:
        ValueError: If ``dim < 1`` or ``diffusivity <= 0``.
    """
    if dim < 1 or diffusivity <= 0:
        raise ValueError(
            f"heat: need dim >= 1 and diffusivity > 0; got dim={dim}, diffusivity={diffusivity}."
        )
    kappa = float(diffusivity)

    def u(X: Tensor) -> Tensor:
        return torch.exp(-4 * kappa * X[:, 0]) * torch.sin(2 * X[:, 1:]).sum(dim=1)

    def residual(X: Tensor, d: Derivatives) -> Tensor:
        return d.gradient[:, 0] - kappa * d.laplacian

    lower, upper = (
        torch.zeros(dim + 1, dtype=torch.float64),
        torch.ones(dim + 1, dtype=torch.float64),
    )
    return Problem(
        name=f"heat{dim}d",
        dim=dim + 1,
        lower=lower,
        upper=upper,
        residual=residual,
        solution=u,
        boundary_sampler=_space_time_boundary_sampler(lower, upper, lateral=True),
        laplacian_dims=tuple(range(1, dim + 1)),
        hidden=tuple((64, 64, 48, 48) if dim <= 1 else (256, 256, 128, 128))
        if hidden is None
        else tuple(hidden),
        num_interior=3000 if num_interior is None else num_interior,
        num_boundary=500 if num_boundary is None else num_boundary,
        metadata={"diffusivity": kappa},
    )


def log_fokker_planck(
    dim: int = 9,
    *,
    half_width: float = 5.0,
    hidden: Sequence[int] | None = None,
    num_interior: int | None = None,
    num_boundary: int | None = None,
) -> Problem:
    """The log-density form of the Fokker–Planck equation of an Ornstein–Uhlenbeck process.

    With drift ``μ(x) = -x/2`` and diffusion ``σ = √2 I``, the density ``p`` satisfies
    ``∂ₜp = -div(μ p) + ½ Tr(σσᵀ ∇²p)``. Its logarithm ``q = log p`` satisfies the nonlinear PDE

    ``∂ₜq - d/2 - ½ x·∇ₓq - ‖∇ₓq‖² - Δₓq = 0``

    (``div μ = -d/2``, ``½‖σᵀ∇q‖² = ‖∇q‖²``, ``½ Tr(σσᵀ ∇²q) = Δq``). The solution from
    ``p(0) = N(0, I)`` is ``q = log N(x; 0, s(t) I)`` with ``s(t) = 2 - exp(-t)``. The domain
    is ``(t, x) ∈ [0, 1] × [-w, w]^d`` and the boundary term is the initial condition at ``t = 0``.

    Args:
        dim: Number of spatial dimensions (9 in the paper).
        half_width: ``w``.
        hidden: Hidden widths of the default network.
        num_interior: Default interior points per step.
        num_boundary: Default boundary (initial-condition) points per step.

    Returns:
        The ``Problem``.

    Raises:
        ValueError: If ``dim < 1`` or ``half_width <= 0``.
    """
    if dim < 1 or half_width <= 0:
        raise ValueError(
            f"log_fokker_planck: need dim >= 1 and half_width > 0; got {dim}, {half_width}."
        )

    def u(X: Tensor) -> Tensor:
        s = 2 - torch.exp(-X[:, 0])
        x2 = X[:, 1:].square().sum(dim=1)
        return -0.5 * dim * torch.log(2 * math.pi * s) - x2 / (2 * s)

    def residual(X: Tensor, d: Derivatives) -> Tensor:
        grad_x = d.gradient[:, 1:]
        drift = 0.5 * (X[:, 1:] * grad_x).sum(dim=1)
        return d.gradient[:, 0] - 0.5 * dim - drift - grad_x.square().sum(dim=1) - d.laplacian

    lower = torch.cat([torch.zeros(1), torch.full((dim,), -float(half_width))]).double()
    upper = torch.cat([torch.ones(1), torch.full((dim,), float(half_width))]).double()
    return Problem(
        name=f"log_fokker_planck{dim}d",
        dim=dim + 1,
        lower=lower,
        upper=upper,
        residual=residual,
        solution=u,
        boundary_sampler=_space_time_boundary_sampler(lower, upper, lateral=False),
        laplacian_dims=tuple(range(1, dim + 1)),
        hidden=tuple((256, 256, 128, 128) if hidden is None else hidden),
        num_interior=3000 if num_interior is None else num_interior,
        num_boundary=1000 if num_boundary is None else num_boundary,
    )


def linear_pde(
    solution: Callable[[Tensor], Tensor],
    *,
    dim: int,
    source: Callable[[Tensor], Tensor],
    laplacian: float = 1.0,
    gradient: Sequence[float] | Tensor | None = None,
    value: float = 0.0,
    lower: Sequence[float] | Tensor | None = None,
    upper: Sequence[float] | Tensor | None = None,
    laplacian_dims: Sequence[int] | None = None,
    name: str = "linear_pde",
    hidden: Sequence[int] = (64, 64, 48, 48),
    num_interior: int = 3000,
    num_boundary: int = 500,
) -> Problem:
    """A user-defined linear PDE ``a Δ_S u + b·∇u + c u = f`` on a box, Dirichlet data from ``u*``.

    The differential operators are those of ``Derivatives`` (the value, the gradient and the
    Laplacian over ``laplacian_dims`` ``S``), which the residual code evaluates by collapsed
    Taylor mode; for an arbitrary residual, build a ``Problem`` directly.

    Args:
        solution: The exact solution ``u*: (N, D) -> (N,)`` (gives the boundary data and the error).
        dim: Input dimension ``D``.
        source: ``f: (N, D) -> (N,)``.
        laplacian: ``a``.
        gradient: ``b``, shape ``(D,)`` (zero when None).
        value: ``c``.
        lower: Lower corner of the box (zeros when None).
        upper: Upper corner of the box (ones when None).
        laplacian_dims: ``S`` (all coordinates when None).
        name: Problem name.
        hidden: Hidden widths of the default network.
        num_interior: Default interior points per step.
        num_boundary: Default boundary points per step.

    Returns:
        The ``Problem``; its residual is ``a Δ_S u + b·∇u + c u - f``.

    Raises:
        ValueError: If shapes do not match ``dim`` or the box is empty.
    """
    lo = torch.zeros(dim) if lower is None else torch.as_tensor(lower, dtype=torch.float64)
    hi = torch.ones(dim) if upper is None else torch.as_tensor(upper, dtype=torch.float64)
    lo, hi = lo.double(), hi.double()
    if lo.shape != (dim,) or hi.shape != (dim,) or not bool((hi > lo).all()):
        raise ValueError(
            f"linear_pde: need lower < upper, both of shape ({dim},); got {lower}, {upper}."
        )
    b = None if gradient is None else torch.as_tensor(gradient, dtype=torch.float64)
    if b is not None and b.shape != (dim,):
        raise ValueError(
            f"linear_pde: gradient coefficient must have shape ({dim},); got {tuple(b.shape)}."
        )
    if laplacian_dims is not None:
        try:  # integers of any kind (NumPy's too); int() would truncate 0.5 to 0
            laplacian_dims = tuple(operator.index(i) for i in laplacian_dims)
        except TypeError:
            raise ValueError(
                f"linear_pde: laplacian_dims must be integers; got {laplacian_dims!r}."
            ) from None
        if not all(0 <= i < dim for i in laplacian_dims):
            raise ValueError(
                f"linear_pde: laplacian_dims must lie in [0, {dim}); got {laplacian_dims}."
            )
    a, c = float(laplacian), float(value)

    def residual(X: Tensor, d: Derivatives) -> Tensor:
        r = a * d.laplacian + c * d.value - source(X)
        if b is not None:
            r = r + d.gradient @ b.to(X)  # X's dtype and device
        return r

    return Problem(
        name=name,
        dim=dim,
        lower=lo,
        upper=hi,
        residual=residual,
        solution=solution,
        boundary_sampler=_box_boundary_sampler(lo, hi),
        laplacian_dims=laplacian_dims,
        hidden=tuple(hidden),
        num_interior=num_interior,
        num_boundary=num_boundary,
    )
