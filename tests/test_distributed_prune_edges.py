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
