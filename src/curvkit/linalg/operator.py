"""The ``LinearOperator`` base class and its lazy algebra.

A subclass implements ``_matmat`` on ``(n, k)`` blocks (and ``_rmatmat`` unless it is symmetric).
Everything else — vectors, tensor lists, shape/dtype/device checks, sums, products, scaling,
adjoints, dense and SciPy conversion — is derived here, once.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    import scipy.sparse.linalg

__all__ = ["LinearOperator", "Operand"]

Operand = Tensor | Sequence[Tensor]


class LinearOperator:
    """Matrix-free operator of shape ``(m, n)``.

    Subclasses call ``super().__init__(shape, dtype=..., device=...)`` and implement
    ``_matmat(X)`` mapping ``(n, k)`` to ``(m, k)``; non-symmetric ones also implement
    ``_rmatmat(Y)`` mapping ``(m, k)`` to ``(n, k)``.

    Class attributes declare properties that algorithms rely on (they are promises the tests
    verify, never checked at runtime):

    - ``is_symmetric``: ``A == A.T``.
    - ``is_psd``: symmetric positive semi-definite.

    Operators that act on parameters pass ``in_shapes`` (and ``out_shapes``), the shapes of the
    parameter tensors; ``A @ [t_1, ..., t_p]`` then accepts and returns lists shaped like them,
    each optionally with a trailing column dimension ``k``.
    """

    is_symmetric: bool = False
    is_psd: bool = False
    # NumPy defers to our reflected operators instead of treating the operator as a 0-d object
    # array ("matmul: Input operand 1 does not have enough dimensions" for ``x @ A``)
    __array_ufunc__ = None

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        in_shapes: Sequence[torch.Size] | None = None,
        out_shapes: Sequence[torch.Size] | None = None,
    ):
        m, n = (int(s) for s in shape)
        if m < 0 or n < 0:
            raise ValueError(f"{type(self).__name__}: shape must be non-negative; got {shape}.")
        self.shape = (m, n)
        self.dtype = dtype
        self.device = _canonical_device(device)
        self.in_shapes = None if in_shapes is None else [torch.Size(s) for s in in_shapes]
        if out_shapes is None and self.in_shapes is not None and m == n:
            out_shapes = self.in_shapes
        self.out_shapes = None if out_shapes is None else [torch.Size(s) for s in out_shapes]
        for name, shapes, size in (
            ("in_shapes", self.in_shapes, n),
            ("out_shapes", self.out_shapes, m),
        ):
            if shapes is not None and sum(math.prod(s) for s in shapes) != size:
                raise ValueError(
                    f"{type(self).__name__}: {name} {[tuple(s) for s in shapes]} hold "
                    f"{sum(math.prod(s) for s in shapes)} entries; expected {size}."
                )

    # ----------------------------------------------------------------- to implement
    def _matmat(self, X: Tensor) -> Tensor:  # (n, k) -> (m, k)
        raise NotImplementedError(f"{type(self).__name__} must implement _matmat.")

    def _rmatmat(self, Y: Tensor) -> Tensor:  # (m, k) -> (n, k)
        if self.is_symmetric:
            return self._matmat(Y)
        raise NotImplementedError(f"{type(self).__name__} defines no transpose product (_rmatmat).")

    # ----------------------------------------------------------------- products
    def __matmul__(self, other):
        if isinstance(other, LinearOperator):
            return _Product([self, other])
        X, unflatten = _as_block(other, self, transpose=False)
        return unflatten(self._matmat(X))

    def __rmatmul__(self, other):
        """``x @ A`` for a tensor ``x`` of shape ``(m,)`` or ``(k, m)``: computed as ``(A.T @ x.T).T``."""
        if not isinstance(other, Tensor):
            return NotImplemented
        if other.ndim == 1:
            return self.T @ other
        return (self.T @ other.T).T

    def rmatmat(self, Y: Operand):
        """``A.T @ Y`` without building the adjoint operator; same input forms as ``@``."""
        Y, unflatten = _as_block(Y, self, transpose=True)
        return unflatten(self._rmatmat(Y))

    # ----------------------------------------------------------------- lazy algebra
    @property
    def T(self) -> LinearOperator:  # noqa: N802  (matches torch / numpy)
        """The adjoint (transpose) operator, lazy."""
        return self if self.is_symmetric else _Adjoint(self)

    def __add__(self, other):
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _Sum([self, other])

    def __sub__(self, other):
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _Sum([self, _Scaled(other, -1.0)])

    def __mul__(self, c):
        c = _as_scalar(c)
        if c is None:
            return NotImplemented
        return _Scaled(self, _finite_scale(c, self, "*"))

    __rmul__ = __mul__

    def __truediv__(self, c):
        c = _as_scalar(c)
        if c is None:
            return NotImplemented
        if c == 0:
            raise ZeroDivisionError(f"{type(self).__name__} / 0: division of an operator by zero.")
        return _Scaled(self, _finite_scale(1.0 / c, self, "/"))

    def __neg__(self):
        return _Scaled(self, -1.0)

    # ----------------------------------------------------------------- conversion
    def to_dense(self) -> Tensor:
        """Materialise the operator as an ``(m, n)`` tensor by one product with the identity."""
        return self._matmat(torch.eye(self.shape[1], dtype=self.dtype, device=self.device))

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` with the same products and dtype.

        NumPy inputs are converted to this operator's dtype and device and the results back to
        NumPy, so SciPy's solvers and ``eigsh`` run on top of it. A complex input (SciPy's
        ``gmres`` or ``eigs`` may pass one) is applied to its real and imaginary parts, the
        operator's real-linear extension. ``bfloat16`` operators present ``float32`` to NumPy,
        which has no ``bfloat16``.
        """
        import numpy as np
        import scipy.sparse.linalg

        if not (self.dtype.is_floating_point or self.dtype.is_complex):
            raise TypeError(
                f"{type(self).__name__}.to_scipy: needs a floating-point operator; "
                f"got {self.dtype}."
            )
        # NumPy has no bfloat16; float32 holds every bfloat16 value exactly
        np_dtype = np.dtype(
            "float32" if self.dtype == torch.bfloat16 else str(self.dtype).removeprefix("torch.")
        )

        def wrap(fn: Callable[[Tensor], Tensor]):
            def to_numpy(part):
                # torch warns on a read-only NumPy buffer (it cannot honour the flag): copy it
                part = part if part.flags.writeable else np.array(part)
                t = torch.as_tensor(part, dtype=self.dtype, device=self.device)
                return fn(t).detach().cpu().to(
                    torch.float32 if self.dtype == torch.bfloat16 else self.dtype
                ).numpy()

            def apply(x):
                x = np.asarray(x)
                X = x.reshape(x.shape[0], -1)
                if np.iscomplexobj(X) and not self.dtype.is_complex:
                    # a real operator maps x + iy to Ax + iAy; casting would drop iy silently
                    out = to_numpy(X.real) + 1j * to_numpy(X.imag)
                else:
                    out = to_numpy(X).astype(np_dtype, copy=False)
                return out.reshape(-1) if x.ndim == 1 else out

            return apply

        return scipy.sparse.linalg.LinearOperator(
            self.shape,
            matvec=wrap(self._matmat),
            rmatvec=wrap(self._rmatmat),
            matmat=wrap(self._matmat),
            rmatmat=wrap(self._rmatmat),
            dtype=np_dtype,
        )

    def to(self, *args, **kwargs) -> LinearOperator:
        """Return a copy on another device and/or dtype (``torch.Tensor.to`` arguments)."""
        dtype, device = _parse_to(self, *args, **kwargs)
        return self._to(dtype, device)

    def _to(self, dtype: torch.dtype, device: torch.device) -> LinearOperator:
        raise NotImplementedError(
            f"{type(self).__name__} cannot be moved: it holds no tensors of its own to convert "
            "(build it from tensors on the target device instead)."
        )

    # ----------------------------------------------------------------- structured methods
    # Generic operators know nothing of their structure; each default either falls back on an
    # iterative method that is always correct, or says which function to use instead.
    def inverse(
        self, damping: float = 0.0, *, method: str = "cg", **solver_options
    ) -> LinearOperator:
        """``(A + damping·I)^{-1}`` applied by an iterative solver (``"cg"`` or ``"minres"``).

        Structured subclasses override this with an exact inverse.
        """
        from curvkit.linalg.solve import SolveOperator

        return SolveOperator(self, damping=damping, method=method, **solver_options)

    def trace(self) -> Tensor:
        """Exact trace; generic operators have none (use ``curvkit.linalg.trace``)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no exact trace; estimate it with "
            "curvkit.linalg.trace(A, method='xtrace', num_matvecs=...) or use A.to_dense().trace()."
        )

    def diagonal(self) -> Tensor:
        """Exact diagonal; generic operators have none (use ``curvkit.linalg.diagonal``)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no exact diagonal; estimate it with "
            "curvkit.linalg.diagonal(A, method='xdiag', num_matvecs=...)."
        )

    def logdet(self) -> Tensor:
        """Exact log-determinant; generic operators have none."""
        raise NotImplementedError(
            f"{type(self).__name__} has no exact logdet; use torch.logdet(A.to_dense()) on small "
            "operators or stochastic Lanczos quadrature (curvkit.linalg.spectral_density)."
        )

    def eigh(self) -> tuple[Tensor, Tensor | LinearOperator]:
        """Full eigendecomposition; generic operators have none (use ``curvkit.linalg.eigsh``)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no exact eigendecomposition; use "
            "curvkit.linalg.eigsh(A, k) for extreme eigenpairs."
        )

    def pow(self, p: float) -> LinearOperator:
        """Matrix power ``A^p``; generic operators have none."""
        raise NotImplementedError(
            f"{type(self).__name__} has no matrix power; convert it with "
            "curvkit.linalg.Dense(A.to_dense(), symmetric=True) on small problems."
        )

    def sqrt(self) -> LinearOperator:
        """Symmetric square root ``A^{1/2}`` (see ``pow``)."""
        return self.pow(0.5)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"
        )


# --------------------------------------------------------------------------- input handling
def _as_block(x: Operand, op: LinearOperator, *, transpose: bool):
    """Turn a product's right-hand side into an ``(n, k)`` block and return the inverse map.

    Accepts a vector ``(n,)``, a block ``(n, k)``, or a list of tensors shaped like
    ``op.in_shapes`` (each optionally with a trailing ``k``). Returns ``(X, unflatten)`` where
    ``unflatten`` maps an ``(m, k)`` result back to the caller's form.
    """
    name = type(op).__name__
    n = op.shape[0] if transpose else op.shape[1]
    in_shapes = op.out_shapes if transpose else op.in_shapes
    out_shapes = op.in_shapes if transpose else op.out_shapes

    if isinstance(x, Tensor):
        _check_tensor(x, op, name)
        if x.ndim == 1 and x.shape[0] == n:
            return x.unsqueeze(1), lambda Y: Y.squeeze(1)
        if x.ndim == 2 and x.shape[0] == n:
            return x, lambda Y: Y
        raise ValueError(
            f"{name}: expected an operand of shape ({n},) or ({n}, k); got {tuple(x.shape)}."
        )

    if isinstance(x, (list, tuple)) and x and all(isinstance(t, Tensor) for t in x):
        if in_shapes is None:
            raise TypeError(
                f"{name}: got a list of {len(x)} tensors, but this operator has no parameter "
                "shapes; pass a flat tensor of shape (n,) or (n, k)."
            )
        if len(x) != len(in_shapes):
            raise ValueError(f"{name}: expected a list of {len(in_shapes)} tensors; got {len(x)}.")
        for t in x:
            _check_tensor(t, op, name)
        if all(t.shape == s for t, s in zip(x, in_shapes)):
            X, k = torch.cat([t.reshape(-1, 1) for t in x]), None
        elif (
            all(t.shape[:-1] == s for t, s in zip(x, in_shapes))
            and len({t.shape[-1] for t in x}) == 1
        ):
            k = x[0].shape[-1]
            X = torch.cat([t.reshape(-1, k) for t in x])
        else:
            raise ValueError(
                f"{name}: expected tensors of shapes {[tuple(s) for s in in_shapes]} "
                f"(optionally with a common trailing k); got {[tuple(t.shape) for t in x]}."
            )

        def unflatten(Y: Tensor):
            shapes = out_shapes if out_shapes is not None else [torch.Size([Y.shape[0]])]
            parts = Y.split([math.prod(s) for s in shapes])
            if k is None:
                return [p.reshape(s) for p, s in zip(parts, shapes)]
            return [p.reshape(*s, k) for p, s in zip(parts, shapes)]

        return X, unflatten

    raise TypeError(
        f"{name}: expected a tensor, a list of tensors or a LinearOperator; got "
        f"{type(x).__name__} (convert NumPy input with torch.as_tensor(x, dtype={op.dtype}), or "
        "work in NumPy/SciPy through A.to_scipy())."
    )


def _as_scalar(c) -> float | None:
    """A real scalar (Python or NumPy number, one-element real tensor) as a float, else None."""
    if isinstance(c, Tensor):
        return c.item() if c.numel() == 1 and not c.is_complex() else None
    if isinstance(c, numbers.Real):
        return float(c)
    return None


def _finite_scale(c: float, op: LinearOperator, symbol: str) -> float:
    # a NaN or inf factor would turn every product into NaN, far from where it was introduced
    if not math.isfinite(c):
        raise ValueError(
            f"{type(op).__name__} {symbol} c: the scale factor must be finite; got {c}."
        )
    return c


def _canonical_device(device: torch.device | str) -> torch.device:
    """``cuda`` → ``cuda:0`` (the current index), so that it compares equal to tensors' devices."""
    device = torch.device(device)
    if device.type not in ("cpu", "meta") and device.index is None:
        return torch.empty(0, device=device).device
    return device


