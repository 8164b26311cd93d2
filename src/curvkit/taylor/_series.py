"""Combinatorics of Taylor arithmetic: Faà di Bruno partitions and derivative tables.

Coefficients follow the *derivative* convention: a K-jet ``(x_0, x_1, ..., x_K)`` describes the
curve ``x(t) = sum_k t^k / k! x_k`` and ``y_k = d^k/dt^k f(x(t))`` at ``t = 0``.

References:
    Griewank, A. and Walther, A. (2008). Evaluating Derivatives, 2nd ed., chapter 13. SIAM.
    Dangel, F., Siebert, T., Zeinhofer, M. and Walther, A. (2025). Collapsing Taylor mode
    automatic differentiation. NeurIPS. arXiv:2505.13644.
"""

from __future__ import annotations

import math
from collections import Counter
from functools import cache

import torch
from torch import Tensor


@cache
def integer_partitions(k: int) -> tuple[tuple[int, ...], ...]:
    """All partitions of ``k`` into positive parts, each sorted in decreasing order."""

    def parts(n: int, largest: int):
        if n == 0:
            yield ()
            return
        for first in range(min(n, largest), 0, -1):
            for rest in parts(n - first, first):
                yield (first, *rest)

    return tuple(parts(k, k))


@cache
def faa_di_bruno_terms(k: int) -> dict[int, tuple[tuple[float, tuple[int, ...]], ...]]:
    """Faà di Bruno's formula for the k-th coefficient, grouped by the derivative order.

    ``y_k = sum_m phi^(m)(x_0) * sum_{(c, sigma) in terms[m]} c * prod_{s in sigma} x_s``, where
    ``sigma`` runs over the partitions of ``k`` with ``m`` parts and
    ``c = k! / (prod_s n_s! * prod_{s in sigma} s!)`` (``n_s`` = multiplicity of part ``s``).

    Args:
        k: Coefficient order, ``k >= 1``.

    Returns:
        Mapping from ``m`` (number of parts) to ``(multiplicity, partition)`` pairs.
    """
    grouped: dict[int, list[tuple[float, tuple[int, ...]]]] = {}
    for sigma in integer_partitions(k):
        counts = Counter(sigma)
        denominator = math.prod(math.factorial(n) for n in counts.values())
        denominator *= math.prod(math.factorial(s) for s in sigma)
        grouped.setdefault(len(sigma), []).append((math.factorial(k) / denominator, sigma))
    return {m: tuple(terms) for m, terms in sorted(grouped.items())}


def _poly_derivative(coefficients: list[float]) -> list[float]:
    """Derivative of a polynomial given by increasing-degree coefficients."""
    return [i * c for i, c in enumerate(coefficients)][1:] or [0.0]


def _poly_multiply(a: list[float], b: list[float]) -> list[float]:
    out = [0.0] * (len(a) + len(b) - 1)
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            out[i + j] += ai * bj
    return out


@cache
def _chain_polynomials(order: int, generator: tuple[float, ...]) -> tuple[tuple[float, ...], ...]:
    """Polynomials ``p_n`` with ``phi^(n) = p_n(phi)`` for ``phi' = g(phi)``, ``g = generator``.

    ``p_0(u) = u`` and ``p_{n+1} = p_n' * g`` by the chain rule.
    """
    polys = [[0.0, 1.0]]
    for _ in range(order):
        polys.append(_poly_multiply(_poly_derivative(polys[-1]), list(generator)))
    return tuple(tuple(p) for p in polys)


