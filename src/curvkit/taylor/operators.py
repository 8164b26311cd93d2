"""PDE operators by (collapsed) Taylor mode: Laplacian, weighted Laplacian, biharmonic.

Each constructor returns a callable ``g(X)`` for a batch ``X`` of shape ``(N, D)``. ``f`` must act
on the rows of ``X`` independently (an MLP does; batch normalisation in training mode does not):
the operator is applied to ``x ↦ f(x)`` per row, and per output component when ``f`` returns
``(N, C)``.

All operators are sums of K-th directional derivatives ``sum_r w_r <∂^K f(x), u_r^{⊗K}>``. One
packed jet carries the value, the ``R`` per-direction coefficients of orders ``1..K-1`` and — when
``collapsed=True`` — the single weighted sum of the top coefficients (``2 + R`` rows for ``K=2``,
the forward Laplacian), instead of ``R`` top coefficients summed at the end (``1 + 2R`` rows).

The captured ATen graph of ``f`` is cached inside ``g`` per input shape, dtype and device (and the
module's parameter shapes), so a training loop with a fixed batch shape traces ``f`` once. A
module's parameters are graph inputs and are read afresh on every call; results are
differentiable by ``torch.autograd`` w.r.t. them (and w.r.t. tensors a plain ``f`` closes over).

References:
    Dangel, F., Siebert, T., Zeinhofer, M. and Walther, A. (2025). Collapsing Taylor mode
    automatic differentiation. NeurIPS. arXiv:2505.13644.
    Li, R. et al. (2023). A computational framework for neural network-based variational Monte
    Carlo with forward Laplacian. arXiv:2307.08214.
    Griewank, A., Utke, J. and Walther, A. (2000). Evaluating higher derivative tensors by forward
    propagation of univariate Taylor series. Math. Comp. 69(231).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from curvkit.taylor._capture import CapturedFunction
from curvkit.taylor._propagation import Context, Jet, Layout

Distribution = Literal["rademacher", "normal"]


class DifferentialResult(NamedTuple):
    """Value, gradient and operator of ``f`` on a batch; fields not requested are ``None``.

    Attributes:
        value: ``f(X)``, shape ``(N,)`` or ``(N, C)``.
        gradient: ``∇_x f(X)``, shape ``(N, D)`` or ``(N, C, D)``.
        operator: The differential operator applied to ``f``, shape ``(N,)`` or ``(N, C)``.
    """

    value: Tensor | None
    gradient: Tensor | None
    operator: Tensor | None


# Griewank–Utke–Walther interpolation weights for <∂⁴f, e_a² ⊗ e_b²> (Dangel et al., 2025, §C);
# verified against the nested Hessian-of-Laplacian in tests/taylor/test_operators.py.
_GAMMA_40, _GAMMA_31, _GAMMA_22 = 13 / 192, -1 / 3, 5 / 8


class _Plan(NamedTuple):
    directions: Tensor  # (R, N, D)
    weights: Tensor | None  # (R,)
    scale: float
    tangents: bool  # propagate the D unit vectors at first order for the gradient


class DifferentialOperator:
    """Callable ``g(X, *, generator=None)`` evaluating a PDE operator of ``f`` on ``X: (N, D)``.

    Built by ``laplacian``, ``weighted_laplacian`` and ``biharmonic``; see their docs. Randomized
    operators draw fresh directions on every call from ``generator`` (the call's, else the one
    given at construction, else a private ``torch.Generator`` seeded with 0 that this object owns).
    """

    def __init__(self, f, *, caller: str, order: int, planner: Callable, randomized: bool,
                 collapsed: bool, return_value: bool, return_gradient: bool,
                 generator: torch.Generator | None):
        for name, flag in [("collapsed", collapsed), ("return_value", return_value),
                           ("return_gradient", return_gradient)]:
            if not isinstance(flag, bool):
                raise TypeError(f"{caller}: {name} must be a bool; got {flag!r}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{caller}: generator must be a torch.Generator; "
                            f"got {type(generator)}.")
        self.captured = CapturedFunction(f, caller=caller)
        self.caller = caller
        self.order = order
        self.planner = planner
        self.randomized = randomized
        self.collapsed = collapsed
        self.return_value = return_value
        self.return_gradient = return_gradient
        self.generator = generator

    def _generator(self, generator: torch.Generator | None) -> torch.Generator | None:
        if not self.randomized:
            return None
        if generator is not None:
            return generator
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(0)
        return self.generator

    def __call__(self, X: Tensor, *, generator: torch.Generator | None = None
                 ) -> Tensor | DifferentialResult:
        """Evaluate on ``X`` of shape ``(N, D)``; see the constructor's docs for the return."""
        if not isinstance(X, Tensor) or X.dim() != 2 or not X.is_floating_point():
            got = f"{tuple(X.shape)} {X.dtype}" if isinstance(X, Tensor) else type(X)
            raise ValueError(f"{self.caller}: X must be a floating tensor of shape (N, D); "
                             f"got {got}.")
        f = self.captured.f
        if isinstance(f, nn.Module):
            off = {t.device for t in (*f.parameters(), *f.buffers())} - {X.device}
            if off:
                raise ValueError(f"{self.caller}: X is on device {X.device} but the model's "
                                 f"tensors are on {', '.join(sorted(map(str, off)))}; move one "
                                 "of them.")
        plan = self.planner(X, self._generator(generator), self.return_gradient)
        return self._evaluate(X, plan)

    def _evaluate(self, X: Tensor, plan: _Plan) -> Tensor | DifferentialResult:
        N, D = X.shape
        R = plan.directions.shape[0]
        layout = Layout(self.order, R, D if plan.tangents else 0, self.collapsed)
        rows = [X.unsqueeze(0)]
        if plan.tangents:
            rows.append(torch.eye(D, dtype=X.dtype, device=X.device).unsqueeze(1).expand(D, N, D))
        rows.append(plan.directions.to(X.dtype))
        rows.append(X.new_zeros((layout.size - 1 - layout.num_tangents - R, N, D)))
        ctx = Context(layout, plan.weights)
        out = self.captured.run(ctx, X, torch.cat(rows))
        if not isinstance(out, (Jet, Tensor)):
            raise ValueError(f"{self.caller}: f must return one tensor of shape (N,) or (N, C); "
                             f"got {type(out).__name__}.")
        if not isinstance(out, Jet):  # f does not depend on X: all derivatives vanish
            out = ctx.constant(out)
        if out.data.dim() < 2 or out.data.shape[1] != N:
            raise ValueError(f"{self.caller}: f must map (N, D) = {(N, D)} to (N,) or (N, C); "
                             f"got output shape {tuple(out.shape)}.")
        value, tangents, blocks, top = ctx.split(out.data)
        operator = top[0] if self.collapsed else ctx.weighted_sum(top)
        if plan.scale != 1.0:
            operator = plan.scale * operator
        if not (self.return_value or self.return_gradient):
            return operator
        gradient = None
        if self.return_gradient:
            gradient = (tangents if plan.tangents else blocks[0]).movedim(0, -1)
        return DifferentialResult(value if self.return_value else None, gradient, operator)

    def __repr__(self) -> str:
        return (f"{self.caller}(order={self.order}, collapsed={self.collapsed}, "
                f"randomized={self.randomized})")


