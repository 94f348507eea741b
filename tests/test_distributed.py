"""groupsparse.distributed against the single-process projection, on gloo process groups spawned on loopback.

Each test spawns one small process group and runs many cases in it (start-up dominates on a shared 2-core box).
Every rank builds the whole group from a seed, keeps its own slice, and compares its part of the distributed
result with its part of ``groupsparse.project`` of the whole group.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import groupsparse
import groupsparse.distributed as gd

# a hard limit against hangs, not a speed bound: on the shared 2-core box under load the 2-rank pruning cases took
# 130 s (idle: well under a minute)
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, errdir, backend="gloo"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        try:
            fn(rank, world)
            dist.barrier()  # no rank tears down while a peer's last send is in flight (gloo aborts then)
        finally:
            dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(errdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    # every check passed and the group is destroyed: leave without the interpreter's finalization, where gloo's
    # worker threads can still be joinable and abort the process ("terminate called without an active exception",
    # SIGABRT after a passing test, once in a CI run of test_layer_scope_normalize_matches_project_tensors_2_ranks)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_group(world: int, fn, tmp_path, timeout: float = TIMEOUT_S, backend: str = "gloo"):
    """Run ``fn(rank, world)`` on ``world`` spawned ranks; fail with the children's tracebacks."""
    ctx = mp.start_processes(_entry, args=(world, _free_port(), fn, str(tmp_path), backend), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                pytest.fail(f"process group of {world} did not finish within {timeout} s")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        errs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("rank*.err")))
        pytest.fail(f"a rank failed ({type(e).__name__}: {e}):\n{errs}")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


# ---------------------------------------------------------------- helpers used inside the ranks


def _split(items, world, counts=None):
    """Contiguous shares in rank order (``counts`` fixes them, zeros allowed)."""
    if counts is None:
        bounds = np.linspace(0, len(items), world + 1).round().astype(int)
    else:
        bounds = np.concatenate([[0], np.cumsum(counts)])
    return [items[bounds[i] : bounds[i + 1]] for i in range(world)]


def _close(a, b, rel=1e-9):
    a = a.detach().double() if torch.is_tensor(a) else torch.as_tensor(a, dtype=torch.float64)
    b = b.detach().double() if torch.is_tensor(b) else torch.as_tensor(b, dtype=torch.float64)
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1e-300)
    return float((a - b).abs().max()) <= rel * scale if a.numel() else True


def _check_case(rank, world, name, vecs, s, weights=None, counts=None, rel=1e-9, measured=False, **kw):
    ref, ref_info = groupsparse.project(vecs, s, weights=weights, return_info=True, **kw)
    mine = _split(vecs, world, counts)[rank]
    wmine = _split(weights, world, counts)[rank] if weights is not None else None
    got, info = gd.project(mine, s, weights=wmine, return_info=True, **kw)
    want = _split(ref, world, counts)[rank]
    assert len(got) == len(want), (name, len(got), len(want))
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, (name, i)
        assert _close(a, b, rel), (name, rank, i, float((a.double() - b.double()).abs().max()))
    assert info.already_sparse == ref_info.already_sparse, name
    assert info.discontinuity == ref_info.discontinuity, name
    assert info.n_jumped == ref_info.n_jumped, (name, info.n_jumped, ref_info.n_jumped)
    assert info.n_vectors == ref_info.n_vectors, name
    assert abs(info.sparsity - ref_info.sparsity) <= 1e-9, (name, info.sparsity, ref_info.sparsity)
    # validation 1 + constants 2 + one per evaluation + up to 2 for a jump (1 when no rank has a jumper)
    extra = info.collectives - 3 - info.evaluations
    assert measured or extra == 0 or (info.discontinuity and extra in (1, 2)), (name, info.collectives, info.evaluations)
    return info


