"""Cost of one GSP pruning step on replicated (DDP) weights: replicated vs owner vs sharded projection.

    torchrun --nproc-per-node 2 examples/ddp_bench.py [--repeats 5]

Weights are random float32 tensors with the shapes of ResNet-20 (CIFAR) and ResNet-50 (ImageNet) conv/linear
layers, the same on every rank. Times are the slowest rank's, min and median over repeats after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist

import groupsparse.distributed as gd


def resnet20_shapes():
    shapes, cin = [(16, 3, 3, 3)], 16
    for planes in (16, 32, 64):
        for b in range(3):
            shapes += [(planes, cin, 3, 3), (planes, planes, 3, 3)]
            cin = planes
    return shapes + [(10, 64)]


def resnet50_shapes():
    shapes, inplanes = [(64, 3, 7, 7)], 64
    for planes, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes, planes, 3, 3), (planes * 4, planes, 1, 1)]
            if b == 0:
                shapes.append((planes * 4, inplanes, 1, 1))
            inplanes = planes * 4
    return shapes + [(1000, 2048)]


def timed(fn, repeats):
    out = []
    for i in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        infos = fn()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        if i:  # the first run loads the Numba kernels
            out.append(float(dt))
    return (min(out), statistics.median(out)), infos


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--models", default="ResNet-20,ResNet-50")
    ap.add_argument("--scopes", default="layer,model")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # the distributed projection's per-evaluation cost on top of the local work: one all_gather of 2 floats
    comm = gd.TorchDistComm()
    t, _ = timed(lambda: [comm.sum(np.zeros(2)) for _ in range(100)], args.repeats)
    if rank == 0:
        print(f"one 2-float all_gather (the per-evaluation collective): min {1e4 * t[0]:.0f} us  "
              f"median {1e4 * t[1]:.0f} us", flush=True)
    for name, shapes in (("ResNet-20", resnet20_shapes()), ("ResNet-50", resnet50_shapes())):
        if name not in args.models.split(","):
            continue
        g = torch.Generator().manual_seed(0)
        base = [torch.randn(s, generator=g) * (2.0 / (s[1] * (s[2] * s[3] if len(s) == 4 else 1))) ** 0.5
                for s in shapes]
        n = sum(w.numel() for w in base)
        for scope, strategies in (("layer", ("replicated", "owner", "sharded")), ("model", ("replicated", "sharded"))):
            if scope not in args.scopes.split(","):
                continue
            normalize = "vector" if scope == "model" else None
            for strategy in strategies:
                ws = [w.clone() for w in base]

                def run():
                    for w, b in zip(ws, base):
                        w.copy_(b)
                    return gd.project_params_(ws, args.sparsity, scope=scope, normalize=normalize, strategy=strategy)

                t, infos = timed(run, args.repeats)
                assert gd.replicas_identical(ws)
                evals = sum(i.evaluations for i in infos)
                coll = sum(getattr(i, "collectives", 0) for i in infos) if strategy == "sharded" else 0
                if strategy == "sharded":
                    coll += len(infos)  # the all_gather of the results, per projection group
                elif strategy == "owner":
                    coll = 2  # results and infos
                if rank == 0:
                    print(f"{name:9s} {len(shapes):3d} tensors {n / 1e6:6.2f}M  scope={scope:5s} {strategy:10s} "
                          f"min {1e3 * t[0]:8.1f} ms  median {1e3 * t[1]:8.1f} ms  evaluations {evals:4d}  "
                          f"collectives {coll:4d}", flush=True)
        flat = torch.cat([w.reshape(-1) for w in base])
        mine = flat[rank * (n // world) : (rank + 1) * (n // world)].clone()
        parts = [torch.empty_like(mine) for _ in range(world)]
        t, _ = timed(lambda: dist.all_gather(parts, mine), args.repeats)
        if rank == 0:
            print(f"{name:9s} all_gather of the weights alone ({4 * n / 1e6:.1f} MB): min {1e3 * t[0]:.1f} ms  "
                  f"median {1e3 * t[1]:.1f} ms", flush=True)
    dist.barrier()  # gloo aborts a rank whose peer closes the connection while its last send is in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