def _parse_randomization(randomization, caller: str, allowed: tuple[str, ...]):
    if randomization is None:
        return None
    if (not isinstance(randomization, (tuple, list)) or len(randomization) != 2
            or randomization[0] not in allowed or isinstance(randomization[1], bool)
            or not isinstance(randomization[1], int) or randomization[1] < 1):
        raise ValueError(f"{caller}: randomization must be None or (distribution, num_samples) "
                         f"with distribution in {allowed} and num_samples >= 1; "
                         f"got {randomization!r}.")
    return randomization[0], randomization[1]


def _sample(distribution: str, shape: tuple[int, ...], generator: torch.Generator,
            like: Tensor) -> Tensor:
    if distribution == "normal":
        v = torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype)
    else:
        v = torch.randint(0, 2, shape, generator=generator, device=generator.device)
        v = (2 * v - 1).to(like.dtype)
    return v.to(like.device)


def _unit_directions(X: Tensor) -> Tensor:
    N, D = X.shape
    return torch.eye(D, dtype=X.dtype, device=X.device).unsqueeze(1).expand(D, N, D)


def laplacian(f: nn.Module | Callable[[Tensor], Tensor], *,
              randomization: tuple[Distribution, int] | None = None, collapsed: bool = True,
              return_value: bool = False, return_gradient: bool = False,
              generator: torch.Generator | None = None) -> DifferentialOperator:
    """Laplacian ``Δf = tr(∇²f)`` by (collapsed) Taylor mode — the forward Laplacian.

    Args:
        f: ``nn.Module`` or function mapping ``(N, D)`` to ``(N,)`` or ``(N, C)``, acting on each
            row independently.
        randomization: ``None`` for the exact Laplacian (directions ``e_1..e_D``), or
            ``("rademacher" | "normal", S)`` for Hutchinson's estimator with ``S`` directions per
            datum, ``(1/S) sum_s v_sᵀ ∇²f v_s``.
        collapsed: Propagate the summed second-order coefficient (``2 + R`` rows) instead of one
            per direction (``1 + 2R``); both give the same result.
        return_value: Also return ``f(X)``.
        return_gradient: Also return ``∇f(X)``. Free for the exact Laplacian; a randomized one
            propagates ``D`` extra first-order rows.
        generator: Default random generator of a randomized operator.

    Returns:
        ``g(X, *, generator=None)``; it returns the Laplacian, shape ``(N,)`` or ``(N, C)``, or a
        ``DifferentialResult`` when ``return_value`` or ``return_gradient`` is set.

    Raises:
        ValueError: If ``randomization`` is malformed (or, on call, ``X`` is not ``(N, D)``).

    Example:
        >>> g = laplacian(lambda x: (x ** 2).sum(-1))
        >>> g(torch.randn(4, 3))
        tensor([6., 6., 6., 6.])
    """
    parsed = _parse_randomization(randomization, "laplacian", ("rademacher", "normal"))

    def planner(X, generator, gradient):
        if parsed is None:
            return _Plan(_unit_directions(X), None, 1.0, False)
        distribution, S = parsed
        v = _sample(distribution, (S, *X.shape), generator, X)
        return _Plan(v, None, 1.0 / S, gradient)

    return DifferentialOperator(f, caller="laplacian", order=2, planner=planner,
                                randomized=parsed is not None, collapsed=collapsed,
                                return_value=return_value, return_gradient=return_gradient,
                                generator=generator)