def _check_tensor(x: Tensor, op: LinearOperator, name: str) -> None:
    if x.dtype != op.dtype:
        raise TypeError(f"{name}: expected operand dtype {op.dtype}; got {x.dtype}.")
    if x.device != op.device:
        raise ValueError(f"{name}: expected operand on device {op.device}; got {x.device}.")


def _parse_to(op: LinearOperator, *args, **kwargs) -> tuple[torch.dtype, torch.device]:
    dtype, device = kwargs.pop("dtype", None), kwargs.pop("device", None)
    if kwargs:
        raise TypeError(f"{type(op).__name__}.to: unexpected arguments {sorted(kwargs)}.")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, (str, torch.device)):
            device = a
        else:
            raise TypeError(f"{type(op).__name__}.to: expected a dtype or a device; got {a!r}.")
    return dtype or op.dtype, torch.device(device) if device is not None else op.device


def _common(ops: Sequence[LinearOperator], what: str) -> tuple[torch.dtype, torch.device]:
    dtypes, devices = {o.dtype for o in ops}, {o.device for o in ops}
    if len(dtypes) > 1:
        raise TypeError(f"{what}: operators must share one dtype; got {sorted(map(str, dtypes))}.")
    if len(devices) > 1:
        raise ValueError(
            f"{what}: operators must share one device; got {sorted(map(str, devices))}."
        )
    return dtypes.pop(), devices.pop()


