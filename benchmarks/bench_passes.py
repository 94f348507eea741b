"""Passes over the data per entry of the equal-length path: a deterministic measure of the projection's work.

    python benchmarks/bench_passes.py [--baseline DIR] [--out benchmarks/results/projection-passes.json]

Timings on a shared 2-core machine swing by 10-30 % between runs; the number of passes over the data does not.
This runs the compiled equal-length solve (``groupsparse/projection/_uniform.py``) with its Newton loop in Python
(the same code, ``py_func``) and counts the entries each pass reads: a full pass counts 1 per entry, a pass over
a sample of parts its share, and a pass that also writes the output counts 2 (read, then write).
Cases (float32, s = 0.8): the ResNet-50 layers (one group per layer, N(0, 0.02^2) and Kaiming-uniform weights),
1e7 entries of length 9 and of length 1000 (three seeds each). Each version runs in its own subprocess
(``--baseline``: a checkout of older code, e.g. ``git worktree add /tmp/base <rev>``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

_PROBE = r"""
import json, sys
sys.path[:0] = {path!r}
import numpy as np
import groupsparse as gs
from groupsparse.projection import _uniform as U
from bench_projection import resnet_layers

touched = [0.0]
def pass_(par, x, n, T, beta, wn, stride, write, out, part):
    P = U.part_size.py_func(n)
    U._pass_range(x, n, P, T, beta, wn, stride, write, out, part, 0)
    touched[0] += min(part.shape[0] * stride * P * n, x.size) / stride * (2 if write else 1)
def first(x, n, P, beta, wn, check, part, p0):  # (before the first pass took a stride and a threshold)
    U._first_range(x, n, P, beta, wn, check, part, p0)
    touched[0] += x.size
def first_strided(par, x, n, P, stride, beta, wn, T, part):
    U._first_range(x, n, P, stride, beta, wn, x.itemsize == 8, T, part, 0)
    touched[0] += min(part.shape[0] * stride * P * n, x.size) / stride  # (at T > 0 also an evaluation: one read)

calls = []
solve = U.solve_uniform
def spy(x, n, s, margin, tol, max_iter, mu0, out, stats, par):
    calls.append((x, n, s, margin, tol, max_iter, mu0))
    return solve(x, n, s, margin, tol, max_iter, mu0, out, stats, par)

def groups(case):
    if case in ("resnet50", "resnet50-kaiming-uniform"):
        init = "normal" if case == "resnet50" else "kaiming-uniform"
        return resnet_layers(np.random.default_rng(0), init=init)
    n = int(case.split("-")[1])
    return [np.random.default_rng(seed).normal(size=(10**7 // n, n)).astype(np.float32) for seed in range(3)]

res = {{}}
for case in ("resnet50", "resnet50-kaiming-uniform", "1e7-9", "1e7-1000"):
    mats = groups(case)
    calls.clear()
    U.solve_uniform = spy
    for m in mats:
        gs.project(m, 0.8, axis=1)  # the arguments the public call hands the solve
    U.solve_uniform = solve
    saved = (U._pass, U._kahan, U._newton, U._first_ser, getattr(U, "_first", None), getattr(U, "_sample_root", None),
             getattr(U, "_in_range", None))
    U._pass, U._kahan, U._newton, U._first_ser = pass_, U._kahan.py_func, U._newton.py_func, first
    if saved[4] is not None:
        U._first, U._sample_root, U._in_range = first_strided, U._sample_root.py_func, U._in_range.py_func
    touched[0] = 0.0
    evals = 0.0
    for a in calls:
        stats = np.zeros(7)
        U._solve(*a, np.empty_like(a[0]), stats, False)
        evals += stats[2] * a[0].size
    U._pass, U._kahan, U._newton, U._first_ser = saved[:4]
    if saved[4] is not None:
        U._first, U._sample_root, U._in_range = saved[4:]
    size = sum(a[0].size for a in calls)
    res[case] = {{"passes_per_entry": touched[0] / size, "evaluations_per_entry": evals / size, "groups": len(calls)}}
print(json.dumps(res))
"""


def bench_passes(baseline_dir=None):
    """{case: {version: passes per entry, ...}} for this checkout ('ours') and the baseline ('before')."""
    versions = {"ours": HERE.parent}
    if baseline_dir:
        versions["before"] = Path(baseline_dir).resolve()
    out = {}
    for name, root in versions.items():
        env = dict(os.environ)
        if name == "before":  # numba's cache is keyed by file: the baseline's files get a folder of their own
            env["NUMBA_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / "gs-bench-numba-before")
        code = _PROBE.format(path=[str(root), str(HERE)])
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
        if proc.returncode:
            raise RuntimeError(f"passes probe ({name}) failed: {proc.stderr[-2000:]}")
        for case, row in json.loads(proc.stdout.strip().splitlines()[-1]).items():
            for k, v in row.items():
                out.setdefault(case, {})[f"{name}_{k}"] = v
    for case, row in out.items():
        print(f"  passes {case}: {row['ours_passes_per_entry']:.3f} per entry ({row['ours_evaluations_per_entry']:.2f} "
              f"evaluations)" + (f"; before {row['before_passes_per_entry']:.3f} ({row['before_evaluations_per_entry']:.2f})"
                                  if baseline_dir else ""), flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default=None, help="a checkout of older code to count too")
    p.add_argument("--out", default=str(HERE / "results" / "projection-passes.json"))
    args = p.parse_args()
    res = bench_passes(args.baseline)
    sys.path.insert(0, str(HERE))
    from bench_projection import write_json

    write_json(Path(args.out), res)


if __name__ == "__main__":
    main()
