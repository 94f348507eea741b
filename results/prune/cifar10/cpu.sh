#!/usr/bin/env bash
# CIFAR-10 / ResNet-20 on the shared 2-core CPU (results/prune/cifar10/cpu_table.*): deliberately tiny, a fixed
# 5000-image training subset, 6 dense epochs, then gsp / gsp-single-shot / magnitude at 90 % zeros with 3 epochs
# each after the dense model (equal budgets), test accuracy on the full 10k test set. A smoke-scale run only.
set -euo pipefail
cd "$(dirname "$0")/../../.."
DATA=${DATA:-../shared/data/cifar10-jpg.zip}
for m in magnitude gsp gsp-single-shot; do
  python -m groupsparse.experiments prune --dataset cifar10 --model resnet20 --data "$DATA" --method $m \
    --sparsity 0.9 --seed 0 --epochs 6 --finetune-epochs 3 --train-subset 5000 --out runs/cifar10-cpu/$m \
    --cache runs/cache --device cpu --no-progress
done
python -m groupsparse.experiments report runs/cifar10-cpu --out results/prune/cifar10/cpu_table
