"""GSP projection of FSDP2 (``fully_shard``) parameters: DTensors sharded on dim 0 over a 1-D mesh.

The local shard holds whole rows of the weight, so vectors that lie inside a row (``"filter"``: the whole fan-in
row; ``"kernel"``: one k x k kernel) are projected in place with the distributed projection over the mesh's
process group, with no gathering of weights. ``"fan_out"`` and ``"layer"`` vectors cross the shard boundary and
are rejected.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..prune.vectors import scale_factors
from ._project import TorchDistComm
from ._project import project as dist_project

FSDP_MODES = ("filter", "kernel")

try:  # DTensor is public from torch 2.4 on; older torch has no FSDP2 either
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor, Shard = (), ()


def _is_dtensor(t) -> bool:
    return bool(DTensor) and isinstance(t, DTensor)


def _shard_group(p):
    mesh = p.device_mesh
    if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        # Shard(1) on a 1-D mesh is what plain fully_shard gives the (out, in) view of a weight stored (in, out):
        # say so, or the user is told to use the fully_shard they did use
        hint = (": the (out, in) view of a weight stored (in, out) (ConvTranspose*, GPT-2 Conv1D), whose vectors "
                "cross the FSDP2 shards; such layers are not supported under FSDP2, leave them out of the selection"
                if mesh.ndim == 1 and tuple(p.placements) == (Shard(1),) else " (plain FSDP2 fully_shard)")
        raise ValueError(f"parameter: got a DTensor with placements {tuple(p.placements)} on a {mesh.ndim}-D mesh, "
                         f"expected (Shard(dim=0),) on a 1-D mesh{hint}")
    return mesh.get_group()


def _local_rows(p, vectors):
    """The local shard as a matrix of whole vectors (a view: writing it writes the shard)."""
    local = p.to_local()
    if vectors == "filter":
        return local, local.reshape(local.shape[0], math.prod(local.shape[1:]))  # (-1 fails on an empty shard)
    k = int(np.prod(local.shape[2:]))
    return local, local.reshape(-1, k)


def _scales(mats, normalize, group):
    """Per-row divisors of local shards, as :func:`~groupsparse.prune.vectors.scale_factors` of the full tensors."""
    if normalize != "layer":
        return scale_factors(mats, normalize)  # per row: a row lies in one shard
    # the RMS row norm of a tensor spans all its shards: sum squares and counts over the group (1 collective)
    loc = []
    for m in mats:
        norms = torch.linalg.vector_norm(m.double(), dim=1)
        loc += [float((norms * norms).sum()), float(m.shape[0])]
    tot = TorchDistComm(group).sum(np.array(loc)).reshape(-1, 2)
    scales = []
    for m, (ss, cnt) in zip(mats, tot):
        rms = float(np.sqrt(ss / cnt)) if cnt else 1.0
        scales.append(torch.full((m.shape[0], 1), rms if rms > 0 else 1.0, dtype=m.dtype, device=m.device))
    return scales


def _project_fsdp_(params, s, *, vectors, scope, normalize, kw):
    if vectors not in FSDP_MODES:
        raise ValueError(f"vectors: got {vectors!r} for FSDP-sharded weights, expected one of {FSDP_MODES} "
                         "(vectors inside a row of dim 0; 'fan_out'/'layer' vectors cross the shards)")
    groups = [_shard_group(p) for p in params]
    mats = [_local_rows(p, vectors) for p in params]
    if scope == "layer":
        infos = []
        for (local, m), g in zip(mats, groups):
            f = _scales([m], normalize, g)[0]
            res, info = dist_project(m if f is None else m / f, s, axis=1, group=g, return_info=True, **kw)
            m.copy_(res if f is None else res * f)
            infos.append(info)
        return infos
    g = groups[0]
    if any(x is not g and x != g for x in groups[1:]):
        raise ValueError("parameters: got FSDP shards over different process groups, expected one group for "
                         "scope='model'")
    scales = _scales([m for _, m in mats], normalize, g)
    rows = [row for (_, m), f in zip(mats, scales) for row in (m if f is None else m / f).unbind(0)]
    res, info = dist_project(rows, s, group=g, return_info=True, **kw)
    i = 0
    for (_, m), f in zip(mats, scales):
        if m.shape[0]:
            block = torch.stack(res[i : i + m.shape[0]])
            m.copy_(block if f is None else block * f)
        i += m.shape[0]
    return [info]
