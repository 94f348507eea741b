"""Projection benchmarks: ratios to a copy of the same data measured in the same run (not unit tests).

    python benchmarks/bench_projection.py [--quick] [--out benchmarks/results/cpu.json]

1. resnet50: all ResNet-50 conv/fc weights (25.5M float32, N(0, 0.02^2)), each layer its own group, filter
   vectors (rows of W.reshape(out, -1)), s = 0.8: our time / time to copy the same arrays, with one
   ``project`` call per layer and with one ``project_groups`` call for all layers.
2. scaling: 1e5 .. 1e8 entries (vectors of length 1000), time per entry.
3. the resnet50 group through the torch engine on CPU, and on CUDA when available.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
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


def resnet_layers(rng, xp="numpy", device="cpu"):
    mats = [rng.normal(0, 0.02, size=s).astype(np.float32).reshape(s[0], -1) for s in resnet50_weight_shapes()]
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


def bench_resnet(rng, repeat, s=0.8):
    mats = resnet_layers(rng)
    run_group(mats, s)  # compile / warm caches
    run_group(mats, s, batched=True)
    t_copy = best_of(lambda: [m.copy() for m in mats], repeat)
    t_ours = best_of(lambda: run_group(mats, s), repeat)
    t_batched = best_of(lambda: run_group(mats, s, batched=True), repeat)
    infos = run_group(mats, s)
    outs = [gs.project(m, s, axis=1) for m in mats]
    zeros = sum(int((o == 0).sum()) for o in outs) / sum(o.size for o in outs)
    worst = max(abs(i.sparsity - s) for i in infos)
    return {
        "entries": int(sum(m.size for m in mats)), "layers": len(mats), "sparsity": s,
        "copy_s": t_copy, "ours_s": t_ours, "ratio_to_copy": t_ours / t_copy,
        "project_groups_s": t_batched, "project_groups_ratio_to_copy": t_batched / t_copy,
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats, scaling up to 1e7")
    p.add_argument("--out", default=None, help="JSON file for the results (default benchmarks/results/<device>.json)")
    p.add_argument("--skip", nargs="*", default=[], choices=["resnet50", "scaling", "torch"])
    args = p.parse_args()
    repeat = 3 if args.quick else 5
    rng = np.random.default_rng(0)
    res = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
           "numpy": np.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import numba

        res["numba"] = numba.__version__
        res["numba_threads"] = numba.get_num_threads()
    except ImportError:
        pass
    if "resnet50" not in args.skip:
        res["resnet50"] = r = bench_resnet(rng, repeat)
        print(f"resnet50 ({r['entries']:,} float32, {r['layers']} groups, s=0.8): ours {1e3 * r['ours_s']:.1f} ms, "
              f"copy {1e3 * r['copy_s']:.1f} ms -> {r['ratio_to_copy']:.2f}x copy (project_groups: "
              f"{1e3 * r['project_groups_s']:.1f} ms, {r['project_groups_ratio_to_copy']:.2f}x); zeros {r['zero_fraction']:.1%}; "
              f"max |sparsity - s| {r['max_abs_sparsity_error']:.1e}; {r['mean_evaluations']:.1f} evaluations/layer", flush=True)
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
    dev = "cuda" if any(r.get("device", "").startswith("cuda") for r in res.get("torch", [])) else "cpu"
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"projection-{dev}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
