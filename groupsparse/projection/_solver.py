"""Root finding on the dual, shared by every engine (docs/projection.md has the derivations).

Units. Engines hold vector i as a_i = |c_i| / 2^e_i with weights w_i normalized per vector (beta_i w_i does not
change when w_i is scaled, so beta_i is computed on the normalized weights). The solver's dual variable mu is the
true one divided by 2^E, one reference exponent for the group chosen so that every vector's range of interest
is a normal double; vector i sees the threshold t_i = ldexp(mu beta_i, E - e_i). Then x_i(mu) = u_i / ||u_i||
with u_i = (a_i - t_i w_i)_+, h_i = <w_i, u_i> / ||u_i||, and vector i's sparsity is sp_i = beta_i (||w_i|| - h_i).

The grouped projection finds mu with S(mu) = sum_i sp_i(mu) in [r s, r s + r tol] (S is non-decreasing):
safeguarded Newton, with bisection on the ordered bit patterns of the doubles as the fallback, which reaches
adjacent floats in at most 64 steps whatever the span of mu. A bracket that closes on adjacent floats with no
root is a jump (tied largest entries): ``split_ties`` shares out the sparsity still needed among the tied vectors,
one of them partially, so the result lands on the target with the optimal objective.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BATCH_ITERS = 16


class ProjectionWarning(UserWarning):
    """The root finder stopped at ``max_iter``; the (feasible) best point found is returned."""


class LocalComm:
    """Sums and maxima over one process: the identity. The distributed module swaps in all-reduce."""

    def sum(self, values):
        return np.asarray(values, dtype=np.float64)

    def max(self, values):
        return np.asarray(values, dtype=np.float64)

    def gather(self, values):
        return [np.asarray(values, dtype=np.float64)]

    @property
    def rank(self) -> int:
        return 0


@dataclass
class Evaluation:
    mu: float
    h: Any  # per-vector h_i (engine-native array)
    dh: Any  # per-vector dh_i/dt_i
    state: Any  # engine-specific (stats for writing the output)
    S: float = math.nan  # group sum of sparsities (after comm)
    dS: float = math.nan
    sp: Any = None  # per-vector sparsities (engine-native)


@dataclass
class ProjectionInfo:
    """What the solver did. ``sparsity`` is the average (weighted) Hoyer sparsity of the returned vectors;
    ``margin`` how far inside the target the solve aimed (rounding to the output dtype, docs/projection.md §4)."""

    mu: float
    iterations: int
    evaluations: int
    sparsity: float
    target: float
    discontinuity: bool
    converged: bool
    engine: str
    n_vectors: int
    already_sparse: bool = False
    n_jumped: int = 0  # tied vectors sent fully to one-hot at a discontinuity
    n_partial: int = 0  # tied vectors given a partial share (0 or 1)
    margin: float = 0.0
    collectives: int = 0  # collective calls made (groupsparse.distributed; 0 in one process)
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def h_and_slope(xp, stats, empty, hval):
    """h_i and dh_i/dt_i from the support sums [sum w^2 on the support, sum w u, sum u^2] (every engine)."""
    m, swu, suu = stats[:, 0], stats[:, 1], stats[:, 2]
    ok = (~empty) & (suu > 0)
    nu = xp.sqrt(xp.where(ok, suu, 1.0))
    h = xp.where(ok, swu / nu, hval)
    dh = xp.where(ok, (-m + h * h) / nu, 0.0)  # = -m/||u|| + <w,u>^2/||u||^3 without cubing tiny norms
    return h, dh


# ---- ordered bit patterns: bisection that reaches adjacent doubles in <= 64 steps over any span


def to_key(x):
    """Monotone map of doubles (NumPy arrays or scalars) to int64."""
    b = np.asarray(x, dtype=np.float64).view(np.int64)
    return np.where(b < 0, np.int64(-0x8000000000000000) - b, b)


def from_key(k):
    k = np.asarray(k, dtype=np.int64)
    return np.where(k < 0, np.int64(-0x8000000000000000) - k, k).view(np.float64)


def key_mid(lo, hi):
    """The double halfway between lo and hi in bit order (lo itself once they are adjacent)."""
    a, b = to_key(lo), to_key(hi)
    return from_key(a + (b - a) // 2)


def one_hot_top(eng):
    """``(p + m, min p)`` over the engine's nonzero vectors, for the largest one-hot point 2^p m (m in [0.5, 1));
    ``(-inf, 10**6)`` when every vector is zero."""
    nz = ~np.asarray(eng.to_host(eng.zero_mask))
    if not nz.any():
        return -math.inf, 10**6
    m, p = np.frexp(eng.ratio_host[nz] / eng.beta_host[nz])
    p = p + eng.e_host[nz]
    j = np.lexsort((m, p))[-1]
    # m rounded up to 40 bits: p + m is then exact (|p| < 2^12), whatever p (equivariance); an m that
    # rounds up to 1 is 0.5 of the next binade (p + 1.0 would decode below as a zero top, mu_top = 0)
    pj, mj = float(p[j]), math.ceil(float(m[j]) * 2.0**40) * 2.0**-40
    if mj == 1.0:
        pj, mj = pj + 1.0, 0.5
    return pj + mj, int(p.min())


def mu_above_top(top_key: float, p_top: int, E: int) -> float:
    """A dual value strictly inside the all-one-hot region, in units of 2^E."""
    return math.ldexp(top_key - p_top, p_top - E) * (1 + 1e-9) if math.isfinite(top_key) else 1.0


def reference_exponent(p_max: int, p_min: int) -> int:
    """E such that the group's top (2^p_max) and its smallest vector's range (from 2^(p_min - 60)) are normal
    doubles once divided by 2^E. Taken from the group's own exponents (never a fixed 0), so scaling the data by
    2^k shifts E by k and the whole solve, bisection included, is exactly equivariant."""
    if p_min >= p_max - 900:
        return p_max
    return max((p_max + p_min) // 2, p_max - 1000)


def split_ties(gain: np.ndarray, mixable: np.ndarray, need: float):
    """The canonical share-out at a jump, identical on every engine and rank (docs/projection.md §3).

    ``gain[j]``: sparsity vector j gains going from its spread limit to one-hot; ``mixable[j]``: it can stop
    anywhere in between (tied entries: any split of the Lagrangian-optimal face); ``need``: sparsity to add to
    the all-spread state. Vectors are taken in group order: the first fully, then one partially, the rest stay
    spread. Non-mixable jumps (weighted one-hot switches) are taken first, in order, only while the mixable ones
    cannot cover the rest. Returns (full mask, partial index or -1, the partial vector's share).
    """
    full = np.zeros(len(gain), dtype=bool)
    if need <= 0:
        return full, -1, 0.0
    rem = float(need)
    mix_total = float(gain[mixable].sum())
    if mix_total < rem:
        for j in np.flatnonzero(~mixable):
            if rem <= mix_total:
                break
            full[j] = True
            rem -= float(gain[j])
    for j in np.flatnonzero(mixable):
        if rem <= 0:
            break
        if gain[j] <= rem:
            full[j] = True
            rem -= float(gain[j])
        else:
            return full, int(j), rem
    return full, -1, 0.0


def _unit(a, t, w, m):
    u = np.maximum(a - t * w, 0.0) if math.isfinite(t) else np.zeros_like(a)
    nrm = np.linalg.norm(u)
    if nrm == 0:
        u[m] = nrm = 1.0
    return u / nrm


def tie_vector(xv, w, inv, e, t_lo, t_hi, m, beta, wnorm, sp_target):
    """Vector on the tied face: x proportional to (1 - theta) x_lo + theta x_hi with its sparsity = sp_target.

    x_lo is the spread limit (u at the left of the jump, normalized), x_hi the right side (the one-hot e_m at an
    exact tie; at a near-tie that rounding turns into a jump, the few entries left). Returns the output entries
    (float64, the caller's units and signs) and the sparsity reached.
    """
    a = np.abs(xv) * inv
    x_lo, x_hi = _unit(a, t_lo, w, m), _unit(a, t_hi, w, m)
    A, B, p = float(np.dot(w, x_lo)), float(np.dot(w, x_hi)), float(np.dot(x_lo, x_hi))
    h_target = wnorm - sp_target / beta

    def h(th):
        return ((1 - th) * A + th * B) / math.sqrt(max((1 - th) ** 2 + th * th + 2 * th * (1 - th) * p, 1e-300))

    lo, hi = 0.0, 1.0  # h falls from A (spread) to B (one-hot) along the family
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if h(mid) > h_target else (lo, mid)
    v = (1 - hi) * x_lo + hi * x_hi
    x = v / np.linalg.norm(v)
    alpha = float(np.dot(a, x))
    with np.errstate(over="ignore"):
        z = np.copysign(np.ldexp(alpha * x, int(e)), xv)
    return z, float(beta * (wnorm - np.dot(w, x)))


MAX_SECANTS = 3  # secant steps per solve (while the bracket starts at 0)


def newton_step(mu: float, f: float, dS: float, d2S: float, lo: float, top: float) -> float:
    """Newton's candidate mu - f / dS, corrected by the curvature d2S (Halley's step) where Newton's stays inside
    the bracket (lo, top) and the correction at most doubles the step (NaN d2S: Newton's). A Newton step that leaves
    the bracket is left alone: at a jump, Halley's small steps inside it would stall the bisection (a weighted
    two-vector case ran out of max_iter). The compiled paths (``_uniform``, ``_small``) and the device loop take the
    same step with the same operations, so every path lands at nearly the same point of the band. Halley's
    correction saves an evaluation in many of ResNet-50's layers (4.96 -> 4.61 evaluations a layer;
    Kaiming-uniform weights 8.68 -> 7.08)."""
    mu, f, dS, d2S = float(mu), float(f), float(dS), float(d2S)  # (NumPy scalars warn on inf - inf; floats don't)
    cand = mu - f / dS
    if lo < cand < top:
        den = 2.0 * dS * dS - f * d2S
        if den > dS * dS:
            cand = mu - 2.0 * f * dS / den
    return cand


def curvature(prev, ev, d2S: float) -> float:
    """The secant of the slopes of two successive evaluations (sees supports change, which a fixed-support second
    derivative misses); the last estimate where they share mu."""
    if ev.mu == prev.mu:
        return d2S
    return (float(ev.dS) - float(prev.dS)) / (float(ev.mu) - float(prev.mu))  # (floats: inf or NaN, not a warning)


def _ldexp_inf(x: float, e: int) -> float:
    """math.ldexp, with inf where it overflows (as C's, and the compiled paths', ldexp give)."""
    try:
        return math.ldexp(x, e)
    except OverflowError:
        return math.inf


def solve_shared(eng, sparsity: float, *, margin: float = 0.0, tol: float, max_iter: int, comm=None,
                 margin_sum: float | None = None, mu0: float | None = None):
    """Grouped projection: returns ``(flat_output, ProjectionInfo)``.

    The result is feasible for ``sparsity + margin`` (the margin absorbs rounding to a coarser output dtype);
    a group already at ``sparsity`` is returned unchanged. Across ranks, ``margin_sum`` (this rank's share of
    r times the margin) replaces ``margin``. ``mu0`` (the true dual variable, e.g. ``info.mu`` of an earlier
    call on similar data) is evaluated first, so Newton starts next to the root.
    """
    comm = comm or LocalComm()
    r_loc = eng.n_vectors
    if hasattr(eng, "plan"):  # an engine may lay out its passes for the target (torch: compaction in its first)
        eng.plan(sparsity + margin)
    top_key, p_min = one_hot_top(eng) if r_loc else (-math.inf, 10**6)
    # two collectives for all the constants: sums, and maxima (p + m orders the tops like their values)
    r_tot, msum = comm.sum(np.array([float(r_loc), margin * r_loc if margin_sum is None else margin_sum]))
    nzv = eng.cnorm_host > 0 if r_loc else np.zeros(0, dtype=bool)
    low_loc = int(eng.e_host[nzv].min()) if nzv.any() else 10**6
    # (the smallest vector exponent rides along: outputs near the subnormal range, _contract, all ranks)
    with np.errstate(over="ignore"):
        bound = float(np.max(np.ldexp(eng.cnorm_host, eng.e_host))) if r_loc else 0.0
    # (the largest vector norm rides along too: the overflow check needs it over all ranks)
    mx = comm.max(np.array([top_key, float(-p_min), float(eng.weighted), float(-low_loc), bound]))
    low, bound = int(-mx[3]), float(mx[4])
    r_tot, weighted = int(round(r_tot)), bool(mx[2])
    margin = msum / r_tot
    p_top = math.floor(mx[0]) if math.isfinite(mx[0]) else 0
    E = reference_exponent(p_top, int(-mx[1]))
    if r_loc:
        eng.set_shift(E - eng.e_host)
    # strictly inside the all-one-hot region
    mu_top = mu_above_top(mx[0], p_top, E)
    target = r_tot * sparsity
    need = min(r_tot * (sparsity + margin), float(r_tot))
    band = tol * r_tot
    aim = need + 0.5 * band
    evals = 0

    def evaluate(mu: float) -> Evaluation:
        nonlocal evals
        evals += 1
        ev = eng.evaluate_shared(mu)
        ev.S, ev.dS = (float(v) for v in comm.sum(np.array([ev.S, ev.dS])))
        return ev

    def info(mu, S, it, **kw):
        res = ProjectionInfo(mu=float(np.ldexp(mu, E)), iterations=it, evaluations=evals, sparsity=float(S / r_tot),
                              target=sparsity, converged=kw.pop("conv", True), engine=eng.name,
                              n_vectors=r_tot, discontinuity=kw.pop("disc", False), margin=margin, **kw)
        res.bound = bound  # the largest vector l2 norm in the group (all ranks): no output entry exceeds it
        res.low = low  # the smallest vector exponent over all ranks (outputs near the subnormal range: _contract)
        return res

    ev0 = evaluate(0.0)
    if sparsity == 0.0 or ev0.S >= target:
        return eng.copy_input(), info(0.0, ev0.S, 0, already_sparse=True)
    if need >= r_tot:
        ev = evaluate(math.inf)
        return _write(eng, ev, ev), info(math.inf, ev.S, 1)

    lo, hi = ev0, None
    hi_mu = mu_top
    if weighted:
        # one-hot vectors keep moving (to lower-weight entries) past mu_top: push the top until feasible
        hi = evaluate(hi_mu)
        while hi.S < need:
            lo = hi
            eng.confirm_lower(lo.mu)
            hi_mu = hi_mu * 2.0 if hi_mu < 1e300 else math.inf
            hi = evaluate(hi_mu)
    cur, it, slow, prev_res = lo, 0, 0, math.inf
    d2S = math.nan  # the secant of the last two slopes, the curvature for Halley's correction
    secants = 0
    converged = disc = False
    m0 = _ldexp_inf(mu0, -E) if mu0 else math.nan  # a warm start, in the solver's units (inf: past any bracket)
    if lo.mu < m0 < (hi.mu if hi is not None else hi_mu):
        ev = evaluate(m0)
        d2S = curvature(cur, ev, d2S)
        cur = ev
        if cur.S < need:
            lo = cur
            eng.confirm_lower(lo.mu)
        else:
            hi = cur
            converged = cur.S <= need + band
    while not converged and it < max_iter:
        it += 1
        top = hi.mu if hi is not None else hi_mu
        S_top = hi.S if hi is not None else float(r_tot)  # (past the top every vector is one-hot)
        cand = math.nan
        if slow < 2 and cur.dS > 0:
            cand = newton_step(cur.mu, cur.S - aim, cur.dS, d2S, lo.mu, top)
        if not (lo.mu < cand < top) and lo.mu == 0.0 and secants < MAX_SECANTS and S_top > lo.S:
            # the secant of the bracket while lo = 0: where S is convex at first (uniformly distributed entries)
            # Newton from 0 overshoots past the top, and bisecting bit patterns from 0 spent ~5 evaluations near
            # mu = 1e-155 .. 1e-11 (21-26 evaluations per solve instead of 8-14; ``_uniform._newton``). Only then:
            # at a jump, secants would stall bisection's progress to adjacent doubles; and a few at most: at a jump
            # right above 0 (weighted one-hot vectors) every secant lands above it and lo stays 0
            cand = lo.mu + (aim - lo.S) * ((top - lo.mu) / (S_top - lo.S))
            secants += 1
        if not (lo.mu < cand < top):
            cand, slow = float(key_mid(lo.mu, top)), 0
            if cand == lo.mu:  # adjacent doubles, no root between: a jump
                disc = True
                break
        ev = evaluate(cand)
        d2S = curvature(cur, ev, d2S)
        res = abs(ev.S - aim)
        slow = slow + 1 if res > 0.5 * prev_res else 0
        prev_res = res
        if ev.S < need:
            lo = ev
            eng.confirm_lower(lo.mu)
        else:
            hi = ev
        cur = ev
        if hi is not None and hi.S <= need + band:
            converged = True
            break
    if hi is None:  # the top is always feasible
        hi = evaluate(hi_mu)
    if disc:
        out, S, n_full, n_part = _resolve_jump(eng, comm, lo, hi, need, aim)
        return out, info(hi.mu, S, it, disc=True, n_jumped=n_full, n_partial=n_part)
    if not converged:
        warnings.warn(f"grouped projection stopped after max_iter={max_iter} iterations; returning the feasible "
                      f"point with average sparsity {hi.S / r_tot:.12g} (target {sparsity})", ProjectionWarning,
                      stacklevel=3)
    return _write(eng, hi, hi), info(hi.mu, hi.S, it, conv=converged)


def _write(eng, hi: Evaluation, lo: Evaluation, use_lo=None):
    t, stats, onehot = hi.state
    if use_lo is not None:
        ul = eng.from_host(use_lo)
        tl, sl, ol = lo.state
        t = eng.xp.where(ul, tl, t)
        stats = eng.xp.where(ul[:, None], sl, stats)
        onehot = eng.xp.where(ul, ol, onehot)
    return eng.write_state(t, stats, onehot)


def _resolve_jump(eng, comm, lo: Evaluation, hi: Evaluation, need: float, aim: float):
    """S jumps over the target between adjacent mu's: tied vectors share out the sparsity still needed."""
    sp_lo, sp_hi = eng.to_host(lo.sp), eng.to_host(hi.sp)
    gain = sp_hi - sp_lo
    jumper = gain > 1e-9  # a jump is at least beta (sqrt 2 - 1) w_min; continuous moves here are ~1e-15
    oh_lo = eng.to_host(lo.state[2])
    mixable = oh_lo < 0  # spread at the left limit: the tied face is a continuum
    parts = comm.gather(np.concatenate([gain[jumper], mixable[jumper].astype(np.float64)]))
    sizes = [len(q) // 2 for q in parts]
    gains = np.concatenate([q[: len(q) // 2] for q in parts])
    mix = np.concatenate([q[len(q) // 2 :] for q in parts]).astype(bool)
    S_base = hi.S - float(gains.sum())  # every jumper at its spread limit
    land = need + min(0.5 * (aim - need), 64 * np.finfo(np.float64).eps * max(need, 1.0))  # on the target
    full, part, share = split_ties(gains, mix, land - S_base)
    start = sum(sizes[: comm.rank])
    idx = np.flatnonzero(jumper)
    mine = full[start : start + len(idx)]
    use_lo = np.zeros(eng.n_vectors, dtype=bool)
    use_lo[idx[~mine]] = True
    out = _write(eng, hi, lo, use_lo)
    if part >= 0 and start <= part < start + len(idx):
        i = int(idx[part - start])
        xv, w = eng.vector_host(i)
        t_lo, t_hi = float(eng.to_host(lo.state[0])[i]), float(eng.to_host(hi.state[0])[i])
        m = max(int(eng.to_host(hi.state[2])[i]) - int(eng.offsets[i]), 0)
        z, _ = tie_vector(xv, w, float(eng.inv_host[i]), int(eng.e_host[i]), t_lo, t_hi, m, float(eng.beta_host[i]),
                          float(eng.wnorm_host[i]), float(sp_lo[i]) + share)
        eng.patch(out, i, z)
    S = S_base + float(gains[full].sum()) + (share if part >= 0 else 0.0)
    return out, S, int(full.sum()), int(part >= 0)
