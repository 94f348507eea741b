"""The batched group solve (``project_groups`` for tensors on a GPU) with and without skipping settled groups.

    python benchmarks/bench_batched.py [--out benchmarks/results/batched-cpu.json]

Runs ``_batched.solve_groups`` on CPU tensors (``_api_groups._BATCH_ON_CPU``: the solve is the GPU's, the device is not)
over the ResNet-50 layers (25.5M float32, N(0, 0.02^2), one group per layer, s = 0.8), twice in the same process,
interleaved: "skip" (this code: an evaluation reads only the groups whose mu moved) and "full" (every group at
every evaluation, the code before, by hiding the flags from the engine). Counted: the entries each evaluation's
sums read, over the group's entries (deterministic); timed: best wall time of ``--repeat`` rounds. The outputs of
both must be equal bit for bit (checked). The eager passes: the fused ones need every run of one length to hold
64K entries, and ResNet-50's small layers do not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "batched-cpu.json"))
    args = p.parse_args()
    os.environ["GROUPSPARSE_TORCH_COMPILE"] = "0"
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from shapes import resnet50_weight_shapes

    import groupsparse as gs
    from groupsparse.projection import _api_groups, _torch_fused
    from groupsparse.projection._torch import TorchEngine

    _api_groups._BATCH_ON_CPU = True
    rng = np.random.default_rng(0)
    mats = [torch.from_numpy(rng.normal(0, 0.02, size=s).astype(np.float32).reshape(s[0], -1))
            for s in resnet50_weight_shapes()]
    total = sum(m.numel() for m in mats)
    read = [0]
    stats, call = TorchEngine._piece_stats, _torch_fused._call
    TorchEngine._piece_stats = lambda self, u, p: (read.__setitem__(0, read[0] + p.e1 - p.e0), stats(self, u, p))[1]
    _torch_fused._call = lambda name, *a: (read.__setitem__(0, read[0] + (a[0].numel() if name == "sums" else 0)),
                                           call(name, *a))[1]
    full_eval = TorchEngine.evaluate_vec

    def run(skip):
        TorchEngine.evaluate_vec = full_eval if skip else (lambda self, t, mu=None, live=None: full_eval(self, t, mu))
        read[0] = 0
        t0 = time.perf_counter()
        out, infos = gs.project_groups(mats, 0.8, axis=1, engine="torch", return_info=True)
        return time.perf_counter() - t0, read[0] / total, out, infos[0].evaluations

    res = {"load_before": os.getloadavg(), "entries": total, "torch_threads": torch.get_num_threads()}
    run(True), run(False)  # (compile, warm)
    best = {"skip": float("inf"), "full": float("inf")}
    for _ in range(args.repeat):
        for k in best:
            t, passes, out, evals = run(k == "skip")
            best[k] = min(best[k], t)
            res[f"{k}_sums_passes_per_entry"], res[f"{k}_evaluations"] = passes, evals
            res[f"{k}_out"] = out
    same = all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(res.pop("skip_out"), res.pop("full_out")))
    res.update({f"{k}_s": v for k, v in best.items()}, bit_identical=same, skip_over_full=best["skip"] / best["full"],
               load_after=os.getloadavg())
    print(f"batched project_groups over ResNet-50: evaluations "
          f"{res['skip_evaluations']}, sums read {res['full_sums_passes_per_entry']:.2f} -> "
          f"{res['skip_sums_passes_per_entry']:.2f} passes per entry, {1e3 * best['full']:.0f} -> "
          f"{1e3 * best['skip']:.0f} ms ({res['skip_over_full']:.2f}x), bit-identical {same}")
    Path(args.out).write_text(json.dumps(res, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
