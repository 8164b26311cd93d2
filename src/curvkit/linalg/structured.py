"""Structured operators whose methods exploit their structure exactly.

``Dense``, ``Diagonal``, ``Identity``, ``Kronecker`` and ``BlockDiagonal`` (``LowRank`` and
``SymmetricEigen`` are in ``eigen.py``). Each implements what its structure allows among
``inverse``, ``pow``, ``eigh``, ``trace``, ``logdet`` and ``diagonal``; the rest fall back on the
base class, which names the estimator or solver to use instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from curvkit.linalg.operator import LinearOperator, _common

__all__ = [
    "Dense",
    "Diagonal",
    "Identity",
    "Kronecker",
    "BlockDiagonal",
]


def _require_square(op: LinearOperator, method: str) -> int:
    m, n = op.shape
    if m != n:
        raise ValueError(
            f"{type(op).__name__}.{method}: needs a square operator; got shape {op.shape}."
        )
    return n


def _require_symmetric(op: LinearOperator, method: str) -> None:
    if not op.is_symmetric:
        raise ValueError(
            f"{type(op).__name__}.{method}: needs a symmetric operator; construct it with "
            "symmetric=True if it is."
        )


def _check_damping(damping: float, caller: str) -> float:
    damping = float(damping)
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"{caller}: damping must be a finite number >= 0; got {damping}.")
    return damping


def _spectral_pow(evals: Tensor, p: float, caller: str) -> Tensor:
    """``λ^p`` for the eigenvalues of a PSD matrix; negative eigenvalues are an error, not clamped."""
    if p != int(p) and (evals < 0).any():
        raise ValueError(
            f"{caller}: fractional power {p} of a matrix with negative eigenvalues "
            f"(min {evals.min().item():.3e}); add damping or clamp the spectrum explicitly."
        )
    if p < 0 and (evals == 0).any():
        raise ValueError(f"{caller}: negative power {p} of a singular matrix; add damping.")
    return evals.pow(p)


def _cholesky_solve_inverse(M: Tensor, caller: str) -> Tensor:
    """Inverse of an SPD matrix by Cholesky, retried in float64 with a warning if it fails."""
    L, info = torch.linalg.cholesky_ex(M)
    if not info.any():
        return torch.cholesky_inverse(L)
    if M.dtype == torch.float64:
        raise torch.linalg.LinAlgError(
            f"{caller}: Cholesky failed; the matrix is not positive definite."
        )
    warnings.warn(f"{caller}: Cholesky failed in {M.dtype}; retrying in float64.", stacklevel=3)
    M64 = M.double()
    L, info = torch.linalg.cholesky_ex(M64)
    if info.any():
        raise torch.linalg.LinAlgError(
            f"{caller}: Cholesky failed in float64 too; the matrix is not positive definite "
            "(add damping)."
        )
    return torch.cholesky_inverse(L).to(M.dtype)


# --------------------------------------------------------------------------- Dense
class Dense(LinearOperator):
    """An explicit ``(m, n)`` matrix.

    Args:
        M: Matrix of shape ``(m, n)``.
        symmetric: Declare ``M`` symmetric (enables ``eigh``, ``pow``, the Cholesky inverse).
        psd: Declare ``M`` positive semi-definite (implies ``symmetric``).
    """

    def __init__(self, M: Tensor, *, symmetric: bool = False, psd: bool = False):
        if not isinstance(M, Tensor) or M.ndim != 2:
            raise ValueError(f"Dense: expected a 2-d tensor; got {getattr(M, 'shape', type(M))}.")
        super().__init__(tuple(M.shape), dtype=M.dtype, device=M.device)
        self.M = M
        self.is_symmetric = symmetric or psd
        self.is_psd = psd

    def _matmat(self, X):
        return self.M @ X

    def _rmatmat(self, Y):
        return self.M.T @ Y

    def _to(self, dtype, device):
        return Dense(
            self.M.to(dtype=dtype, device=device), symmetric=self.is_symmetric, psd=self.is_psd
        )

    def to_dense(self):
        return self.M

    def trace(self):
        _require_square(self, "trace")
        return self.M.trace()

    def diagonal(self):
        return self.M.diagonal()

    def logdet(self):
        _require_square(self, "logdet")
        sign, logabs = torch.linalg.slogdet(self.M)
        if sign <= 0:
            raise ValueError(
                f"Dense.logdet: determinant is not positive (sign {sign.item():+.0f})."
            )
        return logabs

    def eigh(self):
        _require_symmetric(self, "eigh")
        return torch.linalg.eigh(self.M)

    def pow(self, p):
        _require_symmetric(self, "pow")
        evals, Q = torch.linalg.eigh(self.M)
        return Dense(
            (Q * _spectral_pow(evals, p, "Dense.pow")) @ Q.T, symmetric=True, psd=self.is_psd
        )

    def inverse(self, damping: float = 0.0, **_):
        n = _require_square(self, "inverse")
        damping = _check_damping(damping, "Dense.inverse")
        M = (
            self.M + damping * torch.eye(n, dtype=self.dtype, device=self.device)
            if damping
            else self.M
        )
        if self.is_psd:
            return Dense(_cholesky_solve_inverse(M, "Dense.inverse"), psd=True)
        return Dense(torch.linalg.inv(M), symmetric=self.is_symmetric)


# --------------------------------------------------------------------------- Diagonal / Identity
class Diagonal(LinearOperator):
    """``diag(d)`` for ``d`` of shape ``(n,)``."""

    is_symmetric = True

    def __init__(self, d: Tensor):
        if not isinstance(d, Tensor) or d.ndim != 1:
            raise ValueError(
                f"Diagonal: expected a 1-d tensor; got {getattr(d, 'shape', type(d))}."
            )
        super().__init__((d.shape[0], d.shape[0]), dtype=d.dtype, device=d.device)
        self.d = d
        self.is_psd = bool((d >= 0).all())

    def _matmat(self, X):
        return self.d.unsqueeze(1) * X

    def _to(self, dtype, device):
        return Diagonal(self.d.to(dtype=dtype, device=device))

    def to_dense(self):
        return torch.diag(self.d)

    def trace(self):
        return self.d.sum()

    def diagonal(self):
        return self.d

    def logdet(self):
        if (self.d <= 0).any():
            raise ValueError(
                "Diagonal.logdet: entries must be positive for a real log-determinant."
            )
        return self.d.log().sum()

    def eigh(self):
        evals, order = self.d.sort()
        Q = torch.eye(self.shape[0], dtype=self.dtype, device=self.device)[:, order]
        return evals, Q

    def pow(self, p):
        return Diagonal(_spectral_pow(self.d, p, "Diagonal.pow"))

    def inverse(self, damping: float = 0.0, **_):
        d = self.d + _check_damping(damping, "Diagonal.inverse")
        if (d == 0).any():
            raise ValueError("Diagonal.inverse: the diagonal has zeros; add damping.")
        return Diagonal(1.0 / d)


class Identity(LinearOperator):
    """``scale · I_n``.

    Args:
        n: Size.
        scale: Scalar multiple of the identity.
        dtype, device: Of the vectors it acts on.
        in_shapes: Optional parameter shapes (list products).
    """

    is_symmetric = True

    def __init__(
        self,
        n: int,
        scale: float = 1.0,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        in_shapes=None,
    ):
        super().__init__(
            (n, n), dtype=dtype or torch.get_default_dtype(), device=device, in_shapes=in_shapes
        )
        self.scale = float(scale)
        self.is_psd = self.scale >= 0

    def _matmat(self, X):
        return self.scale * X

    def _to(self, dtype, device):
        return Identity(
            self.shape[0], self.scale, dtype=dtype, device=device, in_shapes=self.in_shapes
        )

    def _full(self, value: float) -> Tensor:
        return torch.full((self.shape[0],), value, dtype=self.dtype, device=self.device)

    def trace(self):
        return torch.tensor(self.scale * self.shape[0], dtype=self.dtype, device=self.device)

    def diagonal(self):
        return self._full(self.scale)

    def logdet(self):
        if self.scale <= 0:
            raise ValueError(f"Identity.logdet: scale must be positive; got {self.scale}.")
        return torch.tensor(
            self.shape[0] * math.log(self.scale), dtype=self.dtype, device=self.device
        )

    def eigh(self):
        return self._full(self.scale), Identity(self.shape[0], dtype=self.dtype, device=self.device)

    def pow(self, p):
        return Identity(
            self.shape[0],
            _spectral_pow(torch.tensor(self.scale), p, "Identity.pow").item(),
            dtype=self.dtype,
            device=self.device,
            in_shapes=self.in_shapes,
        )

    def inverse(self, damping: float = 0.0, **_):
        s = self.scale + _check_damping(damping, "Identity.inverse")
        if s == 0:
            raise ValueError("Identity.inverse: zero scale; add damping.")
        return Identity(
            self.shape[0], 1.0 / s, dtype=self.dtype, device=self.device, in_shapes=self.in_shapes
        )


# --------------------------------------------------------------------------- Kronecker
class Kronecker(LinearOperator):
    """``A_1 ⊗ A_2 ⊗ ... ⊗ A_r``, never materialised.

    Vectors are row-major: ``(A ⊗ B) vec(V) = vec(A V Bᵀ)`` for ``V`` of shape ``(n_A, n_B)``,
    matching ``torch.kron`` and ``Tensor.flatten``.

    Args:
        *factors: Matrices ``A_i`` of shapes ``(m_i, n_i)``.
        symmetric: Declare every factor symmetric (default: inferred from exact symmetry of the
            factors). ``psd=True`` declares every factor PSD.
    """

    def __init__(self, *factors: Tensor, symmetric: bool | None = None, psd: bool = False):
        if not factors or any(not isinstance(f, Tensor) or f.ndim != 2 for f in factors):
            raise ValueError(
                "Kronecker: expected one or more 2-d tensors; got "
                f"{[tuple(getattr(f, 'shape', ())) for f in factors]}."
            )
        dtypes, devices = {f.dtype for f in factors}, {f.device for f in factors}
        if len(dtypes) > 1 or len(devices) > 1:
            raise TypeError(
                f"Kronecker: factors must share dtype and device; got {dtypes}, {devices}."
            )
        m = math.prod(f.shape[0] for f in factors)
        n = math.prod(f.shape[1] for f in factors)
        super().__init__((m, n), dtype=factors[0].dtype, device=factors[0].device)
        self.factors = list(factors)
        if (symmetric or psd) and any(f.shape[0] != f.shape[1] for f in factors):
            # (⊗ A_i)ᵀ = ⊗ A_iᵀ swaps a non-square factor's shape: A.T = A would be wrong
            raise ValueError(
                "Kronecker: symmetric=True or psd=True needs square factors; got "
                f"{[tuple(f.shape) for f in factors]}."
            )
        if symmetric is None:
            symmetric = psd or all(
                f.shape[0] == f.shape[1] and torch.equal(f, f.T) for f in factors
            )
        self.is_symmetric = symmetric or psd
        self.is_psd = psd

    def _apply(self, mats: Sequence[Tensor], X: Tensor) -> Tensor:
        # Contract each mode in turn: (n_1, ..., n_r, k) -> (m_1, ..., m_r, k). Each step is one
        # matmul over the leading mode, then a cyclic shift of the modes.
        k = X.shape[1]
        if k == 0:  # (the mode-wise reshapes below cannot infer a size from 0 entries)
            return X.new_zeros(math.prod(M.shape[0] for M in mats), 0)
        T = X.reshape(*[M.shape[1] for M in mats], k)
        for M in mats:
            rest = T.shape[1:]
            T = (M @ T.reshape(T.shape[0], -1)).reshape(M.shape[0], *rest)
            T = T.movedim(0, -2)  # bring the next mode to the front, keep k last
        return T.reshape(-1, k)

    def _matmat(self, X):
        return self._apply(self.factors, X)

    def _rmatmat(self, Y):
        return self._apply([f.T for f in self.factors], Y)

    def _to(self, dtype, device):
        return Kronecker(
            *[f.to(dtype=dtype, device=device) for f in self.factors],
            symmetric=self.is_symmetric,
            psd=self.is_psd,
        )

    def to_dense(self):
        out = self.factors[0]
        for f in self.factors[1:]:
            out = torch.kron(out, f)
        return out

    def _sizes(self, method: str) -> list[int]:
        _require_square(self, method)
        if any(f.shape[0] != f.shape[1] for f in self.factors):
            raise ValueError(
                f"Kronecker.{method}: needs square factors; got {[tuple(f.shape) for f in self.factors]}."
            )
        return [f.shape[0] for f in self.factors]

    def trace(self):  # tr(A ⊗ B) = tr A · tr B
        self._sizes("trace")
        return math.prod(f.trace() for f in self.factors)

    def diagonal(self):
        self._sizes("diagonal")
        out = self.factors[0].diagonal()
        for f in self.factors[1:]:
            out = torch.outer(out, f.diagonal()).flatten()
        return out

    def logdet(self):  # logdet(A ⊗ B) = n_B logdet A + n_A logdet B
        sizes = self._sizes("logdet")
        n = math.prod(sizes)
        total, negative = 0.0, False
        for f, s in zip(self.factors, sizes):
            sign, logabs = torch.linalg.slogdet(f)
            if sign == 0:
                raise ValueError("Kronecker.logdet: a factor has non-positive determinant (zero).")
            # det(⊗ A_i) = Π det(A_i)^(n / n_i): a negative factor counts only to an odd power
            negative ^= bool(sign < 0) and (n // s) % 2 == 1
            total = total + (n // s) * logabs
        if negative:
            raise ValueError("Kronecker.logdet: non-positive determinant (a factor with negative "
                             "determinant enters to an odd power).")
        return total

    def eigh(self):
        """Eigenvalues ``(n,)`` (in Kronecker order, not sorted) and eigenvectors as a ``Kronecker``."""
        self._sizes("eigh")
        _require_symmetric(self, "eigh")
        pairs = [torch.linalg.eigh(f) for f in self.factors]
        evals = pairs[0][0]
        for lam, _ in pairs[1:]:
            evals = torch.outer(evals, lam).flatten()
        return evals, Kronecker(*[Q for _, Q in pairs])

    def pow(self, p):
        """``(⊗ A_i)^p = ⊗ A_i^p`` for symmetric PSD factors."""
        self._sizes("pow")
        _require_symmetric(self, "pow")
        out = []
        for f in self.factors:
            lam, Q = torch.linalg.eigh(f)
            out.append((Q * _spectral_pow(lam, p, "Kronecker.pow")) @ Q.T)
        return Kronecker(*out, symmetric=True, psd=self.is_psd)

    def inverse(self, damping: float = 0.0, **_):
        """``(⊗ A_i + λ I)^{-1}``: factor-wise inverses when ``λ = 0``, else via ``eigh``.

        Damping is exact (added to the Kronecker product, not to the factors); for per-factor
        damping invert ``Kronecker(A + a I, B + b I)`` instead.
        """
        self._sizes("inverse")
        damping = _check_damping(damping, "Kronecker.inverse")
        if damping == 0.0:
            invs = [
                _cholesky_solve_inverse(f, "Kronecker.inverse")
                if self.is_psd
                else torch.linalg.inv(f)
                for f in self.factors
            ]
            return Kronecker(*invs, symmetric=self.is_symmetric, psd=self.is_psd)
        if not self.is_symmetric:
            raise ValueError(
                "Kronecker.inverse: damping > 0 needs symmetric factors (the damped inverse goes "
                "through eigh); declare symmetric=True if they are, or invert "
                "Kronecker(A + a I, B + b I) with damping=0 for per-factor damping."
            )
        evals, Q = self.eigh()
        shifted = evals + damping
        if (shifted == 0).any():
            raise ValueError("Kronecker.inverse: the damped matrix is singular.")
        from curvkit.linalg.eigen import SymmetricEigen  # eigen.py builds on this module

        return SymmetricEigen(Q, 1.0 / shifted)


# --------------------------------------------------------------------------- BlockDiagonal
class BlockDiagonal(LinearOperator):
    """``diag(B_1, ..., B_r)`` of operators (or tensors, wrapped as ``Dense``)."""

    def __init__(self, blocks: Sequence[LinearOperator | Tensor], *, in_shapes=None):
        blocks = [Dense(b) if isinstance(b, Tensor) else b for b in blocks]
        if not blocks:
            raise ValueError("BlockDiagonal: expected at least one block.")
        dtype, device = _common(blocks, "BlockDiagonal")
        m = sum(b.shape[0] for b in blocks)
        n = sum(b.shape[1] for b in blocks)
        super().__init__((m, n), dtype=dtype, device=device, in_shapes=in_shapes)
        self.blocks = list(blocks)
        self.is_symmetric = all(b.is_symmetric for b in blocks)
        self.is_psd = all(b.is_psd for b in blocks)

    def _split_apply(self, X, transpose: bool):
        sizes = [b.shape[0 if transpose else 1] for b in self.blocks]
        parts = X.split(sizes)
        return torch.cat(
            [(b._rmatmat if transpose else b._matmat)(x) for b, x in zip(self.blocks, parts)]
        )

    def _matmat(self, X):
        return self._split_apply(X, transpose=False)

    def _rmatmat(self, Y):
        return self._split_apply(Y, transpose=True)

    def _to(self, dtype, device):
        return BlockDiagonal([b._to(dtype, device) for b in self.blocks], in_shapes=self.in_shapes)

    def _map(self, fn) -> BlockDiagonal:
        return BlockDiagonal([fn(b) for b in self.blocks], in_shapes=self.in_shapes)

    def _require_square_blocks(self, method: str) -> None:
        # with a non-square block the blocks' diagonals are not on the matrix's diagonal
        if any(b.shape[0] != b.shape[1] for b in self.blocks):
            raise ValueError(
                f"BlockDiagonal.{method}: needs square blocks; got "
                f"{[b.shape for b in self.blocks]}."
            )

    def trace(self):
        self._require_square_blocks("trace")
        return sum(b.trace() for b in self.blocks)

    def diagonal(self):
        self._require_square_blocks("diagonal")
        return torch.cat([b.diagonal() for b in self.blocks])

    def logdet(self):
        return sum(b.logdet() for b in self.blocks)

    def eigh(self):
        """Eigenvalues ``(n,)`` (block by block) and a ``BlockDiagonal`` of the blocks' eigenvectors."""
        pairs = [b.eigh() for b in self.blocks]
        return torch.cat([lam for lam, _ in pairs]), BlockDiagonal([Q for _, Q in pairs])

    def pow(self, p):
        return self._map(lambda b: b.pow(p))

    def inverse(self, damping: float = 0.0, **kwargs):
        return self._map(lambda b: b.inverse(damping, **kwargs))
