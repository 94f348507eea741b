#!/usr/bin/env bash
# CIFAR-10 / ResNet-20 on the shared 2-core CPU, one torch thread, 45k train / 5k validation / 10k test:
# 6 dense epochs (cosine, lr 0.1) + 2 epochs for every method at 90 % zeros (equal budget, 8 epochs in all).
# protocol after: magnitude, gsp-single-shot (2 masked finetune), gsp and gmp (1 shaping + 1 masked finetune);
# protocol during: gsp and gmp shape epochs 5-6 of the dense run at its learning rate, then 2 masked finetune.
# Sized for the time left on a CPU shared by five jobs (this process got about a third of a core).
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
    --protocol $p --sparsity 0.9 --seed $SEED --epochs 6 --finetune-epochs 2 --out runs/cifar10-cpu-v2/$m-$p-seed$SEED \
    --cache runs/cache --device cpu --no-progress "$@"
}
run magnitude after                 # trains the shared dense model first (keeps its snapshots from epoch 3 on)
run gsp during --start-epoch 4
run gsp after
run gmp after
run gsp-single-shot after
run gmp during --start-epoch 4
python -P -m groupsparse.experiments report runs/cifar10-cpu-v2 --baseline magnitude --out results/prune/cifar10/cpu_v2_table
