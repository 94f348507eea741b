"""Time GSPPruner.project and finalize on ResNet-20 / ResNet-50 shaped weights (random values), and the cost
of mask enforcement in a real ResNet-50 training step.

    python benchmarks/bench_prune.py [--device cuda] [--threads 2]
    python benchmarks/bench_prune.py --enforcement [--batch 8] [--steps 6] [--out result.json]

``--enforcement`` trains two identical ResNet-50s with SGD (momentum, weight decay) on the same batch, one plain
and one with 90 % of its conv/linear weights masked (masks enforced on weights, gradients and momentum), their
steps interleaved so machine load hits both alike; it reports the median step times, their ratio, and the
time of ``apply_masks`` alone as a fraction of the plain step.
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


class _Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.body(x) + (x if self.down is None else self.down(x)))


def resnet50() -> nn.Module:
    """A wired ResNet-50 (torchvision's layout, 25.5 M parameters) for timing training steps."""
    layers, cin = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
    for i, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
        for b in range(blocks):
            layers.append(_Bottleneck(cin, width, 2 if (b == 0 and i > 0) else 1))
            cin = 4 * width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000))


def enforcement(args) -> dict:
    """Median training-step time of a masked vs an unmasked ResNet-50 (interleaved), and apply_masks alone."""
    import json
    import statistics

    from groupsparse.prune import MagnitudePruner

    torch.manual_seed(0)
    plain, masked = resnet50().to(args.device), resnet50().to(args.device)
    masked.load_state_dict(plain.state_dict())
    x = torch.randn(args.batch, 3, 224, 224, device=args.device)
    y = torch.randint(0, 1000, (args.batch,), device=args.device)
    opts = {m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4) for m in (plain, masked)}
    pruner = MagnitudePruner(masked)
    pruner.prune(0.9)
    pruner.attach(opts[masked])

    def step(m):
        sync(args.device)
        t = time.perf_counter()
        opts[m].zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(x), y).backward()
        opts[m].step()
        sync(args.device)
        return time.perf_counter() - t

    for m in (plain, masked):  # warm-up: allocator, optimizer state
        step(m)
    times = {plain: [], masked: []}
    for i in range(args.steps):
        for m in ((plain, masked) if i % 2 == 0 else (masked, plain)):
            times[m].append(step(m))
    apply = []
    for _ in range(20):
        sync(args.device)
        t = time.perf_counter()
        pruner.apply_masks()
        sync(args.device)
        apply.append(time.perf_counter() - t)
    # What the gradient hooks do during backward: one multiply of each masked gradient by its mask.
    pairs = [(t.param.grad, pruner.mask(t).to(t.param.dtype)) for t in pruner.targets if t.param.grad is not None]
    hooks = []
    for _ in range(5):
        sync(args.device)
        t = time.perf_counter()
        _ = [g * m for g, m in pairs]
        sync(args.device)
        hooks.append(time.perf_counter() - t)
    res = {"device": args.device, "threads": torch.get_num_threads(), "batch": args.batch,
           "grad_hooks_s": statistics.median(hooks),
           "plain_step_s": statistics.median(times[plain]), "masked_step_s": statistics.median(times[masked]),
           "apply_masks_s": statistics.median(apply)}
    res["step_ratio"] = res["masked_step_s"] / res["plain_step_s"]
    res["apply_masks_fraction"] = res["apply_masks_s"] / res["plain_step_s"]
    res["enforcement_fraction"] = (res["apply_masks_s"] + res["grad_hooks_s"]) / res["plain_step_s"]
    print(json.dumps(res, indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--enforcement", action="store_true", help="time mask enforcement in ResNet-50 training steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=None, help="--enforcement: also write the figures to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.enforcement:
        enforcement(args)
        return
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
