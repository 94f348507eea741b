#!/usr/bin/env bash
# CIFAR-10 / ResNet-20 on the shared 2-core CPU, one torch thread per process, nice 10. What the CPU allowed in
# the session (each niced process got 5-25 % of one core while five jobs shared two cores): a fixed 10,000-image
# subset of the 45,000 training images (5,000 more are the validation split), the full 10,000-image test set,
# 5 dense epochs (cosine, lr 0.1) + 2 epochs for every method at 90 % zeros (equal budget: 7 epochs in all).
# protocol after: magnitude, gsp-single-shot (2 masked finetune), gsp and gmp (1 shaping + 1 masked finetune);
# protocol during: gsp and gmp shape epochs 4-5 of the dense run at its learning rate, then 2 masked finetune.
# The dense model is trained once (by the first command); the method runs then go in parallel.
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
    --protocol $p --sparsity 0.9 --seed $SEED --epochs 5 --finetune-epochs 2 --train-subset 10000 \
    --out runs/cifar10-cpu-v2/$m-$p-seed$SEED --cache runs/cache --device cpu --no-progress "$@"
}
run magnitude after                 # trains the shared dense model first (keeps its snapshots from epoch 2 on)
run gsp during --start-epoch 3 & run gsp after & run gmp after & run gsp-single-shot after & run gmp during --start-epoch 3 &
wait
python -P -m groupsparse.experiments report runs/cifar10-cpu-v2 --baseline magnitude --out results/prune/cifar10/cpu_v2_table  # needs the current code (not CODE)
