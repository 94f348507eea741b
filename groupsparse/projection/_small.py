"""The whole unweighted grouped projection in one compiled call, for small groups.

Why: the general solver (``_solver.solve_shared``) drives the kernels from Python, ~60 us of interpreter work per
evaluation. Callers that project small groups thousands of times (NMF's projected gradient) pay that many times
over the arithmetic. This runs the same safeguarded Newton (same units, bracket, aim inside the feasible band,
slow-progress switch to bisection on ordered bit patterns) entirely in Numba. A jump (tied largest entries), an
exhausted ``max_iter``, or a vector whose squares leave [2^-800, 2^800] returns a status that sends the caller to
the general solver, which handles all of them; tests check that both paths agree.
"""

from __future__ import annotations

import math

import numpy as np

from ._kernels import (_FM_SUM, _FM_WRITE, FIRST_PASS_PLAIN, UNIFORM_FIRST, UNIFORM_PART, UNIFORM_PASS, jit, plain_sums,
                       plain_write, write_onehot)

# The compiled loop takes every group the engine would run serially (measured on the 2-core VM: the five
# 1-2.4M-entry ResNet-50 layers 17 ms against 30-41 ms through the Python-driven kernels, 1e7 entries in vectors
# of length 9 0.31 s against 1.18 s); where the engine would run threaded it takes groups up to this size.
# A negative value switches the compiled path off (tests use it to exercise the general solver).
SMALL_MAX_ENTRIES = 1 << 20
_LO_SQ, _HI_SQ = 2.0**-800, 2.0**800
# Threaded, equal-length groups take the compiled path up to this length (threads split a pass by vectors; the
# engine also splits long vectors into chunks).
UNIFORM_MAX_LENGTH = 1 << 14
UNIFORM = True  # False sends equal-length groups to solve_plain_small (tests compare the two compiled paths)
_first_pass = FIRST_PASS_PLAIN[0]  # sums |x| directly: NaN and Inf show in them


@jit(fastmath=_FM_SUM)
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


@jit(fastmath=_FM_WRITE)
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
    hi = top * (1 + 1e-9)
    mu = 0.0
    S_hi = math.nan
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
                cand = mu + (aim - S) / dS
            if not (lo < cand < hi):
                cand = _key_mid(lo, hi, buf, ibuf)
                slow = 0
                if cand == lo:
                    break  # adjacent doubles: a jump
        mu = cand
        for i in range(r):
            t[i] = mu * dt[i]
        _sums_all(x, offsets, inv, t, sums)
        S, dS = _total(beta, wn, dt, sums)
        evals += 1
        res = abs(S - aim)
        slow = slow + 1 if res > 0.5 * prev_res else 0
        prev_res = res
        if S < need:
            lo = mu
        else:
            hi = mu
            S_hi = S
            if S <= need + band:
                done = True
                break
    if not done:
        return -1
    _write(x, offsets, inv, e, t, sums, out)  # the loop ended on an evaluation at hi
    stats[0] = math.ldexp(hi, E)
    stats[1] = it
    stats[2] = evals
    stats[3] = S_hi / r
    return 1


# ---- equal-length groups: the whole solve with no per-vector arrays (docs/projection.md §6)

# Groups of at least 16x this many parts (4M vectors) first solve on this many (every stride-th part): its
# passes cost <= 1/16 of a full one, and its root, 2-3e-4 off in average sparsity for length-9 N(0,1) data, is
# close enough that one Newton step from there usually lands in the float32 band (1e8 entries: 3 passes, not 4).
_SAMPLE_PARTS = 64
_RANGE64 = 2.0**450  # float64 entries within [2^-450, 2^450]: no square or sum under- or overflows in any pass


_pass_ser, _pass_par = UNIFORM_PASS
_first_ser, _first_par = UNIFORM_FIRST


@jit
def _pass(par, x, n, T, beta, wn, stride, write, out, part):
    if par:
        _pass_par(x, n, T, beta, wn, stride, write, out, part)
    else:
        _pass_ser(x, n, T, beta, wn, stride, write, out, part)


@jit
def _kahan(col):
    s = 0.0
    comp = 0.0
    for v in col:
        y = v - comp
        tot = s + y
        comp = (tot - s) - y
        s = tot
    return s


