"""The whole unweighted projection of an equal-length group in one compiled call, with no per-vector arrays.

Vector i is x[i n : (i + 1) n]: no offsets array, and no per-vector state outside a pass (docs/projection.md
§8). Every pass recomputes what it needs per vector from the entries it reads anyway, in the caller's units
(threshold T = mu beta 2^E). That is what the per-vector power-of-two units (``_numba``) give, bit for bit,
wherever no square under- or overflows: always for float32 entries, and for float64 entries within
[2^-450, 2^450] (checked by the first pass; other groups, NaN/Inf, jumps and exhausted iterations go to the
general solver, as from ``_small.solve_plain_small``).

The serial solve is one compiled function: the passes, the Newton loop and the writes are inlined into
:func:`solve_uniform` (``inline="always"``), the reductions carrying their own ``reassoc`` flags (``_kernels.radd``)
and everything else IEEE. Its only separately compiled callees are exact (no fastmath), so its bits do not depend
on whether this process compiled it or loaded it from Numba's cache (``_kernels``). Threaded, the same solve
hands each pass to Python threads running the pass compiled on its own over ranges of parts (``_threads``):
cached too, and the same bits whatever the thread count.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from ._kernels import abs_max, jit
from ._small import _key_mid
from ._uniform_passes import _first_ser, _first_threaded, _pass_ser, _pass_threaded, part_size
from ._uniform_passes import UNIFORM_PART, _first_range, _pass_range  # noqa: F401  (tests, benchmarks)

UNIFORM = True  # False sends equal-length groups to solve_plain_small (tests compare the two compiled paths)


# Groups of at least _SAMPLE_MIN_PARTS parts (32k vectors up to length 16, 512k entries beyond) first solve on a
# sample, every stride-th part: at most an eighth of the group and not much more than _SAMPLE_PARTS parts, so its
# passes cost <= 1/8 of a full one. Its root, 2-8e-4 off in average sparsity for 1e7 length-9 N(0,1) entries, is
# close enough that one or two Newton steps from there land in the float32 band; so its own band need not be finer
# than _SAMPLE_TOL (a tenth of that error). Passes over the data per entry (a write counts as a second pass;
# benchmarks/bench_passes.py), ResNet-50 layers: 6.09 -> 5.09 for N(0, 0.02^2) weights, 8.09 -> 6.23 for
# Kaiming-uniform ones (the sample started at 256 parts before, 16M entries of long vectors: no ResNet-50 layer
# had it); 1e7 entries: 5.42 -> 5.04 for length 9 (a quarter sampled before), 5.00 -> 4.71 for length 1000.
_SAMPLE_PARTS = 64
_SAMPLE_MIN_PARTS = 8
_SAMPLE_STRIDE = 8
_SAMPLE_TOL = 3e-5
_RANGE64 = 2.0**450  # float64 entries within [2^-450, 2^450]: no square or sum under- or overflows in any pass


@nb.njit(inline="always")
def _pass(par, x, n, T, beta, wn, stride, write, out, part):
    P = part_size(n)
    if par:
        _pass_threaded(x, n, P, T, beta, wn, stride, write, out, part)
    else:
        _pass_ser(x, n, P, T, beta, wn, stride, write, out, part, 0)


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


@nb.njit(inline="always")
def _newton(x, n, beta, wn, dT, stride, part, S, dS, d2S, need, band, hi, S_hi, m0, max_iter, par, out, pre):
    """Safeguarded Newton on the parts 0, stride, 2 stride, ... (S, dS: their totals at mu = 0; d2S: a curvature
    estimate or NaN): the bracket, the aim inside the band, bisection on ordered bit patterns after two slow
    steps; a warm start m0 (0: none) is evaluated first. On data whose S is convex at first (uniformly distributed
    entries, Kaiming-uniform weights) Newton from mu = 0 overshoots past the largest entry (S = S_hi: every vector
    one-hot, a flat end), and bisecting on bit patterns from lo = 0 then spent 5 evaluations on mu ~ 1e-155 ..
    1e-11 (21-27 evaluations per solve). So the first such overshoot pulls hi down to the largest |x| (the bracket
    started at the largest norm, 18x higher for length-1000 uniform data), and while lo = 0 a Newton step that
    leaves the bracket is replaced by the secant of its ends (later, at a jump, secants would stall bisection's
    progress to adjacent doubles). The curvature is the secant of
    the last two slopes (it
    sees supports change, which a fixed-support second derivative misses). It predicts each step's residual:
    writing (``out``) is speculative, a step predicted to land well inside the band also writes the projection.
    Steps are corrected by that curvature (Halley's), as in every solver (``_solver.halley_step``), so all paths
    land at nearly the same point of the band. ``pre`` (rows of [sum sp, sum dh/dT], or none): the sums at m0,
    measured already (``_uniform_first`` at T > 0), so the warm start costs no pass. Returns (status 1 converged /
    -1 jump or exhausted, mu, S there, iterations, evaluations, written, the last curvature estimate)."""
    aim = need + 0.5 * band
    lo = 0.0
    S_lo = S
    r_cov = S_hi  # every vector one-hot
    tight = False
    secants = 0
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
                if lo < mu - step < hi and den > dS * dS:  # Halley's: at most twice Newton's (_solver.newton_step)
                    step = 2.0 * f * dS / den
                    err *= min(1.0, abs((abs(step) + span) * d2S / dS))  # the correction's own error
                cand = mu - step
                spec = out.shape[0] > 0 and err < 0.25 * band  # (half the half-width)
            if not (lo < cand < hi) and lo == 0.0 and secants < 3 and S_hi > S_lo:  # (_solver.MAX_SECANTS)
                cand = lo + (aim - S_lo) * ((hi - lo) / (S_hi - S_lo))
                spec = False
                secants += 1
            if not (lo < cand < hi):
                buf = np.empty(2)
                cand = _key_mid(lo, hi, buf, buf.view(np.int64))
                slow = 0
                spec = False
                if cand == lo:
                    break  # adjacent doubles: a jump
        mu_p, dS_p = mu, dS
        mu = cand
        if mu == m0 and pre.shape[0] > 0 and not spec:  # (the sums at m0 measured: no pass, and nothing written)
            S = _kahan(pre[:, 0])
            dS = -beta * dT * pre[:, 1].sum()
        else:
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
            S_lo = S
        elif S <= need + band:
            return 1, mu, S, it, evals, spec, d2S
        else:
            hi = mu
            S_hi = S
            if S >= r_cov and not tight:  # past every entry: the largest |x| is a much nearer end (one cheap pass)
                tight = True
                top_x = abs_max(x, 0, x.shape[0]) / dT * (1 + 1e-9)
                if lo < top_x < hi:
                    hi = top_x
    return -1, hi, math.nan, it, evals, False, d2S


@nb.njit(inline="always")
def _first(par, x, n, P, stride, beta, wn, T, part):
    if par:
        _first_threaded(x, n, P, stride, beta, wn, x.itemsize == 8, T, part)
    else:
        _first_ser(x, n, P, stride, beta, wn, x.itemsize == 8, T, part, 0)


@nb.njit(inline="always")
def _in_range(first):
    """No NaN or Inf, and float64 entries within the window (``_RANGE64``; float32 passes do not check: [6] = 0,
    [7] = inf)."""
    return math.isfinite(_kahan(first[:, 5])) and not (first[:, 6].max() > _RANGE64 or
                                                       first[:, 7].min() < 1.0 / _RANGE64)


@nb.njit(inline="always")
def _units(beta, top_sq):
    """(top, E, dT): mu is relative to 2^E, E the exponent of the largest one-hot point (the largest norm / beta):
    scaling the data by 2^k changes E only; T = mu dT with dT = beta 2^E, as the per-vector units' t_i."""
    top, E = math.frexp(math.sqrt(top_sq) / beta)
    return top, E, math.ldexp(beta, E)


@nb.njit(inline="always")
def _sample_root(x, n, P, nparts, s, margin, tol, max_iter, beta, wn, par, out):
    """Large groups: solve on a sample, every stride-th part (at most an eighth of the group, about
    ``_SAMPLE_PARTS`` parts), from a first pass of its own. Returns (the sample's root as mu relative to 2^E,
    E, the curvature there per vector, the evaluations it took); mu = 0 where the sample gives no start (already
    sparse, NaN, out of range, no root)."""
    stride = max(_SAMPLE_STRIDE, nparts // _SAMPLE_PARTS)
    sub = np.zeros(((nparts + stride - 1) // stride, 8))
    _first(par, x, n, P, stride, beta, wn, 0.0, sub)
    r_sub = sub[:, 2].sum()
    S_sub = _kahan(sub[:, 0])
    if not _in_range(sub) or S_sub >= r_sub * (s + margin):
        return 0.0, 0, math.nan, 1
    top, E, dT = _units(beta, sub[:, 3].max())
    st, m, _, _, ev, _, d2S = _newton(x, n, beta, wn, dT, stride, np.zeros((sub.shape[0], 3)), S_sub,
                                      -beta * dT * sub[:, 1].sum(), math.nan, r_sub * (s + margin),
                                      max(tol, _SAMPLE_TOL) * r_sub, top * (1 + 1e-9), r_sub, 0.0, max_iter, par,
                                      out[:0], sub[:0, :2])
    if st < 0:
        return 0.0, 0, math.nan, 1 + ev
    return m, E, d2S / r_sub, 1 + ev


def _solve(x, n, s, margin, tol, max_iter, mu0, out, stats, par):
    """``solve_plain_small`` for r = len(x) / n vectors of n entries each (x[i n : (i + 1) n]), in O(r / 4096)
    memory: every pass recomputes what it needs per vector. Same statuses and ``stats``; ``par`` runs the
    threaded kernels. Groups of ``_SAMPLE_MIN_PARTS`` parts and more first solve on a sample, and the full first
    pass also evaluates the group at the sample's root, where the full Newton starts; its last pass usually writes
    the result too (``_newton``). ``evaluations`` counts the sample's (partial) passes too."""
    r = x.shape[0] // n
    P = part_size(n)
    nparts = (r + P - 1) // P
    sq = math.sqrt(n)
    wn = sq
    beta = 1.0 / (sq - 1.0)
    evals = 1
    m_sub, E_sub, d2S_sub = 0.0, 0, math.nan
    if not mu0 > 0.0 and nparts >= _SAMPLE_MIN_PARTS:
        m_sub, E_sub, d2S_sub, ev = _sample_root(x, n, P, nparts, s, margin, tol, max_iter, beta, wn, par, out)
        evals += ev
    T0 = m_sub * math.ldexp(beta, E_sub)  # (0: no sample root)
    first = np.zeros((nparts, 10))
    _first(par, x, n, P, 1, beta, wn, T0, first)
    if not _in_range(first):
        return -2  # NaN or Inf, or float64 entries outside the window: the general solver reports it
    top_sq = first[:, 3].max()
    low_sq = first[:, 4].min()
    stats[4] = math.sqrt(top_sq)  # the largest vector norm: no output entry exceeds it
    stats[5] = math.frexp(math.sqrt(low_sq))[1] if low_sq < math.inf else 10**6
    S = _kahan(first[:, 0])
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
    top, E, dT = _units(beta, top_sq)
    dS = -beta * dT * first[:, 1].sum()
    hi = top * (1 + 1e-9)
    m0 = math.ldexp(mu0, -E) if mu0 > 0.0 else 0.0
    d2S = math.nan
    pre = first[:0, 8:10]
    if T0 > 0.0:  # m0 dT = T0 exactly (powers of two apart): the first pass measured the sums there
        m0 = math.ldexp(m_sub, E_sub - E)
        d2S = d2S_sub * r * math.ldexp(1.0, 2 * (E - E_sub))
        pre = first[:, 8:10]
    status, hi, S_hi, it, ev, written, _ = _newton(x, n, beta, wn, dT, 1, np.zeros((nparts, 3)), S, dS, d2S, need,
                                                    tol * r, hi, 1.0 * r, m0, max_iter, par, out, pre)
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


_solve_ser = jit(_solve)


def solve_uniform(x, n, s, margin, tol, max_iter, mu0, out, stats, par):
    return _solve_ser(x, n, s, margin, tol, max_iter, mu0, out, stats, par)


solve_uniform.__doc__ = _solve.__doc__
solve_uniform.stats = _solve_ser.stats  # (the cached solve's compile/cache statistics)
