"""The precision contract: what each output dtype is promised, and how it is enforced (docs/projection.md §4)."""

from __future__ import annotations

import math

import numpy as np

from ._group import Group, is_tensor

_TOL = {"float64": 1e-12, "float32": 4e-7, "float16": 1e-5, "bfloat16": 1e-4}
# Unit roundoff of each output dtype: rounding every entry by a relative u moves a vector's (weighted) Hoyer
# sparsity by at most 2u/(1-u) beta ||w|| (docs/projection.md §4), which sets the provable margin.
_ROUNDOFF = {"float64": 0.0, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
_TINY = {"float32": 2.0**-126, "float16": 2.0**-14, "bfloat16": 2.0**-126}
# Half precision: the provable margin (1e-3 and more) would be a wide band, so aim by these measured margins and
# let the measurement after rounding nudge where they fall short.
_FIRST_HALF = {"float16": 4e-5, "bfloat16": 3e-4}
_COARSER = ("float64", "float32", "float16", "bfloat16")
_NUDGES = 6  # re-solves further inside before the last resort (every vector one-hot, exact in any dtype)


_PRECISION: dict = {}  # dtype -> key of _TOL (str() of a dtype is slow enough to matter on small calls)


def _precision(dtypes) -> str:
    """The coarsest output dtype among ``dtypes``, as a key of _TOL/_ROUNDOFF."""
    worst = 0
    for d in dtypes:
        key = _PRECISION.get(d)
        if key is None:
            # byte order normalized first: a big-endian '>f4' is float32 (str() would say '>f4')
            name = str(d.newbyteorder("=") if isinstance(d, np.dtype) else d).replace("torch.", "")
            key = _PRECISION[d] = name if name in _TOL else "float64"  # longdouble: solved and returned >= float64
        worst = max(worst, _COARSER.index(key))
    return _COARSER[worst]


def _check_solver_options(tol, max_iter, precision):
    if tol is None:
        tol = _TOL[precision]
    elif isinstance(tol, bool) or not isinstance(tol, (int, float, np.integer, np.floating)) or not (0 < tol < 1):
        raise ValueError(f"tol: got {tol!r}, expected a float in (0, 1) (average-sparsity units)")
    if max_iter is None:
        max_iter = 100
    elif isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter: got {max_iter!r}, expected a positive int")
    return float(tol), int(max_iter)


def _margin(group: Group, precision: str) -> float:
    """Provable margin for rounding to the output dtype: 2u/(1-u) times the mean over vectors of
    beta_i ||w_i|| = ||w_i|| / (||w_i|| - min w_i) (unweighted: sqrt(n)/(sqrt(n)-1), from the lengths alone)."""
    u = _ROUNDOFF[precision]
    if u == 0.0:
        return 0.0
    if group.weights is None and group.uniform_length:
        ratio = math.sqrt(group.uniform_length) / (math.sqrt(group.uniform_length) - 1.0)
    elif group.weights is None:
        lengths = np.diff(group.offsets).astype(np.float64)
        ratio = np.sqrt(lengths) / (np.sqrt(lengths) - 1.0)
    else:
        w = group.weights
        w = w.detach().cpu().numpy() if is_tensor(w) else w
        nrm = np.sqrt(np.add.reduceat(w * w, group.offsets[:-1]))
        ratio = nrm / (nrm - np.minimum.reduceat(w, group.offsets[:-1]))
    mean = ratio if isinstance(ratio, float) else float(np.mean(ratio))
    return 2 * u / (1 - u) * mean * (1 + 1e-6) + 1e-15


def _rounded(group: Group, flat) -> np.ndarray:
    """``flat`` rounded to each block's own output dtype, back in float64 (inf where that overflows)."""
    import torch

    z = flat.detach().cpu() if is_tensor(flat) else flat
    out = np.empty(int(group.offsets[-1]))
    with np.errstate(over="ignore"):
        for a, b, dt in group.blocks:
            seg = z[a:b]
            if isinstance(dt, torch.dtype):  # tensors (also when the CPU engine worked on their NumPy view)
                seg = seg if is_tensor(seg) else torch.from_numpy(np.ascontiguousarray(seg))
                out[a:b] = seg.to(dt).double().numpy()
            else:
                out[a:b] = np.asarray(seg).astype(dt).astype(np.float64)
    return out


def _measure(group: Group, flat):
    """(sum of sparsities, all finite) of ``flat`` as returned (rounded to each block's dtype)."""
    sp = measured_sparsities(group, flat)
    return (0.0, False) if sp is None else (float(np.sum(sp)), True)


def measured_sparsities(group: Group, flat):
    """Each vector's (weighted) sparsity of ``flat`` as returned (rounded to each block's dtype), or None where
    an entry is not finite; each vector is divided by a power of two of its peak first, so no square over- or
    underflows."""
    z = np.abs(_rounded(group, flat))
    if not np.all(np.isfinite(z)):
        return None
    if len(group.offsets) < 2:
        return np.zeros(0)
    starts = group.offsets[:-1]
    lengths = np.diff(group.offsets)
    peak = np.maximum.reduceat(z, starts)
    z = np.ldexp(z, np.repeat(-np.clip(np.frexp(peak)[1], -1022, 1023), lengths))
    w = group.weights
    w = np.ones_like(z) if w is None else (w.detach().cpu().numpy() if is_tensor(w) else w)
    l1 = np.add.reduceat(w * z, starts)
    l2 = np.sqrt(np.add.reduceat(z * z, starts))
    nrm = np.sqrt(np.add.reduceat(w * w, starts))
    wmin = np.minimum.reduceat(w, starts)
    return np.where(l2 > 0, (nrm - l1 / np.where(l2 > 0, l2, 1.0)) / (nrm - wmin), 1.0)


def _overflow_error(precision: str):
    limit = {"float64": "1.8e308", "float32": "3.4e38", "float16": "65504", "bfloat16": "3.4e38"}[precision]
    return ValueError(f"vectors: got a group whose projection has entries beyond the largest finite {precision} "
                      f"({limit}), expected results representable in the output dtype (projected entries can exceed "
                      "the input's largest: cast to a wider dtype first)")


def solve_contract(group: Group, s: float, tol: float, solve, comm=None):
    """Run ``solve(margin) -> (flat, info, back)`` under the precision contract of the output dtype.

    float64: solved as is. float32/16: aimed inside by the provable rounding margin; results are measured after
    rounding to the output dtype where that bound does not hold (half precision, subnormal outputs) and re-solved
    further inside while short (bounded; the last resort, every vector one-hot, is exact in any dtype).
    ``info.sparsity`` is what was measured on the returned values.
    """
    from ._solver import LocalComm

    precision = _precision(group.out_dtypes)
    margin = _FIRST_HALF.get(precision) or _margin(group, precision)
    flat, info, back = solve(margin)
    info.margin = margin
    last = [back]

    def resolve(m):
        flat, info, last[0] = solve(m)
        return flat, info

    flat, info = finish_contract(group, s, tol, precision, flat, info, resolve, comm or LocalComm())
    return flat, info, last[0]


def finish_contract(group: Group | None, s: float, tol: float, precision: str, flat, info, resolve, comm):
    """The contract after the first solve (aimed by ``info.margin``), for one process or across the ranks of
    ``comm`` (``groupsparse.distributed``): measure where the rounding bound does not hold, ``resolve(margin) ->
    (flat, info)`` further inside while short, and raise where a result passes the dtype's range. ``group`` is
    this process's vectors (None: it holds none); ``info`` is the group's (its sparsity, bound and low already
    over every rank), so every rank takes the same branches."""
    if info.already_sparse:
        return flat, info
    if precision == "float64" and not _may_be_subnormal(info, precision):
        _check_finite(group, flat, precision, info, comm)
        return flat, info
    margin = info.margin
    measure = precision != "float32" or _may_be_subnormal(info, precision)
    for attempt in range(_NUDGES + 1):
        if measure:
            S_loc, finite = _measure(group, flat) if group is not None and group.n_vectors else (0.0, True)
            S, bad = comm.sum(np.array([S_loc, float(not finite)]))
            if bad > 0:
                raise _overflow_error(precision)
            info.sparsity = float(S / info.n_vectors)
        info.margin = margin
        if info.sparsity >= s or attempt == _NUDGES:
            break
        margin = 1.0 if attempt == _NUDGES - 1 else margin + 2 * (s - info.sparsity) + tol
        measure = True
        flat, info = resolve(min(margin, 1.0))
    if not measure:
        _check_finite(group, flat, precision, info, comm)
    return flat, info


_LARGEST = {"float64": 1.79e308, "float32": 3.4e38}
_HALF_MAX = {"float64": 0.5 * np.finfo(np.float64).max, "float32": 1.7e38, "float16": 32752.0, "bfloat16": 1.69e38}


def check_each_finite(group: Group, flat, precision: str) -> None:
    """``project_each``'s overflow rule (as ``project``'s): a result past the output dtype's largest value raises,
    never comes back as inf. Norms are kept, so an output entry nears the limit only where an input vector's norm
    does: below half the limit the peak alone clears it; else the result is rounded to each block's dtype."""
    if int(group.offsets[-1]) == 0:
        return
    peak = float(flat.detach().abs().max()) if is_tensor(flat) else float(np.max(np.abs(flat)))
    if peak < _HALF_MAX[precision]:
        return
    if not np.all(np.isfinite(_rounded(group, flat))):
        raise _overflow_error(precision)


def _check_finite(group, flat, precision, info, comm):
    """Overflow rule: results beyond the output dtype's range raise (never silently inf). Every output entry is
    at most its vector's l2 norm (``info.bound``, the largest over the group and every rank), so most groups skip
    the pass. ``group`` None: this rank holds no vectors."""
    if getattr(info, "bound", np.inf) < _LARGEST[precision]:
        return
    bad = group is not None and not np.all(np.isfinite(_rounded(group, flat)))
    if comm.sum(np.array([float(bad)]))[0] > 0:
        raise _overflow_error(precision)


def _may_be_subnormal(info, precision: str) -> bool:
    """Outputs below the dtype's smallest normal lose the relative rounding bound. A nonzero output entry of
    vector i is at least ulp(t_i) ~ 2^(e_i - 53) (e_i: the vector's exponent), so only groups with a vector below
    2^-60 (float32; float64: 2^-956) can produce one: those are measured (float64 like float32: after writing,
    re-solved further inside while short, the last resort every vector one-hot)."""
    return getattr(info, "low", -(10**6)) < {"float64": -956, "float32": -60, "float16": 41, "bfloat16": -60}[precision]


