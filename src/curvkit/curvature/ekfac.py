"""Eigenvalue-corrected KFAC (EKFAC).

EKFAC keeps KFAC's Kronecker eigenbasis ``Q = Q_G ⊗ Q_A`` per block and replaces the
eigenvalues ``λ_G λ_A`` by the second moments of the per-example gradients in that basis,

    Λ_{ij} = c Σ_n Σ_k ((Q_Gᵀ ∇_W ℓ_{n,k} Q_A)_{ij})²,

the diagonal (in the basis) that is closest in Frobenius norm to the curvature block given by the
same backpropagated vectors. Without weight sharing (``S = 1``) the per-example gradient is
``g aᵀ`` and its square in the basis factorises, ``Λ = c Σ (g̃ ∘ g̃)(ã ∘ ã)ᵀ`` with ``g̃ = Q_Gᵀ g``,
``ã = Q_Aᵀ a``, so no per-example matrix is ever built; with sharing the per-example gradients
``Σ_s g_s a_sᵀ`` are formed in chunks of examples and then rotated. Norm layers and other
parameters keep their exact dense or diagonal KFAC blocks.

References:
    George, Laurent, Bouthillier, Ballas & Vincent (2018), Fast approximate natural gradient
    descent in a Kronecker-factored eigenbasis.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor

from curvkit.curvature.kfac import KFAC
from curvkit.curvature.kfac_blocks import Block
from curvkit.curvature.kfac_pass import type2_positions
from curvkit.linalg import LinearOperator

__all__ = ["EKFAC"]

# Upper bound on the entries of one chunk of rotated per-example gradients.
_CHUNK_ENTRIES = 2**22


class EKFAC(KFAC):
    """KFAC with eigenvalues corrected in the Kronecker eigenbasis (George et al., 2018).

    Same arguments as ``KFAC`` (``fisher="forward_only"`` excepted). ``compute()`` makes two
    passes over the data: the KFAC factors, then the eigenvalue correction with the same
    backpropagated vectors (the same sampled labels for ``fisher="mc"``).

    Example:
        >>> F = EKFAC(model, nn.CrossEntropyLoss(), loader, fisher="mc")
        >>> F.inverse(damping=1e-3) @ grads   # a diagonal solve in the eigenbasis
    """

    def compute(self) -> EKFAC:
        """Compute the KFAC factors, their eigenbases and the corrected eigenvalues.

        Returns:
            ``self``, ready for products.

        Raises:
            ValueError: For ``fisher="forward_only"`` (no gradients to correct with).
        """
        if self.fisher == "forward_only":
            raise ValueError("EKFAC: fisher='forward_only' has no backpropagated gradients to "
                             "correct the eigenvalues with; use KFAC or another fisher.")
        with self._atomic():
            super().compute()
            self._eigenbases()
            self._correct()
        return self

    def _eigenbases(self) -> None:
        """Eigenvectors of every Kronecker factor (batched over convolution groups)."""
        for spec in self.specs:
            if spec.kind == "kron":
                f = self.factors[spec.path]
                f["QA"] = torch.linalg.eigh(f["A"])[1]
                f["QG"] = torch.linalg.eigh(f["G"])[1]

    def _correct(self) -> None:
        """The correction pass: second moments of the rotated per-example gradients."""
        kron = [s for s in self.specs if s.kind == "kron"]
        if not kron:  # only norm and other blocks: nothing to correct
            return
        fp = self._make_pass(per_example=True)
        fp.check = False  # (the wiring found by the factor pass: no second probe either)
        gen = self._generator()  # the same labels as the factor pass

        warned = False

        def per_batch(batch):
            nonlocal warned
            out = fp.forward(batch)
            if self.fisher == "type2" and not warned and (T := type2_positions(self.loss, out)) > 1:
                warned = True
                warnings.warn(
                    f"EKFAC: fisher='type2' backpropagates each output column over all {T} "
                    "positions of an example at once, so the corrected eigenvalues also sum "
                    "products between positions, which the GGN does not have (the KFAC factors "
                    "do not either for layers applied per position); fisher='mc' is unbiased "
                    "here.",
                    UserWarning,
                    stacklevel=4,
                )
            plans = [p for p in fp.layers if p.is_kron]
            if [p.path for p in plans] != [s.path for s in kron]:
                raise RuntimeError("EKFAC: the layers called differ between passes.")
            V = fp.vectors(batch, out, gen)
            inputs = [fp.layer_inputs(p) for p in plans]
            acc: list[list[Tensor] | None] = [None] * len(plans)
            for k in range(V.shape[0]):
                grads, _ = fp.backward(out, V[k], retain=k < V.shape[0] - 1)
                kron_grads = [g for p, g in zip(fp.layers, grads) if p.is_kron]
                for i, (plan, a, g) in enumerate(zip(plans, inputs, kron_grads)):
                    f = self.factors[plan.path]
                    c = self._second_moments(plan, a, fp.layer_grads(plan, g), f["QA"], f["QG"])
                    acc[i] = c if acc[i] is None else [x + y for x, y in zip(acc[i], c)]
            return [t for c in acc for t in c]

        totals = iter(fp.reduce(per_batch, desc="EKFAC correction"))
        for spec in kron:
            f = self.factors[spec.path]
            if spec.weight is not None:
                f["EW"] = next(totals)
            if spec.bias is not None and not spec.joint:
                f["Eb"] = next(totals)
        self._build()

    @staticmethod
    def _second_moments(plan, a: Tensor, g: Tensor, QA: Tensor, QG: Tensor) -> list[Tensor]:
        """Σ over examples of squared rotated gradients: ``[weight][, separate bias]``.

        Args:
            plan: The layer.
            a: Inputs ``(N, S, groups, d_in)``.
            g: Output gradients ``(N, S, groups, d_out)``.
            QA: Input-factor eigenvectors ``(groups, d_in, d_in)``.
            QG: Output-factor eigenvectors ``(groups, d_out, d_out)``.

        Returns:
            The weight's eigenvalues, ``(groups, d_out, d_in)`` (``"GA"``) or ``(d_in, d_out)``
            (``"AG"``), and for a separate bias ``(groups, d_out)``.
        """
        out = []
        N, S = a.shape[:2]
        ga = plan.rule.order == "GA"
        if plan.weight is not None:
            if S == 1:  # (g̃ ãᵀ)² = (g̃²)(ã²)ᵀ: rotate the vectors, no per-example matrix
                a2 = torch.einsum("ngi,gij->ngj", a[:, 0], QA).square()
                g2 = torch.einsum("ngo,gop->ngp", g[:, 0], QG).square()
                W = torch.einsum("ngo,ngi->goi", g2, a2)
            else:  # per-example gradients Σ_s g_s a_sᵀ, then rotated: cheaper than rotating
                # the S position vectors when S·(d_in² + d_out²) > d_in·d_out·(d_in + d_out)
                per = a.shape[2] * a.shape[3] * g.shape[3]
                chunk = max(1, _CHUNK_ENTRIES // max(1, per))
                W = 0
                for i in range(0, N, chunk):
                    M = torch.einsum("nsgo,nsgi->ngoi", g[i:i + chunk], a[i:i + chunk])
                    W = W + (QG.transpose(-1, -2) @ M @ QA).square().sum(0)
            out.append(W if ga else W[0].T)
        if plan.bias is not None and not plan.joint:
            b = torch.einsum("ngo,gop->ngp", g.sum(1), QG)
            out.append(b.square().sum(0))  # (groups, d_out)
        return out

    def _blocks(self) -> list[Block]:
        blocks = super()._blocks()
        if any("QG" not in self.factors[s.path] for s in self.specs if s.kind == "kron"):
            return blocks  # the KFAC stage of compute(), before the correction pass
        for b in blocks:
            if b.kind != "kron":
                continue
            f = self.factors[b.label]
            role, j = b.key
            if role == "W" and b.a_pos == 0:  # embedding: A ⊗ G on W (V, D)
                b.data = (f["QA"][0], f["QG"][0], f["EW"].reshape(-1))
            elif role == "W":
                b.data = (f["QG"][j], f["QA"][j], f["EW"][j].reshape(-1))
            else:  # KFAC's block (G_j, [[1]]): its 1x1 factor is the bias's basis too
                b.data = (f["QG"][j], b.data[1], f["Eb"][j])
            b.kind = "eigen"
        return blocks

    def _factor_shapes(self, spec, plan) -> dict[str, tuple]:
        shapes = super()._factor_shapes(spec, plan)
        if spec.kind == "kron":  # the eigenbases and the corrected eigenvalues
            A, G = shapes["A"], shapes["G"]
            shapes |= {"QA": A, "QG": G}
            if spec.weight is not None:
                shapes["EW"] = (A[1], G[1]) if spec.order == "AG" else (G[0], G[1], A[1])
            if spec.bias is not None and not spec.joint:
                shapes["Eb"] = G[:2]
        return shapes

    def inverse(self, damping: float = 0.0, *, heuristic: Literal["pi"] | None = None,
                exact: bool = True) -> LinearOperator:
        """``(F + damping·I)⁻¹``: a diagonal solve in the eigenbasis (damping is always exact).

        Raises:
            ValueError: If a heuristic or ``exact=False`` is requested.
        """
        if heuristic is not None or not exact:
            raise ValueError("EKFAC.inverse: EKFAC is diagonal in its eigenbasis, so damping is "
                             f"always exact; got heuristic={heuristic!r}, exact={exact!r}.")
        return self._require("inverse").inverse(damping)