def _projection_cases(rank, world):
    g = torch.Generator().manual_seed(0)
    ragged = [torch.randn(int(n), generator=g, dtype=torch.float64) for n in torch.randint(2, 60, (23,), generator=g)]
    _check_case(rank, world, "ragged", ragged, 0.7)
    _check_case(rank, world, "ragged-s0.2", ragged, 0.2)
    _check_case(rank, world, "ragged-s1", ragged, 1.0)
    _check_case(rank, world, "ragged-torch-engine", ragged, 0.6, engine="torch")
    weights = [torch.rand(v.shape[0], generator=g, dtype=torch.float64) + 0.1 for v in ragged]
    _check_case(rank, world, "weighted", ragged, 0.65, weights=weights)
    _check_case(rank, world, "weighted-torch", ragged, 0.65, weights=weights, engine="torch")
    # already sparse: one nonzero per vector except a couple
    sparse = [torch.zeros(10, dtype=torch.float64).index_fill_(0, torch.tensor([i % 10]), 1.0 + i) for i in range(9)]
    info = _check_case(rank, world, "already-sparse", sparse, 0.5)
    assert info.already_sparse
    # ties: identical vectors (two equal largest entries) with random signs; the jumpers straddle ranks
    base = torch.tensor([1.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    signs = torch.where(torch.rand(12, 4, generator=g) < 0.5, -1.0, 1.0).double()
    tied = [base * signs[i] for i in range(12)]
    info = _check_case(rank, world, "ties", tied, 0.8)
    assert info.discontinuity and 0 < info.n_jumped < 12
    pm = [torch.where(torch.rand(6, generator=g) < 0.5, -2.0, 2.0).double() for _ in range(10)]  # +-c vectors
    _check_case(rank, world, "+-c", pm, 0.5)
    # empty ranks: every vector on the last rank, then on the first
    counts = [0] * (world - 1) + [len(ragged)]
    _check_case(rank, world, "empty-ranks-a", ragged, 0.7, counts=counts)
    _check_case(rank, world, "empty-ranks-b", ragged, 0.7, weights=weights, counts=counts[::-1])
    _check_case(rank, world, "empty-ties", tied, 0.8, counts=[12] + [0] * (world - 1))
    # float32 (target s + 2e-7 as in project) and a float32/float64 mix (the group is computed in float64)
    r32 = [v.float() for v in ragged]
    _check_case(rank, world, "float32", r32, 0.7, rel=1e-5)
    mixed = [v.float() if i % 2 else v for i, v in enumerate(ragged)]
    _check_case(rank, world, "mixed-dtype", mixed, 0.7, rel=1e-6)
    # half precision, alone and beside float32/float64: project's measured contract across ranks (it aimed by the
    # provable margin and came back 2-10 % apart from project)
    for name, conv in (("float16", lambda i, v: v.half()), ("bfloat16", lambda i, v: v.bfloat16()),
                       ("f16-f32", lambda i, v: v.half() if i % 2 else v.float()),
                       ("bf16-f64", lambda i, v: v.bfloat16() if i % 3 == 0 else v)):
        _check_case(rank, world, name, [conv(i, v) for i, v in enumerate(ragged)], 0.7, rel=1e-12, measured=True)
    # a result past the dtype's range raises on every rank (float16 came back as inf)
    big = [torch.tensor([6e4] + [5e4] * 50, dtype=torch.float16) for _ in range(world)]
    with pytest.raises(ValueError, match="beyond the largest finite float16"):
        gd.project(_split(big, world)[rank], 0.3)
    # numpy inputs go through the same path
    _check_case(rank, world, "numpy", [v.numpy() for v in ragged], 0.7)

    # random splits (empty ranks included), targets and weights; the same draws on every rank
    rng = np.random.default_rng(5)
    for case in range(8):
        n_vec = int(rng.integers(1, 30))
        vecs = [torch.from_numpy(rng.standard_normal(int(rng.integers(2, 40)))) for _ in range(n_vec)]
        if case % 3 == 0:  # quantized entries: ties inside and across vectors
            vecs = [torch.round(v * 2) / 2 + (v == 0) * 0.5 for v in vecs]
        w = [torch.from_numpy(rng.uniform(0.2, 2.0, v.shape[0])) for v in vecs] if case % 2 else None
        counts = rng.multinomial(n_vec, np.ones(world) / world)
        _check_case(rank, world, f"random-{case}", vecs, float(rng.uniform(0.05, 0.95)), weights=w, counts=counts)

    # the exponent dimension: each vector at its own scale anywhere from near-subnormal to 1e300, entries spread
    # over binades inside a vector, mixed in one group and split over the ranks (empty ones included); float32
    # groups over float32's range; ties sometimes. Each vector is compared in its own units (``_check_case``).
    for case in range(12):
        n_vec = int(rng.integers(1, 20))
        f32 = case % 4 == 3
        lo, hi = (-120, 100) if f32 else (-1000, 990)
        vecs = []
        for _ in range(n_vec):
            v = rng.standard_normal(int(rng.integers(2, 30))) * 2.0 ** rng.integers(-12, 13, 1)
            if case % 3 == 1:  # ties: few magnitudes
                v = np.round(v * 2) / 2 + (v == 0) * 0.5
            v = torch.from_numpy(v * 2.0 ** int(rng.integers(lo, hi)))
            vecs.append(v.float() if f32 else v)
        w = [torch.from_numpy(rng.uniform(0.2, 2.0, v.shape[0])) for v in vecs] if case % 5 == 2 else None
        counts = rng.multinomial(n_vec, np.ones(world) / world)
        _check_case(rank, world, f"exponents-{case}", vecs, float(rng.uniform(0.05, 0.95)), weights=w, counts=counts,
                    rel=1e-5 if f32 else 1e-9, measured=True)

    # one matrix per rank (columns are vectors, axis=0), compared with project of the concatenated columns
    mats = [torch.randn(8, 5 + r, generator=g, dtype=torch.float64) for r in range(world)]
    full = torch.cat(mats, dim=1)
    ref = groupsparse.project(full, 0.6)
    got = gd.project(mats[rank], 0.6)
    start = sum(m.shape[1] for m in mats[:rank])
    assert _close(got, ref[:, start : start + mats[rank].shape[1]])
    # rows as vectors on one rank, an empty (0, 8) tensor on another
    rows = torch.randn(7, 8, generator=g, dtype=torch.float64)
    mine = rows if rank == 0 else rows[:0]
    got = gd.project(mine, 0.6, axis=1)
    assert got.shape == mine.shape
    if rank == 0:
        assert _close(got, groupsparse.project(rows, 0.6, axis=1))

    # errors are raised on every rank, not only where the input is bad (the others would hang)
    bad = [v.clone() for v in _split(ragged, world)[rank]]
    if rank == world - 1:
        bad[0][0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gd.project(bad, 0.5)
    with pytest.raises(ValueError, match="different values across ranks"):
        gd.project(_split(ragged, world)[rank], 0.5 + 0.1 * (rank == 0))
    with pytest.raises(ValueError, match="no vectors on any"):
        gd.project([], 0.5)
    with pytest.raises(ValueError, match="weights on some ranks"):
        mine = _split(ragged, world)[rank]
        gd.project(mine, 0.5, weights=[torch.ones_like(v) for v in mine] if rank == 0 else None)
    with pytest.raises(TypeError, match="floating dtype"):
        mine = _split(ragged, world)[rank]
        gd.project([v.long() for v in mine] if rank == 1 else mine, 0.5)
    # the group is still usable after the errors
    _check_case(rank, world, "after-errors", ragged, 0.7)


def test_projection_matches_single_process_3_ranks(tmp_path):
    run_group(3, _projection_cases, tmp_path)


# ---------------------------------------------------------------- pruning under DDP and FSDP2


def _small_cnn():
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48, 10))


def _weights(model):
    return [m.weight for m in model if hasattr(m, "weight")]


def _prune_cases(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from groupsparse.prune import GSPPruner, project_tensors

    # strategies on replicated weights against the single-process projection of the same tensors
    for scope, normalize, strategies in (("layer", None, ("replicated", "owner", "sharded")),
                                         ("model", "vector", ("replicated", "sharded")),
                                         ("model", "layer", ("sharded",))):
        for vectors in ("filter", "fan_out"):
            ref, ref_infos = project_tensors(_weights(_small_cnn()), 0.7, vectors=vectors, scope=scope,
                                             normalize=normalize)
            for strategy in strategies:
                ws = _weights(_small_cnn())
                infos = gd.project_params_(ws, 0.7, vectors=vectors, scope=scope, normalize=normalize,
                                           strategy=strategy)
                assert gd.replicas_identical(ws)
                exact = strategy in ("replicated", "owner")  # the same single-process computation
                for w, r in zip(ws, ref):
                    assert torch.equal(w, r) if exact else _close(w, r, 1e-5), (scope, vectors, strategy)
                for a, b in zip(infos, ref_infos):
                    assert abs(a.sparsity - b.sparsity) < 1e-6 and a.n_vectors == b.n_vectors
    with pytest.raises(ValueError, match="strategy"):
        gd.project_params_(_weights(_small_cnn()), 0.7, scope="model", strategy="owner")
    # layers of different dtypes in one sharded group: every rank gathers one dtype (gloo aborted on bf16 + f32,
    # float64 + float32 read float32 bytes as float64), and the result is project_tensors'
    for dt in (torch.float64, torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        a, b = torch.randn(12, 16).to(dt), torch.randn(4, 16)
        ref, _ = project_tensors([a.clone(), b.clone()], 0.6, scope="model")
        got = [a.clone(), b.clone()]
        gd.project_params_(got, 0.6, scope="model", strategy="sharded")
        rel = 1e-6 if dt == torch.float64 else 1e-2  # (sums in another order: a half ulp may round the other way)
        assert all(g_.dtype == r.dtype and _close(g_, r, rel) for g_, r in zip(got, ref)), dt
    scalar = torch.nn.Module()
    scalar.fc, scalar.t = torch.nn.Linear(4, 4), torch.nn.Parameter(torch.tensor(1.0))  # a 0-dim parameter
    assert gd.replicas_identical(scalar)

    assert gd.project_params_(_weights(_small_cnn()), 0.5, strategy="auto")[0].engine == "numba"  # gloo: local
    # DDP training with the pruner projecting every step; ranks see different data, replicas must stay equal
    model = DDP(_small_cnn())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = gd.DistributedGSPPruner(model, 0.6, strategy="owner").attach(opt)
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(4):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert pruner.step()
        assert gd.replicas_identical(model)
        assert all(i.sparsity >= 0.6 - 1e-6 for i in pruner.last_info)
    pruner.finalize(zero_fraction=0.8)
    for step in range(2):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert gd.replicas_identical(model)
    zeros = sum(int((p == 0).sum()) for p in pruner.params)
    assert zeros == round(0.8 * sum(p.numel() for p in pruner.params))
    a, b = _small_cnn(), _small_cnn()
    infos = gd.project_model_(DDP(a), 0.5, strategy="owner", include="*.weight")
    ref, _ = project_tensors(_weights(b), 0.5)
    assert len(infos) == 3 and all(torch.equal(p, q) for p, q in zip(_weights(a), ref))
    # a sharded-strategy pruner on the same replicas agrees with the single-process GSPPruner
    a, b = _small_cnn(), _small_cnn()
    gd.DistributedGSPPruner(DDP(a), 0.5, strategy="sharded").project()
    GSPPruner(b, 0.5).project()
    assert all(_close(p, q, 1e-5) for p, q in zip(_weights(a), _weights(b)))

    # FSDP2: weights sharded on dim 0 (uneven: 8, 12 and 10 rows over the ranks), projected shard by shard
    from torch.distributed.fsdp import fully_shard

    for vectors, scope, normalize in (("filter", "layer", None), ("kernel", "layer", None),
                                      ("filter", "model", "layer"), ("filter", "model", "vector")):
        pick = slice(0, 2) if vectors == "kernel" else slice(None)  # kernel vectors: conv weights only
        ref, _ = project_tensors(_weights(_small_cnn())[pick], 0.7, vectors=vectors, scope=scope, normalize=normalize)
        model = _small_cnn()
        for m in model:
            if hasattr(m, "weight"):
                fully_shard(m)
        fully_shard(model)
        ws = _weights(model)[pick]
        infos = gd.project_params_(ws, 0.7, vectors=vectors, scope=scope, normalize=normalize)
        for w, r in zip(ws, ref):
            assert _close(w.full_tensor(), r, 1e-5), (vectors, scope, normalize)
        assert all(i.sparsity >= 0.7 - 1e-6 for i in infos)
        # and the model still trains after the in-place write into the shards
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    # a rank whose shard is empty (2 rows over 2 ranks of a 3-rank job; here 1 row over 2 ranks) holds no vectors
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 3), torch.nn.Linear(5, 1))
    torch.manual_seed(1)
    ref, _ = project_tensors([m.weight.detach().clone() for m in tiny], 0.5)
    for m in tiny:
        fully_shard(m)
    gd.project_params_([m.weight for m in tiny], 0.5)
    assert all(_close(m.weight.full_tensor(), r, 1e-6) for m, r in zip(tiny, ref))
    with pytest.raises(ValueError, match="fan_out"):
        gd.project_params_(ws, 0.7, vectors="fan_out")


def test_pruning_ddp_and_fsdp2_2_ranks(tmp_path):
    run_group(2, _prune_cases, tmp_path)


# ---------------------------------------------------------------- CUDA: NCCL buffers on the GPU, CUDA vectors over gloo


def _cuda_cases(rank, world):
    backend = dist.get_backend()
    assert gd.collective_device().type == ("cuda" if backend == "nccl" else "cpu")
    g = torch.Generator().manual_seed(3)
    ragged = [torch.randn(int(n), generator=g, dtype=torch.float64).cuda()
              for n in torch.randint(2, 300, (40,), generator=g)]
    weights = [torch.rand(v.shape[0], generator=g, dtype=torch.float64).cuda() + 0.1 for v in ragged]
    tied = [torch.tensor([1.0, -1.0, 0.5, 0.5], dtype=torch.float64).cuda() for _ in range(12)]
    _check_case(rank, world, "cuda-ragged", ragged, 0.7)
    _check_case(rank, world, "cuda-weighted", ragged, 0.7, weights=weights)
    _check_case(rank, world, "cuda-ties", tied, 0.8)
    _check_case(rank, world, "cuda-float32", [v.float() for v in ragged], 0.7, rel=1e-5)
    for strategy in ("owner", "sharded", "replicated"):
        ws = [w.cuda() for w in _weights(_small_cnn())]
        gd.project_params_(ws, 0.7, strategy=strategy)
        assert gd.replicas_identical(ws)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_vectors_nccl_and_gloo(tmp_path):
    # NCCL needs one GPU per rank: as many ranks as GPUs (one is enough to check where the buffers live)
    world = min(torch.cuda.device_count(), 2)
    (tmp_path / "nccl").mkdir()
    run_group(world, _cuda_cases, tmp_path / "nccl", backend="nccl")
    (tmp_path / "gloo").mkdir()
    run_group(2, _cuda_cases, tmp_path / "gloo")  # CUDA tensors, collectives over gloo on CPU buffers
