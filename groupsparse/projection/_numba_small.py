"""The whole unweighted grouped projection in one compiled call, for small groups.

Why: the general solver (``_solver.solve_shared``) drives the kernels from Python, ~60 us of interpreter work per
evaluation. Callers that project small groups thousands of times (NMF's projected gradient: a 10 x 100 factor,
up to 10 projections per iteration) pay that overhead many times over the arithmetic. This file runs the same
safeguarded Newton (same bracket, same aim inside the feasible band, same slow-progress switch to bisection) as
``solve_shared`` entirely in Numba. A jump of g over k (tied largest entries) or an exhausted ``max_iter`` returns a
status that sends the caller to the general solver, which resolves ties; tests check that both paths agree.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

EPS = 2.220446049250313e-16
SMALL_MAX_ENTRIES = 1 << 16


@nb.njit(cache=True, fastmath={"reassoc", "nsz", "contract"})
def _g_plain(x, offsets, beta, mu, with_slope):
    """g(mu) = sum_i beta_i h_i(mu beta_i) and g'(mu), unweighted (REFERENCE.md §2)."""
    g = 0.0
    dg = 0.0
    for i in range(offsets.shape[0] - 1):
        xs = x[offsets[i] : offsets[i + 1]]
        t = mu * beta[i]
        m = 0.0
        su = 0.0
        suu = 0.0
        for j in range(xs.shape[0]):
            d = abs(np.float64(xs[j])) - t
            pos = d > 0.0
            u = d if pos else 0.0
            m += 1.0 if pos else 0.0
            su += u
            suu += u * u
        if suu > 0.0:
            nu = math.sqrt(suu)
            h = su / nu
            g += beta[i] * h
            if with_slope:
                dg += beta[i] * beta[i] * (-m + h * h) / nu
        else:
            g += beta[i]  # one-hot (or zero) vector: h = 1
    return g, dg


@nb.njit(cache=True, fastmath={"reassoc", "nsz", "contract"})
def solve_plain_small(x, offsets, s, tol, max_iter, out, stats):
    """Returns 0 (already sparse: out = x), 1 (solved), -1 (ask the general solver).

    ``stats`` receives [mu, iterations, evaluations, achieved average sparsity].
    """
    r = offsets.shape[0] - 1
    beta = np.empty(r)
    base = 0.0
    top = 0.0
    for i in range(r):
        n = offsets[i + 1] - offsets[i]
        sq = math.sqrt(n)
        beta[i] = 1.0 / (sq - 1.0)
        base += beta[i] * sq
        amax = 0.0
        for j in range(offsets[i], offsets[i + 1]):
            amax = max(amax, abs(np.float64(x[j])))
        top = max(top, amax / beta[i])
    k = base - r * s
    slack = 64 * EPS * max(base, 1.0)
    band = tol * r
    aim = k - 0.5 * band
    g, dg = _g_plain(x, offsets, beta, 0.0, True)
    evals = 1
    if g <= k + slack:
        out[:] = x
        stats[0] = 0.0
        stats[1] = 0.0
        stats[2] = evals
        stats[3] = (base - g) / r
        return 0
    if s >= 1.0:
        return -1
    lo = 0.0
    hi = top
    mu = 0.0
    g_hi = math.nan
    slow = 0
    prev_res = math.inf
    it = 0
    done = False
    while it < max_iter:
        it += 1
        cand = math.nan
        if slow < 2 and dg < 0.0:
            cand = mu - (g - aim) / dg
        if not (lo < cand < hi):
            cand = 0.5 * (lo + hi)
            slow = 0
        mu = cand
        g, dg = _g_plain(x, offsets, beta, mu, True)
        evals += 1
        res = abs(g - aim)
        slow = slow + 1 if res > 0.5 * prev_res else 0
        prev_res = res
        if g > k + slack:
            lo = mu
        else:
            hi = mu
            g_hi = g
            if g >= k - band:
                done = True
                break
        if hi - lo <= 4 * EPS * hi:
            break
    if not done:
        return -1
    for i in range(r):
        o0 = offsets[i]
        o1 = offsets[i + 1]
        t = hi * beta[i]
        sau = 0.0
        suu = 0.0
        amax = -1.0
        arg = o0
        for j in range(o0, o1):
            a = abs(np.float64(x[j]))
            if a > amax:
                amax = a
                arg = j
            d = a - t
            if d > 0.0:
                sau += a * d
                suu += d * d
        if suu > 0.0:
            sc = sau / suu  # alpha_i / ||u_i||: unit direction times the least-squares scale
            for j in range(o0, o1):
                xv = np.float64(x[j])
                d = abs(xv) - t
                rr = d * sc if d > 0.0 else 0.0
                out[j] = rr if xv >= 0.0 else -rr
        else:
            for j in range(o0, o1):
                out[j] = x[j] if j == arg else 0.0
    stats[0] = hi
    stats[1] = it
    stats[2] = evals
    stats[3] = (base - g_hi) / r
    return 1
