"""GSP pruning under DistributedDataParallel, on CPU (gloo) or GPUs (NCCL).

    torchrun --nproc-per-node 2 examples/ddp_prune.py            # CPU, gloo, a few seconds
    torchrun --nproc-per-node 8 examples/ddp_prune.py --cuda     # one GPU per rank, NCCL

A tiny CNN on synthetic data: dense warm-up, induced GSP (projection every few steps, target ramping up),
exact-zero masks, finetuning. Every rank checks at the end that the replicas are bit-identical.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import groupsparse.distributed as gd
from groupsparse.prune import Schedule


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuda", action="store_true", help="NCCL, one GPU per rank (LOCAL_RANK)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--strategy", default="auto", choices=gd.STRATEGIES)
    args = ap.parse_args()

    if args.cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # NCCL collectives run on the current device
        dist.init_process_group("nccl")
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's at wrap time)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, 10)).to(device)
    ddp = DDP(model, device_ids=[device.index] if args.cuda else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    sched = Schedule(args.sparsity, start=10, every=5, ramp="cubic", initial=0.3, ramp_steps=args.steps // 2)
    pruner = gd.DistributedGSPPruner(ddp, sched, strategy=args.strategy).attach(opt)

    g = torch.Generator().manual_seed(1234 + rank)  # each rank its own data shard
    teacher = torch.nn.Linear(3 * 8 * 8, 10)
    teacher.requires_grad_(False)
    for step in range(args.steps):
        x = torch.randn(32, 3, 8, 8, generator=g)
        y = teacher(x.flatten(1)).argmax(1)
        loss = nn.functional.cross_entropy(ddp(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if pruner.step(step) and rank == 0:
            sp = ", ".join(f"{s:.3f}" for s in pruner.history[-1]["sparsity"])
            print(f"step {step:3d}  loss {loss.item():.3f}  target {pruner.history[-1]['target']:.3f}  "
                  f"per-layer sparsity [{sp}]  projection {1e3 * pruner.last_time:.1f} ms", flush=True)
    pruner.finalize(zero_fraction=0.7)  # exact zeros from here on
    for step in range(10):
        x = torch.randn(32, 3, 8, 8, generator=g)
        loss = nn.functional.cross_entropy(ddp(x.to(device)), teacher(x.flatten(1)).argmax(1).to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    same = gd.replicas_identical(model)
    if rank == 0:
        print(f"world {world}: zero fraction {pruner.zero_fraction():.3f}, replicas identical: {same}")
    dist.barrier()  # gloo aborts a rank whose peer closes the connection while its last send is in flight
    dist.destroy_process_group()
    if not same:
        raise SystemExit("replicas diverged")


if __name__ == "__main__":
    main()
