"""``jet(f, order)``: Taylor-mode propagation of K-jets through a captured graph."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from curvkit.taylor._capture import CapturedFunction
from curvkit.taylor._propagation import Context, Jet, Layout


def jet(f: nn.Module | Callable[[Tensor], Tensor], order: int
        ) -> Callable[[Tensor, Sequence[Tensor]], tuple[Tensor, tuple[Tensor, ...]]]:
    """Return a function that pushes a K-jet through ``f`` by Taylor-mode arithmetic.

    Coefficients use the derivative convention: the input jet ``(x_0, (x_1, ..., x_K))`` is the
    curve ``x(t) = sum_k t^k / k! x_k`` and the output is ``(f(x_0), (y_1, ..., y_K))`` with
    ``y_k = d^k/dt^k f(x(t))|_{t=0}``. ``f`` is captured once per input shape/dtype/device as an
    ATen graph (``make_fx``) and each operation is replaced by its Taylor rule: Faà di Bruno for
    elementwise functions, Leibniz for products, linearity for linear maps and shape operations.

    Args:
        f: An ``nn.Module`` or a function of one tensor returning one tensor, built from
            supported operations (see ``curvkit.taylor`` module docs).
        order: Jet order ``K >= 0``.

    Returns:
        ``jet_fn(primal, series)`` with ``primal`` of any shape ``S`` and ``series`` a sequence of
        ``K`` tensors of shape ``S``; it returns ``(value, (y_1, ..., y_K))``, each of the output's
        shape. Results are differentiable w.r.t. the inputs and ``f``'s parameters.

    Raises:
        ValueError: If ``order`` is negative or ``series`` has the wrong length or shapes.
        NotImplementedError: If ``f`` uses an operator without a Taylor rule (raised on call).

    Example:
        >>> value, (d1, d2) = jet(torch.sin, 2)(torch.zeros(3), (torch.ones(3), torch.zeros(3)))
        >>> d2  # d^2/dt^2 sin(t) at 0
        tensor([0., 0., 0.])

    References:
        Griewank, A. and Walther, A. (2008). Evaluating Derivatives, chapter 13. SIAM.
    """
    if not isinstance(order, int) or isinstance(order, bool) or order < 0:
        raise ValueError(f"jet: order must be an integer >= 0; got {order!r}.")
    captured = CapturedFunction(f, caller="jet")
    layout = Layout(order)

    def jet_fn(primal: Tensor, series: Sequence[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
        series = tuple(series)
        if len(series) != order:
            raise ValueError(f"jet: expected {order} series coefficients; got {len(series)}.")
        for k, s in enumerate(series, start=1):
            if s.shape != primal.shape:
                raise ValueError(f"jet: series[{k - 1}] (x_{k}) must have shape "
                                 f"{tuple(primal.shape)}; got {tuple(s.shape)}.")
        data = torch.stack([primal, *series])
        out = captured.run(Context(layout), primal, data)
        if not isinstance(out, Jet):  # f does not depend on its input
            if not isinstance(out, Tensor):
                raise TypeError(f"jet: f must return one tensor; got {type(out)}.")
            return out, tuple(torch.zeros_like(out) for _ in range(order))
        return out.data[0], tuple(out.data[1:])

    return jet_fn
