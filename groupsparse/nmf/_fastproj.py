r"""Compiled kernels for NMF's small dense factors: GSP of the rows of an r x p matrix with a warm start, and the
projected fast gradient that calls it.

Why a module of its own, cached on disk: the projected fast gradient calls the projection up to 10 times per outer
iteration (~5 000 times per 500-iteration fit), so the whole inner loop runs as one Numba call. Numba's on-disk
cache only notices changes to the file that holds the cached function, so *everything* these functions call lives
in this file (no import of the projection core's kernels): a cached copy can never run a stale callee. When the
cache directory is not writable Numba would raise at decoration time; we then compile per process instead.

The GSP solve is REFERENCE.md §2 (unweighted, every row one vector, one shared mu): safeguarded Newton on g(mu) = k
inside a bracket. NMF projects nearly the same matrix again and again, so the solve starts from the previous
call's mu (``mu0``): one or two evaluations instead of four to six from mu = 0. When a solve cannot finish (the
average jumps at tied largest entries, or no convergence) the status is negative and the caller redoes the step
with ``groupsparse.project``, which resolves ties.
"""

from __future__ import annotations

import math
import warnings

import numba as nb
import numpy as np

_FM = {"reassoc", "nsz", "contract"}
_EPS = 2.220446049250313e-16


def _jit(**kw):
    """``njit(cache=True)``, or without the cache when no cache directory can be written."""
    def deco(fn):
        try:
            return nb.njit(cache=True, **kw)(fn)
        except RuntimeError as e:  # "cannot cache function ...: no locator available"
            warnings.warn(f"groupsparse.nmf: compiling {fn.__name__} without a disk cache ({e})", RuntimeWarning,
                          stacklevel=2)
            return nb.njit(cache=False, **kw)(fn)
    return deco


@_jit(fastmath=_FM)
def _g_rows(x, t, sums):
    """g(mu) and g'(mu) with t = mu * beta (equal row lengths, so one beta); per-row sums kept in ``sums``."""
    r, p = x.shape
    beta = 1.0 / (math.sqrt(p) - 1.0)
    g = 0.0
    dg = 0.0
    for i in range(r):
        m = 0.0
        su = 0.0
        suu = 0.0
        for j in range(p):
            d = abs(x[i, j]) - t
            pos = d > 0.0
            u = d if pos else 0.0
            m += 1.0 if pos else 0.0
            su += u
            suu += u * u
        sums[i, 0] = m
        sums[i, 1] = su
        sums[i, 2] = suu
        if suu > 0.0:
            nu = math.sqrt(suu)
            h = su / nu
            g += beta * h
            dg += beta * beta * (-m + h * h) / nu
        else:
            g += beta  # one-hot (or zero) row: h = 1
    return g, dg


@_jit(fastmath=_FM)
def gsp_rows_warm(x, s, mu0, tol, max_iter, out):
    """GSP of the rows of ``x`` (r x p, p >= 2) into ``out``. Returns (status, mu): status 0 = already at least
    s on average (out = x), 1 = solved, -1 = ask ``groupsparse.project`` (ties, no convergence, over/underflow)."""
    r, p = x.shape
    sums = np.empty((r, 3))
    sq = math.sqrt(p)
    beta = 1.0 / (sq - 1.0)
    base = r * beta * sq
    k = base - r * s
    slack = 64 * _EPS * max(base, 1.0)
    band = tol * r
    aim = k - 0.5 * band
    g, dg = _g_rows(x, 0.0, sums)
    top = 0.0
    for i in range(r):
        saa = sums[i, 2]
        if not saa < math.inf or (saa < 2.2250738585072014e-308 and sums[i, 1] > 0.0):
            return -1, 0.0
        top = max(top, math.sqrt(saa) / beta)
    if g <= k + slack:
        out[:] = x
        return 0, 0.0
    if s >= 1.0:
        return -1, 0.0
    lo = 0.0
    hi = top
    mu = 0.0
    if 0.0 < mu0 < top:  # warm start: one evaluation at the previous root usually brackets the new one tightly
        mu = mu0
        g, dg = _g_rows(x, mu * beta, sums)
        if g > k + slack:
            lo = mu
        else:
            hi = mu
            if g >= k - band:
                return _write_rows(x, hi * beta, sums, out), hi
    slow = 0
    prev_res = math.inf
    for _ in range(max_iter):
        cand = math.nan
        if slow < 2 and dg < 0.0:
            cand = mu - (g - aim) / dg
        if not (lo < cand < hi):
            cand = 0.5 * (lo + hi)
            slow = 0
        mu = cand
        g, dg = _g_rows(x, mu * beta, sums)
        res = abs(g - aim)
        slow = slow + 1 if res > 0.5 * prev_res else 0
        prev_res = res
        if g > k + slack:
            lo = mu
        else:
            hi = mu
            if g >= k - band:
                return _write_rows(x, hi * beta, sums, out), hi
        if hi - lo <= 4 * _EPS * hi:
            break
    return -1, 0.0


