"""Benchmark: exact curvature products of curvkit against curvlinops 3.0.1, in the same run.

For each model (the issue's MLP, CNN and transformer LM), one batch of the issue's size, float32:

- time of one product ``A @ v`` for the Hessian, the GGN and the empirical Fisher, as a multiple
  of one gradient computation (``torch.autograd.grad`` of the mean loss), for curvkit and for
  curvlinops, and the ratio curvkit / curvlinops;
- time of a 16-column product ``A @ V`` as a multiple of one product (curvkit);
- peak memory of one product as a multiple of the gradient's peak memory.

Timings interleave all methods and repeat them (``--repeats``), reporting medians: the 2 cores
are shared with other jobs. Peak memory is measured in a fresh subprocess per model with
``MALLOC_MMAP_THRESHOLD_=65536`` (so every tensor of 64 KiB or more is ``mmap``-ed and returned
to the OS when freed): after one warm-up call, the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``), the call runs, and the peak is ``VmHWM`` minus the RSS before the
call. It counts every byte the call touches (tensors, autograd graph, allocator slack), not
just tensor bytes.

Run: ``python benchmarks/curvature.py`` (the issue's sizes), ``--quick`` for a smoke test.
Writes ``benchmarks/results/curvature.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvkit.curvature import GGN, EmpiricalFisher, Hessian

ROOT = Path(__file__).resolve().parent
OPS = ("Hessian", "GGN", "EF")


# --------------------------------------------------------------------------- models
class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, h, mask):
        a = self.norm1(h)
        h = h + self.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class TransformerLM(nn.Module):
    def __init__(self, vocab, width, layers, heads, context):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(context, width))
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", torch.triu(torch.full((context, context), float("-inf")), 1))

    def forward(self, tokens):
        S = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:S]
        for block in self.blocks:
            h = block(h, self.mask[:S, :S])
        return self.head(self.norm(h)).transpose(1, 2)  # (N, V, S) for CrossEntropyLoss


def make_case(name: str, quick: bool, g: torch.Generator):
    if name == "mlp":
        n = 64 if quick else 512
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                              nn.Linear(256, 10))
        X, y = torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)
        desc = f"MLP 784-512-256-10, batch {n}"
    elif name == "cnn":
        n = 32 if quick else 256
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(32 * 8 * 8, 128), nn.ReLU(),
                              nn.Linear(128, 10))
        X, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
        desc = f"CNN 2 conv + 2 linear, 32x32x3, batch {n}"
    elif name == "lm":
        n, S = (4, 16) if quick else (32, 64)
        model = TransformerLM(vocab=512, width=128, layers=2, heads=4, context=64)
        X = torch.randint(0, 512, (n, S), generator=g)
        y = torch.randint(0, 512, (n, S), generator=g)
        desc = f"Transformer LM 2x128, context {S}, vocab 512, batch {n}"
    else:
        raise ValueError(f"curvature benchmark: unknown model {name!r}; use mlp, cnn or lm.")
    return model.eval(), nn.CrossEntropyLoss(), [(X, y)], desc


def make_methods(model, loss_fn, data, columns: int, g: torch.Generator):
    """Callables to time: name → fn. All operators are built once, outside the timing."""
    import curvlinops

    params = [p for p in model.parameters() if p.requires_grad]
    P = sum(p.numel() for p in params)
    v = torch.randn(P, generator=g)
    V = torch.randn(P, columns, generator=g)
    X, y = data[0]

    def gradient():
        return torch.autograd.grad(loss_fn(model(X), y), params)

    # curvlinops's EF takes one outer product per loss term (token); compare the same matrix.
    ours = {"Hessian": Hessian, "GGN": GGN,
            "EF": lambda *a, **k: EmpiricalFisher(*a, grouping="term", **k)}
    theirs = {"Hessian": curvlinops.HessianLinearOperator, "GGN": curvlinops.GGNLinearOperator,
              "EF": curvlinops.EFLinearOperator}
    methods = {"gradient": gradient}
    for op in OPS:
        A = ours[op](model, loss_fn, data, check_deterministic=False)
        B = theirs[op](model, loss_fn, params, data, check_deterministic=False)

        def mine(A=A, x=v):
            return A @ x

        def other(B=B, x=v):
            with sdpa_kernel(SDPBackend.MATH):  # curvlinops needs it for double differentiation
                return B @ x

        methods[f"curvkit {op}"] = mine
        methods[f"curvlinops {op}"] = other
        methods[f"curvkit {op} x{columns}"] = lambda A=A: A @ V
    return methods


def time_methods(methods, repeats: int) -> dict[str, float]:
    for fn in methods.values():  # warm-up: lazy initialisation, caches
        fn()
    samples = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in samples.items()}


# --------------------------------------------------------------------------- memory probe
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("curvature benchmark: no VmHWM in /proc/self/status")


def memory_probe(name: str, quick: bool, columns: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model, loss_fn, data, _ = make_case(name, quick, g)
    methods = make_methods(model, loss_fn, data, columns, g)
    peaks = {}
    for method, fn in methods.items():
        if f" x{columns}" in method:  # memory is reported for single products only
            continue
        fn()  # warm-up
        before = _rss()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        out = fn()
        peaks[method] = (_hwm() - before) / 2**20
        del out
    return peaks


def measure_memory(name: str, args) -> dict[str, float] | None:
    cmd = [sys.executable, __file__, "--memory-probe", name, "--threads", str(args.threads),
           "--columns", str(args.columns)] + (["--quick"] if args.quick else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        print(f"memory probe for {name} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main
def check_agreement(methods) -> dict[str, float]:
    """Relative difference of curvkit's and curvlinops's product (same v), per operator."""
    out = {}
    for op in OPS:
        a, b = methods[f"curvkit {op}"](), methods[f"curvlinops {op}"]()
        b = torch.cat([t.reshape(-1) for t in b]) if isinstance(b, (list, tuple)) else b
        out[op] = ((a - b).norm() / b.norm()).item()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,cnn,lm")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--columns", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1: stable timings on a shared 2-core machine)")
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 repeats")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "results" / "curvature.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.quick, args.columns)))
        return
    repeats = 2 if args.quick else args.repeats
    rows = []
    for name in args.models.split(","):
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model, loss_fn, data, desc = make_case(name, args.quick, g)
        methods = make_methods(model, loss_fn, data, args.columns, g)
        agreement = check_agreement(methods)
        times = time_methods(methods, repeats)
        memory = None if args.no_memory else measure_memory(name, args)
        grad_t = times["gradient"]
        for op in OPS:
            ours, theirs = times[f"curvkit {op}"], times[f"curvlinops {op}"]
            row = {
                "model": name, "description": desc, "operator": op,
                "gradient_s": grad_t, "curvkit_s": ours, "curvlinops_s": theirs,
                "curvkit_x_grad": ours / grad_t, "curvlinops_x_grad": theirs / grad_t,
                "curvkit_over_curvlinops": ours / theirs,
                f"curvkit_x{args.columns}_s": times[f"curvkit {op} x{args.columns}"],
                f"x{args.columns}_over_one": times[f"curvkit {op} x{args.columns}"] / ours,
                "rel_diff_vs_curvlinops": agreement[op],
            }
            if memory is not None:
                row.update({
                    "gradient_peak_mib": memory["gradient"],
                    "curvkit_peak_mib": memory[f"curvkit {op}"],
                    "curvlinops_peak_mib": memory[f"curvlinops {op}"],
                    "curvkit_mem_x_grad": memory[f"curvkit {op}"] / memory["gradient"],
                    "curvlinops_mem_x_grad": memory[f"curvlinops {op}"] / memory["gradient"],
                })
            rows.append(row)
            print_row(row, args.columns)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    result = {
        "benchmark": "curvature products vs curvlinops",
        "device": f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, "
                  f"{args.threads} torch thread(s)",
        "torch": torch.__version__, "curvlinops": _curvlinops_version(), "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/curvature.py " + " ".join(argv or sys.argv[1:]),
        "repeats": repeats, "columns": args.columns, "dtype": "float32", "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def _curvlinops_version() -> str:
    from importlib.metadata import version

    return version("curvlinops-for-pytorch")


def print_row(r, columns):
    mem = ""
    if "curvkit_mem_x_grad" in r:
        mem = (f" | mem {r['curvkit_mem_x_grad']:.2f}x grad "
               f"(curvlinops {r['curvlinops_mem_x_grad']:.2f}x)")
    print(f"{r['model']:4s} {r['operator']:8s} grad {r['gradient_s'] * 1e3:7.1f} ms | curvkit "
          f"{r['curvkit_x_grad']:5.2f}x grad | curvlinops {r['curvlinops_x_grad']:5.2f}x grad | "
          f"ours/theirs {r['curvkit_over_curvlinops']:.2f} | x{columns} "
          f"{r[f'x{columns}_over_one']:5.2f}x one{mem} | "
          f"rel diff {r['rel_diff_vs_curvlinops']:.1e}",
          flush=True)


if __name__ == "__main__":
    main()
