"""The whole unweighted grouped projection in one compiled call, for small groups.

Why: the general solver (``_solver.solve_shared``) drives the kernels from Python, ~60 us of interpreter work per
evaluation. Callers that project small groups thousands of times (NMF's projected gradient) pay that many times
over the arithmetic. This runs the same safeguarded Newton (same units, bracket, aim inside the feasible band,
slow-progress switch to bisection on ordered bit patterns) entirely in Numba. A jump (tied largest entries), an
exhausted ``max_iter``, or a vector whose squares leave [2^-800, 2^800] returns a status that sends the caller to
the general solver, which handles all of them; tests check that both paths agree.

Every kernel here is inlined into :func:`solve_plain_small` (``inline="always"``; the reductions carry their own
``reassoc`` flags, ``_kernels.radd``): the only separately compiled callees are exact (no fastmath), so the result
does not depend on whether this process compiled the solver or loaded it from Numba's cache (``_kernels``).
"""

from __future__ import annotations

import math

import numpy as np

import numba as nb

from ._kernels import FIRST_PASS_PLAIN_INLINE, abs_max, jit, plain_sums, plain_write, write_onehot

# The compiled loop takes every ragged group the engine would run serially (measured on the 2-core VM: the five
# 1-2.4M-entry ResNet-50 layers 17 ms against 30-41 ms through the Python-driven kernels, 1e7 entries in vectors
# of length 9 0.31 s against 1.18 s); where the engine would run threaded it takes groups up to this size.
# Equal-length groups go to ``_uniform``. A negative value switches both compiled paths off (tests use it to
# exercise the general solver).
SMALL_MAX_ENTRIES = 1 << 20
_LO_SQ, _HI_SQ = 2.0**-800, 2.0**800
_first_pass = FIRST_PASS_PLAIN_INLINE  # sums |x| directly: NaN and Inf show in them


@nb.njit(inline="always")
def _sums_all(x, offsets, inv, t, sums):
    for i in range(offsets.shape[0] - 1):
        sums[i, 0], sums[i, 1], sums[i, 2] = plain_sums(x[offsets[i] : offsets[i + 1]], inv[i], t[i])


@jit
def _total(beta, wn, dt, sums):
    """S = sum_i sp_i (compensated: r can be 1e6) and dS/dmu, unweighted, from per-vector sums."""
    S = 0.0
    comp = 0.0
    dS = 0.0
    for i in range(beta.shape[0]):
        m, su, suu = sums[i, 0], sums[i, 1], sums[i, 2]
        sp = 1.0
        if suu > 0.0:
            nu = math.sqrt(suu)
            h = su / nu
            sp = beta[i] * (wn[i] - h)
            dh = (-m + h * h) / nu
            if dh != 0.0:
                dS -= beta[i] * dh * dt[i]
        y = sp - comp
        tot = S + y
        comp = (tot - S) - y
        S = tot
    return S, dS


@nb.njit(inline="always")  # exact arithmetic (no nsz either: the sign of every zero is IEEE's)
def _write(x, offsets, inv, e, t, sums, out):
    for i in range(offsets.shape[0] - 1):
        o0 = offsets[i]
        o1 = offsets[i + 1]
        su, suu = sums[i, 1], sums[i, 2]
        if suu > 0.0:
            # alpha_i / ||u_i|| with alpha_i = <x_i, a_i> = (sum u^2 + t sum u) / ||u_i||, back in the caller's units
            sc = math.ldexp((suu + t[i] * su) / suu, e[i])
            plain_write(x[o0:o1], out[o0:o1], inv[i], t[i], sc)
        else:
            amax = -1.0
            arg = o0
            for j in range(o0, o1):
                a = abs(np.float64(x[j]))
                if a > amax:
                    amax = a
                    arg = j
            write_onehot(x, out, o0, o1 - o0, arg)


@jit
def _saturation_mu(x, offsets, inv, dt):
    """A mu past which no vector has support: max over vectors of max|x_i| inv_i / dt_i, rounded up. Far below the
    norm-based top on spread-out data (uniform entries: 18x at length 1000), where Newton from 0 overshoots."""
    best = 0.0
    for i in range(offsets.shape[0] - 1):
        best = max(best, abs_max(x, offsets[i], offsets[i + 1]) * inv[i] / dt[i])
    return best * (1 + 1e-9)


@jit
def _key_mid(lo, hi, buf, ibuf):
    """Halfway between lo >= 0 and hi in bit order (lo itself once adjacent)."""
    buf[0] = lo
    buf[1] = hi
    ibuf[0] = ibuf[0] + (ibuf[1] - ibuf[0]) // 2
    return buf[0]