def _agreed_shapes(ops: Sequence[LinearOperator], attr: str) -> list[torch.Size] | None:
    """The parameter shapes ``attr`` the operands declare, refusing two different ones."""
    declared = {tuple(getattr(o, attr)) for o in ops if getattr(o, attr) is not None}
    if len(declared) > 1:
        raise ValueError(
            f"Sum: operands declare different {attr}: "
            f"{[[tuple(s) for s in d] for d in declared]}; a list operand would be split "
            "differently for each."
        )
    return list(declared.pop()) if declared else None


# --------------------------------------------------------------------------- lazy compositions
class _Sum(LinearOperator):
    """``A_1 + ... + A_r`` (lazy)."""

    def __init__(self, ops: Sequence[LinearOperator]):
        flat = [p for o in ops for p in (o.ops if isinstance(o, _Sum) else [o])]
        shapes = {o.shape for o in flat}
        if len(shapes) > 1:
            raise ValueError(
                f"Sum: operands must have equal shapes; got {[o.shape for o in flat]}."
            )
        dtype, device = _common(flat, "Sum")
        # parameter shapes from whichever operand has them (``I + A`` as well as ``A + I``);
        # operands that disagree would split a list operand differently
        in_shapes = _agreed_shapes(flat, "in_shapes")
        out_shapes = _agreed_shapes(flat, "out_shapes")
        super().__init__(
            flat[0].shape,
            dtype=dtype,
            device=device,
            in_shapes=in_shapes,
            out_shapes=out_shapes,
        )
        self.ops = flat
        self.is_symmetric = all(o.is_symmetric for o in flat)
        self.is_psd = all(o.is_psd for o in flat)

    def _matmat(self, X):
        return sum(o._matmat(X) for o in self.ops)

    def _rmatmat(self, Y):
        return sum(o._rmatmat(Y) for o in self.ops)

    def _to(self, dtype, device):
        return _Sum([o._to(dtype, device) for o in self.ops])

    def trace(self):
        return sum(o.trace() for o in self.ops)

    def diagonal(self):
        return sum(o.diagonal() for o in self.ops)


