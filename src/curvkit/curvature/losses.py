"""Per-loss output-space curvature: counts, Hessians, their square roots, Monte-Carlo labels.

A curvature operator never differentiates the loss twice through autograd. For the losses of
the GGN family (``MSELoss``, ``CrossEntropyLoss``, ``BCEWithLogitsLoss``) this module gives the
Hessian of the *sum-reduced* loss with respect to the model output in closed form, applied as a
product (for softmax cross-entropy ``H = diag(p) - p pᵀ`` is applied as ``p∘v - p (pᵀv)``, so a
50k-wide output layer costs a few logits-sized tensors, never ``C × C`` per token).

Conventions:

- ``output`` is the model output as the PyTorch loss takes it: ``(N, C)`` or ``(N, C, d1, ...)``
  logits for cross-entropy (classes in dimension 1), any ``(N, ...)`` for MSE and BCE.
- A *term* is one summand of the loss: a token (a ``C``-vector of logits) for cross-entropy and
  one output entry for MSE/BCE. The output Hessian is block diagonal over terms.
- ``count(y)`` is the number of loss terms PyTorch divides by under ``reduction="mean"``:
  non-ignored (class-weighted) tokens for cross-entropy, ``y.numel()`` for MSE/BCE (which also
  average over the output dimension). The engine sums counts over all batches (and ranks).
- The *canonical* layout ``(N, T, C)`` lists the terms of each example: ``C`` is the class
  dimension for cross-entropy and 1 for elementwise losses.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OutputLoss", "output_loss", "SUPPORTED_LOSSES"]

SUPPORTED_LOSSES = ("MSELoss", "CrossEntropyLoss", "BCEWithLogitsLoss")


class OutputLoss:
    """A loss module seen through its output-space curvature.

    Subclasses fill in the analytic parts; the base class serves any twice-differentiable loss
    for the Hessian (its terms are then counted as examples, ``count = N``).

    Attributes:
        module: The user's loss module.
        reduction: ``"mean"`` or ``"sum"``.
        analytic: Whether closed-form output Hessians are available (the GGN family).
        class_dim: Output dimension holding a term's entries (1 for cross-entropy), or ``None``
            for elementwise losses.
    """

    analytic = False
    class_dim: int | None = None

    def __init__(self, module: nn.Module, caller: str):
        reduction = getattr(module, "reduction", None)
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"{caller}: loss_fn must use reduction='mean' or 'sum'; got {reduction!r} "
                f"({type(module).__name__})."
            )
        self.module, self.reduction, self.caller = module, reduction, caller
        # While a list: checks that need the device's answer append ``(flag, message)`` here
        # instead of synchronising, and the engine reads them all at once after its pass
        # (``DataEngine.reduce_over_data(defer_checks=True)``).
        self.pending: list[tuple[Tensor, Callable[[], str]]] | None = None

    # ------------------------------------------------------------------ any loss
    def count(self, y: Tensor, batch_size: int) -> Tensor:
        """Number of loss terms in the batch (what ``reduction='mean'`` divides by), 0-d."""
        return torch.tensor(float(batch_size))

    def sum_loss(self, output: Tensor, y: Tensor, batch_size: int) -> Tensor:
        """The batch's loss summed over its terms (so batch contributions add up)."""
        loss = self.module(output, y)
        return loss * batch_size if self.reduction == "mean" else loss

    def check(self, output: Tensor, y: Tensor) -> None:
        """Raise if ``output`` and ``y`` do not fit this loss."""

    def require(self, failed: Tensor, message: Callable[[], str], *, eager: bool = False) -> None:
        """Raise ``ValueError(message())`` if the 0-d bool ``failed`` is true.

        Now, or after the pass where checks are deferred (``pending``) and not ``eager``.
        """
        if self.pending is not None and not eager:
            self.pending.append((failed, message))
        elif bool(failed):  # a device synchronisation
            raise ValueError(message())

    # ------------------------------------------------------------------ GGN family
    def _unsupported(self, what: str):
        return ValueError(
            f"{self.caller}: {what} needs an analytic output Hessian, available for "
            f"{', '.join(SUPPORTED_LOSSES)}; got {type(self.module).__name__}."
        )

    def hessian_product(self, output: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
        """Return ``v ↦ ∇²_f ℓ v`` for the sum-reduced loss; ``v`` shaped like ``output``."""
        raise self._unsupported("the GGN")

    def sqrt_factor(self, output: Tensor, y: Tensor) -> Tensor:
        """``S`` of shape ``(N, T, C, K)`` with each term's Hessian ``H_{n,t} = S S ᵀ``."""
        raise self._unsupported("the GGN diagonal")

    def sample_gradients(self, output: Tensor, y: Tensor, mc_samples: int,
                         generator: torch.Generator) -> Tensor:
        """Gradients ``(M, *output.shape)`` at labels drawn from the model's likelihood.

        Per term, ``E[g gᵀ]`` equals the output Hessian, so ``(1/M) Σ_m g_m g_mᵀ`` is an unbiased
        Monte-Carlo estimate of it.
        """
        raise self._unsupported("the Monte-Carlo Fisher")

    # ------------------------------------------------------------------ layouts
    def to_terms(self, t: Tensor) -> Tensor:
        """``(N, ...)`` output-shaped tensor → canonical ``(N, T, C)``."""
        if self.class_dim is None:
            return t.reshape(t.shape[0], -1, 1)
        return t.movedim(1, -1).reshape(t.shape[0], -1, t.shape[1])

    def from_terms(self, z: Tensor, shape: torch.Size) -> Tensor:
        """Canonical ``(N, T, C)`` → output shape ``shape`` (inverse of ``to_terms``)."""
        if self.class_dim is None:
            return z.reshape(shape)
        return z.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


class _CrossEntropy(OutputLoss):
    analytic = True
    class_dim = 1

    def __init__(self, module: nn.CrossEntropyLoss, caller: str):
        super().__init__(module, caller)
        self.ignore_index = module.ignore_index
        self.weight = module.weight
        self.label_smoothing = module.label_smoothing

    def check(self, output, y):
        if output.ndim < 2:
            raise ValueError(
                f"{self.caller}: CrossEntropyLoss needs batched logits (N, C) or (N, C, d1, ...); "
                f"got output of shape {tuple(output.shape)}."
            )
        class_targets = y.shape == output.shape[:1] + output.shape[2:] and not y.is_floating_point()
        prob_targets = y.shape == output.shape and y.is_floating_point()
        if not (class_targets or prob_targets):
            raise ValueError(
                f"{self.caller}: CrossEntropyLoss targets must be class indices of shape "
                f"{tuple(output.shape[:1] + output.shape[2:])} or probabilities of shape "
                f"{tuple(output.shape)}; got {tuple(y.shape)} ({y.dtype})."
            )
        C = output.shape[1]
        if class_targets:
            # PyTorch takes int64 or uint8 indices; other dtypes and indices outside [0, C) it
            # rejects deep inside the loss, while the GGN (which reads the targets only for
            # ignored tokens and class weights) would silently use them.
            if y.dtype not in (torch.int64, torch.uint8):
                raise ValueError(
                    f"{self.caller}: CrossEntropyLoss class-index targets must be int64 (or "
                    f"uint8); got {y.dtype}."
                )
            self._check_range(y, C)
        if self.weight is not None and (self.weight.shape != (C,)
                                        or self.weight.dtype != output.dtype):
            raise ValueError(
                f"{self.caller}: CrossEntropyLoss's class weight must be a ({C},) tensor of the "
                f"output's dtype {output.dtype}; got {tuple(self.weight.shape)} "
                f"({self.weight.dtype})."
            )
        if prob_targets and self.weight is not None:
            raise ValueError(
                f"{self.caller}: CrossEntropyLoss with class weights and probability targets is "
                "not supported; use class-index targets."
            )
        if self.weight is not None and self.label_smoothing > 0:
            raise ValueError(
                f"{self.caller}: CrossEntropyLoss with both class weights and label smoothing is "
                "not supported (its output Hessian depends on the target mixture)."
            )

    def _check_range(self, y: Tensor, C: int, *, eager: bool = False) -> None:
        # Deferred (see ``pending``) unless ``eager``: before targets index anything on an
        # accelerator, where an index out of range is a device-side assert, not an error.
        bad = (y != self.ignore_index) & ((y < 0) | (y >= C))

        def message() -> str:
            return (f"{self.caller}: CrossEntropyLoss class-index targets must lie in [0, {C}) "
                    f"(or equal ignore_index={self.ignore_index}); got "
                    f"{y[bad].unique()[:8].tolist()}.")

        self.require(bad.any(), message, eager=eager)  # one reduction, no boolean indexing

    def _term_weights(self, y: Tensor, dtype: torch.dtype) -> Tensor | None:
        """Per-token weights ``(N, d1, ...)``: 0 for ignored tokens, ``weight[y]`` if weighted.

        For probability targets: the token's target mass (after label smoothing), which scales
        its Hessian ``Σ_c y_c (diag p − p pᵀ)`` (PyTorch does not require rows to sum to 1).
        """
        if y.is_floating_point():
            mass = y.sum(dim=1).to(dtype)
            eps = self.label_smoothing
            return mass if eps == 0 else mass * (1 - eps) + eps
        keep = y != self.ignore_index
        if self.weight is None:
            return keep.to(dtype)
        self._check_range(y, self.weight.shape[0], eager=True)  # before y indexes the weights
        return torch.where(keep, self.weight.to(dtype)[y.clamp(min=0) * keep], 0.0)

    def count(self, y, batch_size):
        if y.is_floating_point():  # probability targets: PyTorch divides by N·d1·…
            if y.ndim < 2:
                raise ValueError(
                    f"{self.caller}: CrossEntropyLoss targets must be integer class indices or "
                    f"probabilities of shape (N, C, ...); got {y.dtype} targets of shape "
                    f"{tuple(y.shape)}."
                )
            return torch.tensor(float(y.numel() // y.shape[1]))
        return self._term_weights(y, torch.float64).sum()

    def sum_loss(self, output, y, batch_size):
        return F.cross_entropy(output, y, weight=self.weight, ignore_index=self.ignore_index,
                               reduction="sum", label_smoothing=self.label_smoothing)

    def hessian_product(self, output, y):
        p = output.detach().softmax(dim=1)
        w = self._term_weights(y, p.dtype)
        if w is not None:
            w = w.unsqueeze(1)

        def apply(v: Tensor) -> Tensor:  # H v = p∘v − p (pᵀv), per token
            Hv = p * v - p * (p * v).sum(dim=1, keepdim=True)
            return Hv if w is None else Hv * w

        return apply

    def sqrt_factor(self, output, y):
        p = self.to_terms(output.detach().softmax(dim=1))  # (N, T, C)
        s = p.sqrt()
        # diag(√p) − p √pᵀ squares to diag(p) − p pᵀ because Σ_c p_c = 1.
        S = torch.diag_embed(s) - p.unsqueeze(-1) * s.unsqueeze(-2)
        w = self._term_weights(y, p.dtype)
        return S if w is None else S * w.reshape(S.shape[0], -1, 1, 1).sqrt()

    def sample_gradients(self, output, y, mc_samples, generator):
        if self.weight is not None:
            raise ValueError(f"{self.caller}: the Monte-Carlo Fisher of a class-weighted "
                             "CrossEntropyLoss is not defined; drop the weights.")
        # Softmax and sampling over the class dimension laid out last (a free view when the
        # logits come from a Linear over positions, as in language models).
        p = self.to_terms(output.detach()).softmax(dim=-1)  # (N, T, C)
        N, T, C = p.shape
        # Inverse-CDF sampling: one uniform number per draw. (torch.multinomial draws one
        # exponential number per class and term for a single sample: 30x slower for C = 512.)
        cdf = p.cumsum(dim=-1)
        u = torch.rand((N, T, mc_samples), generator=generator, dtype=p.dtype, device=p.device)
        labels = torch.searchsorted(cdf, u * cdf[..., -1:]).clamp_(max=C - 1)  # (N, T, M)
        # gradient of −log softmax at the label; p is ours, so one sample reuses it
        G = p.unsqueeze(0) if mc_samples == 1 else p.unsqueeze(0).repeat(mc_samples, 1, 1, 1)
        G.scatter_add_(-1, labels.permute(2, 0, 1).unsqueeze(-1),
                       torch.full((1, 1, 1, 1), -1.0, dtype=p.dtype, device=p.device)
                       .expand(mc_samples, N, T, 1))
        w = self._term_weights(y, p.dtype)
        if w is not None:  # ignored tokens, target mass (multiplied even when all ones: a
            G.mul_(w.reshape(1, N, T, 1).sqrt())  # test for that would synchronise a device)
        shape = output.shape  # back to the output layout, as views
        return G.reshape(mc_samples, shape[0], *shape[2:], shape[1]).movedim(-1, 2)


class _Elementwise(OutputLoss):
    """Losses that are a sum over output entries of a scalar function (MSE, BCE)."""

    analytic = True
    class_dim = None

    def check(self, output, y):
        if y.shape != output.shape:
            raise ValueError(
                f"{self.caller}: {type(self.module).__name__} needs targets shaped like the "
                f"output {tuple(output.shape)}; got {tuple(y.shape)}."
            )

    def count(self, y, batch_size):
        return torch.tensor(float(y.numel()))

    def _h(self, output: Tensor, y: Tensor) -> Tensor:  # entrywise second derivative
        raise NotImplementedError

    def hessian_product(self, output, y):
        h = self._h(output.detach(), y)
        return lambda v: h * v

    def sqrt_factor(self, output, y):
        h = self._h(output.detach(), y).expand(output.shape)
        return h.sqrt().reshape(output.shape[0], -1, 1, 1)


class _MSE(_Elementwise):
    def sum_loss(self, output, y, batch_size):
        return F.mse_loss(output, y, reduction="sum")

    def _h(self, output, y):
        return torch.full((), 2.0, dtype=output.dtype, device=output.device)  # no host copy

    def sample_gradients(self, output, y, mc_samples, generator):
        # ℓ = (f − ỹ)², ỹ ~ N(f, 1/2): g = 2(f − ỹ) = √2 ε has E[g²] = 2 = ∂²ℓ/∂f².
        eps = torch.randn((mc_samples, *output.shape), generator=generator,
                          dtype=output.dtype, device=output.device)
        return math.sqrt(2.0) * eps


class _BCEWithLogits(_Elementwise):
    def __init__(self, module: nn.BCEWithLogitsLoss, caller: str):
        super().__init__(module, caller)
        self.weight, self.pos_weight = module.weight, module.pos_weight

    def check(self, output, y):
        super().check(output, y)
        # PyTorch's BCE needs floating-point targets (an integer one fails with a cast error);
        # the GGN would otherwise accept them silently.
        if not y.is_floating_point():
            raise ValueError(
                f"{self.caller}: BCEWithLogitsLoss needs floating-point targets (0/1 or "
                f"probabilities); got {y.dtype}."
            )
        for name in ("weight", "pos_weight"):
            t = getattr(self, name)
            if t is not None and not _broadcasts_to(t.shape, output.shape):
                raise ValueError(
                    f"{self.caller}: BCEWithLogitsLoss's {name} of shape {tuple(t.shape)} does "
                    f"not broadcast to the output shape {tuple(output.shape)}."
                )

    def sum_loss(self, output, y, batch_size):
        return F.binary_cross_entropy_with_logits(output, y, weight=self.weight,
                                                  pos_weight=self.pos_weight, reduction="sum")

    def _h(self, output, y):
        s = output.sigmoid()
        h = s * (1 - s)
        if self.pos_weight is not None:  # ℓ = −pw·y log σ − (1−y) log(1−σ)
            h = h * (self.pos_weight * y + 1 - y)
        return h if self.weight is None else h * self.weight

    def sample_gradients(self, output, y, mc_samples, generator):
        if self.weight is not None or self.pos_weight is not None:
            raise ValueError(f"{self.caller}: the Monte-Carlo Fisher of a weighted "
                             "BCEWithLogitsLoss is not defined; drop weight/pos_weight.")
        s = output.detach().sigmoid()
        labels = torch.bernoulli(s.expand(mc_samples, *s.shape), generator=generator)
        return s - labels  # E[(σ − ỹ)²] = σ(1 − σ)


class _NLL(OutputLoss):
    """``NLLLoss`` for the Hessian, its terms counted as PyTorch's mean divides by them.

    That is the (class-weighted) non-ignored targets, not the examples.
    """

    def __init__(self, module: nn.NLLLoss, caller: str):
        super().__init__(module, caller)
        self.ignore_index, self.weight = module.ignore_index, module.weight

    def count(self, y, batch_size):
        keep = y != self.ignore_index
        if self.weight is None:
            return keep.to(torch.float64).sum()
        w = self.weight.to(torch.float64)[y.clamp(min=0) * keep]
        return torch.where(keep, w, 0.0).sum()

    def sum_loss(self, output, y, batch_size):
        return F.nll_loss(output, y, weight=self.weight, ignore_index=self.ignore_index,
                          reduction="sum")


def output_loss(module: nn.Module, *, caller: str, analytic: bool) -> OutputLoss:
    """Wrap a PyTorch loss module.

    Args:
        module: ``nn.MSELoss``, ``nn.CrossEntropyLoss``, ``nn.BCEWithLogitsLoss`` or (with
            ``analytic=False``) any loss module with a ``reduction`` of ``"mean"`` or ``"sum"``.
        caller: Operator name for error messages.
        analytic: Require a closed-form output Hessian (GGN, Fisher, empirical Fisher).

    Returns:
        The ``OutputLoss`` for ``module``.

    Raises:
        TypeError: If ``module`` is not an ``nn.Module``.
        ValueError: If the reduction is not ``"mean"``/``"sum"`` or ``analytic`` is requested for
            an unsupported loss.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"{caller}: loss_fn must be a torch.nn loss module; got "
                        f"{type(module).__name__}.")
    for cls, wrapper in ((nn.CrossEntropyLoss, _CrossEntropy), (nn.MSELoss, _MSE),
                         (nn.BCEWithLogitsLoss, _BCEWithLogits)):
        if type(module) is cls:
            return wrapper(module, caller)
    if analytic:
        raise ValueError(
            f"{caller}: supports {', '.join(SUPPORTED_LOSSES)}; got {type(module).__name__} "
            f"(the Hessian operator accepts any twice-differentiable loss).{_HINTS.get(type(module), '')}"
        )
    arity = _required_arguments(module)
    if arity is not None and arity > 2:  # GaussianNLLLoss(input, target, var), CTCLoss, ...
        raise ValueError(
            f"{caller}: loss_fn is called as loss_fn(output, target); {type(module).__name__} "
            f"needs {arity} arguments, which a batch (X, y) cannot provide."
        )
    if type(module) is nn.NLLLoss:
        return _NLL(module, caller)
    return OutputLoss(module, caller)


# Supported losses that give the same curvature as an unsupported one on a model's typical output.
_HINTS = {
    nn.NLLLoss: " For log-probabilities from a LogSoftmax, drop it and pass the logits with "
                "nn.CrossEntropyLoss (the same loss).",
    nn.KLDivLoss: " For log-probabilities from a LogSoftmax against target probabilities, drop it "
                  "and pass the logits with nn.CrossEntropyLoss and probability targets (the "
                  "same curvature up to the reduction's normalisation: the two losses differ by "
                  "the targets' entropy).",
}


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` without enlarging it."""
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _required_arguments(module: nn.Module) -> int | None:
    """Positional arguments ``module.forward`` requires (``None`` if it cannot be told)."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in sig.parameters.values()
               if p.kind in kinds and p.default is inspect.Parameter.empty)
