"""Solvers over many independent unknowns at once: per-vector (``project_each``) and per-group (``project_groups``).

Same units and safeguards as ``_solver``: thresholds in each vector's own power-of-two units, Newton with
bisection on ordered bit patterns as the fallback.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ._solver import BATCH_ITERS, ProjectionWarning, key_mid, reference_exponent, to_key


def _host_mid(eng, lo, hi):
    return eng.from_host(key_mid(eng.to_host(lo), eng.to_host(hi)))


def _adjacent(eng, lo, hi):
    lo_h, hi_h = eng.to_host(lo), eng.to_host(hi)
    return eng.from_host(np.isfinite(lo_h) & np.isfinite(hi_h) & (to_key(hi_h) - to_key(lo_h) <= 1))


def solve_each(eng, sparsity: float, *, tol: float, max_iter: int):
    """Per-vector projection: every vector to exactly ``sparsity`` (same l2 norm), batched safeguarded Newton on
    each vector's own threshold t_i (negative t makes a vector denser)."""
    xp = eng.xp
    beta = eng.beta
    target = eng.wnorm - sparsity / beta
    if sparsity == 0.0:
        # all magnitudes equal (x proportional to w) is the limit t -> -inf; 1e12 puts it past float64 resolution
        ev = eng.evaluate_vec(-1e12 * eng.ratio_max)
        sp = np.where(eng.to_host(eng.zero_mask), 1.0, 0.0)
        return eng.write_each(ev), sp, 0
    t = eng.full(0.0)
    ev = eng.evaluate_vec(t)
    lo, hi = eng.full(-math.inf), eng.full(math.inf)
    top = eng.ratio_max  # at or above this threshold a vector is one-hot
    done = eng.zero_mask | (xp.abs(ev.h - target) <= tol / beta)
    slow = eng.full(0.0)
    prev = eng.full(math.inf)
    it = 0
    while it < max_iter and not bool(xp.all(done)):
        it += 1
        above = ev.h > target  # needs a larger threshold (sparser)
        lo = xp.where(above & ~done, t, lo)
        hi = xp.where(~above & ~done, t, hi)
        newton = t - (ev.h - target) / xp.where(ev.dh < 0, ev.dh, -1.0)
        # an open top: the one-hot threshold, doubled past it (weighted one-hots keep moving to lighter entries)
        hi_eff = xp.where(xp.isfinite(hi), hi, 2 * xp.maximum(xp.where(xp.isfinite(lo), lo, 0.0), top))
        lo_eff = xp.where(xp.isfinite(lo), lo, xp.minimum(2 * t, -top) - 1e-300)
        inside = (ev.dh < 0) & (slow < 2) & (newton > lo_eff) & (newton < hi_eff)
        mid = xp.where(xp.isfinite(lo), _host_mid(eng, lo_eff, hi_eff), lo_eff)
        slow = xp.where(inside, slow, 0.0)
        t = xp.where(done, t, xp.where(inside, newton, mid))
        ev = eng.evaluate_vec(t)
        res = xp.abs(ev.h - target)
        slow = xp.where(res > 0.5 * prev, slow + 1, 0.0)
        prev = res
        # a bracket closed on adjacent doubles with no root: a jump (exactly tied largest entries)
        done = done | (res <= tol / beta) | _adjacent(eng, xp.where(ev.h > target, t, lo), xp.where(ev.h > target, hi, t))
    if not bool(xp.all(done)):
        warnings.warn(f"project_each stopped after max_iter={max_iter} iterations with some vectors unsettled; "
                      "those are returned at the sparser end of their bracket", ProjectionWarning, stacklevel=3)
        t = xp.where(done, t, xp.where(xp.isfinite(hi), hi, top))
        ev = eng.evaluate_vec(t)
    # A vector whose target lies in a jump goes to the sparser side of it (its one-hot). With weights the one-hot
    # keeps moving to lighter entries past ``top``: push those thresholds out until feasible.
    need = ev.h > target + tol / beta
    t = xp.where(need, xp.maximum(t, xp.where(xp.isfinite(hi), hi, top)), t)
    ev = eng.evaluate_vec(t)
    for step in range(65 if eng.weighted else 0):
        need = ev.h > target + tol / beta
        if not bool(xp.any(need)):
            break
        t = xp.where(need, xp.maximum(2 * t, top) if step < 64 else xp.inf * t, t)
        ev = eng.evaluate_vec(t)
    out = eng.write_each(ev)
    sp = eng.to_host(beta * (eng.wnorm - ev.h))
    sp = np.where(eng.to_host(eng.zero_mask), 1.0, sp)
    return out, sp, it