class _Scaled(LinearOperator):
    """``c · A`` (lazy)."""

    def __init__(self, op: LinearOperator, c: float):
        if isinstance(op, _Scaled):
            op, c = op.op, c * op.c
        super().__init__(
            op.shape,
            dtype=op.dtype,
            device=op.device,
            in_shapes=op.in_shapes,
            out_shapes=op.out_shapes,
        )
        self.op, self.c = op, c
        self.is_symmetric = op.is_symmetric
        self.is_psd = op.is_psd and c >= 0

    def _matmat(self, X):
        return self.c * self.op._matmat(X)

    def _rmatmat(self, Y):
        return self.c * self.op._rmatmat(Y)

    def _to(self, dtype, device):
        return _Scaled(self.op._to(dtype, device), self.c)

    def trace(self):
        return self.c * self.op.trace()

    def diagonal(self):
        return self.c * self.op.diagonal()

    def logdet(self):
        # det(cA) = c^n det(A): for c < 0 and even n that is |c|^n det(A)
        if self.c > 0 or (self.c < 0 and self.shape[0] % 2 == 0):
            return self.shape[0] * math.log(abs(self.c)) + self.op.logdet()
        return super().logdet()

    def eigh(self):
        """``(c λ, Q)`` from ``A``'s eigenpairs, in ``A``'s order (reversed when ``c < 0``)."""
        evals, evecs = self.op.eigh()
        return self.c * evals, evecs

    def inverse(self, damping: float = 0.0, **kwargs):
        if self.c > 0:  # (cA + λI)^{-1} = (1/c)(A + (λ/c) I)^{-1}
            return _Scaled(self.op.inverse(damping=damping / self.c, **kwargs), 1.0 / self.c)
        return super().inverse(damping, **kwargs)


