#!/usr/bin/env bash
# Reproduces results/prune/digits/{table.csv,table.png}: digits / MLP (LeNet-300-100 on 64 inputs), 3 seeds,
# 5 methods x 4 zero fractions, default schedule (30 dense epochs, 20 epochs after the dense model for every
# method). The dense model of each seed is trained once and reused (cache: runs/cache).
# sweep.py runs the 60 `groupsparse prune` invocations in one process; `python -m groupsparse.experiments X` is
# the same command as `groupsparse X`.
set -euo pipefail
cd "$(dirname "$0")/../../.."
python results/prune/digits/sweep.py
python -m groupsparse.experiments report runs/digits --out results/prune/digits/table
