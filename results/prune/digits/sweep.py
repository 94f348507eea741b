"""The digits / MLP sweep behind results/prune/digits/table.{csv,png}, in one process (imports and JIT paid once).

Each run is exactly ``groupsparse prune --dataset digits --model mlp --method M --sparsity S --seed N
--out runs/digits/M-S-seedN --cache runs/cache`` (defaults otherwise); finished runs are skipped, so a killed
sweep resumes. Then: ``groupsparse report runs/digits --out results/prune/digits/table``.
"""

import sys

import torch

from groupsparse.experiments.runner import Config, run

torch.set_num_threads(1)  # a tiny MLP: one thread avoids oversubscription on a shared 2-core machine
for seed in (0, 1, 2):
    for s in (0.8, 0.9, 0.95, 0.98):
        for m in ("gsp", "gsp-single-shot", "magnitude", "deephoyer", "random"):
            r = run(Config("digits", "mlp", m, s, seed, f"runs/digits/{m}-{s}-seed{seed}", cache_dir="runs/cache",
                           progress=False))
            print(f"{m:16s} zeros {s:.2f} seed {seed}: acc {r['accuracy']:.4f} (dense {r['dense_accuracy']:.4f}, "
                  f"zero_fraction {r['zero_fraction']:.4f})", file=sys.stderr, flush=True)
