#!/usr/bin/env bash
# CIFAR-10 / ResNet-20 on the shared 2-core CPU with the FULL training set (45,000 images; 5,000 more are the
# validation split) and the full 10,000-image test set, at 90 % zeros, one stream per seed (SEED=0, SEED=1 run side by
# side, one torch thread each, nice 10). Dense: 8 epochs (cosine, lr 0.1) -- the longest schedule that left room for
# six methods x two seeds on this CPU in one session. Then every method gets 2 more epochs (equal budget: 10 in all):
#   after : magnitude, gsp-single-shot (2 masked finetune); gsp and gmp (1 shaping + 1 masked finetune)
#   during: gsp and gmp shape the last dense epoch (--start-epoch 7 counts completed epochs: epoch 8 of 8) at the
#           training learning rate (the tail of the cosine, ~0.004), then 2 masked finetune
# Runs in order of importance so an interrupted session still has the headline comparisons. Resumable: rerun the same
# command (each phase checkpoints every epoch; a run folder refuses other settings). CODE=DIR runs a frozen copy of the
# package in DIR (python -P: the working tree, which may be edited meanwhile, is not imported).
set -euo pipefail
cd "$(dirname "$0")/../../.."
DATA=${DATA:-../shared/data/cifar10-jpg.zip}
SEED=${SEED:-0}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1
[ -n "${CODE:-}" ] && export PYTHONPATH=$CODE
run() {  # method protocol [extra options]
  local m=$1 p=$2; shift 2
  nice -n 10 python -P -m groupsparse.experiments prune --dataset cifar10 --model resnet20 --data "$DATA" --method $m \
    --protocol $p --sparsity 0.9 --seed $SEED --epochs 8 --finetune-epochs 2 \
    --out runs/cifar10-cpu-full2/$m-$p-seed$SEED --cache runs/cache --device cpu --no-progress "$@"
}
run magnitude after            # trains the seed's dense model first (keeps its epoch snapshots)
run gsp during --start-epoch 7
run gmp during --start-epoch 7
run gsp after
run gmp after
run gsp-single-shot after
# then, with both seeds done:
# groupsparse report runs/cifar10-cpu-full2 --baseline gmp:during --out results/prune/cifar10/cpu_full2_table-vs-gmp-during
# groupsparse report runs/cifar10-cpu-full2 --baseline magnitude --out results/prune/cifar10/cpu_full2_table-vs-magnitude
