"""Structured optimizers vs AdamW on a small byte-level transformer LM (Python stdlib sources).

Measures, in one run:
  * validation loss against steps and against wall-clock for each method, with a short
    learning-rate sweep (the best learning rate per method is reported and plotted);
  * steps to reach AdamW's final validation loss (ratio to AdamW's step count);
  * full training-step time and optimizer-step time, interleaved across methods and repeated
    (medians), as multiples of AdamW's;
  * optimizer-state memory as multiples of AdamW's, and bf16 vs float32 state;
  * the basis refresh alone at dimension --refresh-dim: subspace QR vs full QR (medians).

Default sizes are the issue's (4 layers, width 256, context 128); ``--quick`` is a smoke test.

    python benchmarks/optim.py --quick
    python benchmarks/optim.py --layers 2 --width 128 --context 64 --steps 300
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from curvkit.apps.lm import ByteLM, load_stdlib_bytes, sample_batch
from curvkit.optim import KLSOAP, SOAP, KLShampoo, Muon, Shampoo, muon_param_groups
from curvkit.optim._basis import refresh

RESULTS = Path(__file__).parent / "results"


# --------------------------------------------------------------------------- methods
def torch_muon(model, lr):
    groups = muon_param_groups(model)
    hidden = [g for g in groups if g["use_muon"]][0]["params"]
    rest = [g for g in groups if not g["use_muon"]][0]["params"]
    muon = torch.optim.Muon(hidden, lr=lr, weight_decay=0.01, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(rest, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    return _Pair(muon, adamw)


class _Pair:
    """Two torch optimizers stepped together (torch.optim.Muon handles only matrices)."""

    def __init__(self, a, b):
        self.opts = (a, b)
        self.param_groups = a.param_groups + b.param_groups
        self.state = {**a.state, **b.state}

    def step(self):
        for o in self.opts:
            o.step()
        self.state = {**self.opts[0].state, **self.opts[1].state}

    def zero_grad(self, set_to_none=True):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)


def heavyball_soap(model, lr):
    import heavyball  # optional; only used when installed
    import heavyball.utils

    # torch.compile's CPU autotuning takes minutes per kernel on 2 cores: run it eagerly
    heavyball.utils.compile_mode = None
    heavyball.utils.compile_mode_recommended_to_none = None
    return heavyball.SOAP(model.parameters(), lr=lr, precondition_frequency=10,
                          weight_decay=0.01)


def build_methods(freq):
    bf16 = torch.bfloat16
    return {
        "adamw": lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95),
                                                 weight_decay=0.01),
        "shampoo": lambda m, lr: Shampoo(m.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-10,
                                         precondition_frequency=freq),
        "soap": lambda m, lr: SOAP(m.parameters(), lr=lr, betas=(0.9, 0.95),
                                   precondition_frequency=freq),
        "klshampoo": lambda m, lr: KLShampoo(m.parameters(), lr=lr, betas=(0.9, 0.95),
                                             precondition_frequency=freq),
        "klsoap": lambda m, lr: KLSOAP(m.parameters(), lr=lr, betas=(0.9, 0.95),
                                       precondition_frequency=freq),
        "muon": lambda m, lr: Muon(muon_param_groups(m), lr=lr, adamw_lr=lr,
                                   adjust_lr="match_rms_adamw", weight_decay=0.01,
                                   adamw_weight_decay=0.01, ns_dtype=None),
        "soap_bf16": lambda m, lr: SOAP(m.parameters(), lr=lr, betas=(0.9, 0.95),
                                        precondition_frequency=freq, state_dtype=bf16),
        "klsoap_bf16": lambda m, lr: KLSOAP(m.parameters(), lr=lr, betas=(0.9, 0.95),
                                            precondition_frequency=freq, state_dtype=bf16),
        "soap_subspace": lambda m, lr: SOAP(m.parameters(), lr=lr, betas=(0.9, 0.95),
                                            precondition_frequency=max(1, freq // 5),
                                            basis_update="subspace"),
        # every axis above 256 split into 256-blocks: the step-time variant
        "soap_block256": lambda m, lr: SOAP(m.parameters(), lr=lr, betas=(0.9, 0.95),
                                            precondition_frequency=freq,
                                            max_preconditioner_dim=256, large_dims="block"),
        "klshampoo_block256": lambda m, lr: KLShampoo(m.parameters(), lr=lr, betas=(0.9, 0.95),
                                                      precondition_frequency=freq,
                                                      max_preconditioner_dim=256,
                                                      large_dims="block"),
        "torch_muon": torch_muon,
        "heavyball_soap": heavyball_soap,
    }


# --------------------------------------------------------------------------- helpers
def state_bytes(opt):
    total = 0

    def walk(v):
        nonlocal total
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    for s in opt.state.values():
        walk(s)
    return total


def lr_at(step, steps, warmup):
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def set_schedule(opt, base, factor):
    for group, values in zip(opt.param_groups, base):
        for key, value in values.items():
            group[key] = value * factor


@torch.no_grad()
def evaluate(model, val_batches):
    return statistics.fmean(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                            for x, y in val_batches)


def train_run(name, make, lr, args, data, val_batches):
    torch.manual_seed(args.seed)
    model = ByteLM(args.layers, args.width, args.heads, args.context)
    opt = make(model, lr)
    base = [{k: g[k] for k in ("lr", "adamw_lr") if k in g} for g in opt.param_groups]
    gen = torch.Generator().manual_seed(args.seed + 1)
    curve, wall, step_times, opt_times = [], 0.0, [], []
    warmup = max(1, args.steps // 10)
    for step in range(args.steps):
        x, y = sample_batch(data, args.batch, args.context, gen)
        set_schedule(opt, base, lr_at(step, args.steps, warmup))
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        wall += t2 - t0
        step_times.append(t2 - t0)
        opt_times.append(t2 - t1)
        if not math.isfinite(loss.item()):
            curve.append((step + 1, wall, float("nan")))
            break
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append((step + 1, wall, evaluate(model, val_batches)))
    return dict(method=name, lr=lr, curve=curve, final=curve[-1][2],
                state_bytes=state_bytes(opt),
                median_step_s=statistics.median(step_times[5:] or step_times),
                median_opt_s=statistics.median(opt_times[5:] or opt_times))


def interleaved_timing(methods, args, data, lrs):
    """Per method: `steps_per_round` consecutive steps (covering refreshes), round-robin."""
    runs = {}
    for name in methods:
        torch.manual_seed(args.seed)
        model = ByteLM(args.layers, args.width, args.heads, args.context)
        runs[name] = (model, methods[name](model, lrs[name]))
    gen = torch.Generator().manual_seed(7)
    batch = sample_batch(data, args.batch, args.context, gen)
    full = {n: [] for n in runs}
    only = {n: [] for n in runs}
    for model, opt in runs.values():  # warm-up past initialisation steps
        for _ in range(2):
            loss = F.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    for _ in range(args.timing_rounds):
        for name, (model, opt) in runs.items():
            t_full = t_opt = 0.0
            for _ in range(args.timing_steps):
                t0 = time.perf_counter()
                loss = F.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten())
                opt.zero_grad()
                loss.backward()
                t1 = time.perf_counter()
                opt.step()
                t2 = time.perf_counter()
                t_full += t2 - t0
                t_opt += t2 - t1
            full[name].append(t_full / args.timing_steps)
            only[name].append(t_opt / args.timing_steps)
    return ({n: statistics.median(v) for n, v in full.items()},
            {n: statistics.median(v) for n, v in only.items()})


def refresh_timing(dim, rank, repeats):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(dim, dim, generator=g)
    S = A @ A.T / dim
    Q = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
    P = Q.T @ S @ Q
    cases = {
        "full_qr_P": lambda: refresh(Q, P, method="qr", sort=True),
        "soap_qr_SQ": lambda: torch.linalg.qr(S @ Q),
        "subspace_qr": lambda: refresh(Q, P, method="subspace", sort=False, rank=rank),
    }
    times = {n: [] for n in cases}
    for _ in range(repeats):
        for n, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def steps_to_reach(curve, target):
    for step, _, loss in curve:
        if loss <= target:
            return step
    return None


def train_all(names, lr_spec, all_methods, args, train, val_batches, save=None):
    """Train every method at each learning rate of its sweep; returns the list of runs."""
    runs, best = [], {}
    for name in names:
        spec = lr_spec.get(name, "3e-3")
        lrs = [best[spec[5:]]["lr"]] if spec.startswith("best:") else \
            [float(v) for v in spec.split(",")]
        for lr in lrs:
            t0 = time.perf_counter()
            try:
                run = train_run(name, all_methods[name], lr, args, train, val_batches)
            except Exception as exc:  # record an optional baseline's failure, keep going
                print(f"{name} lr={lr}: failed: {exc!r}")
                continue
            runs.append(run)
            print(f"{name:15s} lr={lr:g} final val {run['final']:.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
            if run["final"] == run["final"] and (
                    name not in best or run["final"] < best[name]["final"]):
                best[name] = run
            if save is not None:
                save(runs)  # keep finished runs if the job is stopped
    return runs


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--precondition-frequency", type=int, default=10)
    ap.add_argument("--methods", default="adamw,shampoo,soap,klshampoo,klsoap,muon,soap_bf16,"
                    "klsoap_bf16,soap_subspace,torch_muon,heavyball_soap")
    ap.add_argument("--lrs", default="adamw=1e-3,3e-3;shampoo=1e-3,3e-3;soap=1e-3,3e-3;"
                    "klshampoo=1e-3,3e-3;klsoap=1e-3,3e-3;muon=3e-3,1e-2;soap_bf16=best:soap;"
                    "klsoap_bf16=best:klsoap;soap_subspace=best:soap;torch_muon=best:muon;"
                    "heavyball_soap=best:soap",
                    help="per method: comma-separated learning rates, or best:<method>")
    ap.add_argument("--timing-rounds", type=int, default=3)
    ap.add_argument("--timing-steps", type=int, default=10)
    ap.add_argument("--refresh-dim", type=int, default=1024)
    ap.add_argument("--refresh-repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny smoke-test configuration")
    ap.add_argument("--out", default=str(RESULTS / "optim"))
    ap.add_argument("--train-only", action="store_true",
                    help="train and write <out>.runs.json, no timing (time later on a quiet "
                         "machine with --runs-from)")
    ap.add_argument("--runs-from", default=None,
                    help="take the training runs from a --train-only JSON; only time and report "
                         "(the curves' wall-clock axis becomes steps × the measured step time)")
    ap.add_argument("--from-json", default=None,
                    help="only re-write the table and targets (.targets.md) from a saved JSON")
    args = ap.parse_args(argv)
    if args.from_json:
        print(targets_markdown(json.loads(Path(args.from_json).read_text())))
        return
    if args.quick:
        args.layers, args.width, args.heads, args.context, args.batch = 1, 32, 2, 32, 8
        args.steps, args.eval_every, args.val_batches = 30, 10, 2
        args.timing_rounds, args.timing_steps = 1, 3
        args.refresh_dim, args.refresh_repeats = 256, 2
        args.lrs = ";".join(f"{m}=3e-3" for m in args.methods.split(","))
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")

    train, val, data_info = load_stdlib_bytes()
    vgen = torch.Generator().manual_seed(123)
    val_batches = [sample_batch(val, args.batch, args.context, vgen)
                   for _ in range(args.val_batches)]
    all_methods = build_methods(args.precondition_frequency)
    names = [m for m in args.methods.split(",") if m]
    try:
        import heavyball  # noqa: F401
    except ImportError:
        names = [n for n in names if n != "heavyball_soap"]
    lr_spec = dict(item.split("=") for item in args.lrs.split(";"))

    def save_runs(runs):
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".runs.json").write_text(json.dumps(
            dict(command=" ".join(sys.argv), config=vars(args), runs=runs), indent=1))

    if args.runs_from:
        runs = json.loads(Path(args.runs_from).read_text())["runs"]
    else:
        runs = train_all(names, lr_spec, all_methods, args, train, val_batches,
                         save=save_runs if args.train_only else None)
    if args.train_only:
        print(f"wrote {args.out}.runs.json")
        return
    best = {}
    for run in runs:
        name = run["method"]
        if run["final"] == run["final"] and (name not in best or run["final"] < best[name]["final"]):
            best[name] = run

    timed = {n: all_methods[n] for n in best}
    full, only = interleaved_timing(timed, args, train, {n: best[n]["lr"] for n in best})
    if args.runs_from:
        # The runs trained under unknown load: put their wall-clock axis on the quiet, interleaved
        # median step time measured just now (steps × seconds per step).
        for n, r in best.items():
            r["curve"] = [(step, step * full[n], loss) for step, _, loss in r["curve"]]
    rank = max(64, math.ceil(args.refresh_dim / 4))
    refresh_times = refresh_timing(args.refresh_dim, rank, args.refresh_repeats)

    adam = best["adamw"]
    adam_steps = adam["curve"][-1][0]
    rows = []
    for n, r in best.items():
        reach = steps_to_reach(r["curve"], adam["final"])
        rows.append(dict(
            method=n, lr=r["lr"], final_val_loss=r["final"],
            steps_to_adamw_final=reach,
            steps_ratio=None if reach is None else reach / adam_steps,
            step_time_s=full[n], step_time_ratio=full[n] / full["adamw"],
            opt_time_s=only[n], opt_time_ratio=only[n] / only["adamw"],
            state_bytes=r["state_bytes"], state_ratio=r["state_bytes"] / adam["state_bytes"]))
    print(f"\n{'method':15s} {'lr':>7s} {'val':>7s} {'steps→adam':>10s} {'ratio':>6s} "
          f"{'step×':>6s} {'opt×':>6s} {'mem×':>6s}")
    for row in rows:
        ratio = "-" if row["steps_ratio"] is None else f"{row['steps_ratio']:.2f}"
        print(f"{row['method']:15s} {row['lr']:7.0e} {row['final_val_loss']:7.4f} "
              f"{str(row['steps_to_adamw_final']):>10s} {ratio:>6s} "
              f"{row['step_time_ratio']:6.2f} {row['opt_time_ratio']:6.2f} "
              f"{row['state_ratio']:6.2f}")
    print(f"\nrefresh at d={args.refresh_dim}: " + ", ".join(
        f"{k} {v * 1e3:.1f} ms" for k, v in refresh_times.items()))
    print(f"subspace speed-up vs full QR (P-coordinates): "
          f"{refresh_times['full_qr_P'] / refresh_times['subspace_qr']:.2f}x; vs SOAP qr(SQ): "
          f"{refresh_times['soap_qr_SQ'] / refresh_times['subspace_qr']:.2f}x")

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "unknown"
    out = dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        device=f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, "
               f"{args.threads} torch threads",
        torch=torch.__version__, commit=commit, command=" ".join(sys.argv),
        config=vars(args), data=data_info, rows=rows, refresh_times_s=refresh_times,
        refresh_rank=rank, runs=runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=1))
    plot(best, args.out + ".png")
    print(targets_markdown(out))
    print(f"wrote {args.out}.json and {args.out}.png")


def targets_markdown(out):
    """The results table and the issue's targets, evaluated on a saved run."""
    rows = {r["method"]: r for r in out["rows"]}
    lines = ["| method | lr | final val loss | steps to AdamW's final (ratio) | step time × AdamW "
             "| optimizer step × AdamW | state memory × AdamW |", "|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        reach = "not reached" if r["steps_to_adamw_final"] is None else \
            f"{r['steps_to_adamw_final']} ({r['steps_ratio']:.2f})"
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['final_val_loss']:.4f} | {reach} | "
                     f"{r['step_time_ratio']:.2f} | {r['opt_time_ratio']:.2f} | "
                     f"{r['state_ratio']:.2f} |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]

    def verdict(ok):
        return "yes" if ok else "**no**"

    for m in ("klshampoo", "soap", "klsoap", "soap_block256", "klshampoo_block256"):
        if m in rows:
            r = rows[m]
            ok = r["steps_ratio"] is not None and r["steps_ratio"] <= 0.75
            got = "not reached" if r["steps_ratio"] is None else f"{r['steps_ratio']:.2f}×"
            lines.append(f"| {m} reaches AdamW's final loss in ≤ 0.75× steps | {got} | "
                         f"{verdict(ok)} |")
    for m in ("shampoo", "soap", "klshampoo", "klsoap", "soap_block256", "klshampoo_block256"):
        if m in rows:
            r = rows[m]
            lines.append(f"| {m} full step ≤ 1.5× AdamW (freq 10) | {r['step_time_ratio']:.2f}× "
                         f"(optimizer step alone {r['opt_time_ratio']:.2f}×) | "
                         f"{verdict(r['step_time_ratio'] <= 1.5)} |")
    for m in ("soap", "klsoap"):
        if m in rows and f"{m}_bf16" in rows:
            a, b = rows[m], rows[f"{m}_bf16"]
            mem = b["state_bytes"] / a["state_bytes"]
            loss = abs(b["final_val_loss"] - a["final_val_loss"]) / a["final_val_loss"]
            lines.append(f"| {m} bf16 state ≤ 0.55× float32 state | {mem:.3f}× | "
                         f"{verdict(mem <= 0.55)} |")
            lines.append(f"| {m} bf16 final loss within 1 % of float32 | {100 * loss:.2f} % | "
                         f"{verdict(loss <= 0.01)} |")
    t = out["refresh_times_s"]
    speed = t["full_qr_P"] / t["subspace_qr"]
    dim = out["config"]["refresh_dim"]
    lines.append(f"| subspace refresh ≥ 2× faster than full QR refresh at d={dim} | {speed:.2f}× "
                 f"(vs SOAP's qr(SQ): {t['soap_qr_SQ'] / t['subspace_qr']:.2f}×) | "
                 f"{verdict(speed >= 2)} |")
    if "soap" in rows and "soap_subspace" in rows:
        a, b = rows["soap"], rows["soap_subspace"]
        loss = (b["final_val_loss"] - a["final_val_loss"]) / a["final_val_loss"]
        lines.append(f"| subspace final loss within 1 % of full QR (SOAP) | {100 * loss:+.2f} % | "
                     f"{verdict(abs(loss) <= 0.01 or loss < 0)} |")
    return "\n".join(lines)


def plot(best, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for n, r in best.items():
        steps, wall, loss = zip(*r["curve"])
        style = "--" if n in ("adamw",) else "-"
        axes[0].plot(steps, loss, style, label=f"{n} (lr {r['lr']:g})")
        axes[1].plot(wall, loss, style, label=n)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training wall-clock (s)")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("byte-level LM on Python stdlib sources: best learning rate per method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