def _horner(coefficients: tuple[float, ...], u: Tensor) -> Tensor:
    out = torch.full_like(u, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        out = out * u + c
    return out


def _from_ode(value: Tensor, order: int, generator: tuple[float, ...]) -> list[Tensor]:
    # tanh' = 1 - tanh², sigmoid' = sigmoid - sigmoid²: every derivative is a polynomial in the
    # value, so the table costs a few fused multiply-adds per order.
    polys = _chain_polynomials(order, generator)
    return [value] + [_horner(p, value) for p in polys[1:]]


Derivatives = list  # [phi(x0), phi'(x0), ..., phi^(K)(x0)]; None marks an identically zero entry


def tanh_derivatives(x: Tensor, order: int) -> Derivatives:
    """``[tanh(x), tanh'(x), ..., tanh^(order)(x)]``."""
    return _from_ode(torch.tanh(x), order, (1.0, 0.0, -1.0))


def sigmoid_derivatives(x: Tensor, order: int) -> Derivatives:
    """``[sigmoid(x), ..., sigmoid^(order)(x)]``."""
    return _from_ode(torch.sigmoid(x), order, (0.0, 1.0, -1.0))


def _cyclic(first: Tensor, second: Tensor, order: int) -> Derivatives:
    # (first, second, -first, -second, first, ...): sin -> (sin, cos), cos -> (cos, -sin)
    cycle = (first, second, -first, -second) if order >= 2 else (first, second)
    return [cycle[n % 4] for n in range(order + 1)]


def sin_derivatives(x: Tensor, order: int) -> Derivatives:
    """Cyclic derivatives ``sin, cos, -sin, -cos, ...``."""
    if order == 0:
        return [torch.sin(x)]
    return _cyclic(torch.sin(x), torch.cos(x), order)


def cos_derivatives(x: Tensor, order: int) -> Derivatives:
    """Cyclic derivatives ``cos, -sin, -cos, sin, ...``."""
    if order == 0:
        return [torch.cos(x)]
    return _cyclic(torch.cos(x), -torch.sin(x), order)


def exp_derivatives(x: Tensor, order: int) -> Derivatives:
    """Every derivative of ``exp`` is ``exp``."""
    e = torch.exp(x)
    return [e] * (order + 1)


def log_derivatives(x: Tensor, order: int) -> Derivatives:
    """``log^(n)(x) = (-1)^(n-1) (n-1)! x^(-n)``."""
    out = [torch.log(x)]
    if order > 0:
        inv = torch.reciprocal(x)
        power = inv
        for n in range(1, order + 1):
            out.append((-1) ** (n - 1) * math.factorial(n - 1) * power)
            power = power * inv
    return out


def pow_derivatives(x: Tensor, order: int, exponent: float) -> Derivatives:
    """``d^n x^p = p (p-1) ... (p-n+1) x^(p-n)``, zero beyond ``n > p`` for integer ``p >= 0``."""
    out = [torch.pow(x, exponent)]
    falling = 1.0
    for n in range(1, order + 1):
        falling *= exponent - (n - 1)
        if falling == 0.0:
            out.extend([None] * (order + 1 - len(out)))
            break
        out.append(falling * torch.pow(x, exponent - n))
    return out


def softplus_derivatives(x: Tensor, order: int, beta: float, threshold: float) -> Derivatives:
    """``softplus(x) = log(1 + exp(beta x)) / beta``, linear where ``beta x > threshold``.

    ``softplus^(n)(x) = beta^(n-1) sigmoid^(n-1)(beta x)``; the linear region (which torch's
    autograd also treats as exactly linear) gets derivative one and zero higher derivatives.
    """
    value = torch.nn.functional.softplus(x, beta, threshold)
    if order == 0:
        return [value]
    linear = beta * x > threshold
    sig = sigmoid_derivatives(beta * x, order - 1)
    out = [value, torch.where(linear, 1.0, sig[0])]
    for n in range(2, order + 1):
        out.append(torch.where(linear, 0.0, beta ** (n - 1) * sig[n - 1]))
    return out


def piecewise_linear_derivatives(value: Tensor, slope: Tensor, order: int) -> Derivatives:
    """Value and slope of a piecewise-linear map; higher derivatives vanish away from kinks."""
    return [value, slope][: order + 1] + [None] * max(order - 1, 0)



# ----------------------------------------------------------------------------------------------
# Derivative tables built from simpler ones: products with x, compositions, Hermite multiples


def times_identity(h: Derivatives, x: Tensor) -> Derivatives:
    """Derivatives of ``x h(x)`` from those of ``h``: ``(x h)^(n) = x h^(n) + n h^(n-1)``."""
    return [x * h[0]] + [x * h[n] + n * h[n - 1] for n in range(1, len(h))]


def compose(outer: Derivatives, inner: Derivatives) -> Derivatives:
    """Derivatives of ``g(u(x))`` from ``outer = [g(u), g'(u), ...]`` and ``inner = [u, u', ...]``.

    The scalar Faà di Bruno formula, ``(g∘u)^(k) = sum_m g^(m)(u) sum_sigma c prod_s u^(s)``, with
    the same partition table as the jet rule (``inner[s]`` may be ``None`` for zero).
    """
    out = [outer[0]]
    for k in range(1, len(inner)):
        total = torch.zeros_like(inner[0])
        for m, terms in faa_di_bruno_terms(k).items():
            poly = None
            for c, sigma in terms:
                if any(inner[s] is None for s in sigma):
                    continue
                term = c * math.prod(inner[s] for s in sigma)
                poly = term if poly is None else poly + term
            if poly is not None:
                total = total + outer[m] * poly
        out.append(total)
    return out


def _hermite(x: Tensor, degree: int, *, physicists: bool) -> list[Tensor]:
    """``[H_0(x), ..., H_degree(x)]`` (physicists') or ``He_n`` (probabilists') by recurrence.

    ``H_{n+1} = 2x H_n - 2n H_{n-1}`` and ``He_{n+1} = x He_n - n He_{n-1}``.
    """
    c = 2.0 if physicists else 1.0
    out = [torch.ones_like(x), c * x][: degree + 1]
    for n in range(1, degree):
        out.append(c * (x * out[n] - n * out[n - 1]))
    return out


def erf_derivatives(x: Tensor, order: int) -> Derivatives:
    """``erf^(n)(x) = (-1)^(n-1) (2/√π) H_{n-1}(x) exp(-x²)`` with physicists' Hermite ``H``."""
    out = [torch.erf(x)]
    if order == 0:
        return out
    gauss = (2.0 / math.sqrt(math.pi)) * torch.exp(-x * x)
    hermite = _hermite(x, order - 1, physicists=True)
    return out + [(-1) ** (n - 1) * hermite[n - 1] * gauss for n in range(1, order + 1)]


def normal_cdf_derivatives(x: Tensor, order: int) -> Derivatives:
    """``Φ(x) = (1 + erf(x/√2))/2``; ``Φ^(n)(x) = (-1)^(n-1) He_{n-1}(x) φ(x)``."""
    out = [0.5 * torch.erfc(-x * math.sqrt(0.5))]
    if order == 0:
        return out
    density = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    hermite = _hermite(x, order - 1, physicists=False)
    return out + [(-1) ** (n - 1) * hermite[n - 1] * density for n in range(1, order + 1)]


_GELU_TANH_SCALE, _GELU_TANH_CUBIC = math.sqrt(2.0 / math.pi), 0.044715


def gelu_derivatives(x: Tensor, order: int, approximate: str = "none") -> Derivatives:
    """GELU ``x Φ(x)``, or with ``approximate="tanh"`` ``x (1 + tanh(a (x + b x³))) / 2``.

    The value is torch's own ``gelu`` so that it matches ``f(x)`` to the last bit.
    """
    if approximate == "none":
        h = normal_cdf_derivatives(x, order)
    elif approximate == "tanh":
        a, b = _GELU_TANH_SCALE, _GELU_TANH_CUBIC
        inner = [a * (x + b * x**3), a * (1 + 3 * b * x * x), 6 * a * b * x,
                 torch.full_like(x, 6 * a * b)][: order + 1]
        inner += [None] * (order + 1 - len(inner))
        g = compose(tanh_derivatives(inner[0], order), inner)
        h = [0.5 * (1 + g[0])] + [0.5 * t for t in g[1:]]
    else:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh'; got {approximate!r}.")
    out = times_identity(h, x)
    out[0] = torch.nn.functional.gelu(x, approximate=approximate)
    return out


def silu_derivatives(x: Tensor, order: int) -> Derivatives:
    """SiLU ``x sigmoid(x)``."""
    out = times_identity(sigmoid_derivatives(x, order), x)
    out[0] = torch.nn.functional.silu(x)
    return out


def mish_derivatives(x: Tensor, order: int) -> Derivatives:
    """Mish ``x tanh(softplus(x))``; ``softplus^(n) = sigmoid^(n-1)``."""
    softplus = torch.nn.functional.softplus(x)
    inner = [softplus] + (sigmoid_derivatives(x, order - 1) if order else [])
    out = times_identity(compose(tanh_derivatives(softplus, order), inner), x)
    out[0] = torch.nn.functional.mish(x)
    return out


def elu_derivatives(x: Tensor, order: int, alpha: float = 1.0, scale: float = 1.0,
                    input_scale: float = 1.0) -> Derivatives:
    """``scale * x`` for ``x > 0``, ``scale * alpha * (exp(input_scale x) - 1)`` otherwise.

    At the kink ``x = 0`` this follows torch's autograd (and ``relu``'s convention here): the
    slope is the left one, ``scale * alpha * input_scale``, and higher derivatives are zero.
    """
    out = [torch.ops.aten.elu(x, alpha, scale, input_scale)]
    if order == 0:
        return out
    # exp of the non-positive part only: the positive branch never reads it, and it cannot overflow
    e = scale * alpha * torch.exp(input_scale * torch.clamp(x, max=0))
    out.append(torch.where(x <= 0, input_scale * e, torch.full_like(x, scale)))
    negative = x < 0
    for n in range(2, order + 1):
        out.append(torch.where(negative, input_scale**n * e, torch.zeros_like(x)))
    return out


def log_sigmoid_derivatives(x: Tensor, order: int) -> Derivatives:
    """``log sigmoid(x)``: first derivative ``sigmoid(-x)``, then ``-sigmoid^(n-1)(x)``."""
    out = [torch.nn.functional.logsigmoid(x)]
    if order == 0:
        return out
    sig = sigmoid_derivatives(x, order - 1)
    return out + [torch.sigmoid(-x)] + [-sig[n - 1] for n in range(2, order + 1)]