@jit
def _newton(x, n, beta, wn, dT, stride, part, S, dS, d2S, need, band, hi, m0, max_iter, par, out, halley):
    """Safeguarded Newton on the parts 0, stride, 2 stride, ... (S, dS: their totals at mu = 0; d2S: a curvature
    estimate or NaN): the bracket, the aim inside the band, bisection on ordered bit patterns after two slow
    steps; a warm start m0 (0: none) is evaluated first. The curvature is the secant of the last two slopes (it
    sees supports change, which a fixed-support second derivative misses). It predicts each step's residual:
    writing (``out``) is speculative, a step predicted to land well inside the band also writes the projection.
    With ``halley`` (the sample's solve) it also corrects the step; the full solve keeps plain Newton steps, the
    general solver's, so both end at nearly the same point of the band. Returns (status 1 converged / -1 jump
    or exhausted, mu, S there, iterations, evaluations, written, the last curvature estimate)."""
    aim = need + 0.5 * band
    lo = 0.0
    mu = 0.0
    slow = 0
    prev_res = math.inf
    it = 0
    evals = 0
    mu_p = math.nan  # the previous evaluation (for the secant of the slopes)
    dS_p = math.nan
    span = math.inf  # how far apart the curvature estimate's slopes were taken
    warm = lo < m0 < hi  # (not counted as an iteration)
    while it < max_iter:
        spec = False
        if warm:
            cand = m0
            warm = False
        else:
            it += 1
            cand = math.nan
            if slow < 2 and dS > 0.0:
                f = S - aim
                step = f / dS
                err = 0.5 * abs(d2S) * step * step  # what Newton leaves
                den = 2.0 * dS * dS - f * d2S
                if halley and den > dS * dS:  # Halley's step is then at most twice Newton's
                    step = 2.0 * f * dS / den
                    err *= min(1.0, abs((abs(step) + span) * d2S / dS))  # the correction's own error
                cand = mu - step
                spec = out.shape[0] > 0 and err < 0.25 * band  # (half the half-width)
            if not (lo < cand < hi):
                buf = np.empty(2)
                cand = _key_mid(lo, hi, buf, buf.view(np.int64))
                slow = 0
                spec = False
                if cand == lo:
                    break  # adjacent doubles: a jump
        mu_p, dS_p = mu, dS
        mu = cand
        _pass(par, x, n, mu * dT, beta, wn, stride, spec, out, part)
        S = _kahan(part[:, 0])
        dS = -beta * dT * part[:, 1].sum()
        evals += 1
        if mu != mu_p and math.isfinite(dS_p):
            d2S = (dS - dS_p) / (mu - mu_p)
            span = abs(mu - mu_p)
        res = abs(S - aim)
        slow = slow + 1 if res > 0.5 * prev_res else 0
        prev_res = res
        if S < need:
            lo = mu
        elif S <= need + band:
            return 1, mu, S, it, evals, spec, d2S
        else:
            hi = mu
    return -1, hi, math.nan, it, evals, False, d2S


@jit
def solve_uniform(x, n, s, margin, tol, max_iter, mu0, out, stats, par):
    """``solve_plain_small`` for r = len(x) / n vectors of n entries each (x[i n : (i + 1) n]), in O(r / 4096)
    memory: every pass recomputes what it needs per vector. Same statuses and ``stats``; ``par`` runs the
    threaded kernels. Very large groups first solve on a sample of parts and start the full Newton there; its last
    pass usually writes the result too (``_newton``). ``evaluations`` counts the sample's (partial) passes too."""
    r = x.shape[0] // n
    nparts = (r + UNIFORM_PART - 1) // UNIFORM_PART
    sq = math.sqrt(n)
    wn = sq
    beta = 1.0 / (sq - 1.0)
    first = np.zeros((nparts, 8))
    if par:
        _first_par(x, n, beta, wn, x.itemsize == 8, first)
    else:
        _first_ser(x, n, beta, wn, x.itemsize == 8, first)
    if not math.isfinite(_kahan(first[:, 5])):
        return -2  # NaN or Inf: the general solver reports it
    if x.itemsize == 8 and (first[:, 6].max() > _RANGE64 or first[:, 7].min() < 1.0 / _RANGE64):
        return -2
    top_sq = first[:, 3].max()
    low_sq = first[:, 4].min()
    stats[4] = math.sqrt(top_sq)  # the largest vector norm: no output entry exceeds it
    stats[5] = math.frexp(math.sqrt(low_sq))[1] if low_sq < math.inf else 10**6
    S = _kahan(first[:, 0])
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
    # mu relative to 2^E, E the exponent of the largest one-hot point (the largest norm / beta): scaling the data
    # by 2^k changes E only; T = mu dT with dT = beta 2^E, as the per-vector units' t_i = mu beta 2^(E - e_i)
    top, E = math.frexp(math.sqrt(top_sq) / beta)
    dT = math.ldexp(beta, E)
    dS = -beta * dT * first[:, 1].sum()
    hi = top * (1 + 1e-9)
    m0 = math.ldexp(mu0, -E) if mu0 > 0.0 else 0.0
    d2S = math.nan
    if m0 == 0.0 and nparts >= 16 * _SAMPLE_PARTS:
        # a warm start from a sample: each of its passes costs 1/stride of a full one
        stride = nparts // _SAMPLE_PARTS
        sub = first[::stride]
        r_sub = sub[:, 2].sum()
        S_sub = _kahan(sub[:, 0])
        if S_sub < r_sub * (s + margin):
            st, m0, _, _, ev, _, d2S = _newton(x, n, beta, wn, dT, stride, np.zeros((sub.shape[0], 3)), S_sub,
                                               -beta * dT * sub[:, 1].sum(), math.nan, r_sub * (s + margin),
                                               tol * r_sub, hi, 0.0, max_iter, par, out[:0], True)
            evals += ev
            d2S *= r / r_sub
            if st < 0:
                m0, d2S = 0.0, math.nan
    status, hi, S_hi, it, ev, written, _ = _newton(x, n, beta, wn, dT, 1, np.zeros((nparts, 3)), S, dS, d2S, need,
                                                    tol * r, hi, m0, max_iter, par, out, False)
    evals += ev
    if status < 0:
        return -1
    if not written:
        _pass(par, x, n, hi * dT, beta, wn, 1, True, out, np.zeros((nparts, 3)))  # the solve ended at hi
    stats[0] = math.ldexp(hi, E)
    stats[1] = it
    stats[2] = evals
    stats[3] = S_hi / r
    if stats.shape[0] > 6:
        stats[6] = written  # (tests and benchmarks: the speculative write was the last pass)
    return 1
