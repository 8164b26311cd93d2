"""Where the structured optimizers' step time goes, and their step time as multiples of AdamW's.

Two jobs on the issue's language model (``ByteLM(layers=4, width=256, heads=4, context=128)``,
batch 16 x 128 bytes, float32, one torch thread, the constructor arguments of
``benchmarks/optim.py``'s ``build_methods``):

* ``profile``: ``torch.profiler`` over ``--steps`` consecutive optimizer steps (covering one
  basis refresh at ``precondition_frequency=10``), table of the operators by self CPU time, plus
  the FLOP floor of the per-step matrix products for this model;
* ``time``: full training-step time (forward, backward, optimizer) and optimizer-step time,
  interleaved round-robin with AdamW in one process, ``--rounds`` rounds of ``--steps``
  consecutive steps each; medians of the per-round means and their ratios to AdamW's.

    OMP_NUM_THREADS=1 python benchmarks/optim_profile.py time --methods soap,klshampoo
    OMP_NUM_THREADS=1 python benchmarks/optim_profile.py profile --methods soap

Writes JSON to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from curvkit.apps.lm import ByteLM  # noqa: E402
from optim import build_methods  # noqa: E402  (the lead's benchmark owns the constructor args)


def make_batch(args):
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 256, (args.batch, args.context + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def build(name, args):
    torch.manual_seed(args.seed)
    model = ByteLM(args.layers, args.width, args.heads, args.context)
    return model, build_methods(args.frequency)[name](model, args.lr)


def train_step(model, opt, batch):
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    t1 = time.perf_counter()
    opt.step()
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def flop_floor(model):
    """Per-step GEMM FLOPs of a SOAP-type step, and of one refresh, for every matrix."""
    rows, per_step, refresh = [], 0, 0
    for name, p in model.named_parameters():
        dims = [d for d in p.shape if d != 1]
        if len(dims) != 2:
            continue
        m, n = dims
        rotate = 2 * m * n * (m + n)  # Q_Lᵀ G Q_R (and the same back)
        grams = 2 * m * n * (m + n)  # G̃ G̃ᵀ and G̃ᵀ G̃ as plain GEMMs
        # QR of P (geqrf + orgqr ~ 8/3 d³), Q O (2 d³), the new P (2 d³ as R O, or 4 d³ as
        # Oᵀ P O) and the momentum's coordinate map (2 d² x other)
        ref = sum(8 * d**3 // 3 + 4 * d**3 + 2 * d * d * (m * n // d) for d in (m, n))
        rows.append((name, m, n, 2 * rotate + grams, ref))
        per_step += 2 * rotate + grams
        refresh += ref
    return rows, per_step, refresh


def profile(args):
    batch = make_batch(args)
    for name in args.methods:
        model, opt = build(name, args)
        for _ in range(args.warmup):
            train_step(model, opt, batch)
        grads = []
        for _ in range(args.steps):  # fixed gradients: profile the optimizer alone
            loss = F.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for g in grads:
                for p, gp in zip(model.parameters(), g):
                    p.grad = gp
                opt.step()
            total = time.perf_counter() - t0
        print(f"\n=== {name}: {args.steps} optimizer steps, {total / args.steps:.3f} s/step "
              "(under the profiler)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    rows, per_step, refresh = flop_floor(ByteLM(args.layers, args.width, args.heads, args.context))
    print("\nFLOP floor (GEMMs only): matrix, m, n, per-step GFLOP, refresh GFLOP")
    for r in rows:
        print(f"  {r[0]:28s} {r[1]:5d} {r[2]:5d} {r[3] / 1e9:7.3f} {r[4] / 1e9:7.3f}")
    print(f"  total per step {per_step / 1e9:.2f} GFLOP; per refresh {refresh / 1e9:.1f} GFLOP "
          f"({refresh / 1e9 / args.frequency:.2f} GFLOP/step amortised at frequency "
          f"{args.frequency})")


def timing(args):
    batch = make_batch(args)
    names = ["adamw"] + [m for m in args.methods if m != "adamw"]
    runs = {n: build(n, args) for n in names}
    for model, opt in runs.values():
        for _ in range(args.warmup):
            train_step(model, opt, batch)
    full = {n: [] for n in names}
    only = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names:
            times = [train_step(*runs[n], batch) for _ in range(args.steps)]
            full[n].append(statistics.fmean(t[0] for t in times))
            only[n].append(statistics.fmean(t[1] for t in times))
        print(f"round {r + 1}: " + ", ".join(f"{n} {full[n][-1]:.3f}/{only[n][-1]:.3f}"
                                            for n in names), flush=True)
    med_full = {n: statistics.median(v) for n, v in full.items()}
    med_only = {n: statistics.median(v) for n, v in only.items()}
    print("\n| method | full step s | optimizer s | full × AdamW | optimizer × AdamW |")
    print("|---|---|---|---|---|")
    for n in names:
        print(f"| {n} | {med_full[n]:.3f} | {med_only[n]:.3f} | "
              f"{med_full[n] / med_full['adamw']:.2f} | {med_only[n] / med_only['adamw']:.1f} |")
    return dict(full=full, only=only, median_full=med_full, median_opt=med_only)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job", choices=("profile", "time"))
    ap.add_argument("--methods", default="soap,klshampoo,klsoap,shampoo")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--frequency", type=int, default=10)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    torch.set_num_threads(1)
    result = profile(args) if args.job == "profile" else timing(args)
    if args.out is not None and result is not None:
        args.out.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()},
                                            **result), indent=1))


if __name__ == "__main__":
    main()
