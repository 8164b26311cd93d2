"""PDE problems with exact solutions: Poisson, heat, log-Fokker–Planck, and user-defined ones.

A problem (``curvkit.pinn.base.Problem``) is a residual on the interior (a function of the
point and of the network's value, gradient and Laplacian there), a Dirichlet / initial condition
on the boundary, samplers for both and a default network. Everything is float64 unless the
caller asks otherwise.

References:
    Müller & Zeinhofer (2023), "Achieving High Accuracy with PINNs via Energy Natural
    Gradients", ICML (arXiv 2302.13163).
    Guzmán-Cordero, Dangel, Goldshlager & Zeinhofer (2025), "Improving Energy Natural Gradient
    Descent through Woodbury, Momentum, and Randomization", NeurIPS (arXiv 2505.12149).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from curvkit.pinn.base import Batch, Derivatives, Problem, _uniform, mlp

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


# --------------------------------------------------------------------------- checks
def _check_dim(dim: object, caller: str) -> int:
    """``dim`` as an int >= 1; a float or string would otherwise fail deep inside torch."""
    try:
        if isinstance(dim, bool):
            raise TypeError
        value = operator.index(dim)  # integers of any kind, never a truncated float
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"{caller}: dim must be an int >= 1; got {dim!r}.")
    return value


def _check_finite(value: float, what: str, caller: str) -> float:
    """``float(value)``, refusing NaN and inf (NaN slips through every ``<=`` check)."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{caller}: {what} must be finite; got {value}.")
    return value


