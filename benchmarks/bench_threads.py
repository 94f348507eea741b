"""Threads on this machine: serial against threaded passes, each setting in fresh processes (not a unit test).

    python benchmarks/bench_threads.py [--busy K] [--rounds 2] [--out benchmarks/results/threads.json]

Settings (environment of each worker process): ``serial`` (GROUPSPARSE_NUM_THREADS=1), ``threaded`` (the
defaults: threads from 2 cores, 1M entries) and ``ragged_general`` (also ragged groups on the threaded general
engine, GROUPSPARSE_RAGGED_MIN_THREADS=2). ``--busy K`` starts K processes spinning on the CPU beside the
workers (another job on the machine). Cases, float32 N(0, 1) unless said, s = 0.8, best of 7 calls per worker:
  resnet50   every ResNet-50 weight its own group (N(0, 0.02^2)), one ``project`` call per layer
  1e7-9      one group of length-9 vectors; 1e7-1000: of length-1000 vectors
  ragged     one group of 1500 vectors of lengths 100..3000 (2.4M entries)
  after_torch  the median of 40 projections of a 512 x 4608 layer, each right after three 512^2 matmuls on
             torch's threads (their idle OpenMP threads spin for a while: the pruner's case); ``omp_passive``
             runs every case with OMP_WAIT_POLICY=passive
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = {"serial": {"GROUPSPARSE_NUM_THREADS": "1"}, "threaded": {},
            # ragged groups through the threaded general engine (the default keeps them on the serial solve)
            "ragged_general": {"GROUPSPARSE_RAGGED_MIN_THREADS": "2"},
            # torch's idle OpenMP threads sleep at once instead of spinning (the after_torch case)
            "omp_passive": {"OMP_WAIT_POLICY": "passive"}}


def _after_torch(gs, rng):
    """A pruner's case: torch ops on torch's threads, then at once the projection of one 512 x 4608 layer (2.4M
    entries), while torch's idle OpenMP threads may still spin; the median of 40 such steps."""
    import numpy as np
    import torch

    a = torch.randn(512, 512)
    w = rng.normal(size=(512, 4608)).astype(np.float32)
    gs.project(w, 0.8, axis=1)
    times = []
    for _ in range(40):
        for _ in range(3):
            a @ a
        t0 = time.perf_counter()
        gs.project(w, 0.8, axis=1)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def worker():
    import numpy as np

    import groupsparse as gs

    sys.path.insert(0, str(HERE))
    from bench_projection import resnet_layers

    rng = np.random.default_rng(0)
    cases = {"resnet50": resnet_layers(np.random.default_rng(0), init="normal")}
    for n in (9, 1000):
        cases[f"1e7-{n}"] = [rng.normal(size=(10**7 // n, n)).astype(np.float32)]
    cases["ragged"] = [[rng.normal(size=int(n)).astype(np.float32) for n in rng.integers(100, 3000, 1500)]]
    res = {"after_torch": _after_torch(gs, rng)}
    for name, groups in cases.items():
        axis = 0 if name == "ragged" else 1
        for g in groups:
            gs.project(g, 0.8, axis=axis)  # compile or load the cache, start the pool
        best = float("inf")
        for _ in range(7):
            t0 = time.perf_counter()
            for g in groups:
                gs.project(g, 0.8, axis=axis)
            best = min(best, time.perf_counter() - t0)
        res[name] = best
    print(json.dumps(res))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busy", type=int, default=0, help="spinning processes beside the workers")
    p.add_argument("--rounds", type=int, default=2, help="workers per setting, alternating (best of all)")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker()
        return
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
    try:
        times: dict = {}
        for _ in range(a.rounds):
            for name, env in SETTINGS.items():
                e = {k: v for k, v in os.environ.items() if not k.startswith("GROUPSPARSE_")} | env
                out = subprocess.run([sys.executable, __file__, "--worker"], env=e, capture_output=True, text=True,
                                     check=True).stdout
                for case, t in json.loads(out.strip().splitlines()[-1]).items():
                    times.setdefault(case, {})[name] = min(t, times.get(case, {}).get(name, float("inf")))
    finally:
        for s in spin:
            s.kill()
    rows = {case: {**{f"{k}_ms": 1e3 * v for k, v in t.items()}, "threaded_over_serial": t["threaded"] / t["serial"]}
            for case, t in times.items()}
    for case, r in rows.items():
        print(f"{case:11s} serial {r['serial_ms']:7.1f} ms  threaded {r['threaded_ms']:7.1f} ms  "
              f"ratio {r['threaded_over_serial']:.2f}  (ragged on the general engine: {r['ragged_general_ms']:.1f}; "
              f"OMP_WAIT_POLICY=passive: {r['omp_passive_ms']:.1f})")
    res = {"cpu_count": os.cpu_count(), "busy": a.busy, "rounds": a.rounds, "load_after": os.getloadavg(),
           "cases": rows}
    out = Path(a.out or HERE / "results" / f"threads-busy{a.busy}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
