"""``project_groups``: several independent grouped projections in one call (one group at a time on the CPU, one
batched Newton loop over all groups for tensors on a GPU, ``_batched.solve_groups``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._api import _convert_back, _engine_for, _sub_group, eager_under_compile, project
from ._batched import solve_groups
from ._contract import _LARGEST, _check_solver_options, _margin, _precision
from ._group import as_group, grouped_target, is_tensor, validate_sparsity
from ._solver import ProjectionInfo

_BATCH_ON_CPU = False  # tests: the batched solve (the GPU's path) on CPU arrays too


@eager_under_compile
def project_groups(groups: Any, sparsity: Any, *, axis: int = 0, weights: Any = None, tol: float | None = None,
                   max_iter: int | None = None, engine: str = "auto", return_info: bool = False):
    """Several independent grouped projections in one call (e.g. every layer of a model, each its own group).

    ``groups`` is a list whose entries are what :func:`project` accepts (an N-D array/tensor with vectors along
    ``axis``, or a list of 1-D vectors and N-D blocks); ``sparsity`` is one target for all groups or one per
    group. The result equals ``[project(g, s) for g, s in zip(groups, sparsity)]`` (same tolerances, tie
    handling and early returns). On the CPU that is how it runs (a layer's repeated passes stay in cache, and
    small groups take the compiled paths); for tensors on a GPU all groups share every pass over the data and
    every kernel launch: one batched Newton over a vector of dual variables, each pass reading only the groups
    whose dual variable moved. Groups still unsettled after a few passes (a discontinuity from tied largest
    entries, or a hard case) are finished by the scalar solver, one by one.
    ``return_info=True`` adds a list of :class:`ProjectionInfo`, one per group.
    """
    if not isinstance(groups, (list, tuple)) or len(groups) == 0:
        n = len(groups) if isinstance(groups, (list, tuple)) else type(groups).__name__
        raise ValueError(f"groups: got {n}, expected a non-empty list of groups")
    G = len(groups)
    if isinstance(sparsity, (list, tuple, np.ndarray)):
        if len(sparsity) != G:
            raise ValueError(f"sparsity: got {len(sparsity)} targets, expected one per group ({G}) or a single float")
        targets = np.array([grouped_target(validate_sparsity(s)) for s in sparsity])
    else:
        targets = np.full(G, grouped_target(validate_sparsity(sparsity)))
    if weights is not None and (not isinstance(weights, (list, tuple)) or len(weights) != G):
        raise ValueError(f"weights: got {type(weights).__name__}, expected a list of {G} entries matching groups")
    blocks, wblocks, layout = [], [] if weights is not None else None, []
    for gi, grp in enumerate(groups):
        is_list = isinstance(grp, (list, tuple))
        bl = list(grp) if is_list else [grp]
        blocks += bl
        layout.append((len(bl), is_list))
        if weights is not None:
            wg = weights[gi]
            wl = list(wg) if isinstance(wg, (list, tuple)) else [wg]
            if len(wl) != len(bl):
                raise ValueError(f"weights[{gi}]: got {len(wl)} blocks, expected {len(bl)} (the group's structure)")
            wblocks += wl
    first = blocks[0] if blocks else None
    on_cuda = is_tensor(first) and first.device.type != "cpu"
    if not (on_cuda or _BATCH_ON_CPU):
        # On the CPU one group at a time is faster: a layer's repeated passes stay in cache, and small groups take
        # the compiled path. Batching pays where each pass costs kernel launches and host syncs (GPU).
        out = [project(grp, float(s), axis=axis, weights=None if weights is None else weights[gi], tol=tol,
                       max_iter=max_iter, engine=engine, return_info=True)
               for gi, (grp, s) in enumerate(zip(groups, targets))]
        results, infos = [r for r, _ in out], [i for _, i in out]
        return (results, infos) if return_info else results
    group = as_group(blocks, axis=axis, weights=wblocks)
    # each group keeps the precision contract of its own dtype, even when mixed dtypes are solved together
    precisions, i = [], 0
    for nb_, _ in layout:
        precisions.append(_precision([b.dtype for b in blocks[i : i + nb_]]))
        i += nb_
    tols = np.array([_check_solver_options(tol, max_iter, p)[0] for p in precisions])
    max_iter = _check_solver_options(tol, max_iter, precisions[0])[1]
    per_block = [1 if b.ndim == 1 else int(np.prod([d for k, d in enumerate(b.shape) if k != axis % b.ndim],
                                                    dtype=np.int64)) for b in blocks]
    vec_counts, i = [], 0
    for nb_, _ in layout:
        vec_counts.append(sum(per_block[i : i + nb_]))
        i += nb_
    if 0 in vec_counts:  # (each group on its own: ``project`` rejects an empty one; so does the batch)
        raise ValueError(f"groups[{vec_counts.index(0)}]: got an empty group, expected at least one vector")
    starts = np.zeros(G + 1, dtype=np.int64)
    np.cumsum(vec_counts, out=starts[1:])
    eng, back = _engine_for(group, engine)
    gid_h = np.repeat(np.arange(G, dtype=np.int64), vec_counts)
    gid = eng.from_host(gid_h)
    margins = np.array([_margin(_sub_group(group, starts, gi), p) for gi, p in enumerate(precisions)])
    flat, mu, S, iters, evals, jumped = solve_groups(eng, gid, starts, targets, margin=margins, tol=tols,
                                                     max_iter=max_iter)
    # groups the batch cannot promise the contract for go through ``project`` one by one: ties (jumped), half
    # precision (measured after rounding), float32 outputs that may be subnormal, and possible overflow
    bound = np.zeros(G)
    np.maximum.at(bound, gid_h, np.ldexp(eng.cnorm_host, eng.e_host))
    low = np.full(G, 10**6)
    np.minimum.at(low, gid_h, np.where(eng.to_host(eng.zero_mask), 10**6, eng.e_host))
    largest = np.array([_LARGEST.get(p, 0.0) for p in precisions])
    redo = jumped | (bound >= largest) | np.array([p not in ("float64", "float32") for p in precisions])
    redo |= np.array([p == "float32" for p in precisions]) & (low < -96)
    redo |= np.array([p == "float64" for p in precisions]) & (low < -956)  # outputs that may be subnormal
    parts = group.rebuild(_convert_back(flat, back))
    results, infos, i = [], [], 0
    counts = np.diff(starts)
    for gi, (nb_, is_list) in enumerate(layout):
        res = parts[i : i + nb_] if is_list else parts[i]
        i += nb_
        if redo[gi]:
            res, info = project(groups[gi], float(targets[gi]), axis=axis,
                                weights=None if weights is None else weights[gi], tol=tols[gi], max_iter=max_iter,
                                engine=engine, return_info=True)
        else:
            info = ProjectionInfo(mu=float(mu[gi]), iterations=iters, evaluations=evals,
                                  sparsity=float(S[gi] / counts[gi]), target=float(targets[gi]),
                                  discontinuity=False, converged=True, engine=eng.name,
                                  n_vectors=int(counts[gi]), already_sparse=bool(mu[gi] == 0.0))
        results.append(res)
        infos.append(info)
    return (results, infos) if return_info else results
