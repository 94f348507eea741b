#!/usr/bin/env bash
# CIFAR-10 / ResNet-20 on the 2-core CPU with the full 50k training set (results/prune/cifar10/cpu_full_table.*):
# 8 dense epochs (cosine, lr 0.1), then magnitude / gsp (2 induce + 2 finetune) / gsp-single-shot at 90 % zeros
# with 4 epochs each after the shared dense model. Resumable: rerun the script after an interruption.
set -euo pipefail
cd "$(dirname "$0")/../../.."
DATA=${DATA:-../shared/data/cifar10-jpg.zip}
for m in magnitude gsp gsp-single-shot; do
  python -m groupsparse.experiments prune --dataset cifar10 --model resnet20 --data "$DATA" --method $m \
    --sparsity 0.9 --seed 0 --epochs 8 --finetune-epochs 4 --induce-epochs 2 --out runs/cifar10-cpu-full/$m \
    --cache runs/cache --device cpu --no-progress
done
python -m groupsparse.experiments report runs/cifar10-cpu-full --out results/prune/cifar10/cpu_full_table
