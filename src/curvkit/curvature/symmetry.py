"""Curvature from weight-space symmetries: orbit averages of gradient outer products.

If a loss is invariant under a compact group ``𝒢`` acting orthogonally on a parameter block
(``L(A w) = L(w)``), its gradient is equivariant, ``∇L(A w) = A ∇L(w)``, so one gradient
``g`` tells the gradient on the whole orbit. Averaging the outer product over the orbit,

    ``S = R₂(g, g) = E_{A ∈ 𝒢}[A g gᵀ Aᵀ]``,

gives a matrix that commutes with every ``A``: it lies in the *commutant* of the
representation, and the orbit average is exactly the Frobenius-orthogonal projector onto that
commutant. The group is a knob: a larger group gives a smaller commutant (fewer stored numbers,
cheaper inverse) and a coarser estimate.

Groups are named per tensor axis of a parameter (vectors and matrices; higher-order tensors
are reshaped by the caller, e.g. a conv kernel to ``(out, in·kh·kw)``), and different axes carry
independent group elements:

============== ==================================== ==================================
name           group on an axis of size ``h``       commutant on that axis
============== ==================================== ==================================
``identity``   the trivial group (a *free* axis)    every matrix: a dense factor
``perm``       permutations ``S_h`` (hidden units)  ``span{I, J}``: mean + centred part
``sign``       sign flips ``{±1}^h``                diagonal matrices
``signed_perm`` signed permutations                  scalars ``c I``
``orthogonal`` ``O(h)`` (the compact part of        scalars ``c I``
               ``GL(h)`` acting on a linear map)
============== ==================================== ==================================

Each representation above is multiplicity-free, so in a fixed orthonormal basis of the acted
axis (the identity, or for ``perm`` a Householder reflection sending ``e₀`` to ``1/√h``) every
commutant element is block diagonal: coordinate ``c`` of the acted axes carries a *label*
``ℓ(c)`` (``perm``: 0 for the mean, 1 for the rest; ``sign``: ``c`` itself; the scalar groups: 0)
and a dense ``(f, f)`` factor ``F_ℓ`` over the free axes:

    ``S = Σ_ℓ P_ℓ ⊗ F_ℓ``,  ``P_ℓ`` = orthogonal projector onto the coordinates labelled ``ℓ``,

and the projection of any symmetric ``M`` is ``F_ℓ = tr_acted[(P_ℓ ⊗ I) M] / tr P_ℓ``
(for ``M = g gᵀ``: ``F_ℓ = G̃_ℓᵀ G̃_ℓ / tr P_ℓ``). Because the ``P_ℓ`` resolve the identity,
every matrix function acts factor-wise: ``(S + λI)^{-1} = Σ_ℓ P_ℓ ⊗ (F_ℓ + λI)^{-1}``.

Named choices: ``("orthogonal", "identity")`` on a weight ``G: (h, f)`` gives ``S = I ⊗ GᵀG/h``,
whose Symo step ``S^{-1/2} g`` is Muon's ``√h U Vᵀ`` (and with ``S`` accumulated over steps,
one-sided Shampoo with exponent ``-1/2``); ``("sign", "sign")`` gives the diagonal ``diag(g²)``
(Adam's statistic); ``("perm", "identity")`` is the ReLU-MLP structure of Symo's Table 1.

Cross-layer coupling (one hidden permutation acting on ``W₁``'s rows, ``b₁`` and ``W₂``'s columns
together) is *not* represented: blocks are per parameter (the paper's "BD" variant).

References:
    Artemev, Xia, Boyd, Yu, Dangel, Hennequin, Bernacchia (2026). Exploiting weight-space
    symmetries for approximating curvature. ICML. arXiv:2606.00442.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from curvkit.curvature.symmetry_models import sequential_symmetries
from curvkit.linalg.operator import LinearOperator
from curvkit.linalg.structured import BlockDiagonal

__all__ = ["GROUPS", "Group", "SymmetryAveraged", "orbit_mean", "sequential_symmetries",
           "symmetry_block_diagonal"]

Group = Literal["identity", "perm", "sign", "signed_perm", "orthogonal"]
GROUPS: tuple[str, ...] = ("identity", "perm", "sign", "signed_perm", "orthogonal")


def _check_groups(shape: Sequence[int], groups: Sequence[str], caller: str, *,
                  operator: bool = True) -> tuple[str, ...]:
    if isinstance(groups, str):  # tuple("sign") would be ('s', 'i', 'g', 'n')
        raise ValueError(f"{caller}: groups must be a sequence of one group name per axis, e.g. "
                         f"({groups!r},); got the string {groups!r}.")
    shape, groups = tuple(shape), tuple(groups)
    if len(shape) not in (1, 2):
        raise ValueError(f"{caller}: parameter blocks must be vectors or matrices (reshape "
                         f"higher-order tensors first); got shape {shape}.")
    if len(groups) != len(shape):
        raise ValueError(f"{caller}: need one group per axis of shape {shape}; got {groups}.")
    for g in groups:
        if g == "rescale":
            raise ValueError(f"{caller}: positive rescaling is a non-compact group acting "
                             "non-orthogonally; it has no orbit average. Use 'sign', 'perm' "
                             "or 'identity' for that axis.")
        if g not in GROUPS:
            raise ValueError(f"{caller}: unknown group {g!r}; expected one of {GROUPS}.")
    for a, (h, g) in enumerate(zip(shape, groups)):
        # an operator's factors need a coordinate per label (orbit_mean of an empty x is empty)
        if operator and h == 0 and g != "identity":
            raise ValueError(f"{caller}: axis {a} of shape {shape} has size 0; a group acts "
                             f"only on a non-empty axis, so use 'identity' there; got {g!r}.")
    return groups


# --------------------------------------------------------------------------- one acted axis
def _householder(h: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """Unit ``u`` with ``(I - 2uuᵀ) e₀ = 1/√h``; ``None`` when ``h == 1`` (the map is ``I``)."""
    if h == 1:
        return None
    u = torch.full((h,), -1.0 / math.sqrt(h), dtype=dtype, device=device)
    u[0] += 1.0
    return u / torch.linalg.vector_norm(u)


def _reflect(X: Tensor, u: Tensor | None, axis: int) -> Tensor:
    """Apply the symmetric orthogonal ``H = I - 2uuᵀ`` along ``axis`` in ``O(numel)``."""
    if u is None:
        return X
    shape = [1] * X.dim()
    shape[axis] = -1
    U = u.to(X.dtype).reshape(shape)
    return X - 2 * U * (X * U).sum(axis, keepdim=True)


def _labels(group: str, h: int) -> tuple[int, list[tuple[int, int, int]] | None]:
    """Number of labels and contiguous segments ``(start, stop, label)`` (``None``: label = c)."""
    if group == "perm":
        return (2, [(0, 1, 0), (1, h, 1)]) if h > 1 else (1, [(0, 1, 0)])
    if group == "sign":
        return h, None
    return 1, [(0, h, 0)]


def _factor_shape(shape: Sequence[int], groups: Sequence[str]) -> tuple[int, ...]:
    """Shape ``(t_1, ..., t_r, f, f)`` of the factors for checked ``shape`` and ``groups``."""
    counts = [_labels(g, h)[0] for h, g in zip(shape, groups) if g != "identity"]
    f = math.prod(h for h, g in zip(shape, groups) if g == "identity")
    return (*counts, f, f)


def _label_index(group: str, h: int, device) -> Tensor:
    """Label of each rotated coordinate, shape ``(h,)``."""
    if group == "sign":
        return torch.arange(h, device=device)
    index = torch.zeros(h, dtype=torch.long, device=device)
    if group == "perm":
        index[1:] = 1
    return index


# --------------------------------------------------------------------------- the operator
class SymmetryAveraged(LinearOperator):
    """The orbit-averaged (commutant-projected) curvature of one parameter block.

    ``S = Σ_ℓ P_ℓ ⊗ F_ℓ`` in the rotated basis of the acted axes (see the module docstring).
    Vectors are row-major flattenings of the parameter (``Tensor.flatten``). Build it with
    :meth:`from_samples` (orbit average of ``Σ_k g_k g_kᵀ``) or :meth:`from_matrix` (projection
    of a dense curvature block, e.g. the exact GGN's).

    Args:
        shape: Parameter shape, ``(n,)`` or ``(m, n)``.
        groups: One group name per axis.
        factors: ``F`` of shape ``(t_1, ..., t_r, f, f)``: one symmetric ``(f, f)`` factor per
            label tuple of the ``r`` acted axes; ``f`` is the product of the free axes' sizes
            (1 when every axis is acted).

    Raises:
        ValueError: For an unknown group, an unsupported shape, or factors of the wrong shape.

    Example:
        >>> G = torch.randn(5, 3)
        >>> S = SymmetryAveraged.from_samples(G[None], groups=("orthogonal", "identity"))
        >>> step = S.pow(-0.5) @ G.flatten()   # = √5 · U Vᵀ (Muon's polar factor)
    """

    is_symmetric = True

    def __init__(self, shape: Sequence[int], groups: Sequence[str], factors: Tensor):
        caller = "SymmetryAveraged"
        groups = _check_groups(shape, groups, caller)
        shape = tuple(int(s) for s in shape)
        self.param_shape, self.groups = shape, groups
        self.acted = tuple(a for a, g in enumerate(groups) if g != "identity")
        self.free = tuple(a for a, g in enumerate(groups) if g == "identity")
        self.f = math.prod(shape[a] for a in self.free)
        self.counts = tuple(_labels(groups[a], shape[a])[0] for a in self.acted)
        expected = _factor_shape(shape, groups)
        if not isinstance(factors, Tensor) or tuple(factors.shape) != expected:
            got = tuple(factors.shape) if isinstance(factors, Tensor) else type(factors).__name__
            raise ValueError(f"{caller}: factors for shape {shape} and groups {groups} must "
                             f"have shape {expected}; got {got}.")
        super().__init__((math.prod(shape),) * 2, dtype=factors.dtype, device=factors.device,
                         in_shapes=[shape])
        self.factors = factors
        self.is_psd = False

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_samples(cls, samples: Tensor, *, groups: Sequence[str],
                     weights: Tensor | None = None) -> SymmetryAveraged:
        """Orbit average of ``Σ_k w_k g_k g_kᵀ``.

        Args:
            samples: Gradients (or any vectors) shaped ``(k, *shape)``.
            groups: One group name per parameter axis.
            weights: Optional non-negative weights ``(k,)`` (default all 1).

        Returns:
            The operator; it is PSD (declared ``is_psd``) when the weights are non-negative.

        Raises:
            ValueError: For bad groups or shapes.
        """
        caller = "SymmetryAveraged.from_samples"
        if not isinstance(samples, Tensor) or samples.dim() not in (2, 3):
            raise ValueError(f"{caller}: samples must have shape (k, n) or (k, m, n); got "
                             f"{getattr(samples, 'shape', type(samples).__name__)}.")
        shape = tuple(samples.shape[1:])
        groups = _check_groups(shape, groups, caller)
        if weights is not None:
            if not isinstance(weights, Tensor) or weights.shape != samples.shape[:1]:
                got = (tuple(weights.shape) if isinstance(weights, Tensor)
                       else type(weights).__name__)
                raise ValueError(f"{caller}: weights must be a tensor of shape "
                                 f"({samples.shape[0]},); got {got}.")
            # nan or inf weights would silently give nan/inf factors
            if weights.numel() and not (torch.isfinite(weights).all() and (weights >= 0).all()):
                raise ValueError(f"{caller}: weights must be non-negative and finite; got min "
                                 f"{weights.min().item():g}, max {weights.max().item():g}.")
            samples = samples * weights.sqrt().reshape(-1, *[1] * len(shape))
        V = _rotate(_canonical(samples, shape, groups), shape, groups)  # (k, *acted, f)
        factors = _label_sums(V, shape, groups)
        result = cls(shape, groups, factors)
        result.is_psd = True
        return result

    @classmethod
    def from_matrix(cls, M: Tensor, *, shape: Sequence[int], groups: Sequence[str]
                    ) -> SymmetryAveraged:
        """Project a dense symmetric matrix onto the commutant (its exact orbit average).

        Args:
            M: Matrix ``(n, n)`` with ``n = prod(shape)``, row-major in the parameter.
            shape: Parameter shape.
            groups: One group name per axis.

        Returns:
            The projected operator.

        Raises:
            ValueError: If ``M`` does not match ``shape``.
        """
        caller = "SymmetryAveraged.from_matrix"
        shape = tuple(int(s) for s in shape)
        groups = _check_groups(shape, groups, caller)
        n = math.prod(shape)
        if not isinstance(M, Tensor) or M.shape != (n, n):
            raise ValueError(f"{caller}: M must have shape ({n}, {n}) for shape {shape}; got "
                             f"{getattr(M, 'shape', type(M).__name__)}.")
        # Rotate both sides; the commutant only sees the c = c' "diagonal" blocks.
        left = _rotate(_canonical(M.T.reshape(n, *shape), shape, groups), shape,
                       groups)  # (n, *acted, f): columns of M rotated on the left
        # explicit sizes (acted·f = n): -1 is ambiguous for a zero-size parameter
        left = left.reshape(n, n).T  # (acted·f, n)
        both = _rotate(_canonical(left.reshape(n, *shape), shape, groups), shape,
                       groups)  # (acted·f, *acted, f)
        acted = [shape[a] for a in (a for a, g in enumerate(groups) if g != "identity")]
        f = both.shape[-1]
        A = math.prod(acted)
        both = both.reshape(A, f, A, f)
        blocks = torch.diagonal(both, dim1=0, dim2=2).movedim(-1, 0)  # (A, f, f)
        factors = _segment_mean(blocks.reshape(*acted, f, f), shape, groups)
        return cls(shape, groups, 0.5 * (factors + factors.mT))

    # ------------------------------------------------------------------ products
    def _matmat(self, X: Tensor) -> Tensor:
        k = X.shape[1]
        T = X.T.reshape(k, *self.param_shape)
        T = _rotate(_canonical(T, self.param_shape, self.groups), self.param_shape,
                    self.groups)
        T = self._apply_blocks(self.factors.to(T.dtype), T)
        T = _rotate(T, self.param_shape, self.groups)  # H is its own inverse
        return _uncanonical(T, self.param_shape, self.groups).reshape(k, -1).T

    def _apply_blocks(self, F: Tensor, T: Tensor) -> Tensor:
        """``T̃[c] ← F[ℓ(c)] T̃[c]`` for ``T: (k, *acted, f)``."""
        if self.f == 1:  # every axis acted: one scalar per coordinate
            return T * _label_grid(F[..., 0, 0], self)[None, ..., None]
        if not self.acted:
            return T @ F[...].mT
        (a,) = self.acted
        _, segments = _labels(self.groups[a], self.param_shape[a])
        if segments is None:  # sign: its own factor per coordinate
            return torch.einsum("cij,kcj->kci", F, T)
        parts = [T[:, s:e] @ F[label].mT for s, e, label in segments]
        return torch.cat(parts, dim=1)

    def _to(self, dtype, device):
        out = SymmetryAveraged(self.param_shape, self.groups,
                               self.factors.to(dtype=dtype, device=device))
        out.is_psd = self.is_psd
        return out

    # ------------------------------------------------------------------ structure
    def label_multiplicities(self) -> Tensor:
        """``tr P_ℓ`` for every label tuple, shape ``(t_1, ..., t_r)``."""
        return self._multiplicities(self.dtype)

    def _multiplicities(self, dtype: torch.dtype) -> Tensor:
        mult = torch.ones((), dtype=dtype, device=self.device)
        for a in self.acted:
            t, segments = _labels(self.groups[a], self.param_shape[a])
            sizes = (torch.ones(t, dtype=dtype, device=self.device) if segments is None else
                     torch.tensor([e - s for s, e, _ in segments], dtype=dtype,
                                  device=self.device))
            mult = mult[..., None] * sizes
        return mult

    @property
    def num_stored(self) -> int:
        """Number of stored floats (memory of the estimate)."""
        if self.f == 1:
            return self.factors.numel()
        return self.factors.numel() // (self.f * self.f) * (self.f * (self.f + 1) // 2)

    def map_factors(self, fn: Callable[[Tensor], Tensor], *, caller: str = "map_factors"
                    ) -> SymmetryAveraged:
        """Apply a spectral function factor-wise: ``Σ_ℓ P_ℓ ⊗ V_ℓ fn(Λ_ℓ) V_ℓᵀ``.

        Args:
            fn: Maps the eigenvalues of all factors, shape ``(t_1, ..., t_r, f)``, elementwise
                (it sees them all at once, e.g. to damp relative to the largest).
            caller: Name for error messages.

        Returns:
            A new operator with the same groups.
        """
        evals, evecs = torch.linalg.eigh(_solvable(self.factors))
        new = (evecs * fn(evals)[..., None, :]) @ evecs.mT
        return SymmetryAveraged(self.param_shape, self.groups,
                                (0.5 * (new + new.mT)).to(self.dtype))

    def pow(self, p: float, *, damping: float = 0.0) -> SymmetryAveraged:
        """``(S + damping·I)^p`` factor by factor (one batched ``eigh``).

        Args:
            p: Exponent.
            damping: Non-negative shift added before the power.

        Returns:
            The power as a ``SymmetryAveraged`` with the same groups.

        Raises:
            ValueError: For a negative damping, a fractional power of a factor with negative
                eigenvalues, or a negative power of a singular factor.
        """
        from curvkit.linalg.structured import _check_damping, _spectral_pow

        damping = _check_damping(damping, "SymmetryAveraged.pow")
        return self.map_factors(lambda s: _spectral_pow(s + damping, p, "SymmetryAveraged.pow"))

    def inverse(self, damping: float = 0.0, **_) -> SymmetryAveraged:
        """Exact ``(S + damping·I)^{-1}``: ``Σ_ℓ P_ℓ ⊗ (F_ℓ + λI)^{-1}``.

        Batched Cholesky for a PSD operator (``from_samples``); batched LU otherwise (e.g. the
        projection of an indefinite Hessian by ``from_matrix``, which is invertible but has no
        Cholesky factor).

        Args:
            damping: Non-negative ``λ``.

        Returns:
            The inverse as a ``SymmetryAveraged``.
        """
        from curvkit.linalg.structured import _check_damping

        damping = _check_damping(damping, "SymmetryAveraged.inverse")
        F = _solvable(self.factors)
        F = F + damping * torch.eye(self.f, dtype=F.dtype, device=F.device)
        if not self.is_psd:
            inv = torch.linalg.inv(F)
            return SymmetryAveraged(self.param_shape, self.groups,
                                    (0.5 * (inv + inv.mT)).to(self.dtype))
        L, info = torch.linalg.cholesky_ex(F)
        if info.any():
            raise torch.linalg.LinAlgError("SymmetryAveraged.inverse: a factor is not positive "
                                           "definite; add damping.")
        return SymmetryAveraged(self.param_shape, self.groups,
                                torch.cholesky_inverse(L).to(self.dtype))

    def trace(self) -> Tensor:
        """Exact trace: ``Σ_ℓ tr(P_ℓ) · tr F_ℓ``."""
        return (self.label_multiplicities() * torch.diagonal(self.factors, dim1=-2, dim2=-1
                                                             ).sum(-1)).sum()

    def logdet(self) -> Tensor:
        """Exact log-determinant: ``Σ_ℓ tr(P_ℓ) · log |det F_ℓ|``.

        As ``torch.logdet`` of the dense matrix: ``nan`` for a negative and ``-inf`` for a zero
        determinant.
        """
        sign, logabs = torch.linalg.slogdet(_solvable(self.factors))
        mult = self._multiplicities(logabs.dtype)
        # det S = Π_ℓ det(F_ℓ)^{tr P_ℓ}: a negative det F_ℓ flips the sign only to an odd power
        flips = ((sign < 0) & (mult % 2 == 1)).sum() % 2 == 1
        total = (mult * logabs).sum()
        total = torch.where(flips, torch.full_like(total, math.nan), total)
        total = torch.where((sign == 0).any(), torch.full_like(total, -math.inf), total)
        return total.to(self.dtype)

    def diagonal(self) -> Tensor:
        """Exact diagonal ``Σ_ℓ diag(P_ℓ) ⊗ diag(F_ℓ)``, shape ``(n,)``, in ``O(n · t)``.

        ``diag(P_ℓ)`` is a product over the acted axes: on a ``perm`` axis of size ``h`` it is
        the constant ``1/h`` (mean) or ``1 - 1/h`` (centred part), on a ``sign`` axis the
        indicator of coordinate ``ℓ``, on a scalar axis one. Nothing of size ``n²`` is formed.
        """
        d = torch.diagonal(self.factors, dim1=-2, dim2=-1)  # (t_1, ..., t_r, f)
        for position, a in enumerate(self.acted):
            W = _projector_diagonals(self.groups[a], self.param_shape[a], d.dtype, d.device)
            d = torch.tensordot(W, d, dims=([1], [position])).movedim(0, position)
        return _uncanonical(d[None], self.param_shape, self.groups).reshape(-1)

    def eigh(self) -> tuple[Tensor, LinearOperator]:
        """Exact eigendecomposition ``S = Q diag(λ) Qᵀ`` from one batched ``eigh`` of the factors.

        With ``F_ℓ = V_ℓ Λ_ℓ V_ℓᵀ``, the rotated coordinate ``c`` of the acted axes contributes
        the eigenpairs ``(Λ_ℓ(c), V_ℓ(c))``, so every eigenvalue of ``F_ℓ`` has multiplicity
        ``tr P_ℓ``. Costs one ``eigh`` per label (``t · f³``) instead of the dense ``n³``;
        ``Q`` is an orthogonal operator that applies ``Uᵀ ⊕_c V_ℓ(c)`` (``U``: the Householder
        reflections of the ``perm`` axes) in ``O(n f)`` per vector and is never formed.

        Returns:
            ``(eigenvalues (n,), Q)``: eigenvalues in ascending order, as ``torch.linalg.eigh``
            returns them, and ``Q: (n, n)`` with the matching eigenvectors as columns (rows
            are row-major flattenings of the parameter).

        Raises:
            ValueError: If the factors hold nan or inf.
        """
        if not torch.isfinite(self.factors).all():
            raise ValueError("SymmetryAveraged.eigh: the factors contain nan or inf; an "
                             "eigendecomposition needs finite factors.")
        evals, vectors = torch.linalg.eigh(_solvable(self.factors))  # (*t, f), (*t, f, f)
        evals = _label_grid(evals, self).reshape(-1)  # per rotated coordinate c, then j
        evals, order = torch.sort(evals, stable=True)
        return evals.to(self.dtype), _SymmetryEigenbasis(self, vectors.to(self.dtype), order)


class _SymmetryEigenbasis(LinearOperator):
    """Eigenvectors of a :class:`SymmetryAveraged` ``S``: ``Q = Uᵀ (⊕_c V_ℓ(c)) Π``, orthogonal.

    ``Π`` puts the eigenvalues in ascending order (``order[i]`` is the structural index, rotated
    coordinate ``c`` then factor eigenvector ``j``, of column ``i``).
    """

    def __init__(self, op: SymmetryAveraged, vectors: Tensor, order: Tensor):
        n = op.shape[0]
        # flat vectors only: eigen-coordinates have no parameter shape (as Kronecker's eigh)
        super().__init__((n, n), dtype=vectors.dtype, device=vectors.device)
        self.op, self.vectors, self.order = op, vectors, order

    def _matmat(self, X: Tensor) -> Tensor:  # eigen-coordinates -> parameter space
        op, k = self.op, X.shape[1]
        Z = torch.empty_like(X)
        Z[self.order] = X
        T = Z.T.reshape(k, *[op.param_shape[a] for a in op.acted], op.f)
        T = _rotate(op._apply_blocks(self.vectors.to(T.dtype), T), op.param_shape, op.groups)
        return _uncanonical(T, op.param_shape, op.groups).reshape(k, -1).T

    def _rmatmat(self, X: Tensor) -> Tensor:  # parameter space -> eigen-coordinates
        op, k = self.op, X.shape[1]
        T = _canonical(X.T.reshape(k, *op.param_shape), op.param_shape, op.groups)
        T = op._apply_blocks(self.vectors.to(T.dtype).mT, _rotate(T, op.param_shape, op.groups))
        return T.reshape(k, -1).T[self.order]

    def _to(self, dtype, device):
        return _SymmetryEigenbasis(self.op._to(dtype, device),
                                   self.vectors.to(dtype=dtype, device=device),
                                   self.order.to(device))


# --------------------------------------------------------------------------- layout helpers
def _projector_diagonals(group: str, h: int, dtype: torch.dtype, device) -> Tensor:
    """``W[x, ℓ] = diag(P_ℓ)[x]`` on one acted axis of size ``h``, shape ``(h, t)``."""
    if group == "sign":
        return torch.eye(h, dtype=dtype, device=device)
    if group == "perm" and h > 1:  # J/h and I - J/h
        return torch.tensor([[1.0 / h, 1.0 - 1.0 / h]], dtype=dtype, device=device).expand(h, 2)
    return torch.ones(h, 1, dtype=dtype, device=device)

def _solvable(F: Tensor) -> Tensor:
    """``F`` in a dtype that ``eigh``/``cholesky``/``slogdet`` accept (float32 for half types)."""
    return F.float() if F.dtype in (torch.float16, torch.bfloat16) else F


def _canonical(T: Tensor, shape, groups) -> Tensor:
    """``(k, *shape)`` → ``(k, *acted, f)``: acted axes first (in order), free axes flattened."""
    acted = [a for a, g in enumerate(groups) if g != "identity"]
    free = [a for a, g in enumerate(groups) if g == "identity"]
    k = T.shape[0]
    T = T.permute(0, *[a + 1 for a in acted + free])
    # the free size explicitly: -1 is ambiguous when k == 0
    return T.reshape(k, *[shape[a] for a in acted], math.prod(shape[a] for a in free))


def _uncanonical(T: Tensor, shape, groups) -> Tensor:
    acted = [a for a, g in enumerate(groups) if g != "identity"]
    free = [a for a, g in enumerate(groups) if g == "identity"]
    order = acted + free
    T = T.reshape(T.shape[0], *[shape[a] for a in order])
    inverse = [0] + [order.index(a) + 1 for a in range(len(shape))]
    return T.permute(*inverse)


def _rotate(T: Tensor, shape, groups) -> Tensor:
    """Apply the Householder map of every ``perm`` axis of ``T: (k, *acted, f)``."""
    acted = [a for a, g in enumerate(groups) if g != "identity"]
    for position, a in enumerate(acted):
        if groups[a] == "perm":
            T = _reflect(T, _householder(shape[a], T.dtype, T.device), position + 1)
    return T


def _label_sums(V: Tensor, shape, groups) -> Tensor:
    """Factors ``F_ℓ = Σ_k Σ_{c∈ℓ} ṽ_{k,c} ṽ_{k,c}ᵀ / tr P_ℓ`` from rotated ``V: (k, *acted, f)``.

    Sums over a segment before forming outer products, so a ``perm`` axis never holds ``h``
    separate ``(f, f)`` blocks.
    """
    acted = [a for a, g in enumerate(groups) if g != "identity"]
    if V.shape[-1] == 1:  # every axis acted: per-coordinate squares, then label means
        return _segment_mean(V.square().sum(0)[..., None], shape, groups)
    if not acted:
        return V.T @ V
    (a,) = acted
    _, segments = _labels(groups[a], shape[a])
    if segments is None:  # sign: one factor per coordinate
        return torch.einsum("kci,kcj->cij", V, V)
    return torch.stack([torch.einsum("kci,kcj->ij", V[:, s:e], V[:, s:e]) / (e - s)
                        for s, e, _ in segments])


def _segment_mean(blocks: Tensor, shape, groups) -> Tensor:
    """Average ``(*acted, f, f)`` blocks over the coordinates sharing a label, axis by axis."""
    acted = [a for a, g in enumerate(groups) if g != "identity"]
    for position, a in enumerate(acted):
        _, segments = _labels(groups[a], shape[a])
        if segments is None:
            continue  # sign: one label per coordinate already
        blocks = torch.stack([blocks.narrow(position, s, e - s).mean(position)
                              for s, e, _ in segments], dim=position)
    return blocks


def _label_grid(values: Tensor, op: SymmetryAveraged) -> Tensor:
    """Expand per-label scalars ``(t_1, ..., t_r)`` to per-coordinate ``(h_1, ..., h_r)``."""
    for position, a in enumerate(op.acted):
        index = _label_index(op.groups[a], op.param_shape[a], values.device)
        values = values.index_select(position, index)
    return values


# --------------------------------------------------------------------------- helpers
def orbit_mean(x: Tensor, *, groups: Sequence[str]) -> Tensor:
    """``R₁(x) = E_𝒢[A x]``: the 𝒢-invariant part of a parameter-shaped tensor.

    For ``perm`` axes this is the mean along the axis (broadcast back); any other acted axis
    has no invariant vector, so the result is zero; free axes are untouched.

    Args:
        x: Tensor of the parameter's shape ``(n,)`` or ``(m, n)``.
        groups: One group name per axis.

    Returns:
        Tensor shaped like ``x``.
    """
    groups = _check_groups(x.shape, groups, "orbit_mean", operator=False)
    out = x
    for a, g in enumerate(groups):
        if g == "identity":
            continue
        if g != "perm":
            return torch.zeros_like(x)
        out = out.mean(a, keepdim=True)
    # a new, writable tensor: neither ``x`` itself nor a broadcast view of the means
    return out.expand_as(x).clone(memory_format=torch.contiguous_format)


def symmetry_block_diagonal(samples: Sequence[Tensor], *, groups: Sequence[Sequence[str]]
                            ) -> BlockDiagonal:
    """A block-diagonal operator over several parameters, one ``SymmetryAveraged`` each.

    Args:
        samples: Per parameter, gradients shaped ``(k, *shape_i)`` (the same ``k`` for all).
        groups: Per parameter, its groups.

    Returns:
        ``BlockDiagonal`` with ``in_shapes`` = the parameter shapes and an exact ``inverse``.

    Raises:
        ValueError: If the lists differ in length.
    """
    if len(samples) != len(groups):
        raise ValueError(f"symmetry_block_diagonal: {len(samples)} sample tensors but "
                         f"{len(groups)} group specs.")
    blocks = [SymmetryAveraged.from_samples(s, groups=g) for s, g in zip(samples, groups)]
    return BlockDiagonal(blocks, in_shapes=[b.param_shape for b in blocks])
