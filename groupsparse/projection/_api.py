"""Public entry points of the projection: ``project``, ``project_`` and ``project_each``."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from ._group import Group, NeedsRescale, as_group, is_tensor, validate_sparsity
from ._solver import ProjectionInfo, solve_each, solve_shared

ENGINES = ("auto", "numba", "torch")
# The result is checked in the input's dtype, so aim a little inside the feasible side for float32: rounding the
# output to float32 moves its measured sparsity by ~1e-7.
_TOL = {"float64": 1e-12, "float32": 5e-7, "float16": 5e-5, "bfloat16": 5e-4}
# Results are judged in their own dtype, so aim inside the feasible side by more than rounding the output moves its
# measured sparsity (measured worst shortfalls without a margin: float32 ~1e-7, float16 ~8e-6, bfloat16 ~7e-5).
_MARGIN = {"float64": 0.0, "float32": 2e-7, "float16": 4e-5, "bfloat16": 3e-4}
_COARSER = ("float64", "float32", "float16", "bfloat16")


def _precision(dtypes) -> str:
    """The coarsest output dtype among ``dtypes``, as a key of _TOL/_MARGIN."""
    worst = 0
    for d in dtypes:
        name = str(d).replace("torch.", "")
        key = name if name in _TOL else "float64"  # longdouble and friends are solved and returned at >= float64
        worst = max(worst, _COARSER.index(key))
    return _COARSER[worst]


def _engine_for(group: Group, engine: str):
    if not isinstance(engine, str) or engine not in ENGINES:
        raise ValueError(f"engine: got {engine!r}, expected one of {ENGINES}")
    data = group.data
    on_cuda = group.backend == "torch" and data.device.type != "cpu"
    if engine == "auto":
        engine = "torch" if on_cuda else "numba"
    if engine == "numba":
        if on_cuda:
            raise ValueError(f"engine: got 'numba' for tensors on {data.device}, expected 'torch' or 'auto' (numba runs on the CPU)")
        from ._numba import NumbaEngine

        if group.backend == "torch":
            x = data.numpy()
            w = group.weights.numpy() if group.weights is not None else None
            return NumbaEngine(x, group.offsets, w), "to_torch"
        return NumbaEngine(data, group.offsets, group.weights), None
    import torch

    from ._torch import TorchEngine

    if group.backend == "numpy":
        with warnings.catch_warnings():  # read-only arrays are fine: the engine never writes into its inputs
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.from_numpy(data)
            w = torch.from_numpy(group.weights) if group.weights is not None else None
        return TorchEngine(x, group.offsets, w, group.uniform_length), "to_numpy"
    return TorchEngine(data, group.offsets, group.weights, group.uniform_length), None


def _try_small(group: Group, engine: str, s: float, tol: float, max_iter: int):
    """Small unweighted CPU groups: the whole solve in one compiled call (None: use the general solver)."""
    from ._numba import SMALL_MAX_ENTRIES, solve_plain_small

    data = group.data
    if engine not in ("auto", "numba") or group.weights is not None or data.shape[0] > SMALL_MAX_ENTRIES:
        return None
    back = None
    if group.backend == "torch":
        if data.device.type != "cpu":
            return None
        data, back = data.numpy(), "to_torch"
    if not np.isfinite(data).all():
        raise ValueError("vectors: got NaN or Inf entries, expected finite values")
    out = np.empty_like(data)
    stats = np.zeros(4)
    status = solve_plain_small(data, group.offsets, s, tol, max_iter, out, stats)
    if status == -2:
        raise NeedsRescale
    if status < 0:
        return None
    info = ProjectionInfo(mu=float(stats[0]), iterations=int(stats[1]), evaluations=int(stats[2]),
                          sparsity=float(stats[3]), target=s, discontinuity=False, converged=True, engine="numba",
                          n_vectors=group.n_vectors, already_sparse=status == 0)
    return out, info, back


def _rescaled_if_needed(group: Group, solve):
    """Run ``solve(group)``; if squares of the entries over/underflow, solve a copy scaled by a power of two
    (exact, and the projection is scale-equivariant) and scale the result back."""
    try:
        return solve(group)
    except NeedsRescale:
        pass
    data = group.data
    top = float(data.abs().max()) if group.backend == "torch" else float(np.abs(data).max())
    scale = 2.0 ** -math.floor(math.log2(top))
    scaled = Group(data * scale, group.offsets, group.weights, group.backend, group.rebuild,
                   group.uniform_length, group.out_dtypes)
    flat, info, back = solve(scaled)
    return flat / scale, info, back


def _convert_back(flat, how):
    if how == "to_torch":
        import torch

        return torch.from_numpy(flat)
    if how == "to_numpy":
        return flat.cpu().numpy()
    return flat


def _check_solver_options(tol, max_iter, precision):
    if tol is None:
        tol = _TOL[precision]
    elif isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 < tol < 1):
        raise ValueError(f"tol: got {tol!r}, expected a float in (0, 1) (average-sparsity units)")
    if max_iter is None:
        max_iter = 100
    elif isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter: got {max_iter!r}, expected a positive int")
    return float(tol), int(max_iter)


def project(vectors: Any, sparsity: float, *, axis: int = 0, weights: Any = None, tol: float | None = None,
            max_iter: int | None = None, engine: str = "auto", return_info: bool = False):
    r"""Grouped sparse projection (GSP): reach an *average* Hoyer sparsity over a group of vectors.

    Solves, for the vectors :math:`c_1..c_r` (any lengths :math:`n_i \ge 2`),

    .. math:: \max_{x_i \ge 0,\ \|x_i\|_2 = 1} \sum_i \langle |c_i|, x_i\rangle
              \quad \text{s.t.} \quad \frac1r \sum_i \mathrm{sp}_{w_i}(x_i) \ge s

    through its one-dimensional dual (one shared :math:`\mu \ge 0`), then returns
    :math:`z_i = \alpha_i\,\mathrm{sign}(c_i)\circ x_i` with :math:`\alpha_i = \langle x_i, |c_i|\rangle`.
    A group already at average sparsity :math:`\ge s` is returned unchanged (a copy, signs included).

    Parameters
    ----------
    vectors : one N-D array or tensor, or a list/tuple of them (one ragged group)
        Vectors lie along ``axis`` (``axis=0``: the columns of a matrix; ``axis=1``: its rows). In a list, 1-D
        entries are single vectors and N-D entries contribute all their vectors along ``axis``: a list of weight
        matrices with ``axis=1`` is the group of all their rows.
    sparsity : float in [0, 1]
        Target average Hoyer sparsity (0 = dense, 1 = one nonzero per vector).
    weights : same structure as ``vectors``, strictly positive, optional
        Weighted Hoyer sparsity (REFERENCE.md §1); ``None`` is the plain measure.
    tol : float, optional
        Accepted excess of the achieved average sparsity over the target: the result lies in
        ``[sparsity, sparsity + tol]`` unless a discontinuity (tied largest entries) forces it higher.
        Default 1e-12 for float64, 5e-7 for float32 (aimed 2e-7 inside), 5e-5 for float16 (4e-5 inside) and
        5e-4 for bfloat16 (3e-4 inside), so that the result, rounded to its dtype, is still feasible.
    max_iter : int, optional
        Newton/bisection iterations (default 100); on exhaustion a ``ProjectionWarning`` is raised and the
        feasible end of the bracket is returned.
    engine : {"auto", "numba", "torch"}
        ``auto`` uses Numba for NumPy arrays and CPU tensors, torch for tensors on other devices.
    return_info : bool
        Also return a :class:`ProjectionInfo` (mu, iterations, evaluations, achieved sparsity, discontinuity,
        number of vectors sent to one-hot at a jump, engine used).

    Returns
    -------
    Same structure, types, shapes, dtypes and devices as ``vectors`` (new arrays; inputs are never modified),
    and the info when ``return_info``.

    Notes
    -----
    Vectors of length 1 are rejected (their Hoyer sparsity is 0/0). A zero vector counts as sparsity 1 and
    stays zero. Results carry no autograd history.
    """
    s = validate_sparsity(sparsity)
    group = as_group(vectors, axis=axis, weights=weights)
    precision = _precision(group.out_dtypes)
    tol, max_iter = _check_solver_options(tol, max_iter, precision)
    s_aim = min(1.0, s + _MARGIN[precision]) if s > 0 else s

    def solve(grp):
        solved = _try_small(grp, engine, s_aim, tol, max_iter)
        if solved is not None:
            return solved
        eng, back = _engine_for(grp, engine)
        return (*solve_shared(eng, s_aim, tol=tol, max_iter=max_iter), back)

    flat, info, back = _rescaled_if_needed(group, solve)
    info.target = s
    out = group.rebuild(_convert_back(flat, back))
    return (out, info) if return_info else out


def project_(vectors: Any, sparsity: float, **kwargs):
    """In-place :func:`project`: writes the result into ``vectors`` (arrays, tensors or a list of them).

    Tensor identity is kept (``nn.Parameter`` objects stay the same objects, so optimizers keep working); the
    write happens under ``torch.no_grad()``. Returns ``vectors`` (and the info with ``return_info=True``).
    """
    res = project(vectors, sparsity, **kwargs)
    out, info = res if kwargs.get("return_info") else (res, None)
    targets = list(vectors) if isinstance(vectors, (list, tuple)) else [vectors]
    results = out if isinstance(vectors, (list, tuple)) else [out]
    for dst, src in zip(targets, results):
        if is_tensor(dst):
            import torch

            with torch.no_grad():
                dst.copy_(src)
        else:
            if not dst.flags.writeable:
                raise ValueError("vectors: got a read-only array, expected a writeable one for project_")
            dst[...] = src
    return (vectors, info) if info is not None else vectors


def project_each(vectors: Any, sparsity: float, *, axis: int = 0, weights: Any = None, tol: float | None = None,
                 max_iter: int | None = None, engine: str = "auto", return_info: bool = False):
    """Per-vector baseline: every vector projected to exactly ``sparsity`` (Hoyer 2004; Thom & Palm 2013).

    Each result is the nearest point to ``c_i`` with (weighted) Hoyer sparsity ``sparsity`` and the same l2
    norm and signs; vectors sparser than the target are made denser. Where tied largest entries make the
    target unreachable (a jump to one nonzero), the sparser side (one nonzero) is returned. Zero vectors stay
    zero. Same input conventions as :func:`project`; ``info`` holds per-vector achieved sparsities.
    """
    s = validate_sparsity(sparsity)
    group = as_group(vectors, axis=axis, weights=weights)
    tol, max_iter = _check_solver_options(tol, max_iter, _precision(group.out_dtypes))

    def solve(grp):
        eng, back = _engine_for(grp, engine)
        flat, per_vector, iters = solve_each(eng, s, tol=max(tol, 1e-13), max_iter=max_iter)
        return flat, (per_vector, iters, eng.name), back

    flat, (per_vector, iters, engine_name), back = _rescaled_if_needed(group, solve)
    out = group.rebuild(_convert_back(flat, back))
    if not return_info:
        return out
    info = {"engine": engine_name, "iterations": iters, "sparsity": per_vector, "target": s}
    return out, info


def project_groups(groups: Any, sparsity: Any, *, axis: int = 0, weights: Any = None, tol: float | None = None,
                   max_iter: int | None = None, engine: str = "auto", return_info: bool = False):
    """Several independent grouped projections in one call (e.g. every layer of a model, each its own group).

    ``groups`` is a list whose entries are what :func:`project` accepts (an N-D array/tensor with vectors along
    ``axis``, or a list of 1-D vectors and N-D blocks); ``sparsity`` is one target for all groups or one per
    group. The result equals ``[project(g, s) for g, s in zip(groups, sparsity)]`` (same tolerances, tie
    handling and early returns) but all groups share every pass over the data and every kernel launch: one
    batched Newton over a vector of dual variables. Groups still unsettled after a few passes (a discontinuity
    from tied largest entries, or a hard case) are finished by the scalar solver, one by one.
    ``return_info=True`` adds a list of :class:`ProjectionInfo`, one per group.
    """
    from ._solver import solve_groups

    if not isinstance(groups, (list, tuple)) or len(groups) == 0:
        n = len(groups) if isinstance(groups, (list, tuple)) else type(groups).__name__
        raise ValueError(f"groups: got {n}, expected a non-empty list of groups")
    G = len(groups)
    if isinstance(sparsity, (list, tuple, np.ndarray)):
        if len(sparsity) != G:
            raise ValueError(f"sparsity: got {len(sparsity)} targets, expected one per group ({G}) or a single float")
        targets = np.array([validate_sparsity(s) for s in sparsity])
    else:
        targets = np.full(G, validate_sparsity(sparsity))
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
    if engine == "numba" or (engine == "auto" and not on_cuda):
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
    per_block = [1 if b.ndim == 1 else int(np.prod(b.shape, dtype=np.int64)) // b.shape[axis] for b in blocks]
    vec_counts, i = [], 0
    for nb_, _ in layout:
        vec_counts.append(sum(per_block[i : i + nb_]))
        i += nb_
    starts = np.zeros(G + 1, dtype=np.int64)
    np.cumsum(vec_counts, out=starts[1:])
    eng, back = _engine_for(group, engine)
    gid = eng.from_host(np.repeat(np.arange(G, dtype=np.int64), vec_counts))
    margins = np.array([_MARGIN[p] for p in precisions])
    aims = np.where(targets > 0, np.minimum(1.0, targets + margins), targets)
    flat, mu, g, base, iters, evals, jumped, converged = solve_groups(eng, gid, starts, aims, tol=tols,
                                                                      max_iter=max_iter)
    parts = group.rebuild(_convert_back(flat, back))
    results, infos, i = [], [], 0
    counts = np.diff(starts)
    for gi, (nb_, is_list) in enumerate(layout):
        res = parts[i : i + nb_] if is_list else parts[i]
        i += nb_
        if jumped[gi]:
            res, info = project(groups[gi], float(targets[gi]), axis=axis,
                                weights=None if weights is None else weights[gi], tol=tols[gi], max_iter=max_iter,
                                engine=engine, return_info=True)
        else:
            info = ProjectionInfo(mu=float(mu[gi]), iterations=iters, evaluations=evals,
                                  sparsity=float((base[gi] - g[gi]) / counts[gi]), target=float(targets[gi]),
                                  discontinuity=False, converged=True, engine=eng.name,
                                  n_vectors=int(counts[gi]), already_sparse=bool(mu[gi] == 0.0))
        results.append(res)
        infos.append(info)
    return (results, infos) if return_info else results
