"""Collapsed Taylor mode vs nested first-order autograd vs standard Taylor mode.

Network: tanh MLP D -> 768 -> 768 -> 512 -> 512 -> 1 (float32 by default). Cases:

* ``laplacian``   exact Laplacian, D = 50, batch size N swept;
* ``weighted``    exact weighted Laplacian tr(σσᵀ∇²f), full-rank random σ, D = 50, N swept;
* ``biharmonic``  exact biharmonic, D = 5, N swept;
* ``stoch_biharmonic`` stochastic biharmonic, D = 5, N fixed, samples S swept;
* ``stoch_laplacian``  stochastic (Rademacher) Laplacian, D = 50, N fixed, S swept.

Methods: ``nested`` = torch.func forward-over-reverse Hessian-vector products (``jvp`` of
``grad``, vmapped; the biharmonic nests two of them), ``standard`` = our Taylor mode with
``collapsed=False``, ``collapsed`` = ours with ``collapsed=True``.

Time: every (method, size) is run ``--repeats`` times, methods interleaved, under ``no_grad``;
the median is taken and the cost per datum (or per sample) is the slope of a least-squares line
through the medians. Peak memory: each (method, size) runs in a fresh subprocess (with glibc's
mmap threshold fixed at 128 KiB, so freed tensors leave the resident set) that warms up, records
its resident set size, resets the kernel's high-water mark (``/proc/self/clear_refs``), runs once
and reports ``VmHWM`` minus that baseline (the kernel's peak, so nothing is missed between
samples); reported for ``no_grad`` ("non-diff") and, unless ``--skip-diff``, for ``enable_grad``
with parameters requiring grad ("diff"). Slopes are in MiB per datum.

    python benchmarks/taylor.py            # full run, writes benchmarks/results/taylor.{json,md}
    python benchmarks/taylor.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch
from torch import nn
from torch.func import grad, jvp, vmap

from curvkit.taylor import biharmonic, laplacian, weighted_laplacian

CASES = {
    # name: (D, swept variable, default sizes, fixed N for sample sweeps)
    "laplacian": (50, "N", [8, 16, 32, 64], None),
    "weighted": (50, "N", [8, 16, 32, 64], None),
    "biharmonic": (5, "N", [8, 16, 32, 64], None),
    "stoch_biharmonic": (5, "S", [1, 2, 4, 8], 64),
    "stoch_laplacian": (50, "S", [1, 2, 4, 8], 64),
}
QUICK = {"laplacian": [2, 4], "weighted": [2, 4], "biharmonic": [2, 4],
         "stoch_biharmonic": [1, 2], "stoch_laplacian": [1, 2]}
METHODS = ["nested", "standard", "collapsed"]


def make_net(D: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    widths = [D, 768, 768, 512, 512]
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(512, 1)).to(dtype)


# ---------------------------------------------------------------------------------------------
# nested first-order AD baselines (forward-over-reverse)


def _quadratic_forms(g, x, V):
    """``[v_rᵀ ∇²g(x) v_r]_r`` for ``V: (R, D)`` by jvp-of-grad."""
    gradient = grad(g)
    hvps = vmap(lambda v: jvp(gradient, (x,), (v,))[1])(V)  # (R, D)
    return (hvps * V).sum(-1)


def nested_operator(case: str, net: nn.Module, D: int, sigma, S: int | None, gen):
    def f(x):
        return net(x).squeeze()

    eye = None

    if case in ("laplacian", "weighted"):
        def run(X):
            V = torch.eye(D, dtype=X.dtype) if case == "laplacian" else sigma.T
            return vmap(lambda x: _quadratic_forms(f, x, V).sum())(X)
    elif case == "biharmonic":
        def run(X):
            eye = torch.eye(D, dtype=X.dtype)

            def lap(x):
                return _quadratic_forms(f, x, eye).sum()

            return vmap(lambda x: _quadratic_forms(lap, x, eye).sum())(X)
    elif case == "stoch_biharmonic":
        def run(X):
            V = torch.randn(X.shape[0], S, D, generator=gen, dtype=X.dtype)

            def one(x, v):  # vᵀ∇²(vᵀ∇²f v)v, E = 3 Δ²f
                def inner(y):
                    return _quadratic_forms(f, y, v.unsqueeze(0)).sum()

                return _quadratic_forms(inner, x, v.unsqueeze(0)).sum()

            return vmap(lambda x, Vx: vmap(lambda v: one(x, v))(Vx).mean() / 3)(X, V)
    elif case == "stoch_laplacian":
        def run(X):
            V = (2 * torch.randint(0, 2, (X.shape[0], S, D), generator=gen) - 1).to(X.dtype)
            return vmap(lambda x, Vx: _quadratic_forms(f, x, Vx).mean())(X, V)
    del eye
    return run


def ours_operator(case: str, net: nn.Module, D: int, sigma, S: int | None, collapsed: bool, gen):
    if case == "laplacian":
        g = laplacian(net, collapsed=collapsed)
    elif case == "weighted":
        g = weighted_laplacian(net, sigma, collapsed=collapsed)
    elif case == "biharmonic":
        g = biharmonic(net, collapsed=collapsed)
    elif case == "stoch_biharmonic":
        g = biharmonic(net, randomization=("normal", S), collapsed=collapsed, generator=gen)
    else:
        g = laplacian(net, randomization=("rademacher", S), collapsed=collapsed, generator=gen)
    return g


def build(case: str, method: str, size: int, dtype: torch.dtype, fixed_n: int | None):
    D, swept, _, n_fixed = CASES[case]
    N = size if swept == "N" else (fixed_n or n_fixed)
    S = size if swept == "S" else None
    net = make_net(D, dtype)
    gen = torch.Generator().manual_seed(1)
    sigma = torch.randn(D, D, generator=torch.Generator().manual_seed(2), dtype=dtype) / D**0.5
    if method == "nested":
        fn = nested_operator(case, net, D, sigma, S, gen)
    else:
        fn = ours_operator(case, net, D, sigma, S, method == "collapsed", gen)
    X = torch.randn(N, D, generator=torch.Generator().manual_seed(3), dtype=dtype)
    return net, fn, X


# ---------------------------------------------------------------------------------------------
# memory: one subprocess per measurement


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(case, method, size, warm_size, dtype, diff, fixed_n):
    net, fn, X = build(case, method, size, dtype, fixed_n)
    _, warm_fn, X_warm = build(case, method, warm_size, dtype, fixed_n)
    del warm_fn
    net.requires_grad_(diff)
    context = torch.enable_grad if diff else torch.no_grad
    with context():
        # warm-up on the smallest size: loads kernels and traces (the trace is cached per shape,
        # so the measured call at `size` also traces -- make_fx runs one plain forward pass)
        fn(X_warm[: min(len(X_warm), X.shape[0])])
        fn(X)  # trace at this size outside the measurement
        baseline = _rss_bytes()
        _reset_peak_rss()  # if refused, the earlier identical call has the same peak anyway
        out = fn(X)
        peak = _peak_rss_bytes()
        del out
    print(json.dumps({"peak_mib": max(peak - baseline, 0) / 2**20}))


def measure_memory(case, method, size, warm_size, dtype_name, diff, fixed_n, threads):
    cmd = [sys.executable, __file__, "--memory-child", case, method, str(size), str(warm_size),
           dtype_name, str(int(diff)), str(fixed_n or 0), "--threads", str(threads)]
    # A fixed mmap threshold stops glibc from raising it dynamically and keeping freed large
    # blocks resident, so RSS follows the live tensor memory and the baseline is not inflated.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


# ---------------------------------------------------------------------------------------------


def slope(xs, ys):
    return float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0])


def run_case(case, sizes, args, dtype):
    D, swept, _, _ = CASES[case]
    built = {(m, s): build(case, m, s, dtype, args.fixed_n)[1:] for m in METHODS for s in sizes}
    times = {key: [] for key in built}
    with torch.no_grad():
        for fn, X in built.values():  # warm-up (and trace) once
            fn(X)
        for _ in range(args.repeats):
            for s in sizes:
                for m in METHODS:
                    fn, X = built[(m, s)]
                    t0 = time.perf_counter()
                    fn(X)
                    times[(m, s)].append(time.perf_counter() - t0)
    # correctness in the same run (exact cases): ours must agree with nested
    check = {}
    if swept == "N":
        fn_n, X = built[("nested", sizes[0])]
        with torch.no_grad():
            ref = fn_n(X)
            for m in ("standard", "collapsed"):
                out = built[(m, sizes[0])][0](X).squeeze(-1)
                check[m] = float((out - ref).abs().max() / ref.abs().max())
    rows = []
    for m in METHODS:
        med = [statistics.median(times[(m, s)]) for s in sizes]
        row = {"case": case, "D": D, "swept": swept, "method": m, "sizes": sizes,
               "median_s": med, "ms_per_unit": 1e3 * slope(sizes, med)}
        for diff in ([False] if args.skip_diff else [False, True]):
            mem = [measure_memory(case, m, s, sizes[0], args.dtype, diff, args.fixed_n,
                                  args.threads) for s in sizes]
            row["peak_mib_" + ("diff" if diff else "nondiff")] = mem
            row["mib_per_unit_" + ("diff" if diff else "nondiff")] = slope(sizes, mem)
        if m in check:
            row["max_rel_diff_vs_nested"] = check[m]
        rows.append(row)
    base = rows[0]
    for row in rows:
        for key in ("ms_per_unit", "mib_per_unit_nondiff", "mib_per_unit_diff"):
            if key in row:
                row[key.replace("_per_unit", "_ratio")] = row[key] / base[key]
    return rows


def fmt_table(rows):
    head = ("| case | D | per | method | ms/unit | ratio | MiB/unit non-diff | ratio "
            "| MiB/unit diff | ratio |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['D']} | {'datum' if r['swept'] == 'N' else 'sample'} "
            f"| {r['method']} | {r['ms_per_unit']:.3f} | {r['ms_ratio']:.2f} "
            f"| {r['mib_per_unit_nondiff']:.3f} | {r['mib_ratio_nondiff']:.2f} "
            f"| {r.get('mib_per_unit_diff', float('nan')):.3f} "
            f"| {r.get('mib_ratio_diff', float('nan')):.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="override the swept sizes (N or S) for every case")
    parser.add_argument("--fixed-n", type=int, default=None, help="N for sample sweeps")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-diff", action="store_true", help="skip enable_grad memory")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats, no output")
    parser.add_argument("--memory-child", nargs=7, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        case, method, size, warm, dtype_name, diff, fixed_n = args.memory_child
        memory_child(case, method, int(size), int(warm), getattr(torch, dtype_name),
                     bool(int(diff)), int(fixed_n) or None)
        return
    dtype = getattr(torch, args.dtype)
    if args.quick:
        args.repeats = 2
    rows = []
    for case in args.cases:
        sizes = args.sizes or (QUICK[case] if args.quick else CASES[case][2])
        rows += run_case(case, sizes, args, dtype)
        print(fmt_table([r for r in rows if r["case"] == case]), flush=True)
        if not args.quick:
            write_results(rows, args)
    print(fmt_table(rows))


def write_results(rows, args):
    """Merge these rows into results/taylor.json (rows of other cases are kept)."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(__file__)).stdout.strip()
    meta = {"device": f"CPU ({platform.processor() or platform.machine()}, "
                      f"{os.cpu_count()} cores, {args.threads} torch threads)",
            "torch": torch.__version__, "python": platform.python_version(), "commit": commit,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dtype": args.dtype, "repeats": args.repeats, "command": " ".join(sys.argv)}
    path = os.path.join(os.path.dirname(__file__), "results", "taylor.json")
    previous = []
    if os.path.exists(path):
        with open(path) as fh:
            previous = json.load(fh).get("rows", [])
    cases = {r["case"] for r in rows}
    for r in rows:
        r.update({"command": meta["command"], "date": meta["date"]})
    merged = [r for r in previous if r["case"] not in cases] + rows
    with open(path, "w") as fh:
        json.dump({**meta, "rows": merged}, fh, indent=1)


if __name__ == "__main__":
    main()
