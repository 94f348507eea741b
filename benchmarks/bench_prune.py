"""Time GSPPruner.project and finalize on ResNet-20 / ResNet-50 shaped weights (random values).

    python benchmarks/bench_prune.py [--device cuda] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

from groupsparse.prune import GSPPruner


def resnet50_like() -> nn.Module:
    """The conv/fc weight shapes of torchvision's ResNet-50 (25.5 M weights), without the wiring."""
    layers, cin = [nn.Conv2d(3, 64, 7)], 64
    for width, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for b in range(blocks):
            layers += [nn.Conv2d(cin, width, 1), nn.Conv2d(width, width, 3), nn.Conv2d(width, width * 4, 1)]
            if b == 0:
                layers.append(nn.Conv2d(cin, width * 4, 1))
            cin = width * 4
    layers.append(nn.Linear(2048, 1000))
    return nn.Sequential(*layers)


def resnet20_like() -> nn.Module:
    layers, cin = [nn.Conv2d(3, 16, 3)], 16
    for w in (16, 32, 64):
        for _ in range(3):
            layers += [nn.Conv2d(cin, w, 3), nn.Conv2d(w, w, 3)]
            cin = w
    layers.append(nn.Linear(64, 10))
    return nn.Sequential(*layers)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    configs = [("filter", "layer", None), ("fan_out", "layer", None), ("filter", "model", "vector"),
               ("fan_out", "model", "vector"), ("layer", "model", "layer")]
    print(f"device {args.device}  threads {torch.get_num_threads()}")
    for name, make in [("resnet20", resnet20_like), ("resnet50", resnet50_like)]:
        for vec, scope, norm in configs:
            model = make().to(args.device)
            n = sum(p.numel() for p in model.parameters() if p.dim() > 1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pr = GSPPruner(model, 0.8, vectors=vec, scope=scope, normalize=norm)
                pr.project(0.5)  # warm-up: numba compilation / CUDA kernels
                best = float("inf")
                for _ in range(args.repeat):
                    sync(args.device)
                    t = time.perf_counter()
                    pr.project(0.8 + 0.01 * _)
                    sync(args.device)
                    best = min(best, time.perf_counter() - t)
                sync(args.device)
                t = time.perf_counter()
                pr.finalize(0.9, keep_zeros=False)
                sync(args.device)
                fin = time.perf_counter() - t
            print(f"{name:9s} {n / 1e6:6.2f}M  {vec:8s} {scope:6s} {str(norm):7s} project {best:7.3f}s  "
                  f"finalize(0.9 global) {fin:6.3f}s  zeros {pr.zero_fraction():.3f}", flush=True)


if __name__ == "__main__":
    main()
