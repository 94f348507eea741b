"""The digits / MLP sweep behind results/prune/digits/table.{csv,png}, in one process (imports paid once).

Each run is exactly ``groupsparse prune --dataset digits --model mlp --method M --protocol P --sparsity S
--seed N [--values V] --out runs/digits-v2/M-P[-V]-S-seedN --cache runs/cache`` (defaults otherwise: 30 dense
epochs, 20 more for every method); finished runs are skipped, so a killed sweep resumes.
"""

import sys

import torch

from groupsparse.experiments.runner import Config, run

RUNS = [("gsp", "after", None), ("gmp", "after", None), ("magnitude", "after", None),
        ("gsp-single-shot", "after", None), ("deephoyer", "after", None), ("random", "after", None),
        ("gsp", "during", None), ("gmp", "during", None), ("deephoyer", "during", None),
        ("gsp-single-shot", "after", "dense"), ("gsp-single-shot", "after", "rescaled"),
        ("gsp", "after", "dense"), ("gsp", "after", "rescaled")]

torch.set_num_threads(1)  # a tiny MLP: one thread avoids oversubscription on a shared 2-core machine
seeds = range(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
for seed in seeds:
    for s in (0.9, 0.95, 0.98):
        for m, p, v in RUNS:
            name = f"{m}-{p}-{v}" if v else f"{m}-{p}"
            r = run(Config("digits", "mlp", m, s, seed, f"runs/digits-v2/{name}-{s}-seed{seed}", protocol=p,
                           values=v, cache_dir="runs/cache", progress=False))
            print(f"{name:26s} zeros {s:.2f} seed {seed}: acc {r['accuracy']:.4f} val {r['val_accuracy']:.4f} "
                  f"(dense {r['dense_accuracy']:.4f}, before finetune {r['accuracy_before_finetune']:.4f})",
                  file=sys.stderr, flush=True)
