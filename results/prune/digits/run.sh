#!/usr/bin/env bash
# Reproduces results/prune/digits/table-vs-{gmp,magnitude,gmp-during}.{csv,png}: digits / MLP (LeNet-300-100 on 64 inputs),
# 10 seeds, 90/95/98 % zeros, every method and both protocols, plus GSP with dense/rescaled kept values
# (sweep.py: 390 `groupsparse prune` runs in one process, 510 trainings with deephoyer's lambda candidates). The dense model of
# each seed is trained once and reused (cache: runs/cache). CODE=DIR runs a frozen copy of the package.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1
[ -n "${CODE:-}" ] && export PYTHONPATH=$CODE
python -P results/prune/digits/sweep.py "${SEEDS:-10}"
for b in gmp magnitude gmp:during; do
  python -P -m groupsparse.experiments report runs/digits-v2 --baseline $b --out results/prune/digits/table-vs-${b/:/-}
done
