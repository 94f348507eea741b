#!/usr/bin/env bash
# CIFAR-10 / ResNet-20 on the shared 2-core CPU, one torch thread, 45k train / 5k validation / 10k test:
# 10 dense epochs (cosine, lr 0.1) + 3 epochs for every method at 90 % zeros (equal budget, 13 epochs in all).
# protocol after: magnitude, gsp-single-shot (3 masked finetune), gsp and gmp (1 shaping + 2 masked finetune);
# protocol during: gsp and gmp shape epochs 8-10 of the dense run at its learning rate, then 3 masked finetune.
# Resumable: rerun after an interruption (each phase checkpoints every epoch). CODE=DIR runs a frozen copy of the
# package in DIR (python -P: the working tree is not imported by accident).
set -euo pipefail
cd "$(dirname "$0")/../../.."
DATA=${DATA:-../shared/data/cifar10-jpg.zip}
SEED=${SEED:-0}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
[ -n "${CODE:-}" ] && export PYTHONPATH=$CODE
run() {  # method protocol [extra options]
  local m=$1 p=$2; shift 2
  python -P -m groupsparse.experiments prune --dataset cifar10 --model resnet20 --data "$DATA" --method $m \
    --protocol $p --sparsity 0.9 --seed $SEED --epochs 10 --finetune-epochs 3 --out runs/cifar10-cpu-v2/$m-$p-seed$SEED \
    --cache runs/cache --device cpu --no-progress "$@"
}
run gsp during --start-epoch 7      # trains the shared dense model first (keeps its epoch-7 snapshot)
run magnitude after
run gsp after
run gmp after
run gsp-single-shot after
run gmp during --start-epoch 7
python -P -m groupsparse.experiments report runs/cifar10-cpu-v2 --baseline magnitude --out results/prune/cifar10/cpu_v2_table
