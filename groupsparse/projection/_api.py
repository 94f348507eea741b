"""Public entry points of the projection: ``project``, ``project_`` and ``project_each``."""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Any

import numpy as np

from ._group import Group, as_group, grouped_target, is_tensor, validate_sparsity
from ._batched import solve_each
from ._contract import _check_solver_options, _precision, check_each_finite, measured_sparsities, solve_contract
from ._memory import check_separate_targets, check_tensor_target, host_view, self_overlapping, shares_memory
from ._solver import ProjectionInfo, solve_shared

ENGINES = ("auto", "numba", "torch")


def eager_under_compile(fn):
    """``fn`` runs eagerly inside a caller's ``torch.compile`` region (a graph break there): the solver is host
    code (Python floats, NumPy, data-dependent branches) that dynamo cannot trace; so ``fullgraph=True`` regions
    cannot hold it (dynamo raises), nor can ``torch.jit.trace`` (refused). Outside them: a dictionary look-up a
    call, and no torch import for NumPy callers."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        torch = sys.modules.get("torch")
        if torch is not None and torch.compiler.is_compiling():
            return torch.compiler.disable(fn, recursive=True)(*args, **kwargs)
        if torch is not None and torch.jit.is_tracing():
            raise RuntimeError(f"{fn.__name__}: got a call under torch.jit.trace, expected eager code or "
                               "torch.compile (the solver is host code: a trace would freeze one call's result)")
        return fn(*args, **kwargs)
    return wrapper


# Default tolerances (accepted excess of the float64 solution over its aim, average-sparsity units).
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
            return NumbaEngine(x, group.offsets, w, group.out_flat), "to_torch"
        return NumbaEngine(data, group.offsets, group.weights, group.out_flat), None
    import torch

    from ._torch import TorchEngine

    if group.backend == "numpy":
        with warnings.catch_warnings():  # read-only arrays are fine: the engine never writes into its inputs
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.from_numpy(data)
            w = torch.from_numpy(group.weights) if group.weights is not None else None
        return TorchEngine(x, group.offsets, w, group.uniform_length), "to_numpy"
    return TorchEngine(data, group.offsets, group.weights, group.uniform_length), None


def _as_float(v) -> float:
    try:
        return float(v)
    except OverflowError:  # an int past float range
        return float("inf")


def _try_small(group: Group, engine: str, s: float, margin: float, tol: float, max_iter: int, mu0: float):
    """Unweighted CPU groups: the whole solve in one compiled call (None: use the general solver). Equal-length
    groups take ``solve_uniform`` (no per-vector arrays, threaded when the engine would be), ragged ones
    ``solve_plain_small`` where the engine would run serially."""
    from . import _numba
    from . import _uniform
    from ._small import SMALL_MAX_ENTRIES, solve_plain_small
    from ._uniform import solve_uniform

    data = group.data
    if engine not in ("auto", "numba") or group.weights is not None or SMALL_MAX_ENTRIES < 0:
        return None
    size = data.shape[0]
    threaded = _numba.threaded(size)
    n = group.uniform_length
    # equal-length groups: always this path, so the thresholds never change the result's bits (they only decide
    # whether its parts run on threads)
    uniform = _uniform.UNIFORM and n is not None
    if not uniform and _numba.ragged_threaded(size) and size > SMALL_MAX_ENTRIES:
        return None
    back = None
    if group.backend == "torch":
        if data.device.type != "cpu":
            return None
        data, back = data.numpy(), "to_torch"
    out = group.out_flat if group.out_flat is not None else np.empty_like(data)
    stats = np.zeros(6)
    if uniform:
        status = solve_uniform(data, n, s, margin, tol, max_iter, mu0, out, stats, threaded)
    else:
        status = solve_plain_small(data, group.offsets, s, margin, tol, max_iter, mu0, out, stats)
    if status < 0:
        return None
    info = ProjectionInfo(mu=float(stats[0]), iterations=int(stats[1]), evaluations=int(stats[2]),
                          sparsity=float(stats[3]), target=s, discontinuity=False, converged=True, engine="numba",
                          n_vectors=group.n_vectors, already_sparse=status == 0)
    info.bound, info.low = float(stats[4]), int(stats[5])
    return out, info, back


def _sub_group(group: Group, starts, gi):
    """Group ``gi`` of a batch, as far as ``_margin`` needs it (offsets and weights)."""
    o = group.offsets[starts[gi] : starts[gi + 1] + 1]
    w = None if group.weights is None else group.weights[o[0] : o[-1]]
    return Group(None, o - o[0], w, group.backend, None)


def _convert_back(flat, how):
    if how == "to_torch":
        import torch

        return torch.from_numpy(flat)
    if how == "to_numpy":
        return flat.cpu().numpy()
    return flat


@eager_under_compile
def project(vectors: Any, sparsity: float, *, axis: int = 0, weights: Any = None, tol: float | None = None,
            max_iter: int | None = None, engine: str = "auto", return_info: bool = False, mu0: float | None = None,
            out: Any = None):
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
        Width of the accepted band above the aim. float64: the result lies in ``[sparsity, sparsity + tol]``
        (default 1e-12), ties included, except where the dual misses the optimum (weighted vectors whose one-hot
        position switches at a jump: feasible, not optimal, possibly far above the band) and for outputs in the
        subnormal range (only ``>= sparsity``, measured after writing; docs/projection.md §3-§4). Coarser
        outputs are aimed inside by a rounding margin and are feasible when measured in their own dtype (docs/projection.md §4): float32 (default tol 4e-7) within
        ``[sparsity, sparsity + 2m + tol]`` with the provable margin m <= 4.1e-7; float16/bfloat16 (default 1e-5 /
        1e-4) measured after rounding and re-solved further inside while short (``info.margin``).
    max_iter : int, optional
        Newton/bisection iterations (default 100); on exhaustion a ``ProjectionWarning`` is raised and the
        feasible end of the bracket is returned.
    engine : {"auto", "numba", "torch"}
        ``auto`` uses Numba for NumPy arrays and CPU tensors, torch for tensors on other devices.
    mu0 : float, optional
        Warm start: a guess of the dual variable, typically ``info.mu`` of an earlier call on similar data (a
        pruner projecting every few steps, NMF's inner iterations). It is evaluated first when inside the bracket;
        a good guess saves evaluations, a poor one costs up to about three (docs/projection.md §6). The result lies in the same band as without it, not necessarily bit for bit the same.
    out : array or tensor, optional
        Where to put the result (one array/tensor input only): same type, shape and dtype as ``vectors``, not
        overlapping it. When it is C-contiguous with the vectors along its last axis (float32/float64, CPU), the
        engine writes straight into it (no fresh output memory); otherwise the result is copied in. Returned.
    return_info : bool
        Also return a :class:`ProjectionInfo` (mu, iterations, evaluations, the average sparsity of the returned
        vectors, discontinuity, vectors sent fully / partially to one-hot at a jump, engine used).

    Returns
    -------
    Same structure, types, shapes, dtypes and devices as ``vectors`` (new arrays; inputs are never modified),
    and the info when ``return_info``.

    Notes
    -----
    Vectors of length 1 are rejected (their Hoyer sparsity is 0/0). A zero vector counts as sparsity 1 and
    stays zero. Results carry no autograd history. Equivariant at every scale (project(a c) = a project(c) up
    to rounding); at tied largest entries the optimum is returned, on the target. Big-endian inputs follow the
    contract of their native dtype and come back in the caller's dtype; ``np.longdouble`` is solved in float64
    and accepted only with entries in float64's normal range. Results beyond the output dtype's largest finite
    value raise ``ValueError``.
    """
    s = grouped_target(validate_sparsity(sparsity))
    group = as_group(vectors, axis=axis, weights=weights)
    tol, max_iter = _check_solver_options(tol, max_iter, _precision(group.out_dtypes))
    if mu0 is not None and (isinstance(mu0, bool) or not isinstance(mu0, (int, float, np.floating, np.integer))
                            or not 0 <= _as_float(mu0) < float("inf")):
        raise ValueError(f"mu0: got {mu0!r}, expected a finite float >= 0 (info.mu of an earlier call)")
    mu0 = float(mu0) if mu0 else 0.0

    def solve(margin):
        solved = _try_small(group, engine, s, margin, tol, max_iter, mu0)
        if solved is not None:
            return solved
        eng, how = _engine_for(group, engine)
        # on a device, the Newton loop runs as tensor ops (one host check every few steps); on the CPU a host sync
        # is free and both loops give the same bits
        solver = solve_shared
        if eng.name == "torch" and eng.device.type != "cpu":
            from ._torch_loop import solve_device as solver
        flat, info = solver(eng, s, margin=margin, tol=tol, max_iter=max_iter, mu0=mu0)
        return flat, info, how

    if out is not None:
        group.out_flat = _out_buffer(out, vectors, group)
    flat, info, back = solve_contract(group, s, tol, solve)
    res = group.rebuild(_convert_back(flat, back))
    if out is not None:
        if group.out_flat is None or flat is not group.out_flat:
            _copy_into(out, res)
        res = out
    return (res, info) if return_info else res