@jit
def solve_plain_small(x, offsets, s, margin, tol, max_iter, mu0, out, stats):
    """Returns 0 (already sparse: out = x), 1 (solved), -1 (ask the general solver), -2 (scale: general solver).

    ``mu0`` > 0 is a warm start (the true dual variable), evaluated first. ``stats`` receives [mu, iterations,
    evaluations, achieved average sparsity, largest vector norm, smallest vector exponent].
    """
    r = offsets.shape[0] - 1
    beta = np.empty(r)
    wn = np.empty(r)
    e = np.zeros(r, dtype=np.int64)
    inv = np.ones(r)
    t = np.zeros(r)
    sums = np.empty((r, 3))
    _first_pass(x, offsets[:-1], offsets[1:] - offsets[:-1], inv, sums)
    top = 0.0  # the largest one-hot point, as a mantissa m in [0.5, 1) and exponent E: 2^E m
    E = -(10**6)
    bound = 0.0
    for i in range(r):
        sq = math.sqrt(offsets[i + 1] - offsets[i])
        wn[i] = sq
        beta[i] = 1.0 / (sq - 1.0)
        sa, saa = sums[i, 1], sums[i, 2]
        if not (saa < _HI_SQ and (saa >= _LO_SQ or sa == 0.0) and sa < math.inf):
            return -2
        if saa > 0.0:
            e[i] = math.frexp(math.sqrt(saa))[1]
            inv[i] = math.ldexp(1.0, -e[i])
            sums[i, 1] = sa * inv[i]
            sums[i, 2] = saa * inv[i] * inv[i]
            # the mu where vector i is surely one-hot: sqrt(sum a^2) bounds its largest entry
            m, p = math.frexp(math.sqrt(sums[i, 2]) / beta[i])
            if p + e[i] > E or (p + e[i] == E and m > top):
                top, E = m, p + e[i]
            bound = max(bound, math.ldexp(math.sqrt(sums[i, 2]), e[i]))
    stats[4] = bound
    low = 10**6
    for i in range(r):
        if sums[i, 2] > 0.0:
            low = min(low, e[i])
    stats[5] = low
    # mu is handled relative to 2^E (E: the top's exponent, see _solver.reference_exponent; all e_i here lie
    # within 2^±400, so no centring is needed): scaling the data by 2^k changes nothing but E
    # thresholds t_i = ldexp(mu beta_i, E - e_i) = mu dt_i: the shifts stay within 2^+-850 here, so dt_i is a
    # normal double and the product rounds exactly like the ldexp
    dt = np.empty(r)
    for i in range(r):
        dt[i] = math.ldexp(beta[i], E - e[i])
    S, dS = _total(beta, wn, dt, sums)
    evals = 1
    if s == 0.0 or S >= r * s:
        out[:] = x
        stats[0] = 0.0
        stats[1] = 0.0
        stats[2] = evals
        stats[3] = S / r
        return 0
    need = min(r * (s + margin), 1.0 * r)
    if need >= r:
        return -1
    band = tol * r
    aim = need + 0.5 * band
    buf = np.empty(2)
    ibuf = buf.view(np.int64)
    lo = 0.0
    S_lo = S
    hi = top * (1 + 1e-9)
    mu = 0.0
    S_hi = 1.0 * r  # every vector one-hot
    tight = False
    d2S = math.nan  # the slopes' secant (``_solver.newton_step``)
    secants = 0
    slow = 0
    prev_res = math.inf
    it = 0
    done = False
    m0 = math.ldexp(mu0, -E) if mu0 > 0.0 else 0.0
    warm = lo < m0 < hi  # a warm start is the first point evaluated (not counted as an iteration)
    while it < max_iter:
        if warm:
            cand = m0
            warm = False
        else:
            it += 1
            cand = math.nan
            if slow < 2 and dS > 0.0:
                f = S - aim  # Newton's step, Halley's inside the bracket (_solver.newton_step)
                cand = mu - f / dS
                den = 2.0 * dS * dS - f * d2S
                if lo < cand < hi and den > dS * dS:
                    cand = mu - 2.0 * f * dS / den
            if not (lo < cand < hi) and lo == 0.0 and secants < 3 and S_hi > S_lo:  # (_solver.MAX_SECANTS)
                cand = lo + (aim - S_lo) * ((hi - lo) / (S_hi - S_lo))
                secants += 1
            if not (lo < cand < hi):
                cand = _key_mid(lo, hi, buf, ibuf)
                slow = 0
                if cand == lo:
                    break  # adjacent doubles: a jump
        mu_p, dS_p = mu, dS
        mu = cand
        for i in range(r):
            t[i] = mu * dt[i]
        _sums_all(x, offsets, inv, t, sums)
        S, dS = _total(beta, wn, dt, sums)
        evals += 1
        if mu != mu_p:
            d2S = (dS - dS_p) / (mu - mu_p)
        res = abs(S - aim)
        slow = slow + 1 if res > 0.5 * prev_res else 0
        prev_res = res
        if S < need:
            lo = mu
            S_lo = S
        else:
            if S <= need + band:
                hi = mu
                S_hi = S
                done = True
                break
            if S >= r and not tight:  # past every entry: hi comes down to the last vector's largest |x|
                tight = True
                mu = min(mu, _saturation_mu(x, offsets, inv, dt))
                S, dS = 1.0 * r, 0.0
            hi = mu
            S_hi = S
    if not done:
        return -1
    _write(x, offsets, inv, e, t, sums, out)  # the loop ended on an evaluation at hi
    stats[0] = math.ldexp(hi, E)
    stats[1] = it
    stats[2] = evals
    stats[3] = S_hi / r
    return 1
