"""The built-in default problem: a small CNN briefly trained on scikit-learn's bundled digits."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["digits_data", "digits_cnn", "train_briefly"]


def digits_data(
    *,
    batch_size: int = 512,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    limit: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 1797 8×8 digit images shipped with scikit-learn, as a list of ``(X, y)`` batches.

    Returns:
        Batches with ``X: (B, 1, 8, 8)`` scaled to ``[0, 1]`` and ``y: (B,)`` class labels.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"digits_data: limit must be >= 1 (or None); got {limit}.")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError(
            "the built-in digits data needs scikit-learn: pip install scikit-learn"
        ) from err
    digits = load_digits()
    X = torch.as_tensor(digits.images, dtype=dtype, device=device).unsqueeze(1) / 16.0
    y = torch.as_tensor(digits.target, device=device)
    if limit is not None:
        X, y = X[:limit], y[:limit]
    return list(zip(X.split(batch_size), y.split(batch_size)))


def digits_cnn(*, width: int = 8, seed: int = 0) -> nn.Module:
    """Two convolutions and two linear layers for 8×8 single-channel images (~10k parameters)."""
    # Layers initialise from the global RNG; fork it so the caller's RNG state is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * width * 16, 32),
            nn.Tanh(),
            nn.Linear(32, 10),
        )


def train_briefly(model: nn.Module, data, loss_fn: nn.Module, *, epochs: int = 40,
                  lr: float = 3e-3) -> nn.Module:
    """Train with Adam for ``epochs`` passes over ``data``; return the model in eval mode.

    A fixed number of epochs (not a time budget) keeps the report reproducible across machines.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for X, y in data:
            optimizer.zero_grad()
            loss_fn(model(X), y).backward()
            optimizer.step()
    return model.eval()
