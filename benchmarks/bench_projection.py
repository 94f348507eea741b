"""Projection benchmarks: ratios to a copy of the same data measured in the same run (not unit tests).

    python benchmarks/bench_projection.py [--quick] [--out benchmarks/results/cpu.json]

1. resnet50: all ResNet-50 conv/fc weights (25.5M float32, N(0, 0.02^2)), each layer its own group, filter
   vectors (rows of W.reshape(out, -1)), s = 0.8: our time / time to copy the same arrays, with one
   ``project`` call per layer and with one ``project_groups`` call for all layers.
2. scaling: 1e5 .. 1e8 entries (vectors of length 1000), time per entry.
3. the resnet50 group through the torch engine on CPU, and on CUDA when available.
4. short: vectors of length 9 (3x3 kernels) against length 1000 at 1e6 .. 1e8 entries (float32 N(0, 1), one
   group, s = 0.8): ns per entry, ratio to a copy, and the 9-vs-1000 per-entry ratio; ``--lengths 9 17 25``
   adds other short lengths at 1e6 and 1e7.
5. memory: peak extra memory of one call over the input size, in a fresh subprocess (peak RSS during the call
   minus RSS just before; numba's allocations are invisible to tracemalloc): lengths 9, 64, 1000 (1e7 entries;
   length 9 also at 1e8 without --quick), with and without ``out=``, and the ResNet-50 layers (one call per
   layer, results kept).
6. cold: the first threaded projection in a fresh process (thresholds forced), twice: once compiling, once with
   numba's cache filled by the first process.
7. passes: passes over the data per entry of the equal-length solve (deterministic; ``bench_passes.py``).

``--baseline DIR`` also times sections 4-7 with the projection package of another checkout (e.g. a git worktree
of an older commit), loaded beside this one: interleaved in the same process, so both see the same load.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import resnet50_weight_shapes  # noqa: E402

import groupsparse as gs  # noqa: E402


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def resnet_layers(rng, xp="numpy", device="cpu", init="normal"):
    """ResNet-50's weights as (out, fan_in) float32 matrices: N(0, 0.02^2), or ``kaiming-uniform`` (PyTorch's
    default Conv2d/Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): uniformly distributed entries)."""
    def draw(s):
        if init == "kaiming-uniform":
            b = 1.0 / math.sqrt(math.prod(s[1:]))
            return rng.uniform(-b, b, size=s)
        return rng.normal(0, 0.02, size=s)
    mats = [draw(s).astype(np.float32).reshape(s[0], -1) for s in resnet50_weight_shapes()]
    if xp == "torch":
        import torch

        return [torch.from_numpy(m).to(device) for m in mats]
    return mats


def run_group(mats, s, engine="auto", sync=None, batched=False):
    """Each layer its own group: one ``project`` call per layer, or one ``project_groups`` call for all."""
    if batched:
        outs, infos = gs.project_groups(mats, s, axis=1, engine=engine, return_info=True)
    else:
        # keep every result alive, as a caller would (and as the copy baseline does): freed buffers reused by
        # the next layer would hide the cost of fresh output memory
        pairs = [gs.project(m, s, axis=1, engine=engine, return_info=True) for m in mats]
        outs, infos = [o for o, _ in pairs], [i for _, i in pairs]
    if sync:
        sync()
    del outs
    return infos


def best_interleaved(fns: dict, repeat: int) -> dict:
    """Each function's best wall time over ``repeat`` rounds that call every function once, in turn."""
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def bench_resnet(rng, repeat, s=0.8):
    mats = resnet_layers(rng)
    run_group(mats, s)  # compile / warm caches
    run_group(mats, s, batched=True)
    # interleaved, one of each per round: the copy's time depends on whether its output pages are fresh (mmap) or
    # reused from the heap, which follows the allocations before it; timed back to back, the copy measured 18 ms
    # after threaded warm-ups and 30-37 ms after serial ones in the same session
    bufs = [np.empty_like(m) for m in mats]  # (the steadier pair: no allocation, no page faults, in either)
    fns = {"copy": lambda: [m.copy() for m in mats], "ours": lambda: run_group(mats, s),
           "batched": lambda: run_group(mats, s, batched=True),
           "copy_into": lambda: [np.copyto(b, m) for b, m in zip(bufs, mats)],
           "ours_out": lambda: [gs.project(m, s, axis=1, out=b) for b, m in zip(bufs, mats)]}
    best = best_interleaved(fns, repeat)
    t_copy, t_ours, t_batched = best["copy"], best["ours"], best["batched"]
    infos = run_group(mats, s)
    outs = [gs.project(m, s, axis=1) for m in mats]
    zeros = sum(int((o == 0).sum()) for o in outs) / sum(o.size for o in outs)
    worst = max(abs(i.sparsity - s) for i in infos)
    return {
        "entries": int(sum(m.size for m in mats)), "layers": len(mats), "sparsity": s,
        "copy_s": t_copy, "ours_s": t_ours, "ratio_to_copy": t_ours / t_copy,
        "project_groups_s": t_batched, "project_groups_ratio_to_copy": t_batched / t_copy,
        "copy_into_s": best["copy_into"], "ours_out_s": best["ours_out"],
        "out_ratio_to_copy_into": best["ours_out"] / best["copy_into"],
        "zero_fraction": zeros, "max_abs_sparsity_error": worst,
        "mean_iterations": float(np.mean([i.iterations for i in infos])),
        "mean_evaluations": float(np.mean([i.evaluations for i in infos])),
    }


