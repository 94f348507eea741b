"""Torch engine benchmark: the code before and after, each in fresh processes, timed against references measured
in the same process (not a unit test).

    python benchmarks/bench_torch_engine.py --before /tmp/tb_base [--threads N] [--repeat 3] [--rounds 3]

``--before``: a checkout of the old code (``git worktree add /tmp/tb_base <rev>``), imported through PYTHONPATH.
``--compiled`` adds the current code with ``GROUPSPARSE_TORCH_COMPILE=1`` (fused passes, version "compiled"; each
worker compiles or loads its kernels in its warm-up call, recorded as ``first_call_s``). ``--threads N`` gives
torch and the numba engine N threads each (0: each library's default: torch's intra-op threads, numba threads
from 2 cores since 5e8522d's round).
Cases (float32, N(0, 0.02^2) for ResNet-50, N(0, 1) otherwise, s = 0.8, vectors = rows):
  resnet50     every ResNet-50 conv/fc weight its own group, one ``project(.., engine='torch')`` per layer
  groups       the same layers in one ``project_groups(.., engine='torch')``
  1e7          one group of 10,000 vectors of length 1000
Per case: time of the torch engine, of the numba engine and of a torch copy (clone) of the same tensors, timed
in the same process (best of ``--repeat``); peak extra memory = growth of the resident set (VmHWM - VmRSS
before the call, /proc/self/status) in a fresh process, outputs kept alive, over the input's bytes. CUDA (when
present): the same timings on the GPU with ``torch.cuda.max_memory_allocated``. CPU rows also record each
engine's best process CPU time (``cpu_s``, all threads summed: steadier than wall time on a shared machine, and
with one thread the same work). Writes benchmarks/results/torch-engine-cpu.json (and -cuda.json; ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = ("resnet50", "groups", "1e7")


def _tensors(case, device="cpu"):
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from shapes import resnet50_weight_shapes

    rng = np.random.default_rng(0)
    if case == "1e7":
        mats = [rng.normal(size=(10_000, 1000)).astype(np.float32)]
    else:
        mats = [rng.normal(0, 0.02, size=s).astype(np.float32).reshape(s[0], -1) for s in resnet50_weight_shapes()]
    return [torch.from_numpy(m).to(device) for m in mats]


def _run(case, mats, engine):
    import groupsparse as gs

    if case == "groups":
        return gs.project_groups(mats, 0.8, axis=1, engine=engine)
    return [gs.project(m, 0.8, axis=1, engine=engine) for m in mats]  # results kept alive, as a caller would


def _rss():
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def worker_time(device, repeat, threads):
    if threads:  # the numba engine with as many threads as torch (it threads from 2 cores by default)
        os.environ["GROUPSPARSE_NUM_THREADS"] = str(threads)
    import torch

    import groupsparse as gs

    if threads:
        torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    cpu = {}

    def best(fn, key=None):
        times, ptimes = [], []
        for _ in range(repeat):
            sync()
            t0, p0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
            ptimes.append(time.process_time() - p0)
        if key:  # CPU seconds of this process (all its threads): steadier than wall time on a shared machine
            cpu[key] = min(ptimes)
        return min(times)

    rows = {}
    for case in CASES:
        mats = _tensors(case, device)
        engines = ["torch"] + (["numba"] if device == "cpu" else [])
        first = {}
        for e in engines:  # warm: numba compiles or loads its cache, torch.compile compiles (or loads) its kernels
            t0 = time.perf_counter()
            _run(case, mats, e)
            first[e] = time.perf_counter() - t0
        cpu.clear()
        row = {"entries": int(sum(m.numel() for m in mats)), "first_call_s": first,
               "copy_s": best(lambda: [m.clone() for m in mats], "copy")}
        for e in engines:
            row[f"{e}_s"] = best(lambda: _run(case, mats, e), e)
        row["torch_over_copy"] = row["torch_s"] / row["copy_s"]
        if "numba_s" in row:
            row["torch_over_numba"] = row["torch_s"] / row["numba_s"]
            row["cpu_s"] = dict(cpu)
            row["cpu_torch_over_numba"] = cpu["torch"] / cpu["numba"]
        rows[case] = row
    return {"package": gs.__file__, "torch_threads": torch.get_num_threads(), "cases": rows,
            "torch_compile": os.environ.get("GROUPSPARSE_TORCH_COMPILE", "")}


def worker_mem(device, case):
    import torch

    mats = _tensors(case, device)
    nbytes = sum(m.numel() * m.element_size() for m in mats)
    # imports, first-call setup and compiling outside the measurement (256 rows: past the fused passes' minimum)
    _run(case, [m[:256] for m in mats], "torch")
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = _run(case, mats, "torch")
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        before = _rss()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS (Linux >= 4.0)
            f.write("5")
        out = _run(case, mats, "torch")
        peak = _rss()["VmHWM"] - before
    del out
    return {"input_bytes": nbytes, "peak_extra_bytes": peak, "peak_extra_over_input": peak / nbytes}


def _spawn(src, args, compiled=False):
    env = {k: v for k, v in os.environ.items() if k != "GROUPSPARSE_TORCH_COMPILE"}
    if compiled:
        env["GROUPSPARSE_TORCH_COMPILE"] = "1"
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _best(old, new):
    """Per case, each timing the smaller of two workers' (ratios recomputed)."""
    if old is None:
        return new
    for case, row in new["cases"].items():
        prev = old["cases"][case]
        for k, v in row.items():
            if k.endswith("_s") and not isinstance(v, dict):
                prev[k] = min(prev[k], v)
        if "cpu_s" in row:
            prev["cpu_s"] = {k: min(prev["cpu_s"][k], v) for k, v in row["cpu_s"].items()}
            prev["cpu_torch_over_numba"] = prev["cpu_s"]["torch"] / prev["cpu_s"]["numba"]
        prev["torch_over_copy"] = prev["torch_s"] / prev["copy_s"]
        if "numba_s" in prev:
            prev["torch_over_numba"] = prev["torch_s"] / prev["numba_s"]
    return old


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--before", default="", help="checkout of the old code (PYTHONPATH)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="time workers per version, alternating (best of all)")
    p.add_argument("--compiled", action="store_true",
                   help="also time the current code with GROUPSPARSE_TORCH_COMPILE=1 (version 'compiled')")
    p.add_argument("--out", default=str(HERE / "results" / "torch-engine-{device}.json"))
    p.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        kind, device, *rest = a.worker
        res = worker_time(device, a.repeat, a.threads) if kind == "time" else worker_mem(device, rest[0])
        print(json.dumps(res))
        return
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    versions = {"before": a.before, "after": ""} if a.before else {"after": ""}
    if a.compiled:
        versions["compiled"] = ""

    for device in devices:
        res = {"device": device, "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "load_before": os.getloadavg(), "s": 0.8, "threads_arg": a.threads, "rounds": a.rounds, "versions": {}}
        for _ in range(a.rounds):  # versions alternate, best of all rounds: load drifts on a shared machine
            for name, src in versions.items():
                t = _spawn(src, ["--worker", "time", device, "--repeat", str(a.repeat), "--threads", str(a.threads)],
                           name == "compiled")
                res["versions"][name] = _best(res["versions"].get(name), t)
        for name, src in versions.items():
            t = res["versions"][name]
            for case in CASES:
                t["cases"][case].update(_spawn(src, ["--worker", "mem", device, case], name == "compiled"))
            for case, row in t["cases"].items():
                vs = (f", {row['torch_over_numba']:.1f}x numba (CPU time {row['cpu_torch_over_numba']:.1f}x)"
                      if "torch_over_numba" in row else "")
                print(f"{device} {name:8s} {case:8s} torch {1e3 * row['torch_s']:8.1f} ms ({row['torch_over_copy']:.0f}x "
                      f"copy{vs}); peak extra memory {row['peak_extra_over_input']:.2f}x input", flush=True)
        res["load_after"] = os.getloadavg()
        out = Path(a.out.format(device=device))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
        print("wrote", out)


if __name__ == "__main__":
    main()
