"""Operators in eigen form: ``LowRank`` (``U diag(s) Vᵀ``) and ``SymmetricEigen``.

``SymmetricEigen`` (``Q diag(λ) Qᵀ`` plus a constant on the complement of ``range(Q)``) is what
the exact damped inverses of ``Kronecker`` and ``LowRank`` return, so they stay structured.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.linalg.operator import LinearOperator
from curvkit.linalg.structured import (
    Kronecker,
    _check_damping,
    _require_square,
    _require_symmetric,
    _spectral_pow,
)

__all__ = ["LowRank", "SymmetricEigen"]


# --------------------------------------------------------------------------- LowRank
class LowRank(LinearOperator):
    """``U diag(s) Vᵀ`` with ``U: (m, r)``, ``s: (r,)``, ``V: (n, r)``; symmetric when ``V`` is None.

    The symmetric form ``U diag(s) Uᵀ`` (as returned by ``nystrom``) supports the damped inverse
    by the Woodbury identity, ``eigh``, ``pow``, ``trace`` and ``diagonal``.
    """

    def __init__(self, U: Tensor, s: Tensor, V: Tensor | None = None):
        if U.ndim != 2 or s.ndim != 1 or s.shape[0] != U.shape[1]:
            raise ValueError(
                f"LowRank: expected U (m, r) and s (r,); got {tuple(U.shape)} and {tuple(s.shape)}."
            )
        if V is not None and (V.ndim != 2 or V.shape[1] != U.shape[1]):
            raise ValueError(f"LowRank: expected V (n, {U.shape[1]}); got {tuple(V.shape)}.")
        n = U.shape[0] if V is None else V.shape[0]
        super().__init__((U.shape[0], n), dtype=U.dtype, device=U.device)
        self.U, self.s, self.V = U, s, V
        self.is_symmetric = V is None
        self.is_psd = V is None and bool((s >= 0).all())

    def _matmat(self, X):
        V = self.U if self.V is None else self.V
        return self.U @ (self.s.unsqueeze(1) * (V.T @ X))

    def _rmatmat(self, Y):
        V = self.U if self.V is None else self.V
        return V @ (self.s.unsqueeze(1) * (self.U.T @ Y))

    def _to(self, dtype, device):
        conv = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
        return LowRank(conv(self.U), conv(self.s), conv(self.V))

    def trace(self):  # tr(U S Vᵀ) = Σ_j s_j ⟨v_j, u_j⟩
        _require_square(self, "trace")
        V = self.U if self.V is None else self.V
        return (self.s * (self.U * V).sum(0)).sum()

    def diagonal(self):
        _require_square(self, "diagonal")
        V = self.U if self.V is None else self.V
        return (self.U * V) @ self.s

    def eigh(self):
        """Orthonormal form ``Q diag(λ) Qᵀ`` (``Q: (n, r)``) from a thin QR and an ``r × r`` eigh."""
        _require_symmetric(self, "eigh")
        Q, R = torch.linalg.qr(self.U)
        lam, W = torch.linalg.eigh((R * self.s) @ R.T)
        return lam, Q @ W

    def _as_eigen(self) -> SymmetricEigen:
        lam, Q = self.eigh()
        return SymmetricEigen(Q, lam)

    def pow(self, p):
        return self._as_eigen().pow(p)

    def logdet(self):
        return self._as_eigen().logdet()

    def inverse(self, damping: float = 0.0, **_):
        """``(U S Uᵀ + λI)^{-1} = Q (Λ + λ)^{-1} Qᵀ + λ^{-1} (I − Q Qᵀ)`` (Woodbury, exact)."""
        _require_symmetric(self, "inverse")
        return self._as_eigen().inverse(damping)


# --------------------------------------------------------------------------- SymmetricEigen
class SymmetricEigen(LinearOperator):
    """``Q diag(λ) Qᵀ + c (I − Q Qᵀ)`` with orthonormal columns ``Q: (n, r)``, ``r <= n``.

    ``Q`` may be a tensor or an orthogonal operator (e.g. a ``Kronecker`` of eigenbases), so
    that ``Kronecker.inverse(damping)`` stays structured. ``complement`` is the eigenvalue on the
    orthogonal complement of ``range(Q)`` (zero for a plain eigendecomposition); it makes the
    damped inverse of a low-rank operator exact.
    """

    is_symmetric = True

    def __init__(self, Q: Tensor | LinearOperator, eigenvalues: Tensor, complement: float = 0.0):
        n, r = Q.shape
        if eigenvalues.shape != (r,):
            raise ValueError(
                f"SymmetricEigen: expected eigenvalues of shape ({r},); got {tuple(eigenvalues.shape)}."
            )
        if r > n:
            raise ValueError(f"SymmetricEigen: Q must have at most n={n} columns; got {r}.")
        super().__init__((n, n), dtype=eigenvalues.dtype, device=eigenvalues.device)
        self.Q, self.eigenvalues, self.complement = Q, eigenvalues, float(complement)
        self.is_psd = bool((eigenvalues >= 0).all()) and self.complement >= 0

    @property
    def rank(self) -> int:
        return self.Q.shape[1]

    def _matmat(self, X):
        Qt_X = self.Q.T @ X
        out = self.Q @ (self.eigenvalues.unsqueeze(1) * Qt_X)
        if self.complement != 0.0 and self.rank < self.shape[0]:
            out = out + self.complement * (X - self.Q @ Qt_X)
        return out

    def _to(self, dtype, device):
        Q = self.Q.to(dtype=dtype, device=device)
        return SymmetricEigen(Q, self.eigenvalues.to(dtype=dtype, device=device), self.complement)

    def _full_spectrum(self) -> Tensor:
        extra = self.shape[0] - self.rank
        if extra == 0:
            return self.eigenvalues
        return torch.cat([self.eigenvalues, self.eigenvalues.new_full((extra,), self.complement)])

    def trace(self):
        return self.eigenvalues.sum() + self.complement * (self.shape[0] - self.rank)

    def diagonal(self):
        # diag(Q Λ Qᵀ) = (Q ∘ Q) λ; for a Kronecker Q, (Q ∘ Q) is the Kronecker of squared factors.
        sq = (
            Kronecker(*[f * f for f in self.Q.factors])
            if isinstance(self.Q, Kronecker)
            else self.Q * self.Q
        )
        d = sq @ self.eigenvalues
        if self.complement != 0.0 and self.rank < self.shape[0]:
            d = d + self.complement * (1 - sq @ torch.ones_like(self.eigenvalues))
        return d

    def logdet(self):
        spectrum = self._full_spectrum()
        if (spectrum <= 0).any():
            raise ValueError("SymmetricEigen.logdet: the spectrum has non-positive values.")
        return spectrum.log().sum()

    def eigh(self):
        """``(λ, Q)`` such that ``Q diag(λ) Qᵀ`` is this operator.

        With a zero complement that is the stored (thin) pair; otherwise ``Q`` is completed to
        an orthonormal basis of ``R^n`` whose added columns carry the complement eigenvalue
        (the thin pair alone would drop ``c (I − Q Qᵀ)``).
        """
        extra = self.shape[0] - self.rank
        if self.complement == 0.0 or extra == 0:
            return self.eigenvalues, self.Q
        if not isinstance(self.Q, Tensor):
            raise NotImplementedError(
                "SymmetricEigen.eigh: cannot complete an operator basis Q of rank "
                f"{self.rank} < n = {self.shape[0]} with the complement {self.complement}; "
                "build it with a tensor Q."
            )
        # the last n - r columns of a complete QR of Q span range(Q)'s orthogonal complement
        Q_full, _ = torch.linalg.qr(self.Q, mode="complete")
        return self._full_spectrum(), torch.cat([self.Q, Q_full[:, self.rank :]], 1)

    def pow(self, p):
        c = (  # a float64 scalar: torch.tensor(float) would round the complement to float32
            _spectral_pow(
                torch.tensor(self.complement, dtype=torch.float64), p, "SymmetricEigen.pow"
            ).item()
            if self.rank < self.shape[0]
            else 0.0
        )
        return SymmetricEigen(self.Q, _spectral_pow(self.eigenvalues, p, "SymmetricEigen.pow"), c)

    def inverse(self, damping: float = 0.0, **_):
        damping = _check_damping(damping, "SymmetricEigen.inverse")
        if (self._full_spectrum() + damping == 0).any():
            raise ValueError(
                f"SymmetricEigen.inverse: the damped operator is singular (rank {self.rank} of "
                f"{self.shape[0]} with damping {damping}); add damping."
            )
        c = 1.0 / (self.complement + damping) if self.rank < self.shape[0] else 0.0
        return SymmetricEigen(self.Q, 1.0 / (self.eigenvalues + damping), c)