@_jit(fastmath=_FM)
def _write_rows(x, t, sums, out):
    """out_i = alpha_i x_i(mu) with the least-squares scale alpha_i (REFERENCE.md §2); sums are those at t."""
    r, p = x.shape
    for i in range(r):
        su, suu = sums[i, 1], sums[i, 2]
        if suu > 0.0:
            sc = (suu + t * su) / suu
            for j in range(p):
                xv = x[i, j]
                d = abs(xv) - t
                rr = d * sc if d > 0.0 else 0.0
                out[i, j] = rr if xv >= 0.0 else -rr
        else:
            arg = 0
            amax = -1.0
            for j in range(p):
                a = abs(x[i, j])
                if a > amax:
                    amax = a
                    arg = j
            for j in range(p):
                out[i, j] = x[i, j] if j == arg else 0.0
    return 1


def gsp_rows(C: np.ndarray, s: float, tol: float = 1e-12, max_iter: int = 100, mu0: float = 0.0):
    """GSP of the rows of a float64 matrix; ``None`` when the caller should use ``groupsparse.project``."""
    C = np.ascontiguousarray(C, dtype=np.float64)
    out = np.empty_like(C)
    status, _ = gsp_rows_warm(C, float(s), float(mu0), float(tol), int(max_iter), out)
    return None if status < 0 else out


@_jit()
def fgm_rows(F, A, B, L, s, project_rows, max_inner, inner_ratio, mu0):
    """Projected Nesterov fast gradient for min 1/2<A, FF^T> - <B, F>, F >= 0 (rows at average sparsity s).

    Returns (F_new, steps, ok, mu): ``ok`` is False when a projection needs the core's tie handling (the caller
    then redoes this subproblem in Python); ``mu`` is the last projection's root, the next call's warm start.
    """
    r, p = F.shape
    Y = F.copy()
    Fo = F.copy()
    Fn = np.empty_like(F)
    P = np.empty_like(F)
    alpha = 0.1
    first = -1.0
    steps = 0
    inv = 1.0 / L
    mu = mu0
    for _ in range(max_inner):
        steps += 1
        for i in range(r):
            for j in range(p):
                Fn[i, j] = B[i, j]
            for l in range(r):
                a = A[i, l]
                if a != 0.0:
                    for j in range(p):
                        Fn[i, j] -= a * Y[l, j]
            for j in range(p):
                v = Y[i, j] + inv * Fn[i, j]
                Fn[i, j] = v if v > 0.0 else 0.0
        if project_rows:
            status, mu_new = gsp_rows_warm(Fn, s, mu, 1e-12, 100, P)
            if status < 0:
                return Fo, steps, False, mu0
            if status == 1:
                mu = mu_new
            Fn, P = P, Fn
        alpha_next = 0.5 * (math.sqrt(alpha**4 + 4 * alpha**2) - alpha**2)
        beta = alpha * (1 - alpha) / (alpha**2 + alpha_next)
        alpha = alpha_next
        step = 0.0
        for i in range(r):
            for j in range(p):
                d = Fn[i, j] - Fo[i, j]
                step += d * d
                Y[i, j] = Fn[i, j] + beta * d
        Fo, Fn = Fn, Fo
        step = math.sqrt(step)
        if first < 0.0:
            first = step
        elif step <= inner_ratio * first:
            break
    return Fo, steps, True, mu