def solve_groups(eng, gid, starts, sparsity, *, margin, tol, max_iter: int):
    """Many independent groups at once: one batched safeguarded Newton over a vector of dual variables.

    ``gid`` (engine-native int array) maps vectors to groups, groups are contiguous (``starts``: host offsets of
    each group's first vector, length G + 1); ``sparsity``, ``margin`` and ``tol`` are host arrays of G. Every
    evaluation is one pass over the groups whose mu moved, so per-call and per-kernel overheads are paid once for
    the set, and a settled group's data is not read again.
    Groups still unsettled after BATCH_ITERS passes (ties, hard cases) come back in ``jumped`` for the scalar
    solver. Returns ``(flat_output, mu (host G), S (host G), iterations, evaluations, jumped (host bool G))``.
    """
    xp = eng.xp
    G = len(starts) - 1
    beta = eng.beta
    gid_h = eng.to_host(gid)
    counts = np.diff(starts).astype(np.float64)

    def gsum(values):
        return eng.group_sum(values, gid, G)

    def dev(a):
        return eng.from_host(np.asarray(a, dtype=np.float64))

    # one reference exponent per group (see _solver.reference_exponent)
    zero = eng.to_host(eng.zero_mask)
    ratio_top = eng.ratio_host / eng.beta_host
    p = np.where(zero, 0, eng.e_host + np.frexp(ratio_top)[1])
    p_max = np.full(G, -(10**6), dtype=np.int64)
    p_min = np.full(G, 10**6, dtype=np.int64)
    np.maximum.at(p_max, gid_h[~zero], p[~zero])
    np.minimum.at(p_min, gid_h[~zero], p[~zero])
    E = np.array([reference_exponent(int(a), int(b)) for a, b in zip(p_max, p_min)], dtype=np.int64)
    eng.set_shift(E[gid_h] - eng.e_host)
    top = np.zeros(G)
    np.maximum.at(top, gid_h, np.ldexp(ratio_top, eng.e_host - E[gid_h]))
    need_h = np.minimum(counts * (sparsity + margin), counts)
    need, band = dev(need_h), dev(tol * counts)
    target = dev(counts * sparsity)
    aim = need + 0.5 * band
    dt = eng.ldexp(beta, eng.shift)

    last = np.full(G, np.nan)  # each group's mu at the evaluation before (NaN: none)

    def evaluate(mu):
        # only the groups whose mu moved are evaluated again: a settled group keeps its mu, and the engine keeps
        # its vectors' sums from the pass that took them at that mu (the torch engine skips their pieces: a
        # batch's later passes and its final one then read only the unsettled groups, not the whole set)
        nonlocal last
        mu_h = eng.to_host(mu)
        live = ~(mu_h == last)
        last = mu_h.copy()
        ev = eng.evaluate_vec(eng.ldexp(mu[gid] * beta, eng.shift), live=live[gid_h])
        sp = beta * (eng.wnorm - ev.h)
        ds = xp.where(ev.dh != 0, -beta * ev.dh * dt, 0.0)
        return ev, gsum(sp), gsum(ds)

    mu = dev(np.zeros(G))
    ev, S, dS = evaluate(mu)
    evals = 1
    early = (S >= target) | (dev(sparsity == 0) > 0)
    ones = dev(need_h >= counts) > 0
    mu = xp.where(ones & ~early, xp.inf * xp.ones_like(mu), mu)
    lo, hi = xp.zeros_like(mu), dev(top * (1 + 1e-9))
    done = early | ones
    converged = early | ones
    if eng.weighted:
        # one-hot vectors keep moving (to lower-weight entries) past the top: push each group's top until feasible
        for _ in range(64):
            _, S_hi, _ = evaluate(hi)
            evals += 1
            bad = (S_hi < need) & ~done
            if not bool(xp.any(bad)):
                break
            lo = xp.where(bad, hi, lo)
            hi = xp.where(bad, 2 * hi, hi)
    slow = xp.zeros_like(mu)
    prev = xp.full_like(mu, math.inf)
    it = 0
    while it < min(max_iter, BATCH_ITERS) and not bool(xp.all(done)):
        it += 1
        newton = mu + (aim - S) / xp.where(dS > 0, dS, 1.0)
        ok = (slow < 2) & (dS > 0) & (newton > lo) & (newton < hi)
        cand = xp.where(ok, newton, _host_mid(eng, lo, hi))
        slow = xp.where(ok, slow, 0.0)
        mu = xp.where(done, mu, cand)
        ev, S, dS = evaluate(mu)
        evals += 1
        res = xp.abs(S - aim)
        slow = xp.where(res > 0.5 * prev, slow + 1, 0.0)
        prev = res
        feas = S >= need
        lo = xp.where(~feas & ~done, mu, lo)
        hi = xp.where(feas & ~done, mu, hi)
        conv = feas & (S <= need + band) & ~done
        converged = converged | conv
        done = done | conv | _adjacent(eng, lo, hi)
    jumped = eng.to_host(~converged)
    final = xp.where(converged, mu, hi)
    ev, S, _ = evaluate(final)
    evals += 1
    written = eng.write_state(*ev.state)
    keep = eng.to_host(early)
    if keep.any():  # groups already sparse enough come back bit-for-bit (-0.0 included); copied only then (1x the input)
        out = eng.merge_vectors(written, eng.copy_input(), eng.from_host(keep[gid_h]))
    else:
        out = written
    return out, np.ldexp(eng.to_host(final), E), eng.to_host(S), it, evals, jumped
