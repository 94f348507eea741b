"""The grouped solve with its Newton loop on the device: no host sync between Newton steps.

``_solver.solve_shared`` reads S(mu) on the host after every evaluation (one device-to-host sync per step, which
makes a GPU solve launch-bound). ``solve_device`` runs the same iteration as tensor ops: candidate, safeguard,
bisection on ordered bit patterns, bracket update and convergence are 0-d device tensors combined with
``torch.where``, so the candidates are the same doubles ``solve_shared`` computes (same IEEE operations) and the
result is the same. The host looks at the state once every ``check_every`` steps; steps after convergence inside a
block are evaluated and discarded. Around the loop the host syncs a fixed few times: the setup (the engine's
per-vector constants), S(0) for the early return, and the end (ties are split on the host by ``split_ties``).

Weighted groups (their top is pushed out by doubling, a host loop) and a single process only; anything else goes
through ``solve_shared``. docs/torch-engine.md.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import torch

from ._solver import (MAX_SECANTS, Evaluation, ProjectionInfo, ProjectionWarning, _resolve_jump, _write, mu_above_top,
                      one_hot_top, reference_exponent, solve_shared)

CHECK_EVERY = 8
_SIGN = -0x8000000000000000


def _key(x):
    """Ordered int64 key of a float64 tensor (``_solver.to_key`` on the device)."""
    b = x.view(torch.int64)
    return torch.where(b < 0, _SIGN - b, b)


def _unkey(k):
    return torch.where(k < 0, _SIGN - k, k).view(torch.float64)


def key_mid(lo, hi):
    a, b = _key(lo), _key(hi)
    return _unkey(a + torch.div(b - a, 2, rounding_mode="floor"))


def _setup(eng, sparsity, margin, tol):
    """The constants ``solve_shared`` derives before its loop (one process), from the engine's host arrays."""
    r = eng.n_vectors
    top_key, p_min = one_hot_top(eng)
    nzv = eng.cnorm_host > 0
    low = int(eng.e_host[nzv].min()) if nzv.any() else 10**6
    p_top = math.floor(top_key) if math.isfinite(top_key) else 0
    E = reference_exponent(p_top, p_min)
    eng.set_shift(E - eng.e_host)
    mu_top = mu_above_top(top_key, p_top, E)
    need = min(r * (sparsity + margin), float(r))
    band = tol * r
    with np.errstate(over="ignore"):
        bound = float(np.max(np.ldexp(eng.cnorm_host, eng.e_host)))
    return E, mu_top, r * sparsity, need, band, need + 0.5 * band, low, bound


class _State:
    """One end of the bracket (or the current point) as device tensors: mu, S, dS, per-vector sp and state."""

    def __init__(self, mu, S, dS, sp, state):
        self.mu, self.S, self.dS, self.sp, self.state = mu, S, dS, sp, state

    def where(self, cond, other: "_State") -> "_State":
        """``other`` where the 0-d ``cond`` holds, else self (every field, no sync)."""
        t, st, oh = self.state
        t2, st2, oh2 = other.state
        pick = [torch.where(cond, b, a) for a, b in ((self.mu, other.mu), (self.S, other.S), (self.dS, other.dS),
                                                     (self.sp, other.sp), (t, t2), (st, st2), (oh, oh2))]
        return _State(*pick[:4], tuple(pick[4:]))

    def host(self) -> Evaluation:
        ev = Evaluation(float(self.mu), None, None, self.state, S=float(self.S), dS=float(self.dS))
        ev.sp = self.sp
        return ev


