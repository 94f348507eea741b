"""GSP pruning of an FSDP2 (``fully_shard``) model: each rank projects its own rows, no weight is gathered.

    torchrun --nproc-per-node 2 examples/fsdp_prune.py           # CPU, gloo
    torchrun --nproc-per-node 8 examples/fsdp_prune.py --cuda    # one GPU per rank, NCCL

FSDP2 shards every parameter on dim 0, so a rank holds whole output rows ("filter" vectors) of each weight.
The grouped projection of a layer needs only one scalar per evaluation from every rank (the dual variable is
shared), so ``groupsparse.distributed`` projects the shards in place and the result equals the projection of
the full, unsharded weights.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import groupsparse
import groupsparse.distributed as gd
from groupsparse.prune import Schedule


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--sparsity", type=float, default=0.8)
    args = ap.parse_args()
    if args.cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    rank = dist.get_rank()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 10)).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = gd.DistributedGSPPruner(model, Schedule(args.sparsity, start=5, every=5), vectors="filter")

    g = torch.Generator().manual_seed(7 + rank)
    for step in range(args.steps):
        x = torch.randn(32, 64, generator=g).to(device)
        loss = (model(x) - x[:, :10]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if pruner.step(step) and rank == 0:
            sp = [round(s, 4) for s in pruner.history[-1]["sparsity"]]
            print(f"step {step:3d}  loss {loss.item():.4f}  sparsity {sp}", flush=True)
    # the sharded result is the projection of the full weights: check one layer against a single-process run
    w = model[2].weight
    before = w.detach().full_tensor()
    gd.project_params_([w], 0.9)
    ref = groupsparse.project(before, 0.9, axis=1)
    err = float((w.detach().full_tensor() - ref).abs().max() / ref.abs().max())
    local_rows = tuple(w.to_local().shape)
    if rank == 0:
        print(f"local shard {local_rows} of {tuple(w.shape)}; sharded vs single-process projection: max rel diff "
              f"{err:.2e}")
    dist.barrier()  # gloo aborts a rank whose peer closes the connection while its last send is in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
