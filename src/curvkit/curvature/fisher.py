"""Fisher matrices: Monte-Carlo (sampled-label) Fisher and the empirical Fisher."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import grad

from curvkit import distributed
from curvkit.curvature.engine import Batch
from curvkit.curvature.ggn import OutputSpaceCurvature

__all__ = ["FisherMC", "EmpiricalFisher"]

DEFAULT_SEED = 2147483647


class FisherMC(OutputSpaceCurvature):
    """Monte-Carlo Fisher ``F = c Σ_n J_nᵀ [(1/M) Σ_m g_{n,m} g_{n,m}ᵀ] J_n``.

    ``g_{n,m}`` is the gradient of a loss term with respect to the output at a label drawn from
    the model's likelihood (categorical for cross-entropy, Gaussian with variance 1/2 for MSE,
    Bernoulli for BCE), one draw per loss term (token or output entry), so that the bracket is an
    unbiased estimate of each term's output Hessian and ``E[F] = GGN``.

    Every product with the same draw represents the same matrix: the labels come from a
    ``torch.Generator`` re-seeded at the start of each pass. ``resample()`` moves to a fresh
    draw; ``FisherMC(..., seed=s)`` and ``resample(seed=s)`` are reproducible.

    Args:
        model: ``nn.Module`` called as ``model(X)``.
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss`` (unweighted).
        data: Re-iterable of ``(X, y)`` batches (targets only mark ignored tokens here).
        params: ``None``, a list of the model's parameters, or a mapping name → tensor.
        mc_samples: Labels drawn per loss term, ``M >= 1``.
        seed: Seed of the label draw.
        progress, check_deterministic, num_data, batch_size_fn, blocks: As for ``GGN``.

    Example:
        >>> F = FisherMC(model, nn.CrossEntropyLoss(), loader, mc_samples=4, seed=0)
        >>> Fv = F @ v
        >>> F.resample()     # a new draw; F @ v changes, reproducibly
    """

    _defer_target_checks = True  # labels are drawn; targets only mask ignored terms

    def __init__(self, model: nn.Module, loss_fn: nn.Module, data: Iterable, params=None, *,
                 mc_samples: int = 1, seed: int = DEFAULT_SEED, progress: bool = False,
                 check_deterministic: bool = True, num_data: int | None = None,
                 batch_size_fn: Callable | None = None, blocks=None):
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"FisherMC: mc_samples must be an int >= 1; got {mc_samples!r}.")
        if not isinstance(seed, int):
            raise TypeError(f"FisherMC: seed must be an int; got {type(seed).__name__}.")
        super().__init__(model, loss_fn, data, params, progress=progress,
                         check_deterministic=check_deterministic, num_data=num_data,
                         batch_size_fn=batch_size_fn)
        self.mc_samples, self.seed = mc_samples, seed
        self._generator = torch.Generator(device=self.device)

    def resample(self, seed: int | None = None) -> FisherMC:
        """Draw new labels: from ``seed`` if given, else from the next seed in sequence.

        Returns:
            ``self``, now representing the new draw.
        """
        self.seed = self.seed + 1 if seed is None else int(seed)
        return self

    def _start_pass(self) -> None:
        # Ranks draw different labels for their different shards.
        self._generator.manual_seed(self.seed + 1_000_003 * distributed.rank())

    def _matmat(self, X: Tensor) -> Tensor:
        self._start_pass()
        return super()._matmat(X)

    def diagonal(self) -> Tensor:
        """Exact diagonal ``(P,)`` of this draw's matrix (``T·M`` backward passes per example)."""
        self._start_pass()
        return super().diagonal()

    def _samples(self, batch: Batch, output: Tensor) -> Tensor:
        return self.loss.sample_gradients(output, batch.y, self.mc_samples, self._generator)

    def _middle(self, batch, output):
        G = self._samples(batch, output)  # (M, *out)
        dim = self.loss.class_dim
        M = self.mc_samples

        def apply(u: Tensor) -> Tensor:  # (1/M) Σ_m g_m (g_mᵀ u), per loss term
            inner = G * u
            if dim is not None:
                inner = inner.sum(dim=dim + 1, keepdim=True)
            return (G * inner).sum(0) / M

        return apply

    def _factor(self, batch, output):
        G = self._samples(batch, output)  # (M, *out) → (N, T, C, M) / √M
        terms = torch.stack([self.loss.to_terms(g) for g in G], dim=-1)
        return terms / self.mc_samples**0.5


class EmpiricalFisher(OutputSpaceCurvature):
    """Empirical Fisher ``EF = c Σ_n ∇_θ ℓ_n ∇_θ ℓ_nᵀ`` with the true labels.

    With ``grouping="example"`` (the default) ``ℓ_n`` is example ``n``'s loss summed over its
    terms (all tokens of a sequence); with ``grouping="term"`` every loss term (token, or
    output entry for MSE/BCE) is its own ``ℓ_n``, as curvlinops 3.0's ``EFLinearOperator`` does.
    The two agree when each example has one term (classification). ``c`` is the reduction factor
    (``1/T`` for mean over ``T`` loss terms, 1 for sum). Computed as ``J_nᵀ (e_n e_nᵀ) J_n``
    with ``e_n = ∂ℓ_n/∂f_n``: one forward-with-tangent and one backward pass per product, no
    per-example gradients stored.

    Args:
        model: ``nn.Module`` called as ``model(X)``.
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``.
        data: Re-iterable of ``(X, y)`` batches.
        params: ``None``, a list of the model's parameters, or a mapping name → tensor.
        grouping: ``"example"`` or ``"term"``: which gradients form the outer products.
        progress, check_deterministic, num_data, batch_size_fn, blocks: As for ``GGN``.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, data: Iterable, params=None, *,
                 grouping: Literal["example", "term"] = "example", progress: bool = False,
                 check_deterministic: bool = True, num_data: int | None = None,
                 batch_size_fn: Callable | None = None, blocks=None):
        if grouping not in ("example", "term"):
            raise ValueError(f"EmpiricalFisher: grouping must be 'example' or 'term'; got "
                             f"{grouping!r}.")
        super().__init__(model, loss_fn, data, params, progress=progress,
                         check_deterministic=check_deterministic, num_data=num_data,
                         batch_size_fn=batch_size_fn)
        self.grouping = grouping

    def _output_gradient(self, batch: Batch, output: Tensor) -> Tensor:
        return grad(lambda o: self.loss.sum_loss(o, batch.y, batch.batch_size))(output)

    def _middle(self, batch, output):
        e = self._output_gradient(batch, output)
        if self.grouping == "term":
            dims = () if self.loss.class_dim is None else (self.loss.class_dim,)
        else:
            dims = tuple(range(1, e.ndim))
        if not dims:
            return lambda u: e * e * u
        return lambda u: e * (e * u).sum(dim=dims, keepdim=True)

    def _factor(self, batch, output):
        e = self.loss.to_terms(self._output_gradient(batch, output))  # (N, T, C)
        if self.grouping == "term":
            return e.unsqueeze(-1)
        # An example's column e_n spans all its terms, so present the example as one
        # pseudo-term of width T·C; the canonical layout flattens (T, C) in the same order.
        N, T, C = e.shape
        return e.reshape(N, 1, T * C, 1)

    def diagonal(self) -> Tensor:
        """Exact diagonal ``(P,)``: ``c Σ_n (∇_θ ℓ_n)²`` from per-example gradients."""
        return super().diagonal()