def bench_scaling(rng, sizes, repeat, s=0.8, n=1000):
    rows = []
    for N in sizes:
        r = max(1, int(N) // n)
        m = rng.normal(0, 1, size=(r, n)).astype(np.float32)
        gs.project(m, s, axis=1)  # warm: compiles and starts the thread pool for this size class
        t_copy = best_of(lambda: m.copy(), repeat)
        t = best_of(lambda: gs.project(m, s, axis=1), repeat)
        rows.append({"entries": int(m.size), "ours_s": t, "copy_s": t_copy, "ns_per_entry": 1e9 * t / m.size,
                     "ratio_to_copy": t / t_copy})
        print(f"  scaling {m.size:>11,d} entries: {1e9 * t / m.size:6.2f} ns/entry  ({t / t_copy:.2f}x copy)", flush=True)
    return rows


def bench_torch(rng, repeat, device, s=0.8):
    import torch

    mats = resnet_layers(rng, "torch", device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    run_group(mats, s, engine="torch", sync=sync)

    def copy():
        out = [m.clone() for m in mats]
        if sync:
            sync()
        return out

    run_group(mats, s, engine="torch", sync=sync, batched=True)
    t_copy = best_of(copy, repeat)
    t_ours = best_of(lambda: run_group(mats, s, engine="torch", sync=sync), repeat)
    t_batched = best_of(lambda: run_group(mats, s, engine="torch", sync=sync, batched=True), repeat)
    return {"device": device, "copy_s": t_copy, "ours_s": t_ours, "ratio_to_copy": t_ours / t_copy,
            "project_groups_s": t_batched, "project_groups_ratio_to_copy": t_batched / t_copy,
            "torch_threads": torch.get_num_threads()}


def load_baseline(root):
    """The ``groupsparse.projection`` package of another checkout, imported under its own name."""
    init = Path(root).resolve() / "groupsparse" / "projection" / "__init__.py"
    spec = importlib.util.spec_from_file_location("baseline_projection", init, submodule_search_locations=[str(init.parent)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["baseline_projection"] = mod
    spec.loader.exec_module(mod)
    return mod


def bench_short(rng, sizes, repeat, baseline=None, s=0.8, lengths=(9,)):
    """Short ``lengths`` (9: 3x3 kernels; 25: 5x5) against length 1000 per entry, at 1e8 length 9 only; the
    callables are interleaved so a load spike hits all of them."""
    impls = {"ours": gs.project} | ({"before": baseline.project} if baseline else {})
    rows = []
    for N in sizes:
        row = {"entries": int(N)}
        short = [n for n in lengths if n == 9 or N <= 1e7]
        for n in (*short, 1000):
            m = rng.normal(0, 1, size=(int(N) // n, n)).astype(np.float32)
            for f in impls.values():
                f(m, s, axis=1)  # compile, warm
            best = {k: math.inf for k in ["copy", *impls]}
            for _ in range(repeat):
                for k, f in [("copy", lambda m=m: m.copy())] + [(k, lambda f=f, m=m: f(m, s, axis=1)) for k, f in impls.items()]:
                    t0 = time.perf_counter()
                    f()
                    best[k] = min(best[k], time.perf_counter() - t0)
            for k in impls:
                row[f"n{n}_{k}_ns_per_entry"] = 1e9 * best[k] / m.size
                row[f"n{n}_{k}_ratio_to_copy"] = best[k] / best["copy"]
            row[f"n{n}_copy_s"] = best["copy"]
            del m
        for k in impls:
            for n in short:
                row[f"{k}_ratio_{n}_vs_1000"] = row[f"n{n}_{k}_ns_per_entry"] / row[f"n1000_{k}_ns_per_entry"]
        rows.append(row)
        for n in (L for L in short if L != 9):  # (length 9 has its own line below)
            print(f"  short {int(N):>11,d} entries: length {n} {row[f'n{n}_ours_ns_per_entry']:.2f} ns/entry -> "
                  f"{n} vs 1000 {row[f'ours_ratio_{n}_vs_1000']:.2f}" + (f"; before: {n} vs 1000 "
                  f"{row[f'before_ratio_{n}_vs_1000']:.2f}" if baseline else ""), flush=True)
        if 9 not in short:
            continue
        print(f"  short {int(N):>11,d} entries: length 9 {row['n9_ours_ns_per_entry']:.2f} ns/entry "
              f"({row['n9_ours_ratio_to_copy']:.1f}x copy), length 1000 {row['n1000_ours_ns_per_entry']:.2f} "
              f"({row['n1000_ours_ratio_to_copy']:.1f}x) -> 9 vs 1000 {row['ours_ratio_9_vs_1000']:.2f}"
              + (f"; before: 9 {row['n9_before_ns_per_entry']:.2f} ns/entry ({row['n9_before_ratio_to_copy']:.1f}x "
                 f"copy), 9 vs 1000 {row['before_ratio_9_vs_1000']:.2f}" if baseline else ""), flush=True)
    return rows


def bench_resnet_before(rng, repeat, baseline, s=0.8, init="normal"):
    """ResNet-50 per-layer calls, this checkout against the baseline, interleaved (regression check)."""
    mats = resnet_layers(rng, init=init)
    fns = {"copy": lambda: [m.copy() for m in mats],
           "ours": lambda: [gs.project(m, s, axis=1) for m in mats],
           "before": lambda: [baseline.project(m, s, axis=1) for m in mats]}
    fns["ours"](), fns["before"]()
    best = best_interleaved(fns, repeat)
    row = {"init": init, "copy_s": best["copy"]} | {f"{k}_ratio_to_copy": best[k] / best["copy"] for k in ("ours", "before")}
    # steadier on a shared VM: each layer's best process time (outputs freed, so no fresh-page faults), interleaved
    # per layer, summed over the layers
    layer = {"ours": 0.0, "before": 0.0}
    for m in mats:
        calls = {"ours": lambda: gs.project(m, s, axis=1), "before": lambda: baseline.project(m, s, axis=1)}
        lbest = dict.fromkeys(calls, math.inf)
        for _ in range(5 * repeat):
            for k, f in calls.items():
                t0 = time.process_time()
                f()
                lbest[k] = min(lbest[k], time.process_time() - t0)
        for k in layer:
            layer[k] += lbest[k]
    row |= {f"{k}_sum_of_layer_best_cpu_s": v for k, v in layer.items()}
    row["ours_over_before_layer_best_cpu"] = layer["ours"] / layer["before"]
    for k, mod in (("ours", gs), ("before", baseline)):  # evaluations per layer, weighted by the layer's entries
        ev = [mod.project(m, s, axis=1, return_info=True)[1].evaluations for m in mats]
        row[f"{k}_evaluations_per_entry"] = float(np.average(ev, weights=[m.size for m in mats]))
    print(f"  resnet50 ({init}) per layer: ours {row['ours_ratio_to_copy']:.2f}x copy "
          f"({row['ours_evaluations_per_entry']:.2f} evaluations), before {row['before_ratio_to_copy']:.2f}x "
          f"({row['before_evaluations_per_entry']:.2f}); sum of per-layer best process times ours / before "
          f"{row['ours_over_before_layer_best_cpu']:.3f} (CPU of all threads: where one version threads and the "
          f"other does not, that one spends more CPU for less wall time)", flush=True)
    return row


_MEMORY_PROBE = r"""
import json, sys, numpy as np
sys.path[:0] = {path!r}
{imp}
def status(key):
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
n, N, use_out = {n}, {N}, {out}
if n:
    x = [np.random.default_rng(0).normal(size=(N // n, n)).astype(np.float32)]
else:
    from shapes import resnet50_weight_shapes
    rng = np.random.default_rng(0)
    x = [rng.normal(0, 0.02, size=s).astype(np.float32).reshape(s[0], -1) for s in resnet50_weight_shapes()]
for m in x:
    project(m[:64], 0.8, axis=1)  # compile before measuring
w = np.random.default_rng(1).normal(size=(1100, 1000)).astype(np.float32)
project(w, 0.8, axis=1)  # and start the thread pool (once per process: ~10 MB, a thread's stack and heap)
del w
outs = [np.zeros_like(m) for m in x] if use_out else [None] * len(x)
before = status('VmRSS')
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # resets the peak (VmHWM) to the current RSS
res = [project(m, 0.8, axis=1, out=o) for m, o in zip(x, outs)]
print(json.dumps((status('VmHWM') - before) / sum(m.nbytes for m in x)))
"""


def _probe_env(version, **extra):
    """The environment of a probe subprocess. The baseline gets a numba cache folder of its own: ``load_baseline``
    compiled its files under another module name, and numba's cache (keyed by file) would hand the probe those
    functions' pickled globals."""
    env = dict(os.environ, **extra)
    if version == "before":
        env["NUMBA_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / "gs-bench-numba-before")
    return env


def bench_memory(baseline_dir=None, N=10**7, big=False):
    """Peak extra memory / input size of one call (per-layer calls for ResNet-50) in a fresh subprocess; ``big``
    adds length 9 at 1e8 entries."""
    here = str(Path(__file__).resolve().parent)
    codes = {"ours": ([str(Path(here).parent), here], "from groupsparse import project")}
    if baseline_dir:
        codes["before"] = ([str(Path(baseline_dir).resolve()), here], "from groupsparse.projection import project")
    rows = []
    for n, size in [(9, N), (64, N), (1000, N), (0, 0)] + ([(9, 10**8)] if big else []):
        for use_out in (False, True):
            row = {"length": n or "resnet50", "entries": size or "25.5M", "out": use_out}
            for k, (path, imp) in codes.items():
                code = _MEMORY_PROBE.format(path=path, imp=imp, n=n, N=size, out=use_out)
                res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                     env=_probe_env(k))
                row[f"{k}_extra_over_input"] = float(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  memory length {row['length']} ({row['entries']} entries), out={use_out}: extra {row['ours_extra_over_input']:.3f}x input"
                  + (f" (before {row['before_extra_over_input']:.3f}x)" if baseline_dir else ""), flush=True)
    return rows


_COLD_PROBE = r"""
import sys, time
sys.path[:0] = {path!r}
import numpy as np
{imp}
x = np.random.default_rng(0).normal(size=(2000, 1000)).astype(np.float32)
t0 = time.perf_counter()
project(x, 0.8, axis=1)
print(time.perf_counter() - t0)
"""


def bench_cold_threads(baseline_dir=None):
    """Seconds of the first threaded projection (2M entries, thresholds forced so any machine takes the threaded
    path) in a fresh process whose numba cache already holds everything a previous process compiled."""
    here = str(Path(__file__).resolve().parent)
    codes = {"ours": ([str(Path(here).parent), here], "from groupsparse import project")}
    if baseline_dir:
        codes["before"] = ([str(Path(baseline_dir).resolve()), here], "from groupsparse.projection import project")
    row = {}
    for k, (path, imp) in codes.items():
        env = _probe_env(k, GROUPSPARSE_PARALLEL_MIN_ENTRIES="1000", GROUPSPARSE_PARALLEL_MIN_THREADS="1")
        code = _COLD_PROBE.format(path=path, imp=imp)
        runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                     env=env).stdout.split()[-1]) for _ in range(2)]
        row[f"{k}_first_call_s"], row[f"{k}_second_process_first_call_s"] = runs
        print(f"  cold threaded ({k}): first call {runs[0]:.1f} s, in the next process {runs[1]:.1f} s", flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats, scaling up to 1e7")
    p.add_argument("--out", default=None, help="JSON file for the results (default benchmarks/results/<device>.json)")
    p.add_argument("--skip", nargs="*", default=[], choices=["resnet50", "scaling", "torch", "short", "memory", "cold",
                                                                    "passes"])
    p.add_argument("--baseline", default=None, help="another checkout whose projection sections 4-7 also measure")
    p.add_argument("--lengths", nargs="*", type=int, default=[9], help="short lengths timed against length 1000 "
                   "(section 4; at 1e8 entries length 9 only)")
    p.add_argument("--merge", action="store_true", help="keep the output file's other keys (rerun some sections)")
    args = p.parse_args()
    repeat = 3 if args.quick else 5
    rng = np.random.default_rng(0)
    res = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
           "numpy": np.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import numba

        res["numba"] = numba.__version__
        from groupsparse.projection._threads import threads

        res["numba_threads"] = threads()  # (the projection's threads; numba's own pool is never started)
    except ImportError:
        pass
    res["load_average"] = os.getloadavg()[0]  # the machine is shared: the 1-minute load when this run started
    res_meta = dict(res)
    if "resnet50" not in args.skip:
        res["resnet50"] = r = bench_resnet(rng, repeat)
        print(f"resnet50 ({r['entries']:,} float32, {r['layers']} groups, s=0.8): ours {1e3 * r['ours_s']:.1f} ms, "
              f"copy {1e3 * r['copy_s']:.1f} ms -> {r['ratio_to_copy']:.2f}x copy (project_groups: "
              f"{1e3 * r['project_groups_s']:.1f} ms, {r['project_groups_ratio_to_copy']:.2f}x); zeros {r['zero_fraction']:.1%}; "
              f"max |sparsity - s| {r['max_abs_sparsity_error']:.1e}; {r['mean_evaluations']:.1f} evaluations/layer; "
              f"into existing memory (out=): ours {1e3 * r['ours_out_s']:.1f} ms, copy {1e3 * r['copy_into_s']:.1f} ms "
              f"-> {r['out_ratio_to_copy_into']:.2f}x", flush=True)
    if "scaling" not in args.skip:
        sizes = [1e5, 1e6, 1e7] + ([] if args.quick else [1e8])
        res["scaling"] = bench_scaling(rng, sizes, max(1, repeat - 2))
    if "torch" not in args.skip:
        import torch

        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        res["torch"] = []
        for d in devices:
            row = bench_torch(rng, repeat, d)
            res["torch"].append(row)
            if d.startswith("cuda"):
                row["gpu"] = torch.cuda.get_device_name()
            print(f"torch engine on {d}: ours {1e3 * row['ours_s']:.1f} ms, copy {1e3 * row['copy_s']:.2f} ms -> "
                  f"{row['ratio_to_copy']:.1f}x copy; project_groups {1e3 * row['project_groups_s']:.1f} ms -> "
                  f"{row['project_groups_ratio_to_copy']:.1f}x", flush=True)
    baseline = load_baseline(args.baseline) if args.baseline else None
    if "short" not in args.skip:
        res["short_vectors"] = bench_short(rng, [1e6, 1e7] + ([] if args.quick else [1e8]), repeat, baseline,
                                           lengths=args.lengths)
        if baseline:
            res["resnet50_vs_before"] = bench_resnet_before(rng, repeat, baseline)
            res["resnet50_kaiming_uniform_vs_before"] = bench_resnet_before(rng, repeat, baseline, init="kaiming-uniform")
    if "memory" not in args.skip:
        res["memory"] = bench_memory(args.baseline, big=not args.quick)
    if "cold" not in args.skip:
        res["cold_threaded"] = bench_cold_threads(args.baseline)
    if "passes" not in args.skip:
        from bench_passes import bench_passes

        res["passes"] = bench_passes(args.baseline)
    dev = "cuda" if any(r.get("device", "").startswith("cuda") for r in res.get("torch", [])) else "cpu"
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"projection-{dev}.json")
    if args.merge and out.exists():  # the file's sections and metadata stay; this run's metadata goes with its sections
        meta = ("machine", "cpus", "python", "numpy", "time", "numba", "numba_threads", "load_average")
        new = {k: v for k, v in res.items() if k not in meta}
        res = json.loads(out.read_text()) | new
        res.setdefault("runs", {})[", ".join(new)] = {k: v for k, v in zip(meta, map(res_meta.get, meta))}
    write_json(out, res)


def write_json(out: Path, res) -> None:
    """Write atomically (a killed run leaves the old file, never half of one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
