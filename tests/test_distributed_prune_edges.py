"""Edge cases of distributed pruning: errors agreed across ranks (no rank left in a collective), normalize in layer
scope against the single-process projection, FSDP2 layers stored (in, out), and what replicas_identical compares.

Each test spawns one small gloo group (helpers from test_distributed.py). A rank that hangs in a collective makes
the test fail at run_group's deadline instead of passing.
"""

from __future__ import annotations

import pytest
import torch
from test_distributed import _close, _small_cnn, _weights, run_group

import groupsparse.distributed as gd

HANG_S = 90  # generous on a loaded 2-core box; a hang waits for the process group's 30-min timeout


def _agreed_error_cases(rank, world):
    # owner: ws[0] (largest) goes to rank 0, ws[1] to rank 1, ws[2] to rank 2; a NaN in one tensor is seen only by
    # its owner's projection. Every rank must raise, none may wait in the all_gather of the results.
    assert gd.assign_owners([80, 24, 12], world) == [0, 1, 2]
    for bad in range(world):
        for strategy in ("owner", "sharded", "replicated"):
            torch.manual_seed(0)
            ws = [torch.randn(8, 10), torch.randn(4, 6), torch.randn(3, 4)]
            ws[bad][1, 1] = float("nan")
            with pytest.raises(ValueError, match="NaN"):
                gd.project_params_(ws, 0.6, strategy=strategy)
    # ranks called with different tensors (here the shape of one replica differs) raise everywhere too
    for strategy in ("owner", "sharded"):
        ws = [torch.randn(8, 10), torch.randn(4 + (rank == 1), 6)]
        with pytest.raises(ValueError, match="across ranks"):
            gd.project_params_(ws, 0.6, strategy=strategy)
    # the group is still in step after the errors
    ws = _weights(_small_cnn())
    gd.project_params_(ws, 0.6, strategy="owner")
    assert gd.replicas_identical(ws)


def test_owner_error_raised_on_every_rank_3_ranks(tmp_path):
    run_group(3, _agreed_error_cases, tmp_path, timeout=HANG_S)


def _layer_normalize_cases(rank, world):
    from torch.distributed.fsdp import fully_shard

    from groupsparse.prune import GSPPruner, project_tensors

    # layer scope with normalize: every strategy equals the single-process project_tensors (it raised at the
    # first project(), although GSPPruner and project_tensors take it)
    for normalize in ("vector", "layer"):
        for vectors in ("filter", "fan_out"):
            ref, ref_infos = project_tensors(_weights(_small_cnn()), 0.7, vectors=vectors, normalize=normalize)
            for strategy in ("replicated", "owner", "sharded"):
                ws = _weights(_small_cnn())
                infos = gd.project_params_(ws, 0.7, vectors=vectors, normalize=normalize, strategy=strategy)
                exact = strategy != "sharded"  # the same single-process computation
                for w, r in zip(ws, ref):
                    assert torch.equal(w, r) if exact else _close(w, r, 1e-5), (normalize, vectors, strategy)
                assert [i.n_vectors for i in infos] == [i.n_vectors for i in ref_infos]
        a, b = _small_cnn(), _small_cnn()
        gd.DistributedGSPPruner(a, 0.7, normalize=normalize).project()
        GSPPruner(b, 0.7, normalize=normalize).project()
        assert all(torch.equal(p, q) for p, q in zip(_weights(a), _weights(b))), normalize
        # FSDP2 shards (uneven: 8, 12 and 10 rows over 2 ranks)
        for vectors in ("filter", "kernel"):
            pick = slice(0, 2) if vectors == "kernel" else slice(None)
            ref, _ = project_tensors(_weights(_small_cnn())[pick], 0.7, vectors=vectors, normalize=normalize)
            model = _small_cnn()
            for m in model:
                if hasattr(m, "weight"):
                    fully_shard(m)
            ws = _weights(model)[pick]
            gd.project_params_(ws, 0.7, vectors=vectors, normalize=normalize)
            assert all(_close(w.full_tensor(), r, 1e-5) for w, r in zip(ws, ref)), (normalize, vectors)


def test_layer_scope_normalize_matches_project_tensors_2_ranks(tmp_path):
    run_group(2, _layer_normalize_cases, tmp_path, timeout=HANG_S * 2)


def _fsdp_transposed_cases(rank, world):
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    # FSDP2 + a layer stored (in, out): the message said "expected (Shard(dim=0),) ... plain FSDP2 fully_shard",
    # which the user had used; now it names the layer and what is supported, at construction
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ConvTranspose2d(6, 4, 3))
    for m in model:
        fully_shard(m)
    with pytest.raises(ValueError, match=r"stored \(in, out\).*1\.weight \(\w*ConvTranspose2d\).*exclude"):
        gd.DistributedGSPPruner(model, 0.6)
    gd.DistributedGSPPruner(model, 0.6, exclude="1.*").project()  # the rest still prunes
    # project_params_ given the transposed view says the same
    with pytest.raises(ValueError, match=r"ConvTranspose.*not supported under FSDP2"):
        gd.project_params_([model[1].weight.transpose(0, 1)], 0.6)


def test_fsdp_transposed_layer_message_2_ranks(tmp_path):
    run_group(2, _fsdp_transposed_cases, tmp_path, timeout=HANG_S)


def _replica_buffers_cases(rank, world):
    from torch import nn

    # replicas_identical compares buffers too (BatchNorm statistics, masks); buffers=False: parameters only
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert gd.replicas_identical(net)
    net[1].running_mean += rank  # e.g. after a DDP forward on each rank's own batch
    assert not gd.replicas_identical(net)
    assert gd.replicas_identical(net, buffers=False)
    assert gd.replicas_identical(list(net.parameters()))
    with pytest.raises(TypeError, match="buffers"):
        gd.replicas_identical(net, buffers="no")


def test_replicas_identical_compares_buffers_2_ranks(tmp_path):
    run_group(2, _replica_buffers_cases, tmp_path, timeout=HANG_S)


def _model_transposed_cases(rank, world):
    from torch import nn

    from groupsparse.prune import GSPPruner

    # project_model_ cuts a layer stored (in, out) in its (out, in) view, as GSPPruner (it took the stored rows,
    # so "filter" acted as "fan_out" on ConvTranspose/Conv1D)
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ConvTranspose2d(6, 4, 3))

    for strategy in ("replicated", "owner", "sharded"):
        a, b = net(), net()
        gd.project_model_(a, 0.6, strategy=strategy)
        GSPPruner(b, 0.6).project()
        assert all(_close(p, q, 1e-5) for p, q in zip(a.parameters(), b.parameters())), strategy


def test_project_model_transposed_layout_2_ranks(tmp_path):
    run_group(2, _model_transposed_cases, tmp_path, timeout=HANG_S)
