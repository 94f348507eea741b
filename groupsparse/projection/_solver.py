"""Root finding on the dual, shared by every engine.

Notation (REFERENCE.md §2). For vector i with magnitudes a_i = |c_i|, weights w_i (1 when unweighted) and a
threshold t_i, let u_i = (a_i - t_i w_i)_+ and

    h_i(t_i) = <w_i, u_i> / ||u_i||,      h_i'(t_i) = -||w_{I_i}||^2 / ||u_i|| + <w_i, u_i>^2 / ||u_i||^3

(one-hot vectors: h_i = w_{j*}, h_i' = 0). The weighted Hoyer sparsity of x_i = u_i/||u_i|| is
beta_i (||w_i|| - h_i). The grouped projection shares one dual variable mu >= 0 with t_i = mu beta_i and solves
g(mu) = sum_i beta_i h_i(mu beta_i) = k := sum_i beta_i ||w_i|| - r s; the per-vector projection solves each
h_i(t_i) = ||w_i|| - s / beta_i on its own (t_i may be negative: that makes a vector denser).

Engines provide ``evaluate(t) -> Evaluation`` (per-vector h, h', and whatever they need to write the output),
``confirm_lower(t)`` (entries below a proven lower bound can be dropped for good), and ``write(...)``.
``comm`` turns the local sums into group sums; the distributed projection passes one backed by all-reduce.
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

    def sum(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    def max(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    def gather(self, values: np.ndarray) -> list[np.ndarray]:
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
    g: float = math.nan  # group sum (after comm)
    dg: float = math.nan


@dataclass
class ProjectionInfo:
    """What the solver did. ``sparsity`` is the achieved average (weighted) Hoyer sparsity of the result."""

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
    n_jumped: int = 0  # vectors sent to one-hot at a discontinuity (only as many as needed)
    collectives: int = 0  # collective calls made (groupsparse.distributed; 0 in one process)
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def select_jumpers(drops: np.ndarray, need: float) -> np.ndarray:
    """Indices (into ``drops``) of the fewest jumps whose summed drop of g reaches ``need``.

    Largest drops first; ties keep index order, so the choice is deterministic across engines and ranks.
    """
    order = np.argsort(-drops, kind="stable")
    cum = np.cumsum(drops[order])
    count = int(np.searchsorted(cum, need, side="left")) + 1
    return order[: min(count, len(order))]


def solve_shared(eng, sparsity: float, *, tol: float, max_iter: int, comm=None):
    """Grouped projection: Newton on g(mu) = k with a bracket, bisection fallback and tie resolution.

    Returns ``(flat_output, ProjectionInfo)``.
    """
    comm = comm or LocalComm()
    r_tot, base, mu_top, weighted = _group_constants(eng, comm)
    k = base - r_tot * sparsity
    # g is a sum of r terms each about beta*||w||: this is its rounding noise, in g's units.
    slack = 64 * np.finfo(np.float64).eps * max(base, 1.0)
    evals = 0

    def evaluate(mu: float) -> Evaluation:
        nonlocal evals
        evals += 1
        ev = eng.evaluate_shared(mu)
        ev.g, ev.dg = (float(v) for v in comm.sum(np.array([ev.g, ev.dg])))
        return ev

    def info(ev_mu, g, it, disc=False, conv=True, n_jumped=0, early=False):
        return ProjectionInfo(
            mu=float(ev_mu), iterations=it, evaluations=evals, sparsity=float((base - g) / r_tot),
            target=sparsity, discontinuity=disc, converged=conv, engine=eng.name, n_vectors=int(r_tot),
            already_sparse=early, n_jumped=n_jumped,
        )

    ev0 = evaluate(0.0)
    if ev0.g <= k + slack:
        return eng.copy_input(), info(0.0, ev0.g, 0, early=True)
    if sparsity >= 1.0:
        ev = evaluate(math.inf)
        return eng.write_shared(ev, None, None), info(math.inf, ev.g, 1)

    band = tol * r_tot  # accept g in [k - band, k]
    target = k - 0.5 * band  # aim inside the feasible side, so Newton from the left lands feasible
    lo, hi = ev0, None
    hi_mu = mu_top
    if weighted:
        # One-hot vectors keep moving (to lower-weight entries) past mu_top; push the top until feasible.
        hi = evaluate(hi_mu)
        while hi.g > k + slack:
            lo = hi
            eng.confirm_lower(lo.mu)
            hi_mu *= 2.0
            hi = evaluate(hi_mu)
    cur = lo
    it = 0
    slow = 0
    prev_res = math.inf
    converged = False
    disc = False
    while it < max_iter:
        it += 1
        top = hi.mu if hi is not None else hi_mu
        cand = math.nan
        if slow < 2 and cur.dg < 0:
            cand = cur.mu - (cur.g - target) / cur.dg
        if not (lo.mu < cand < top):
            cand = 0.5 * (lo.mu + top)
            slow = 0
        ev = evaluate(cand)
        res = abs(ev.g - target)
        slow = slow + 1 if res > 0.5 * prev_res else 0
        prev_res = res
        if ev.g > k + slack:
            lo = ev
            eng.confirm_lower(lo.mu)
        else:
            hi = ev
        cur = ev
        if hi is not None and hi.g >= k - band:
            converged = True
            break
        top = hi.mu if hi is not None else hi_mu
        if top - lo.mu <= 4 * math.ulp(top):
            disc = True
            break
    if hi is None:  # max_iter hit before any feasible evaluation: the top is always feasible
        hi = evaluate(hi_mu)
    if disc:
        out, n_jumped, g = _resolve_jump(eng, comm, lo, hi, k, slack)
        return out, info(hi.mu, g, it, disc=True, n_jumped=n_jumped)
    if not converged:
        warnings.warn(
            f"grouped projection stopped after max_iter={max_iter} iterations; returning the feasible point with "
            f"average sparsity {(base - hi.g) / r_tot:.12g} (target {sparsity})",
            ProjectionWarning,
            stacklevel=3,
        )
    return eng.write_shared(hi, None, None), info(hi.mu, hi.g, it, conv=converged)


def _group_constants(eng, comm):
    beta_h, wnorm_h = eng.beta_host, eng.wnorm_host
    r_tot, base = comm.sum(np.array([float(eng.n_vectors), float(np.sum(beta_h * wnorm_h))]))
    # ``weighted`` decides on extra (collective) evaluations, so every rank must take it from the group
    mu_top, weighted = comm.max(np.array([eng.mu_top(), float(eng.weighted)]))
    # strictly inside the all-one-hot region: (max/beta)*beta may round back onto the largest entry
    return int(round(r_tot)), float(base), float(mu_top) * (1 + 1e-9), bool(weighted)


def _resolve_jump(eng, comm, lo: Evaluation, hi: Evaluation, k: float, slack: float):
    """g jumps over k between lo and hi (tied largest entries): send only as many tied vectors to one-hot as
    needed to land on the feasible side, keep the others at their left limit (mass spread over the ties)."""
    beta = eng.beta_host
    c_lo = beta * eng.to_host(lo.h)
    c_hi = beta * eng.to_host(hi.h)
    drop = c_lo - c_hi
    # Jumps are at least (sqrt(2) - 1) beta w_min; continuous changes across a bracket this narrow are ~1e-12.
    jumper = drop > 1e-6 * beta * eng.wmin_host
    drops_all = comm.gather(drop[jumper])
    sizes = [len(d) for d in drops_all]
    drops_cat = np.concatenate(drops_all) if sizes else np.zeros(0)
    base = hi.g + float(drops_cat.sum())  # every jumper at its left limit, everyone else at hi
    need = base - k + slack
    chosen_global = select_jumpers(drops_cat, need) if need > 0 else np.zeros(0, dtype=np.int64)
    start = sum(sizes[: comm.rank])
    mine = chosen_global[(chosen_global >= start) & (chosen_global < start + sizes[comm.rank])] - start
    use_lo = np.zeros(eng.n_vectors, dtype=bool)
    idx = np.flatnonzero(jumper)
    use_lo[idx] = True
    use_lo[idx[mine]] = False
    g = base - float(drops_cat[chosen_global].sum())
    return eng.write_shared(hi, lo, use_lo), len(chosen_global), g


def solve_each(eng, sparsity: float, *, tol: float, max_iter: int):
    """Per-vector projection: every vector to exactly ``sparsity`` (same l2 norm), batched safeguarded Newton."""
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
    lo = eng.full(-math.inf)
    hi = eng.full(math.inf)
    top = eng.ratio_max  # at or above this threshold a vector is one-hot
    done = eng.zero_mask | (xp.abs(ev.h - target) <= tol / beta)
    it = 0
    while it < max_iter:
        if bool(xp.all(done)):
            break
        it += 1
        above = ev.h > target  # needs a larger threshold (sparser)
        lo = xp.where(above, t, lo)
        hi = xp.where(above, hi, t)
        newton = t - (ev.h - target) / xp.where(ev.dh < 0, ev.dh, -1.0)
        newton = xp.where(ev.dh < 0, newton, xp.nan * t)
        # Bracket ends that are still open: the one-hot top above, a doubling step below.
        hi_eff = xp.where(xp.isfinite(hi), hi, top)
        lo_eff = xp.where(xp.isfinite(lo), lo, xp.minimum(2 * t, -top) - 1e-300)
        inside = (newton > lo_eff) & (newton < hi_eff)
        mid = xp.where(xp.isfinite(lo), 0.5 * (lo_eff + hi_eff), lo_eff)
        cand = xp.where(inside, newton, mid)
        t = xp.where(done, t, cand)
        ev = eng.evaluate_vec(t)
        width_tiny = (hi_eff - lo_eff) <= 4 * xp.abs(hi_eff) * np.finfo(np.float64).eps
        done = done | (xp.abs(ev.h - target) <= tol / beta) | width_tiny
    if not bool(xp.all(done)):
        warnings.warn(f"project_each stopped after max_iter={max_iter} iterations with some vectors unsettled; "
                      "those are returned at the sparser end of their bracket", ProjectionWarning, stacklevel=3)
        t = xp.where(done, t, xp.where(xp.isfinite(hi), hi, top))
        ev = eng.evaluate_vec(t)
    # A vector whose target lies in a jump (ties at the top) goes to the sparser side: its one-hot. With weights
    # the one-hot keeps moving to lighter entries past ``top``: push those thresholds out until feasible.
    need = ev.h > target + tol / beta
    t = xp.where(need, xp.maximum(t, top), t)
    ev = eng.evaluate_vec(t)
    for step in range(65 if eng.weighted else 0):
        need = ev.h > target + tol / beta
        if not bool(xp.any(need)):
            break
        t = xp.where(need, 2 * t if step < 64 else xp.inf * t, t)  # the last resort is the t -> inf limit
        ev = eng.evaluate_vec(t)
    out = eng.write_each(ev)
    sp = eng.to_host(beta * (eng.wnorm - ev.h))
    sp = np.where(eng.to_host(eng.zero_mask), 1.0, sp)
    return out, sp, it


def solve_groups(eng, gid, starts, sparsity, *, tol, max_iter: int):
    """Many independent groups at once: one batched safeguarded Newton over a vector of dual variables.

    ``gid`` (engine-native int array) maps vectors to groups, groups are contiguous (``starts``: host offsets of
    each group's first vector, length G + 1). ``sparsity`` is a host array of G targets. Every evaluation is
    one pass over all groups, so per-call and per-kernel overheads are paid once for the whole set (a model's
    layers in one call). ``tol`` is one tolerance or one per group. Groups whose g jumps over k (ties) come back in ``jumped`` for the scalar solver.

    Returns ``(flat_output, mu (host G), g (host G), iterations, evaluations, jumped (host bool G),
    converged (host bool G))``.
    """
    xp = eng.xp
    G = len(starts) - 1
    beta = eng.beta

    def gsum(values):
        return eng.group_sum(values, gid, G)

    def dev(a):
        return eng.from_host(np.asarray(a, dtype=np.float64))

    counts = np.diff(starts).astype(np.float64)
    base = eng.to_host(gsum(beta * eng.wnorm))
    k = base - counts * sparsity
    slack = 64 * np.finfo(np.float64).eps * np.maximum(base, 1.0)
    band = tol * counts
    k_d, slack_d, band_d = dev(k), dev(slack), dev(band)
    aim = k_d - 0.5 * band_d
    mu_top = dev(eng.to_host(eng.group_max(eng.ratio_max / beta, gid, G)) * (1 + 1e-9))

    def evaluate(mu):
        ev = eng.evaluate_vec(mu[gid] * beta)
        return ev, gsum(beta * ev.h), gsum(beta * beta * ev.dh)

    mu = dev(np.zeros(G))
    ev, g, dg = evaluate(mu)
    evals = 1
    early = g <= k_d + slack_d
    ones = dev(sparsity >= 1.0) > 0
    mu = xp.where(ones & ~early, xp.inf * xp.ones_like(mu), mu)
    lo, hi = xp.zeros_like(mu), mu_top * 1.0
    done = early | ones
    converged = early | ones
    if eng.weighted:
        # One-hot vectors keep moving (to lower-weight entries) past mu_top: push each group's top until feasible.
        for _ in range(64):
            _, g_hi, _ = evaluate(hi)
            evals += 1
            bad = (g_hi > k_d + slack_d) & ~done
            if not bool(xp.any(bad)):
                break
            lo = xp.where(bad, hi, lo)
            hi = xp.where(bad, 2 * hi, hi)
    slow = xp.zeros_like(mu)
    prev = xp.full_like(mu, math.inf)
    it = 0
    # Newton settles a group in a handful of passes; a group still going after BATCH_ITERS is bisecting towards a
    # jump (ties) or is hard, and every extra pass here costs all groups: hand it to the scalar solver instead.
    while it < min(max_iter, BATCH_ITERS) and not bool(xp.all(done)):
        it += 1
        newton = mu - (g - aim) / xp.where(dg < 0, dg, -1.0)
        ok = (slow < 2) & (dg < 0) & (newton > lo) & (newton < hi)
        cand = xp.where(ok, newton, 0.5 * (lo + hi))
        slow = xp.where(ok, slow, 0.0)
        mu = xp.where(done, mu, cand)
        ev, g, dg = evaluate(mu)
        evals += 1
        res = xp.abs(g - aim)
        slow = xp.where(res > 0.5 * prev, slow + 1, 0.0)
        prev = res
        feas = g <= k_d + slack_d
        lo = xp.where(~feas & ~done, mu, lo)
        hi = xp.where(feas & ~done, mu, hi)
        conv = feas & (g >= k_d - band_d) & ~done
        converged = converged | conv
        done = done | conv | ((hi - lo) <= 4 * np.finfo(np.float64).eps * hi)
    jumped = eng.to_host(~converged)
    final = xp.where(converged, mu, hi)
    ev = eng.evaluate_vec(final[gid] * beta)
    evals += 1
    g_final = eng.to_host(gsum(beta * ev.h))
    out = eng.write_shared(ev, None, None)
    return out, eng.to_host(final), g_final, base, it, evals, jumped, eng.to_host(converged)
