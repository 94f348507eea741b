#!/usr/bin/env bash
# CIFAR-10 / ResNet-20 on one GPU (the device run recorded in docs/prune-experiments.md).
# Needs .gpu/cifar10-jpegs.npz (jpegpack.py pack) beside the repo checkout; writes reports and logs to $OUT.
# EPOCHS dense epochs (cosine, lr 0.1), then gsp / gsp-single-shot / magnitude / deephoyer at 90 % zeros,
# FT epochs each after the dense model (equal budgets), the four run concurrently on the one GPU.
set -uo pipefail
EPOCHS=${EPOCHS:-40}; FT=${FT:-20}; SEED=${SEED:-0}; OUT=${OUT:-/tmp/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, numba; print('torch', torch.__version__, 'numba', numba.__version__)"
t0=$(date +%s)
python3 results/prune/cifar10/jpegpack.py unpack .gpu/cifar10-jpegs.npz /tmp/cifar10.npz || exit 1
echo "unpacked in $(( $(date +%s) - t0 )) s"
P="python3 -m groupsparse.experiments prune --dataset cifar10 --model resnet20 --data /tmp/cifar10.npz \
   --cache /tmp/gscache --epochs $EPOCHS --finetune-epochs $FT --seed $SEED --sparsity 0.9 --no-progress"
# The dense model is trained once (by the magnitude run); the other methods start when its masks exist, i.e.
# right after the dense model is cached, and all four then finetune concurrently on the one GPU.
timeout ${LIMIT:-500} $P --method magnitude --out /tmp/runs/magnitude > $OUT/magnitude.log 2>&1 &
while [ ! -e /tmp/runs/magnitude/masks.safetensors ] && kill -0 $! 2>/dev/null; do sleep 2; done
echo "dense done at $(( $(date +%s) - t0 )) s"; grep dense: $OUT/magnitude.log | tail -3
for m in gsp gsp-single-shot deephoyer; do
  timeout $(( ${LIMIT:-500} - $(date +%s) + t0 )) $P --method $m --out /tmp/runs/$m > $OUT/$m.log 2>&1 &
done
wait
echo "total $(( $(date +%s) - t0 )) s"
for m in magnitude gsp gsp-single-shot deephoyer; do
  mkdir -p $OUT/$m; cp /tmp/runs/$m/report.json $OUT/$m/ 2>/dev/null; tail -2 $OUT/$m.log 2>/dev/null
done