def solve_device(eng, sparsity: float, *, margin: float = 0.0, tol: float, max_iter: int, mu0: float | None = None,
                 check_every: int = CHECK_EVERY, guard=contextlib.nullcontext):
    """``solve_shared`` for one ``TorchEngine`` with the Newton loop on the device; same ``(flat, info)``.
    ``guard()`` is entered around each block of steps (tests pass one that fails on any host sync)."""
    if eng.weighted or eng.n_vectors == 0:
        return solve_shared(eng, sparsity, margin=margin, tol=tol, max_iter=max_iter, mu0=mu0)
    eng.compact = False  # (the host solver's CPU compaction adds its sums in another order; a device never compacts)
    E, mu_top, target, need, band, aim, low, bound = _setup(eng, sparsity, margin, tol)
    r = eng.n_vectors
    evals = 1

    def info(mu, S, it, **kw):
        res = ProjectionInfo(mu=float(np.ldexp(mu, E)), iterations=it, evaluations=evals, sparsity=float(S / r),
                             target=sparsity, converged=kw.pop("conv", True), engine=eng.name, n_vectors=r,
                             discontinuity=kw.pop("disc", False), margin=margin, **kw)
        res.bound, res.low = bound, low
        return res

    ev0 = eng.evaluate_shared(0.0)  # one sync: S(0) decides the early returns
    if sparsity == 0.0 or ev0.S >= target:
        return eng.copy_input(), info(0.0, ev0.S, 0, already_sparse=True)
    if need >= r:
        ev = eng.evaluate_shared(math.inf)
        evals += 1
        return _write(eng, ev, ev), info(math.inf, ev.S, 1)
    dev = eng.device

    def scalar(v):
        return torch.full((), v, dtype=torch.float64, device=dev)

    def point(mu) -> _State:
        return _State(mu, *eng.evaluate_device(mu))

    eng.argmax_pos  # noqa: B018 (found once, before the loop: one-hot positions of vectors that empty out)
    lo = _State(scalar(0.0), scalar(ev0.S), scalar(ev0.dS), ev0.sp, ev0.state)
    hi = lo  # a placeholder until has_hi
    has_hi = torch.zeros((), dtype=torch.bool, device=dev)
    converged = torch.zeros_like(has_hi)
    top_mu = scalar(mu_top)
    r_all = scalar(float(r))  # S past the top: every vector one-hot
    cur = lo
    m0 = math.ldexp(mu0, -E) if mu0 else math.nan
    d2S = scalar(math.nan)  # the slopes' secant, as solve_shared keeps it (``_solver.curvature``)
    if 0.0 < m0 < mu_top:  # the warm start, as solve_shared takes it
        cur = point(scalar(m0))
        d2S = torch.where(cur.mu != lo.mu, (cur.dS - lo.dS) / (cur.mu - lo.mu), d2S)
        evals += 1
        below = cur.S < need
        lo, hi = lo.where(below, cur), hi.where(~below, cur)
        has_hi = ~below
        converged = ~below & (cur.S <= need + band)
    slow, prev = scalar(0.0), scalar(math.inf)
    secants = scalar(0.0)
    disc = torch.zeros_like(has_hi)
    n_it = torch.zeros((), dtype=torch.int64, device=dev)  # steps taken (a jump found counts, as on the host)
    n_ev = torch.zeros_like(n_it)  # evaluations that counted
    steps = 0
    while steps < max_iter:
        if (steps or cur is not lo) and bool(converged | disc):  # the host looks once per block
            break
        with guard():
            for _ in range(min(check_every, max_iter - steps)):
                steps += 1
                active = ~(converged | disc)
                n_it = n_it + active.long()
                top = torch.where(has_hi, hi.mu, top_mu)
                S_top = torch.where(has_hi, hi.S, r_all)
                dSs = torch.where(cur.dS > 0, cur.dS, 1.0)
                f = cur.S - aim
                newton = cur.mu - f / dSs
                den = 2.0 * dSs * dSs - f * d2S  # Halley's correction as in _solver.newton_step
                halley = (lo.mu < newton) & (newton < top) & (den > dSs * dSs)
                newton = torch.where(halley, cur.mu - 2.0 * f * dSs / den, newton)
                use_newton = (slow < 2) & (cur.dS > 0) & (lo.mu < newton) & (newton < top)
                up = S_top > lo.S
                secant = lo.mu + (aim - lo.S) * ((top - lo.mu) / torch.where(up, S_top - lo.S, 1.0))
                use_secant = ~use_newton & (lo.mu == 0.0) & (secants < MAX_SECANTS) & up
                use_secant = use_secant & (lo.mu < secant) & (secant < top)
                mid = key_mid(lo.mu, top)
                use_mid = ~use_newton & ~use_secant
                jump = use_mid & (mid == lo.mu)  # adjacent doubles, no root between
                disc = disc | (active & jump)
                active = active & ~jump
                n_ev = n_ev + active.long()
                slow = torch.where(active & use_mid, 0.0, slow)
                secants = secants + (active & use_secant).double()
                ev = point(torch.where(use_newton, newton, torch.where(use_secant, secant, mid)))
                d2S = torch.where(active & (ev.mu != cur.mu), (ev.dS - cur.dS) / (ev.mu - cur.mu), d2S)
                res = (ev.S - aim).abs()
                slow = torch.where(active, torch.where(res > 0.5 * prev, slow + 1, 0.0), slow)
                prev = torch.where(active, res, prev)
                below = ev.S < need
                lo, hi = lo.where(active & below, ev), hi.where(active & ~below, ev)
                has_hi = has_hi | (active & ~below)
                cur = cur.where(active, ev)
                converged = converged | (active & has_hi & (hi.S <= need + band))
    conv_h, disc_h, has_hi_h, it, n = torch.stack([converged.long(), disc.long(), has_hi.long(), n_it, n_ev]).tolist()
    evals += n
    lo_ev = lo.host()
    if not has_hi_h:  # the top is always feasible
        hi_ev = eng.evaluate_shared(mu_top)
        evals += 1
    else:
        hi_ev = hi.host()
    if disc_h:
        out, S, n_full, n_part = _resolve_jump(eng, _one_process(), lo_ev, hi_ev, need, aim)
        return out, info(hi_ev.mu, S, it, disc=True, n_jumped=n_full, n_partial=n_part)
    if not conv_h:
        warnings.warn(f"grouped projection stopped after max_iter={max_iter} iterations; returning the feasible "
                      f"point with average sparsity {hi_ev.S / r:.12g} (target {sparsity})", ProjectionWarning,
                      stacklevel=3)
    return _write(eng, hi_ev, hi_ev), info(hi_ev.mu, hi_ev.S, it, conv=bool(conv_h))


def _one_process():
    from ._solver import LocalComm

    return LocalComm()
