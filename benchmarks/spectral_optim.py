"""SpectralShampoo and Symo on a byte-level language model, beside KL-Shampoo and AdamW.

The task is offline: the training text is the repository's own Python sources and Markdown
(read at run time, byte-level, vocabulary 256), split 90/10 into train/validation. A small
pre-norm Transformer is trained from the same initialisation with the same batches by every
optimizer; the optimizers are stepped round-robin, so that load on the shared machine affects
them alike. Reported: training loss against steps and wall-clock, the final validation loss,
and the median step time (ratio to AdamW's).

Usage::

    python benchmarks/spectral_optim.py            # default: 200 steps
    python benchmarks/spectral_optim.py --quick    # smoke test

Writes ``benchmarks/results/spectral_optim.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from curvkit.optim.kl_shampoo import KLShampoo
from curvkit.optim.spectral import SpectralShampoo
from curvkit.optim.symmetry_precond import Symo

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"


def corpus() -> torch.Tensor:
    """Bytes of the repository's sources and docs, in a fixed order."""
    files = sorted(ROOT.glob("src/**/*.py")) + sorted(ROOT.glob("*.md"))
    text = b"\n".join(f.read_bytes() for f in files)
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


class ByteLM(nn.Module):
    """Pre-norm Transformer over bytes (multi-head causal attention, GELU MLP)."""

    def __init__(self, *, dim: int, heads: int, layers: int, seq: int):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, dim))
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict(dict(
                ln1=nn.LayerNorm(dim), qkv=nn.Linear(dim, 3 * dim), out=nn.Linear(dim, dim),
                ln2=nn.LayerNorm(dim), up=nn.Linear(dim, 4 * dim), down=nn.Linear(4 * dim, dim))))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)

    def forward(self, tokens):
        N, T = tokens.shape
        x = self.embed(tokens) + self.pos[:T]
        for b in self.blocks:
            q, k, v = b["qkv"](b["ln1"](x)).chunk(3, dim=-1)
            q, k, v = (t.reshape(N, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
            att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + b["out"](att.transpose(1, 2).reshape(N, T, -1))
            x = x + b["down"](nn.functional.gelu(b["up"](b["ln2"](x))))
        return self.head(self.ln(x))


def batches(data, *, steps, batch, seq, generator):
    starts = torch.randint(len(data) - seq - 1, (steps, batch), generator=generator)
    offsets = torch.arange(seq + 1)
    for s in starts:
        chunk = data[s[:, None] + offsets]
        yield chunk[:, :-1], chunk[:, 1:]


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


class Combined:
    """Several optimizers stepped together (KLShampoo for matrices, AdamW for vectors)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def zero_grad(self):
        for o in self.optimizers:
            o.zero_grad()

    def step(self):
        for o in self.optimizers:
            o.step()


def make_optimizers(models, args):
    state_dtype = torch.bfloat16 if args.bf16_state else None
    kl_params = list(models["KLShampoo"].parameters())
    # KLShampoo of this commit lacks Adam state for order-1 tensors (KeyError 'exp_avg_sq'):
    # its vectors get AdamW with the same hyperparameters instead.
    kl_matrices = [p for p in kl_params if p.dim() >= 2]
    kl_vectors = [p for p in kl_params if p.dim() < 2]
    return {
        "AdamW": torch.optim.AdamW(models["AdamW"].parameters(), lr=args.lr_adamw,
                                   betas=(0.9, 0.95), weight_decay=args.weight_decay),
        "KLShampoo": Combined(
            KLShampoo(kl_matrices, lr=args.lr_kl, betas=(0.9, 0.95),
                      weight_decay=args.weight_decay, precondition_frequency=10,
                      state_dtype=state_dtype),
            torch.optim.AdamW(kl_vectors, lr=args.lr_kl, betas=(0.9, 0.95),
                              weight_decay=args.weight_decay)),
        "SpectralShampoo": SpectralShampoo(models["SpectralShampoo"].parameters(),
                                           lr=args.lr_spectral, betas=(0.9, 0.95),
                                           weight_decay=args.weight_decay,
                                           state_dtype=state_dtype),
        "SpectralShampoo(T=10)": SpectralShampoo(models["SpectralShampoo(T=10)"].parameters(),
                                                 lr=args.lr_spectral, betas=(0.9, 0.95),
                                                 weight_decay=args.weight_decay,
                                                 update_frequency=10, beta=0.2,
                                                 state_dtype=state_dtype),
        "Symo": Symo(models["Symo"].parameters(), lr=args.lr_symo, betas=(0.9, 0.95),
                     weight_decay=args.weight_decay, precondition_frequency=10,
                     state_dtype=state_dtype),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps on a tiny model")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--dim", type=int, default=48)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr-adamw", type=float, default=3e-3)
    parser.add_argument("--lr-kl", type=float, default=3e-3)
    parser.add_argument("--lr-spectral", type=float, default=3e-3)
    parser.add_argument("--lr-symo", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--bf16-state", action="store_true", help="bfloat16 optimizer state")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--out", default=str(RESULTS / "spectral_optim.json"),
                        help="where to write the JSON")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.dim, args.layers, args.seq, args.batch = 10, 32, 1, 32, 8
        args.eval_batches = 2
    device = torch.device(args.device)
    data = corpus()
    split = int(0.9 * len(data))
    train, valid = data[:split], data[split:]

    torch.manual_seed(args.seed)
    base = ByteLM(dim=args.dim, heads=args.heads, layers=args.layers, seq=args.seq)
    names = ["AdamW", "KLShampoo", "SpectralShampoo", "SpectralShampoo(T=10)", "Symo"]
    models = {}
    for n in names:
        models[n] = ByteLM(dim=args.dim, heads=args.heads, layers=args.layers, seq=args.seq)
        models[n].load_state_dict(base.state_dict())
        models[n].to(device)
    opts = make_optimizers(models, args)
    history = {n: dict(step=[], loss=[], wall=[]) for n in names}
    step_times = {n: [] for n in names}
    wall = dict.fromkeys(names, 0.0)
    diverged: dict[str, int] = {}
    gen = torch.Generator().manual_seed(args.seed + 1)
    for t, (x, y) in enumerate(batches(train, steps=args.steps, batch=args.batch, seq=args.seq,
                                       generator=gen)):
        x, y = x.to(device), y.to(device)
        for n in names:  # round-robin: the machine's load falls on every optimizer alike
            if n in diverged:
                continue
            start = time.perf_counter()
            opts[n].zero_grad()
            loss = loss_of(models[n], x, y)
            if not torch.isfinite(loss):
                diverged[n] = t + 1
                continue
            loss.backward()
            opts[n].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            step_times[n].append(elapsed)
            wall[n] += elapsed
            history[n]["step"].append(t + 1)
            history[n]["loss"].append(float(loss.detach()))
            history[n]["wall"].append(wall[n])
        if (t + 1) % max(1, args.steps // 10) == 0:
            print(f"step {t + 1:5d} " + "  ".join(f"{n} {history[n]['loss'][-1]:.3f}"
                                                  for n in names if n not in diverged),
                  flush=True)
    eval_gen = torch.Generator().manual_seed(args.seed + 2)
    eval_batches = list(batches(valid, steps=args.eval_batches, batch=args.batch, seq=args.seq,
                                generator=eval_gen))
    rows = []
    adam_time = statistics.median(step_times["AdamW"])
    for n in names:
        with torch.no_grad():
            val = statistics.fmean(float(loss_of(models[n], x.to(device), y.to(device)))
                                   for x, y in eval_batches)
        tail = history[n]["loss"][-max(1, args.steps // 10):]
        median_step = statistics.median(step_times[n])
        rows.append(dict(optimizer=n, final_train_loss=statistics.fmean(tail),
                         valid_loss=val, valid_bits_per_byte=val / math.log(2),
                         median_step_s=median_step,
                         step_time_ratio_vs_adamw=median_step / adam_time,
                         total_wall_s=wall[n], diverged_at_step=diverged.get(n)))
    print(f"{'optimizer':22} {'train(last10%)':>14} {'valid':>8} {'bpb':>6} {'step ms':>8} "
          f"{'/AdamW':>7}")
    for r in rows:
        print(f"{r['optimizer']:22} {r['final_train_loss']:>14.3f} {r['valid_loss']:>8.3f} "
              f"{r['valid_bits_per_byte']:>6.2f} {1e3 * r['median_step_s']:>8.1f} "
              f"{r['step_time_ratio_vs_adamw']:>7.2f}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"cpu ({platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads)")
    out = dict(device=where,
               torch=torch.__version__, commit=commit, args=vars(args),
               corpus_bytes=len(data), rows=rows, history=history)
    out_path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