def _out_buffer(out: Any, vectors: Any, group: Group):
    """Validate ``out``; return a flat NumPy view the CPU engine can write into, or None (copy at the end)."""
    if isinstance(vectors, (list, tuple)):
        raise ValueError("out: got an output for a list of vectors, expected out only with one array or tensor")
    if type(out) is not type(vectors) and not (is_tensor(out) and is_tensor(vectors)):
        raise TypeError(f"out: got {type(out).__name__}, expected {type(vectors).__name__} like the vectors")
    if tuple(out.shape) != tuple(vectors.shape) or out.dtype != vectors.dtype:
        raise ValueError(f"out: got shape {tuple(out.shape)} {out.dtype}, expected {tuple(vectors.shape)} "
                         f"{vectors.dtype} (the vectors')")
    if is_tensor(out):
        if out.device != vectors.device:
            raise ValueError(f"out: got a tensor on {out.device}, expected {vectors.device}")
        if out.requires_grad:
            raise ValueError("out: got a tensor that requires grad, expected a plain tensor (or use project_)")
    elif not out.flags.writeable:
        raise ValueError("out: got a read-only array, expected a writeable one")
    if self_overlapping(out):
        raise ValueError(f"out: got {'a tensor' if is_tensor(out) else 'an array'} whose entries may share memory "
                         "(expand, stride 0, as_strided), expected one with its own memory per entry")
    if shares_memory(out, vectors):  # (None on a device: the result is copied into out at the end there)
        raise ValueError("out: got an array overlapping the vectors, expected separate memory (use project_)")
    arr = host_view(out)
    if arr is None or (is_tensor(out) and str(out.dtype) == "torch.bfloat16"):  # no NumPy bfloat16: copied at the end
        return None
    if arr.flags.c_contiguous and arr.dtype == group.data.dtype and arr.dtype.isnative and group.vectors_last:
        return arr.reshape(-1)
    return None


