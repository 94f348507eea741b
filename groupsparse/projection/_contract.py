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
            name = str(d).replace("torch.", "")
            key = _PRECISION[d] = name if name in _TOL else "float64"  # longdouble: solved and returned >= float64
        worst = max(worst, _COARSER.index(key))
    return _COARSER[worst]


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


def _measure(group: Group, flat, precision: str):
    """(sum of sparsities, all finite) of ``flat`` rounded to the output dtype, in float64 (no over/underflow:
    squares of float32/16 values are normal doubles)."""
    import torch

    if is_tensor(flat):
        dt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[precision]
        z = flat.to(dt).double().abs().cpu().numpy()
    else:
        dt = {"float16": np.float16, "float32": np.float32}.get(precision)
        if dt is None:  # bfloat16 NumPy arrays do not exist; torch rounds for us
            z = torch.from_numpy(np.ascontiguousarray(flat)).to(torch.bfloat16).double().abs().numpy()
        else:
            with np.errstate(over="ignore"):  # overflow shows as inf: the overflow rule below
                z = flat.astype(dt).astype(np.float64)
            np.abs(z, out=z)
    if not np.all(np.isfinite(z)):
        return 0.0, False
    w = group.weights
    w = np.ones_like(z) if w is None else (w.detach().cpu().numpy() if is_tensor(w) else w)
    starts = group.offsets[:-1]
    l1 = np.add.reduceat(w * z, starts)
    l2 = np.sqrt(np.add.reduceat(z * z, starts))
    nrm = np.sqrt(np.add.reduceat(w * w, starts))
    wmin = np.minimum.reduceat(w, starts)
    sp = np.where(l2 > 0, (nrm - l1 / np.where(l2 > 0, l2, 1.0)) / (nrm - wmin), 1.0)
    return float(np.sum(sp)), True


def _overflow_error(precision: str):
    limit = {"float64": "1.8e308", "float32": "3.4e38", "float16": "65504", "bfloat16": "3.4e38"}[precision]
    return ValueError(f"vectors: got a group whose projection has entries beyond the largest finite {precision} "
                      f"({limit}), expected results representable in the output dtype (projected entries can exceed "
                      "the input's largest: cast to a wider dtype first)")


def solve_contract(group: Group, s: float, tol: float, solve, comm=None):
    """Run ``solve(margin) -> (flat, info)`` under the precision contract of the output dtype.

    float64: solved as is. float32/16: aimed inside by the provable rounding margin; results are measured after
    rounding to the output dtype where that bound does not hold (half precision, subnormal outputs) and re-solved
    further inside while short (bounded; the last resort, every vector one-hot, is exact in any dtype).
    ``info.sparsity`` is what was measured on the returned values.
    """
    from ._solver import LocalComm

    comm = comm or LocalComm()
    precision = _precision(group.out_dtypes)
    margin = _FIRST_HALF.get(precision) or _margin(group, precision)
    flat, info, back = solve(margin)
    info.margin = margin
    if info.already_sparse:
        return flat, info, back
    if precision == "float64":
        _check_finite(flat, precision, info, comm)
        return flat, info, back
    r = info.n_vectors
    measure = precision != "float32" or _may_be_subnormal(info, precision)
    for attempt in range(_NUDGES + 1):
        if measure:
            S_loc, finite = _measure(group, flat, precision)
        else:
            S_loc, finite = info.sparsity * group.n_vectors, True
        S, ok = comm.sum(np.array([S_loc, float(not finite)]))
        if ok > 0:
            raise _overflow_error(precision)
        info.sparsity = float(S / r)
        info.margin = margin
        if info.sparsity >= s or attempt == _NUDGES:
            break
        short = s - info.sparsity
        margin = 1.0 if attempt == _NUDGES - 1 else margin + 2 * short + tol
        measure = True
        flat, info, back = solve(min(margin, 1.0))
    if not measure:
        _check_finite(flat, precision, info, comm)
    return flat, info, back


_LARGEST = {"float64": 1.79e308, "float32": 3.4e38}


def _check_finite(flat, precision, info, comm):
    """Overflow rule: results beyond the output dtype's range raise (never silently inf). Every output entry is
    at most its vector's l2 norm (``info.bound``, the largest over the group), so most groups skip the pass."""
    if comm.max(np.array([getattr(info, "bound", np.inf)]))[0] < _LARGEST[precision]:
        return
    big = float(flat.abs().max()) if is_tensor(flat) else (float(np.abs(flat).max()) if flat.size else 0.0)
    bad = not np.isfinite(big)
    if comm.sum(np.array([float(bad)]))[0] > 0:
        raise _overflow_error(precision)


def _may_be_subnormal(info, precision: str) -> bool:
    """Outputs below the dtype's smallest normal lose the relative rounding bound. A nonzero output entry of
    vector i is at least ulp(t_i) ~ 2^(e_i - 53) (e_i: the vector's exponent), so only groups with a vector below
    2^-60 (float32) can produce one: those are measured."""
    return getattr(info, "low", -(10**6)) < {"float32": -60, "float16": 41, "bfloat16": -60}[precision]


