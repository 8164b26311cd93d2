"""The built-in language-model task: a byte-level transformer on the Python standard library.

Data: the running interpreter's standard-library ``.py`` sources, deterministic and offline
(files listed in sorted order from ``sysconfig.get_paths()["stdlib"]``, excluding
``site-packages`` and test suites; a file goes to validation when a stable hash of its relative
path falls in the validation fraction, so the split is by file). Model: ``ByteLM``, a small
pre-norm causal transformer. ``curvkit train`` and ``benchmarks/optim.py`` share both.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["load_stdlib_bytes", "sample_batch", "Block", "ByteLM"]


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "test/", "idlelib/idle_test/")) or "/tests/" in rel:
            continue
        files.append(path)
    return files


def load_stdlib_bytes(*, validation_fraction: float = 0.1, max_bytes: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Concatenate the standard library's sources into train and validation byte streams.

    Args:
        validation_fraction: Share of files (by path hash) held out for validation.
        max_bytes: Truncate the training stream to this many bytes (``None``: everything).

    Returns:
        ``(train (N,) uint8, validation (M,) uint8, info)`` with file counts and the root.
    """
    if not 0.0 <= validation_fraction <= 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1]; got {validation_fraction}.")
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val = [], []
    n_train = n_val = 0
    for path in _stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        bucket = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        data = path.read_bytes() + b"\n"
        if bucket < validation_fraction:
            val.append(data)
            n_val += 1
        else:
            train.append(data)
            n_train += 1
    train_bytes, val_bytes = b"".join(train), b"".join(val)
    if max_bytes is not None:
        train_bytes = train_bytes[:max_bytes]
    to_tensor = lambda b: (  # noqa: E731 frombuffer refuses an empty buffer
        torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.zeros(0, dtype=torch.uint8)
    )
    info = dict(root=str(root), train_files=n_train, val_files=n_val,
                train_bytes=len(train_bytes), val_bytes=len(val_bytes))
    return to_tensor(train_bytes), to_tensor(val_bytes), info


def sample_batch(stream: torch.Tensor, batch_size: int, context: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of a byte stream as next-byte prediction pairs.

    Args:
        stream: Byte stream ``(N,)``.
        batch_size: Windows per batch ``B``.
        context: Window length ``T``.
        generator: Source of the window offsets.

    Returns:
        ``(inputs (B, T) long, targets (B, T) long)``.
    """
    if stream.numel() < context + 1:
        raise ValueError(
            f"sample_batch: a window needs context + 1 = {context + 1} tokens; the stream has "
            f"{stream.numel()}."
        )
    # Windows of context + 1 tokens start at 0, ..., N - context - 1 (randint's high is exclusive).
    starts = torch.randint(0, stream.numel() - context, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(context + 1)
    windows = stream[idx].long()
    return windows[:, :-1], windows[:, 1:]


# --------------------------------------------------------------------------- model
class Block(nn.Module):
    """Pre-norm transformer block: causal multi-head attention and a GELU MLP, ``(B, T, C)``."""

    def __init__(self, width, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc = nn.Linear(width, 4 * width)
        self.fc_out = nn.Linear(4 * width, width)
        self.heads = heads

    def forward(self, x):  # noqa: D102
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        shape = (B, T, self.heads, C // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class ByteLM(nn.Module):
    """Byte-level causal LM: ``(B, T)`` token ids to ``(B, T, vocab)`` logits."""

    def __init__(self, layers, width, heads, context, vocab=256):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, idx):  # noqa: D102
        if idx.shape[-1] > self.pos.shape[0]:  # the positional table would broadcast unclearly
            raise ValueError(f"ByteLM: sequences of {idx.shape[-1]} tokens exceed the context of "
                             f"{self.pos.shape[0]}.")
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))