def split_indefinite(C: Tensor, *, rtol: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Split a symmetric ``C: (D, D)`` into ``sigma: (D, R)`` and ``signs: (R,)``.

    ``C = sigma diag(signs) sigmaᵀ`` from the eigendecomposition, dropping eigenvalues with
    ``|λ| <= rtol * max|λ|`` (they contribute nothing beyond round-off).

    Raises:
        ValueError: If ``C`` is not a square symmetric matrix.
    """
    if C.dim() != 2 or C.shape[0] != C.shape[1] or not torch.allclose(C, C.T):
        raise ValueError(f"split_indefinite: C must be symmetric (D, D); got {tuple(C.shape)}.")
    eigenvalues, Q = torch.linalg.eigh(C)
    keep = eigenvalues.abs() > rtol * eigenvalues.abs().max()
    eigenvalues, Q = eigenvalues[keep], Q[:, keep]
    return Q * eigenvalues.abs().sqrt(), torch.sign(eigenvalues)


def weighted_laplacian(f: nn.Module | Callable[[Tensor], Tensor],
                       sigma: Tensor | Callable[[Tensor], Tensor], *,
                       signs: Tensor | None = None,
                       randomization: tuple[Distribution, int] | None = None,
                       collapsed: bool = True, return_value: bool = False,
                       return_gradient: bool = False,
                       generator: torch.Generator | None = None) -> DifferentialOperator:
    """Weighted Laplacian ``tr(σ diag(signs) σᵀ ∇²f)`` (``signs`` default to ones: ``σσᵀ``).

    Args:
        f: As in ``laplacian``.
        sigma: Constant ``(D, R)`` matrix, or a function ``X: (N, D) ↦ (N, D, R)``.
        signs: Optional ``(R,)`` tensor of ``±1`` for an indefinite weighting ``σ diag(s) σᵀ``;
            ``split_indefinite(C)`` produces ``(sigma, signs)`` from a symmetric ``C``.
        randomization: ``None`` for the exact operator (directions = columns of ``σ``), or
            ``("rademacher" | "normal", S)``: directions ``σ v_s`` with ``v_s ∈ R^R``; with
            ``signs``, the positive and negative columns are sampled separately (``S`` each).
        collapsed: As in ``laplacian``.
        return_value: Also return ``f(X)``.
        return_gradient: Also return ``∇f(X)`` (``D`` extra first-order rows).
        generator: Default random generator of a randomized operator.

    Returns:
        ``g(X, *, generator=None)`` as in ``laplacian``.

    Raises:
        ValueError: If ``sigma`` or ``signs`` have the wrong shape (checked on call against
            ``X``), or ``randomization`` is malformed.
    """
    caller = "weighted_laplacian"
    parsed = _parse_randomization(randomization, caller, ("rademacher", "normal"))
    if not (isinstance(sigma, Tensor) or callable(sigma)):
        raise TypeError(f"{caller}: sigma must be a (D, R) tensor or a callable; "
                        f"got {type(sigma)}.")
    if signs is not None and (not isinstance(signs, Tensor) or signs.dim() != 1
                              or not bool(((signs == 1) | (signs == -1)).all())):
        raise ValueError(f"{caller}: signs must be a 1-d tensor of ±1; got {signs!r}.")

    def sigma_of(X):
        N, D = X.shape
        s = sigma(X) if callable(sigma) and not isinstance(sigma, Tensor) else sigma
        if not isinstance(s, Tensor):
            raise TypeError(f"{caller}: sigma(X) must return a tensor; got {type(s)}.")
        expected = "(N, D, R)" if s.dim() == 3 else "(D, R)"
        if s.dim() not in (2, 3) or s.shape[-2] != D or (s.dim() == 3 and s.shape[0] != N):
            raise ValueError(f"{caller}: sigma must have shape {expected} with N={N}, D={D}; "
                             f"got {tuple(s.shape)}.")
        if signs is not None and signs.shape[0] != s.shape[-1]:
            raise ValueError(f"{caller}: signs must have shape ({s.shape[-1]},); "
                             f"got {tuple(signs.shape)}.")
        # X's dtype and device: a constant sigma given on the CPU follows the points
        return (s if s.dim() == 3 else s.expand(N, D, s.shape[-1])).to(X)  # (N, D, R)

    def planner(X, generator, gradient):
        s = sigma_of(X)
        weights = None if signs is None else signs.to(X)
        if parsed is None:
            return _Plan(s.permute(2, 0, 1), weights, 1.0, gradient)
        distribution, S = parsed
        groups = [(s, 1.0)] if signs is None else [
            (s[..., signs > 0], 1.0), (s[..., signs < 0], -1.0)]
        directions, group_weights = [], []
        for columns, sign in groups:
            if columns.shape[-1] == 0:
                continue
            v = _sample(distribution, (S, X.shape[0], columns.shape[-1]), generator, X)
            directions.append(torch.einsum("ndr,snr->snd", columns, v))
            group_weights.append(torch.full((S,), sign, dtype=X.dtype, device=X.device))
        if not directions:  # sigma has no columns (e.g. split_indefinite of zero): Δ_σ f = 0
            return _Plan(s.permute(2, 0, 1), weights, 1.0, gradient)
        weights = None if signs is None else torch.cat(group_weights)
        return _Plan(torch.cat(directions), weights, 1.0 / S, gradient)

    return DifferentialOperator(f, caller=caller, order=2, planner=planner,
                                randomized=parsed is not None, collapsed=collapsed,
                                return_value=return_value, return_gradient=return_gradient,
                                generator=generator)


def _biharmonic_directions(D: int, dtype, device) -> tuple[Tensor, Tensor]:
    """Interpolation directions ``(R, D)`` and weights ``(R,)`` for the exact biharmonic.

    ``Δ²f = (1/24)[(2D γ40 + 2γ31 + γ22) Σ_a F(4e_a) + 2γ31 Σ_{a≠b} F(3e_a + e_b)
    + 2γ22 Σ_{a<b} F(2e_a + 2e_b)]`` with ``F(u) = <∂⁴f, u^{⊗4}>``.
    """
    eye = torch.eye(D, dtype=dtype, device=device)
    a, b = torch.meshgrid(torch.arange(D), torch.arange(D), indexing="ij")
    off = a != b
    upper = a < b
    families = [
        (4 * eye, (2 * D * _GAMMA_40 + 2 * _GAMMA_31 + _GAMMA_22) / 24),
        (3 * eye[a[off]] + eye[b[off]], 2 * _GAMMA_31 / 24),
        (2 * eye[a[upper]] + 2 * eye[b[upper]], 2 * _GAMMA_22 / 24),
    ]
    directions = torch.cat([u for u, _ in families])
    weights = torch.cat([torch.full((u.shape[0],), w, dtype=dtype, device=device)
                         for u, w in families])
    return directions, weights


def biharmonic(f: nn.Module | Callable[[Tensor], Tensor], *,
               randomization: tuple[Literal["normal"], int] | None = None,
               collapsed: bool = True, return_value: bool = False,
               return_gradient: bool = False,
               generator: torch.Generator | None = None) -> DifferentialOperator:
    """Biharmonic ``Δ²f = Σ_{a,b} ∂⁴f/∂x_a²∂x_b²`` by (collapsed) 4-jets.

    Args:
        f: As in ``laplacian``.
        randomization: ``None`` for the exact operator by Griewank–Utke–Walther interpolation
            (``D²(3/2) - D/2`` directions), or ``("normal", S)`` for the unbiased estimator
            ``(1/(3S)) Σ_s <∂⁴f, v_s^{⊗4}>`` with ``v_s ~ N(0, I)`` (``E<T, v^{⊗4}> = 3 Σ T_aabb``;
            Rademacher directions would be biased and are rejected).
        collapsed: Propagate one summed fourth-order coefficient (``2 + 3R`` rows) instead of
            ``R`` of them (``1 + 4R``).
        return_value: Also return ``f(X)``.
        return_gradient: Also return ``∇f(X)`` (``D`` extra first-order rows).
        generator: Default random generator of a randomized operator.

    Returns:
        ``g(X, *, generator=None)`` as in ``laplacian``.

    Raises:
        ValueError: If ``randomization`` is malformed.
    """
    parsed = _parse_randomization(randomization, "biharmonic", ("normal",))

    def planner(X, generator, gradient):
        N, D = X.shape
        if parsed is None:
            u, w = _biharmonic_directions(D, X.dtype, X.device)
            return _Plan(u.unsqueeze(1).expand(u.shape[0], N, D), w, 1.0, gradient)
        S = parsed[1]
        return _Plan(_sample("normal", (S, N, D), generator, X), None, 1.0 / (3 * S), gradient)

    return DifferentialOperator(f, caller="biharmonic", order=4, planner=planner,
                                randomized=parsed is not None, collapsed=collapsed,
                                return_value=return_value, return_gradient=return_gradient,
                                generator=generator)
