"""Kronecker-factored approximate curvature (KFAC) as a block-diagonal linear operator.

For a layer with weight ``W`` (``d_out × d_in``, flattened row-major as PyTorch stores it) KFAC
approximates the curvature block by ``G ⊗ A`` with

    A = Σ_n w_n Σ_s a_{n,s} a_{n,s}ᵀ / Σ_n w_n S        (expand)
    G = c Σ_n Σ_k Σ_s g_{n,s,k} g_{n,s,k}ᵀ

(``reduce``: ``a_n = mean_s a_{n,s}``, ``g_{n,k} = Σ_s g_{n,s,k}``,
``A = Σ_n w_n a_n a_nᵀ / Σ_n w_n``),
where ``a`` are the layer inputs (with a trailing 1 when the bias is joined), ``g_{·,k}`` the
gradients at the layer output of the backpropagated vectors ``v_k`` (see ``kfac_pass``), ``S``
the weight-sharing positions and ``c`` the loss normalisation of the exact operators (``1/T``
for mean reduction over ``T`` loss terms, 1 for sum). With these conventions type-2 KFAC equals
the GGN block for deep linear networks with MSE, and expand (reduce) is exact in the linear
weight-sharing settings of Eschenhagen et al. (2023).

Layers: ``nn.Linear`` (any leading dimensions), ``nn.Conv1d/2d/3d`` (one block per group),
``nn.Embedding`` (``A ⊗ G`` on ``W (V, D)``); the affine parameters of ``LayerNorm``,
``RMSNorm``, ``GroupNorm``, ``BatchNorm`` and ``InstanceNorm`` get a dense block of their exact
per-example gradients; any other parameter a diagonal or dense block (``other=``) computed
exactly from the same vectors, or an error.

References:
    Martens & Grosse (2015), Optimizing neural networks with Kronecker-factored approximate
    curvature. Grosse & Martens (2016), A Kronecker-factored approximate Fisher matrix for
    convolution layers. Eschenhagen et al. (2023), Kronecker-factored approximate curvature for
    modern neural network architectures.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import replace
from typing import Literal

import torch
from torch import Tensor, nn

from curvkit.curvature.engine import DataEngine
from curvkit.curvature.kfac_blocks import Block, JointRows, PermutedBlocks
from curvkit.curvature.kfac_layers import gram_and_side, grouped_gram
from curvkit.curvature.kfac_pass import (
    FISHER_TYPES,
    FactorPass,
    LayerPlan,
    backprop_vectors,
    plan_layers,
    type2_positions,
)
from curvkit.curvature.kfac_state import LayerSpec, check_header, check_state
from curvkit.curvature.kfac_verify import check_layers
from curvkit.curvature.losses import output_loss
from curvkit.curvature.params import resolve_params
from curvkit.linalg import LinearOperator

__all__ = ["KFAC"]

_APPROX = ("expand", "reduce")
_OTHER = ("diagonal", "dense", "error")


class KFAC(LinearOperator):
    """KFAC approximation of the GGN / Fisher of ``loss_fn(model(X), y)`` over all of ``data``.

    A symmetric PSD operator of size ``P = Σ p.numel()`` acting on vectors in ``params`` order
    (flat, or lists shaped like the parameters); internally a ``BlockDiagonal`` of
    ``Kronecker`` blocks (and dense/diagonal blocks for norm layers and other parameters).

    Args:
        model: ``nn.Module`` called as ``model(X)``, returning one tensor; the examples come
            first in ``X`` (per-example quantities also need them first at the layers: a
            probe pass of the first example alone checks both). Layers run under autocast get
            factors in the parameters' dtype.
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``, reduction
            ``"mean"`` or ``"sum"``.
        data: Re-iterable of ``(X, y)`` or weighted ``(X, y, w)`` batches, ``w: (N,)`` ``>= 0``;
            weights make it the curvature of ``c Σ_n w_n ℓ_n``.
        params: ``None`` (all trainable parameters), a list of the model's parameters or a
            mapping name → tensor.
        fisher: ``"type2"`` (exact output-Hessian square root: one backward pass per class or
            output entry, all positions of an example at once; with several output terms per
            example the per-example blocks of norm layers and other parameters then carry
            products between positions, with a warning), ``"mc"`` (``mc_samples`` sampled
            labels), ``"empirical"`` (true labels) or ``"forward_only"`` (``G = I``).
        mc_samples: Number of sampled labels per example for ``fisher="mc"``.
        approx: ``"expand"`` or ``"reduce"`` for weight-shared layers (sequences, convolutions).
        separate_bias: Give biases their own block ``G`` instead of joining them to the weight
            as an input column of ones.
        other: Block for parameters of unsupported layers, and of supported layers called on
            a tensor shared by all examples (positional embeddings of ``torch.arange``, found
            by a forward pass of the first example): ``"diagonal"``, ``"dense"`` (exact per
            parameter, from per-example gradients of the same vectors) or ``"error"``.
        seed: Seed of the label sampling (``fisher="mc"``), re-used at every ``compute()``.
        progress: Progress bar over batches.
        check_deterministic: Refuse random layers and shuffling data, and verify on the first
            batch that the hooked layer calls account for the whole gradient of their
            parameters (weight tying and functional reuse raise instead of being miscounted).
            Both checks run at the first ``compute()`` only: a recompute after a parameter
            update pays for neither (rebuild the operator after changing the model's wiring).
        num_data: Number of examples (spares a counting pass).
        batch_size_fn: ``X ↦ N`` for mapping inputs.
        compute: Compute the factors at construction (one pass over ``data``); with ``False``
            call ``compute()`` or ``load_state_dict()`` before using the operator.

    Raises:
        ValueError: For unknown options, tied weights, unsupported parameters with
            ``other="error"``, inputs that are not batch-first where per-example data is needed.

    Example:
        >>> F = KFAC(model, nn.CrossEntropyLoss(), loader, fisher="mc")
        >>> step = F.inverse(damping=1e-3, heuristic="pi") @ grads   # list of tensors
    """

    is_symmetric = True
    is_psd = True

    def __init__(self, model: nn.Module, loss_fn: nn.Module, data: Iterable, params=None, *,
                 fisher: Literal["type2", "mc", "empirical", "forward_only"] = "type2",
                 mc_samples: int = 1, approx: Literal["expand", "reduce"] = "expand",
                 separate_bias: bool = False,
                 other: Literal["diagonal", "dense", "error"] = "diagonal", seed: int = 0,
                 progress: bool = False, check_deterministic: bool = True,
                 num_data: int | None = None, batch_size_fn: Callable | None = None,
                 compute: bool = True):
        name = type(self).__name__
        for opt, value, allowed in (("fisher", fisher, FISHER_TYPES), ("approx", approx, _APPROX),
                                    ("other", other, _OTHER)):
            if value not in allowed:
                raise ValueError(f"{name}: {opt} must be one of {allowed}; got {value!r}.")
        if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
            raise ValueError(f"{name}: mc_samples must be a positive int; got {mc_samples!r}.")
        if not isinstance(separate_bias, bool):
            raise TypeError(f"{name}: separate_bias must be a bool; got "
                            f"{type(separate_bias).__name__}.")
        loss = output_loss(loss_fn, caller=name, analytic=True)
        selected = resolve_params(model, params, name)
        # Refuse tied weights and layers without a block before any forward pass (the data
        # engine's determinism check runs two): an Embedding's max_norm would already have
        # rewritten the weight by then. The plan is kept: every pass starts from a copy of it
        # (no walk over the model's modules per compute).
        self._plan = plan_layers(model, selected, separate_bias=separate_bias)
        # With compute=False nothing reads the data yet: the determinism check (two passes)
        # waits for the first compute(), so the data may still be in the making.
        self.engine = DataEngine(model, loss, data, selected, caller=name, progress=progress,
                                 check_deterministic=check_deterministic and compute,
                                 num_data=num_data, batch_size_fn=batch_size_fn,
                                 allow_weights=True)
        self._data_checked = compute or not check_deterministic
        self.loss, self.model = loss, model
        self.fisher, self.mc_samples, self.approx = fisher, mc_samples, approx
        self.separate_bias, self.other, self.seed = separate_bias, other, seed
        self._check = check_deterministic  # the gradient-coverage check, until it passes once
        first = next(iter(selected.values()))
        P = sum(p.numel() for p in selected.values())
        super().__init__((P, P), dtype=first.dtype, device=first.device,
                         in_shapes=[p.shape for p in selected.values()])
        self._param_offsets = self._offsets()
        self.specs: list[LayerSpec] = []
        self.others: list[str] = []
        self.factors: dict[str, dict[str, Tensor]] = {}
        # the model's wiring as the first compute() finds it (None: not searched yet)
        self._shared_paths: list[str] | None = None
        self._unbatched_paths: list[str] = []
        self._op: PermutedBlocks | None = None
        if compute:
            self.compute()

    @property
    def params(self) -> dict[str, Tensor]:
        """The parameters the operator acts on (name → tensor), in the order of its vectors."""
        return self.engine.params

    # ------------------------------------------------------------------ the data pass
    def _make_pass(self, *, per_example: bool = False) -> FactorPass:
        # Fresh plans (a pass records its calls in them and prunes its own lists)
        layers = [replace(p, calls=[]) for p in self._plan[0]]
        fp = FactorPass(self.engine, layers, list(self._plan[1]), fisher=self.fisher,
                        mc_samples=self.mc_samples, approx=self.approx, other=self.other,
                        check=self._check, per_example=per_example)
        # The model's wiring (inputs shared by all examples, sequence-first layers) as the
        # first compute() found it: a recompute runs no probe forward
        fp.shared_paths, fp.unbatched_paths = self._shared_paths, self._unbatched_paths
        return fp

    def _generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed)

    def compute(self) -> KFAC:
        """Compute the factors: one forward and ``K`` backward passes per batch (``K`` vectors).

        Factors are summed over batches and ranks and normalised as the exact operators are.

        Returns:
            ``self``, ready for products.
        """
        if not self._data_checked:
            self.engine._check_deterministic()
            self._data_checked = True
        with self._atomic():
            return self._compute()

    @contextmanager
    def _atomic(self):
        """Keep the factors and blocks as they were if a ``compute()`` fails part-way.

        ``_store`` replaces them layer by layer, and EKFAC builds KFAC's blocks before its
        correction pass: a failure would leave factors out of step with the blocks, or an EKFAC
        that acts as KFAC.
        """
        saved = {k: getattr(self, k, None)
                 for k in ("specs", "others", "factors", "_op", "_shared_paths",
                           "_unbatched_paths")}
        try:
            yield
        except BaseException:
            vars(self).update(saved)
            raise

    def _compute(self) -> KFAC:
        fp = self._make_pass()
        gen = self._generator()

        first = True

        def per_batch(batch):
            nonlocal first
            out = fp.forward(batch)
            if first:
                first = False
                self._warn_type2_positions(fp, out)
            V = fp.vectors(batch, out, gen)
            if fp.check:
                fp.check = False  # first batch only
                V_check = V if V.shape[0] else backprop_vectors(self.loss, "empirical", out,
                                                                 batch, 1, gen)
                a_list = [fp.layer_inputs(p, ones=False) if p.is_kron else None
                          for p in fp.layers]
                fp.verify(out, V_check[0], a_list)
                self._check = False  # the wiring is checked: a recompute skips the extra backward
                del a_list
            acc: list[list[Tensor] | None] = [None] * len(fp.layers)
            for k in range(V.shape[0]):
                grads, _ = fp.backward(out, V[k], retain=k < V.shape[0] - 1)
                for i, (plan, g) in enumerate(zip(fp.layers, grads)):
                    c = self._output_factor(fp, plan, g)
                    acc[i] = c if acc[i] is None else [x + y for x, y in zip(acc[i], c)]
            parts: list[Tensor] = []
            for plan, c in zip(fp.layers, acc):
                if plan.is_kron:
                    parts += self._input_factor(fp, plan, batch)
                parts += c if c is not None else [out.new_zeros(1)]  # forward-only: G = I later
            if fp.others:
                U = fp.other_gradients(batch, V)
                parts += [self._other_factor(U[n]) for n in fp.others]
            return parts

        # Plain sums: ``_store`` scales what needs ``1/T`` and divides the input factors by
        # their own counts (one pass over each factor, not two).
        totals = fp.reduce(per_batch, desc=f"{type(self).__name__} factors", normalise=False)
        self._store(fp, totals, fp.engine.loss_scale())
        return self

    def _warn_type2_positions(self, fp: FactorPass, out: Tensor) -> None:
        """Warn where type-2 vectors spanning several positions reach per-example blocks."""
        exact = fp.others + [n for p in fp.layers if not p.is_kron
                             for n in (p.weight, p.bias) if n is not None]
        if self.fisher == "type2" and exact and (T := type2_positions(self.loss, out)) > 1:
            warnings.warn(
                f"{type(self).__name__}: fisher='type2' backpropagates each output column over "
                f"all {T} positions of an example at once, so the per-example blocks of "
                f"{exact} (norm layers, other parameters) also sum products between positions, "
                "which the GGN does not have (they are its blocks with one output term per "
                "example); fisher='mc' is unbiased here.",
                UserWarning,
                stacklevel=5,
            )

    def _input_factor(self, fp: FactorPass, plan: LayerPlan, batch) -> list[Tensor]:
        """``[Σ w a aᵀ (groups, d, d), Σ w S (1,)]``: input factor sum and its normaliser.

        Expand sums each call's Gram as its layer rule computes it best (no joined inputs). A
        joint bias's column of ones is not appended: its row and column of the factor are
        ``Σ w a`` and ``Σ w S`` (cheaper than a Gram one column wider, which also loses the
        aligned width).
        """
        w = batch.weights
        if w is not None and (w.dtype != self.dtype or w.device != self.device):
            w = w.to(dtype=self.dtype, device=self.device)  # validated in FactorPass.forward
        N = batch.batch_size
        if self.approx == "reduce":
            a = fp.layer_inputs(plan, ones=False).mean(dim=1, keepdim=True)
            A, side = gram_and_side(a, w, plan.joint)
            rows = a.shape[0]  # N where the layer is batch-first (checked below)
        else:
            A = side = None
            rows = 0
            for x, _ in plan.calls:
                A_c, s_c, R_c = plan.rule.input_factor(plan.module, x, w, plan.joint)
                A = A_c if A is None else A.add_(A_c)
                side = s_c if side is None else side.add_(s_c)
                rows += R_c
        # An input without the examples in it (a tensor shared by all of them) gets gradients
        # summed over the examples: no Kronecker factor can be formed from those. (The factor
        # pass moves such layers to the other parameters; this catches what it cannot test.)
        if rows % N if self.approx == "expand" else rows != N:
            expected = "a multiple of N" if self.approx == "expand" else "N"
            raise ValueError(
                f"KFAC: module {plan.path!r} saw {rows} input rows in batch {batch.index}; "
                f"expected {expected} = {N}, one set of rows per example (is its input shared "
                "by all examples?). Exclude its parameters via params=.")
        # Normalise by the number of input rows summed, not N times the positions of one call:
        # a layer may see the batch elsewhere than in front ((S, N, D) in a sequence-first
        # model, (N·T, C, H, W) folded frames). Weights need batch-first inputs, so there the
        # rows are N·S and the total is Σ w · S. (Empty batches never get here.)
        # (torch.full fills on the device; new_tensor would copy from the host and sync)
        total = (torch.full((1,), float(rows), dtype=A.dtype, device=A.device) if w is None
                 else (w.sum() * (rows // N)).reshape(1))
        if plan.joint:
            d = A.shape[-1]
            joint = A.new_empty(A.shape[0], d + 1, d + 1)
            joint[:, :d, :d] = A
            joint[:, :d, d] = side
            joint[:, d, :d] = side
            joint[:, d, d] = total
            A = joint
        return [A, total]

    def _output_factor(self, fp: FactorPass, plan: LayerPlan, grads: list[Tensor]) -> list[Tensor]:
        if plan.is_kron:
            if self.approx == "reduce":
                return [grouped_gram(fp.layer_grads(plan, grads).sum(dim=1, keepdim=True))]
            G = None
            for g in grads:  # one Gram per call, as the layer rule computes it best
                G_c = plan.rule.output_gram(plan.module, g)
                G = G_c if G is None else G.add_(G_c)
            return [G]
        u = fp.norm_grads(plan, grads)
        if plan.joint:
            U = torch.cat([u["weight"], u["bias"]], dim=1)
            return [U.T @ U]
        return [u[r].T @ u[r] for r in plan.roles]

    def _other_factor(self, U: Tensor) -> Tensor:  # U: (N, K, numel)
        flat = U.reshape(-1, U.shape[-1])
        return (flat * flat).sum(0) if self.other == "diagonal" else flat.T @ flat

    def _store(self, fp: FactorPass, totals: list[Tensor], scale: float) -> None:
        """Factors from the pass's plain sums.

        ``scale`` (``1/T`` or 1) normalises the Grams of backpropagated vectors; the input
        factors are means over their own rows.
        """
        self.specs = [LayerSpec.of(p) for p in fp.layers]
        self.others = list(fp.others)
        self._shared_paths, self._unbatched_paths = fp.shared_paths, fp.unbatched_paths
        factors: dict[str, dict[str, Tensor]] = {}
        it = iter(totals)
        kron = []  # per Kronecker layer: (plan, spec, its weight count)
        scaled = []  # the Grams of backpropagated vectors (the pass's own tensors)
        for plan, spec in zip(fp.layers, self.specs):
            if spec.kind == "kron":
                A_sum, count, G = next(it), next(it), next(it)
                factors[spec.path] = {"A": A_sum.div_(count), "G": G}
                kron.append((plan, spec, count))
                scaled.append(G)
            else:
                factors[spec.path] = {r: next(it) for r in
                                      (("joint",) if spec.joint else plan.roles)}
                scaled += factors[spec.path].values()
        for name in self.others:
            factors[name] = {self.other: next(it)}
            scaled.append(factors[name][self.other])
        if scale != 1.0 and scaled:
            torch._foreach_mul_(scaled, scale)  # one call: as t.mul_(scale) per tensor
        # Both are Grams (PSD): |X_ij| <= sqrt(X_ii X_jj) bounds every entry by the diagonal,
        # and a NaN or inf in the vectors reaches the diagonal, so the diagonal's sum tells
        # whether the whole factor is finite (d, not d², reads).
        check_layers([(spec.path, count, factors[spec.path]["A"], factors[spec.path]["G"])
                       for _, spec, count in kron])
        if self.fisher == "forward_only":
            for plan, spec, _ in kron:
                A = factors[spec.path]["A"]
                d_out = self._d_out(plan.module, spec, A.shape[0])
                factors[spec.path]["G"] = torch.eye(d_out, dtype=A.dtype, device=A.device).expand(
                    A.shape[0], d_out, d_out).clone()
        self.factors = factors
        self._build()

    def _d_out(self, module: nn.Module, spec: LayerSpec, groups: int) -> int:
        if spec.order == "AG":
            return module.weight.shape[1]
        out_features = (module.weight if module._parameters.get("weight") is not None
                        else module.bias).shape[0]
        return out_features // groups

    # ------------------------------------------------------------------ blocks
    def _offsets(self) -> tuple[dict[str, int], dict[str, int]]:
        """Each parameter's offset in the flat ``params`` order and its size."""
        offsets, sizes, start = {}, {}, 0
        for n, p in self.engine.params.items():
            offsets[n], sizes[n] = start, p.numel()
            start += sizes[n]
        return offsets, sizes

    def _blocks(self) -> list[Block]:
        """The blocks in canonical order, each with its entries' positions in ``params`` order.

        Positions are a ``slice`` where the block is contiguous in ``params`` order (no gather
        needed) and an index tensor where it interleaves (a joint ``[W | b]``).
        """
        off, sizes = self._param_offsets  # (fixed with the parameters: found once)
        dev = self.device

        def span(name, start=0, count=None):
            return slice(off[name] + start, off[name] + start + (count or sizes[name]))

        def joined(first, second):
            if off[second] == off[first] + sizes[first]:
                return slice(off[first], off[second] + sizes[second])
            return torch.cat([torch.arange(s.start, s.stop, device=dev)
                              for s in (span(first), span(second))])

        blocks, one = [], None
        for spec in self.specs:
            f = self.factors[spec.path]
            if spec.kind == "norm":
                if spec.joint:
                    blocks.append(Block(joined(spec.weight, spec.bias), "dense", (f["joint"],),
                                        spec.path))
                for role in ("weight", "bias") if not spec.joint else ():
                    if getattr(spec, role) is not None:
                        blocks.append(Block(span(getattr(spec, role)), "dense", (f[role],),
                                            spec.path))
                continue
            A, G = f["A"], f["G"]
            if spec.order == "AG":
                blocks.append(Block(span(spec.weight), "kron", (A[0], G[0]), spec.path,
                                    a_pos=0, key=("W", 0)))
                continue
            groups, d_out = G.shape[0], G.shape[1]
            Gs = G.unbind(0)  # the groups' views, in one call
            if spec.weight is not None:
                n_w = sizes[spec.weight] // groups
                if spec.joint:  # rows [W_r | b_r]: W and b runs interleaved row by row
                    ix = [JointRows(span(spec.weight, j * n_w, n_w),
                                    span(spec.bias, j * d_out, d_out), d_out, n_w // d_out)
                          for j in range(groups)]
                else:
                    ix = [span(spec.weight, j * n_w, n_w) for j in range(groups)]
                As = A.unbind(0)
                blocks += [Block(ix[j], "kron", (Gs[j], As[j]), spec.path, a_pos=1, key=("W", j))
                           for j in range(groups)]
            if spec.bias is not None and not spec.joint:
                if one is None or one.dtype != G.dtype:  # one for all separate biases
                    one = torch.ones(1, 1, dtype=G.dtype, device=G.device)
                blocks += [Block(span(spec.bias, j * d_out, d_out), "kron", (Gs[j], one),
                                 spec.path, a_pos=1, key=("b", j)) for j in range(groups)]
        for n in self.others:
            kind = "diagonal" if "diagonal" in self.factors[n] else "dense"
            blocks.append(Block(span(n), kind, (self.factors[n][kind],), n))
        return blocks

    def _build(self) -> None:
        self._op = PermutedBlocks(self._blocks(), self.shape[0], self.in_shapes, self.device)

    def _require(self, method: str) -> PermutedBlocks:
        if self._op is None:
            raise RuntimeError(f"{type(self).__name__}.{method}: the factors are not computed; "
                               "call compute() or load_state_dict() first (or construct with "
                               "compute=True).")
        return self._op

    # ------------------------------------------------------------------ operator interface
    def _matmat(self, X: Tensor) -> Tensor:
        return self._require("matmul")._matmat(X)

    def to_dense(self) -> Tensor:
        """The dense ``(P, P)`` matrix (for small models and tests)."""
        return self._require("to_dense").to_dense()

    def trace(self) -> Tensor:
        """Exact trace: ``Σ tr A · tr G`` over Kronecker blocks plus the other blocks' traces."""
        return self._require("trace").trace()

    def diagonal(self) -> Tensor:
        """Exact diagonal ``(P,)`` in ``params`` order."""
        return self._require("diagonal").diagonal()

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(F + damping·I)`` from the factors' eigenvalues (exact damping).

        Raises:
            ValueError: If ``damping`` is negative or not finite, or a block is singular.
        """
        return self._require("logdet").logdet(damping)

    def frobenius_norm(self) -> Tensor:
        """``‖F‖_F``; ``‖A ⊗ G‖_F = ‖A‖_F ‖G‖_F`` per block."""
        return self._require("frobenius_norm").frobenius_norm()

    def eigh(self) -> tuple[Tensor, LinearOperator]:
        """Eigenvalues ``(P,)`` (block by block) and the orthogonal eigenvector operator ``Q``.

        ``F = Q diag(λ) Qᵀ``; ``Q`` maps eigen-coordinates to ``params`` order and is never
        materialised (Kronecker products of the factors' eigenvectors).
        """
        return self._require("eigh").eigh()

    def inverse(self, damping: float = 0.0, *, heuristic: Literal["pi"] | None = None,
                exact: bool = False) -> LinearOperator:
        """Damped inverse as an operator in ``params`` order.

        Args:
            damping: ``λ >= 0``.
            heuristic: ``None``: each Kronecker factor gets ``λ``, i.e. ``(G + λI)⁻¹ ⊗ (A + λI)⁻¹``;
                ``"pi"``: Martens & Grosse's (2015, §6.3) ``A + π√λ I`` and ``G + √λ/π I`` with
                ``π = √((tr A / d_A) / (tr G / d_G))``.
            exact: ``(G ⊗ A + λI)⁻¹`` exactly, via the factors' eigendecompositions.

        Dense and diagonal blocks (norm layers, other parameters) always get ``+ λI``. Factor
        inverses use Cholesky, retried in float64 with a warning if it fails.

        Raises:
            ValueError: If ``exact=True`` is combined with a heuristic, or ``"pi"`` meets a zero
                factor.
        """
        op = self._require("inverse")
        if heuristic not in (None, "pi"):
            raise ValueError(f"{type(self).__name__}.inverse: heuristic must be None or 'pi'; "
                             f"got {heuristic!r}.")
        if exact and heuristic is not None:
            raise ValueError(f"{type(self).__name__}.inverse: exact=True damps the Kronecker "
                             f"product itself; it takes no heuristic (got {heuristic!r}).")
        return op.inverse(damping, heuristic=heuristic, exact=exact)

    # ------------------------------------------------------------------ state
    def _to(self, dtype, device):
        name = type(self).__name__
        raise NotImplementedError(
            f"{name} cannot be moved: its factors follow the model's dtype and device. Move the "
            f"model and the data and build a new {name}, or load this one's factors into it: "
            f"{name}(model, loss_fn, data, compute=False).load_state_dict(old.state_dict())."
        )

    def _options(self) -> dict:
        """The options that define the factors (saved with them, compared on loading)."""
        return {"fisher": self.fisher, "mc_samples": self.mc_samples, "approx": self.approx,
                "separate_bias": self.separate_bias, "other": self.other}

    def state_dict(self) -> dict:
        """Factors and the options that define them (tensors and plain Python values only)."""
        self._require("state_dict")
        return {
            "type": type(self).__name__,
            "options": self._options(),
            "params": {n: tuple(p.shape) for n, p in self.engine.params.items()},
            "layers": [vars(s).copy() for s in self.specs],
            "others": list(self.others),
            "factors": {k: dict(v) for k, v in self.factors.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore factors saved by ``state_dict`` (same parameters and options).

        Raises:
            ValueError: If the state is of another operator type, options or parameters, or its
                layers and factor shapes are not this model's.
        """
        check_header(self, state)
        specs = [LayerSpec(**s) for s in state["layers"]]
        others = list(state["others"])
        check_state(self, specs, others, state["factors"])
        self.specs, self.others = specs, others
        self.factors = {k: {r: t.to(dtype=self.dtype, device=self.device) for r, t in v.items()}
                        for k, v in state["factors"].items()}
        self._build()

    def _factor_shapes(self, spec: LayerSpec, plan: LayerPlan) -> dict[str, tuple]:
        """The shapes of a layer's factors, by key (as ``_store`` and ``factors`` hold them)."""
        if spec.kind == "norm":
            n = {r: self.engine.params[getattr(spec, r)].numel() for r in ("weight", "bias")
                 if getattr(spec, r) is not None}
            return ({"joint": (sum(n.values()),) * 2} if spec.joint
                    else {r: (k, k) for r, k in n.items()})
        weight = plan.module.weight
        if spec.order == "AG":  # embedding, W (V, D)
            V, D = weight.shape
            return {"A": (1, V, V), "G": (1, D, D)}
        groups = plan.rule.groups(plan.module)
        d_out = self._d_out(plan.module, spec, groups)
        d_in = weight[0].numel() + spec.joint  # Linear (d_out, d_in), Conv (C_out, C_in/g, *k)
        return {"A": (groups, d_in, d_in), "G": (groups, d_out, d_out)}