def _copy_into(out, res):
    if is_tensor(out):
        import torch

        with torch.no_grad():
            out.copy_(res)
    else:
        out[...] = res


@eager_under_compile
def project_(vectors: Any, sparsity: float, **kwargs):
    """In-place :func:`project`: writes the result into ``vectors`` (arrays, tensors or a list of them).

    Tensor identity is kept (``nn.Parameter`` objects stay the same objects, so optimizers keep working); the
    write happens under ``torch.no_grad()``. Returns ``vectors`` (and the info with ``return_info=True``).
    """
    targets = list(vectors) if isinstance(vectors, (list, tuple)) else [vectors]
    for i, dst in enumerate(targets):  # all checks before the first write: a failure leaves every input as it was
        where = f"vectors[{i}]" if isinstance(vectors, (list, tuple)) else "vectors"
        if not is_tensor(dst) and isinstance(dst, np.ndarray):
            if not dst.flags.writeable:
                raise ValueError("vectors: got a read-only array, expected a writeable one for project_")
            if self_overlapping(dst):
                raise ValueError(f"{where}: got an array whose entries share memory (stride 0, as_strided), "
                                 "expected one with its own memory per entry (copy it first)")
        if is_tensor(dst):
            check_tensor_target(dst, where)
    check_separate_targets(targets)
    res = project(vectors, sparsity, **kwargs)
    out, info = res if kwargs.get("return_info") else (res, None)
    results = out if isinstance(vectors, (list, tuple)) else [out]
    for dst, src in zip(targets, results):
        if is_tensor(dst):
            import torch

            with torch.no_grad():
                dst.copy_(src)
        else:
            dst[...] = src
    return (vectors, info) if info is not None else vectors


@eager_under_compile
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

    eng, back = _engine_for(group, engine)
    flat, per_vector, iters = solve_each(eng, s, tol=max(tol, 1e-13), max_iter=max_iter)
    check_each_finite(group, flat, _precision(group.out_dtypes))
    engine_name = eng.name
    out = group.rebuild(_convert_back(flat, back))
    if not return_info:
        return out
    # measured on the returned values, as project's info.sparsity (the solve's own values are before rounding:
    # 2e-5 to 4e-4 apart for subnormal outputs, which cannot hit s exactly)
    per_vector = measured_sparsities(group, flat)
    info = {"engine": engine_name, "iterations": iters, "sparsity": per_vector, "target": s}
    return out, info