# --------------------------------------------------------------------------- samplers
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
        ValueError: For an unknown solution, ``dim`` not an int >= 1 or ``"harmonic"`` with
            odd ``dim``.
    """
    dim = _check_dim(dim, "poisson")
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
        ValueError: If ``dim`` is not an int >= 1 or ``diffusivity`` not finite and > 0.
    """
    dim = _check_dim(dim, "heat")
    if not math.isfinite(diffusivity) or diffusivity <= 0:
        raise ValueError(
            f"heat: need dim >= 1 and a finite diffusivity > 0; got dim={dim}, "
            f"diffusivity={diffusivity}."
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
        ValueError: If ``dim`` is not an int >= 1 or ``half_width`` not finite and > 0.
    """
    dim = _check_dim(dim, "log_fokker_planck")
    if not math.isfinite(half_width) or half_width <= 0:
        raise ValueError(
            f"log_fokker_planck: need dim >= 1 and a finite half_width > 0; got {dim}, "
            f"{half_width}."
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
    laplacian: float | Callable[[Tensor], Tensor] = 1.0,
    gradient: Sequence[float] | Tensor | Callable[[Tensor], Tensor] | None = None,
    value: float | Callable[[Tensor], Tensor] = 0.0,
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

    The coefficients may vary in space: ``a``, ``b``, ``c`` are constants or functions of the
    points (e.g. ``laplacian=lambda X: 1 + X[:, 0]`` for ``(1 + x_0) Δu``).

    Args:
        solution: The exact solution ``u*: (N, D) -> (N,)`` (gives the boundary data and the error).
        dim: Input dimension ``D``.
        source: ``f: (N, D) -> (N,)`` (or a 0-d tensor / number for a constant source).
        laplacian: ``a``: a number or ``a: (N, D) -> (N,)``.
        gradient: ``b``: shape ``(D,)``, or ``b: (N, D) -> (N, D)`` (zero when None).
        value: ``c``: a number or ``c: (N, D) -> (N,)``.
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
        ValueError: If shapes do not match ``dim``, the box is empty or not finite, or a
            constant coefficient is not finite; when the residual is evaluated, if the source or
            a coefficient function returns another shape (an ``(N, 1)`` source would otherwise
            broadcast into an ``(N, N)`` residual).
    """
    dim = _check_dim(dim, "linear_pde")
    lo = torch.zeros(dim) if lower is None else torch.as_tensor(lower, dtype=torch.float64)
    hi = torch.ones(dim) if upper is None else torch.as_tensor(upper, dtype=torch.float64)
    lo, hi = lo.double(), hi.double()
    # An infinite corner cannot be sampled uniformly (its points would be inf or NaN).
    finite = bool(torch.isfinite(lo).all() and torch.isfinite(hi).all())
    if lo.shape != (dim,) or hi.shape != (dim,) or not finite or not bool((hi > lo).all()):
        raise ValueError(
            f"linear_pde: need lower < upper, both finite and of shape ({dim},); got {lower}, "
            f"{upper}."
        )
    b_fn = gradient if callable(gradient) else None
    b = None if gradient is None or b_fn is not None else torch.as_tensor(gradient,
                                                                         dtype=torch.float64)
    if b is not None and b.shape != (dim,):
        raise ValueError(
            f"linear_pde: gradient coefficient must have shape ({dim},); got {tuple(b.shape)}."
        )
    if b is not None and not bool(torch.isfinite(b).all()):
        raise ValueError(f"linear_pde: gradient coefficient must be finite; got {b.tolist()}.")
    if laplacian_dims is not None:
        try:  # integers of any kind (NumPy's too); int() would truncate 0.5 to 0
            laplacian_dims = tuple(operator.index(i) for i in laplacian_dims)
        except TypeError:
            raise ValueError(
                f"linear_pde: laplacian_dims must be integers; got {laplacian_dims!r}."
            ) from None
    a = laplacian if callable(laplacian) else _check_finite(laplacian, "laplacian", "linear_pde")
    c = value if callable(value) else _check_finite(value, "value", "linear_pde")

    def residual(X: Tensor, d: Derivatives) -> Tensor:
        N = X.shape[0]
        f = _source_values(source(X), N, name)
        a_X = _pointwise(a(X), (N,), "laplacian coefficient", name) if callable(a) else a
        c_X = _pointwise(c(X), (N,), "value coefficient", name) if callable(c) else c
        r = a_X * d.laplacian + c_X * d.value - f
        if b_fn is not None:
            B = _pointwise(b_fn(X), (N, dim), "gradient coefficient", name)
            r = r + (B * d.gradient).sum(dim=1)
        elif b is not None:
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


def _source_values(values: object, N: int, name: str) -> object:
    """The source ``f(X)``: ``(N,)`` or a constant; the error names what the residual would be."""
    try:
        return _pointwise(values, (N,), "source", name)
    except ValueError as error:
        if not isinstance(values, Tensor):
            raise
        try:
            shape = f"{tuple(torch.broadcast_shapes(values.shape, (N,)))}"
        except RuntimeError:
            shape = "no shape (they do not broadcast)"
        raise ValueError(
            f"{name}: the interior residual must return shape ({N},) (one value per point); "
            f"got {shape}: the source returned {tuple(values.shape)} (it must return ({N},) or "
            "a constant)."
        ) from error


def _pointwise(values: object, shape: tuple[int, ...], what: str, name: str) -> object:
    """A user callback's output: one value per point (``shape``), or a constant.

    Numbers and tensors that broadcast to ``shape`` without adding dimensions (a 0-d tensor,
    ``(1,)``, a ``(D,)`` row for ``(N, D)``) are accepted; anything else is refused, since e.g.
    an ``(N, 1)`` source would broadcast against the ``(N,)`` residual into an ``(N, N)`` matrix.
    """
    if isinstance(values, Tensor):
        try:
            fits = torch.broadcast_shapes(values.shape, shape) == shape
        except RuntimeError:
            fits = False
        if fits and values.ndim <= len(shape):
            return values
        got = tuple(values.shape)
    elif isinstance(values, numbers.Real) and not isinstance(values, bool):
        return values
    else:
        got = type(values).__name__
    raise ValueError(
        f"{name}: the {what} must return a tensor of shape {shape} (one value per point) or a "
        f"constant; got {got}."
    )