class _Product(LinearOperator):
    """``A_1 A_2 ... A_r`` (lazy)."""

    def __init__(self, ops: Sequence[LinearOperator]):
        flat = [p for o in ops for p in (o.ops if isinstance(o, _Product) else [o])]
        for a, b in zip(flat, flat[1:]):
            if a.shape[1] != b.shape[0]:
                raise ValueError(f"Product: inner dimensions differ: {a.shape} @ {b.shape}.")
        dtype, device = _common(flat, "Product")
        super().__init__(
            (flat[0].shape[0], flat[-1].shape[1]),
            dtype=dtype,
            device=device,
            in_shapes=flat[-1].in_shapes,
            out_shapes=flat[0].out_shapes,
        )
        self.ops = flat

    def _matmat(self, X):
        for o in reversed(self.ops):
            X = o._matmat(X)
        return X

    def _rmatmat(self, Y):
        for o in self.ops:
            Y = o._rmatmat(Y)
        return Y

    def _to(self, dtype, device):
        return _Product([o._to(dtype, device) for o in self.ops])


class _Adjoint(LinearOperator):
    """``A.T`` (lazy)."""

    def __init__(self, op: LinearOperator):
        super().__init__(
            (op.shape[1], op.shape[0]),
            dtype=op.dtype,
            device=op.device,
            in_shapes=op.out_shapes,
            out_shapes=op.in_shapes,
        )
        self.op = op

    @property
    def T(self):  # noqa: N802
        return self.op

    def _matmat(self, X):
        return self.op._rmatmat(X)

    def _rmatmat(self, Y):
        return self.op._matmat(Y)

    def _to(self, dtype, device):
        return _Adjoint(self.op._to(dtype, device))

    def trace(self):
        return self.op.trace()

    def diagonal(self):
        return self.op.diagonal()

    def logdet(self):
        return self.op.logdet()
