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
def _g_sums(sums, beta):
    """g and g' from per-row sums (count, sum u, sum u^2) of u = (|x| - t)_+ (REFERENCE.md §2)."""
    g = 0.0
    dg = 0.0
    for i in range(sums.shape[0]):
        m, su, suu = sums[i, 0], sums[i, 1], sums[i, 2]
        if suu > 0.0:
            nu = math.sqrt(suu)
            h = su / nu
            g += beta * h
            dg += beta * beta * (-m + h * h) / nu
        else:
            g += beta  # one-hot (or zero) row: h = 1
    return g, dg


@_jit(fastmath=_FM)
def _g_rows(x, t, sums):
    """g(mu) and g'(mu) with t = mu * beta (equal row lengths, so one beta); per-row sums kept in ``sums``."""
    r, p = x.shape
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
    return _g_sums(sums, 1.0 / (math.sqrt(p) - 1.0))


@_jit(fastmath=_FM)
def _piece_root(sums, t0, aim, t_lo, t_hi, beta, band):
    """Newton in O(r) on the smooth piece of g through t0: with the supports held fixed, the per-row sums at t
    follow from those at t0 (sum u - m dt, sum u^2 - 2 dt sum u + m dt^2). Returns a candidate t in
    (t_lo, t_hi), or NaN. Only a candidate: the caller evaluates g there directly (the supports may change)."""
    dt = 0.0
    best = math.nan
    for it in range(30):
        g = 0.0
        dg = 0.0
        for i in range(sums.shape[0]):
            m = sums[i, 0]
            su = sums[i, 1] - m * dt
            suu = sums[i, 2] - dt * (2.0 * sums[i, 1] - m * dt)
            if su > 0.0 and suu > 0.0:
                nu = math.sqrt(suu)
                h = su / nu
                g += beta * h
                dg += beta * (-m + h * h) / nu
            else:
                g += beta
        if it > 0:
            t = t0 + dt
            if not (t_lo < t < t_hi):
                break
            best = t
            if abs(g - aim) <= 0.25 * band:
                break
        if not dg < 0.0:
            break
        step = (g - aim) / dg
        dt -= step
        if abs(step) <= 4 * _EPS * abs(t0 + dt):
            t = t0 + dt
            if t_lo < t < t_hi:
                best = t
            break
    return best


@_jit(fastmath=_FM)
def _eval_write(x, t, sums, out):
    """g(t) and g'(t) evaluated directly, writing out_i = alpha_i x_i(mu) with the least-squares scale alpha_i
    (REFERENCE.md §2) in the same pass: a row is rescaled while it is still in cache."""
    r, p = x.shape
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
            out[i, j] = u
        sums[i, 0] = m
        sums[i, 1] = su
        sums[i, 2] = suu
        if suu > 0.0:
            sc = (suu + t * su) / suu
            for j in range(p):
                v = out[i, j] * sc
                out[i, j] = v if x[i, j] >= 0.0 else -v
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
    return _g_sums(sums, 1.0 / (math.sqrt(p) - 1.0))


@_jit(fastmath=_FM)
def _solve(x, s, mu0, tol, max_iter, out, sums, warm):
    """GSP of the rows of ``x`` given ``sums`` at mu = 0 and ``warm`` at mu0 (both as from :func:`_g_rows`;
    ``warm`` is overwritten). Returns (status, mu) as :func:`gsp_rows_warm`."""
    r, p = x.shape
    sq = math.sqrt(p)
    beta = 1.0 / (sq - 1.0)
    base = r * beta * sq
    k = base - r * s
    slack = 64 * _EPS * max(base, 1.0)
    band = tol * r
    aim = k - 0.5 * band
    g, dg = _g_sums(sums, beta)
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
    piece = sums
    if 0.0 < mu0 < top:  # warm start: the previous root usually lies on the new root's piece or next to it
        mu = mu0
        piece = warm
        g, dg = _g_sums(warm, beta)
        if g > k + slack:
            lo = mu
        else:
            hi = mu
            if g >= k - band:
                _eval_write(x, mu * beta, warm, out)
                return 1, mu
    slow = 0
    prev_res = abs(g - aim)
    for _ in range(max_iter):
        cand = math.nan
        if slow < 2:
            cand = _piece_root(piece, mu * beta, aim, lo * beta, hi * beta, beta, band) / beta
        if not (lo < cand < hi):
            cand = 0.5 * (lo + hi)
            slow = 0
        mu = cand
        piece = warm
        g, dg = _eval_write(x, mu * beta, piece, out)
        res = abs(g - aim)
        slow = slow + 1 if res > 0.5 * prev_res else 0
        prev_res = res
        if g > k + slack:
            lo = mu
        else:
            hi = mu
            if g >= k - band:
                return 1, mu
        if hi - lo <= 4 * _EPS * hi:
            break
    return -1, 0.0


@_jit(fastmath=_FM)
def gsp_rows_warm(x, s, mu0, tol, max_iter, out):
    """GSP of the rows of ``x`` (r x p, p >= 2) into ``out``. Returns (status, mu): status 0 = already at least
    s on average (out = x), 1 = solved, -1 = ask ``groupsparse.project`` (ties, no convergence, over/underflow)."""
    r, p = x.shape
    sums = np.empty((r, 3))
    warm = np.empty((r, 3))
    _g_rows(x, 0.0, sums)
    if mu0 > 0.0:
        _g_rows(x, mu0 / (math.sqrt(p) - 1.0), warm)
    return _solve(x, s, mu0, tol, max_iter, out, sums, warm)


def gsp_rows(C: np.ndarray, s: float, tol: float = 1e-12, max_iter: int = 100, mu0: float = 0.0):
    """GSP of the rows of a float64 matrix; ``None`` when the caller should use ``groupsparse.project``."""
    C = np.ascontiguousarray(C, dtype=np.float64)
    out = np.empty_like(C)
    status, _ = gsp_rows_warm(C, float(s), float(mu0), float(tol), int(max_iter), out)
    return None if status < 0 else out


@_jit(fastmath=_FM)
def _grad_step(Y, B, G, inv, t, Fn, sums, warm):
    """Fn = max(0, Y - (G - B) / L) with G = AY, and in the same pass the sums of :func:`_g_rows` at mu = 0
    (``sums``) and at the warm start t = mu0 beta (``warm``): two evaluations of g for the price of none."""
    r, p = Y.shape
    for i in range(r):
        m0 = 0.0
        s0 = 0.0
        ss0 = 0.0
        m = 0.0
        su = 0.0
        suu = 0.0
        for j in range(p):
            v = Y[i, j] + inv * (B[i, j] - G[i, j])
            v = v if v > 0.0 else 0.0
            Fn[i, j] = v
            m0 += 1.0 if v > 0.0 else 0.0
            s0 += v
            ss0 += v * v
            d = v - t
            pos = d > 0.0
            u = d if pos else 0.0
            m += 1.0 if pos else 0.0
            su += u
            suu += u * u
        sums[i, 0] = m0
        sums[i, 1] = s0
        sums[i, 2] = ss0
        warm[i, 0] = m
        warm[i, 1] = su
        warm[i, 2] = suu


@_jit(fastmath=_FM)
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
    G = np.empty_like(F)
    sums = np.empty((r, 3))
    warm = np.empty((r, 3))
    tb = 1.0 / (math.sqrt(p) - 1.0) if p >= 2 else 0.0  # t = mu * beta
    alpha = 0.1
    first = -1.0
    steps = 0
    inv = 1.0 / L
    mu = mu0
    for _ in range(max_inner):
        steps += 1
        np.dot(A, Y, G)  # BLAS: about twice as fast as a compiled loop at r = 10, p = 100 (measured)
        if project_rows:
            _grad_step(Y, B, G, inv, mu * tb, Fn, sums, warm)
            status, mu_new = _solve(Fn, s, mu, 1e-12, 100, P, sums, warm)
            if status < 0:
                return Fo, steps, False, mu0
            if status == 1:
                mu = mu_new
                Fn, P = P, Fn
        else:
            for i in range(r):
                for j in range(p):
                    v = Y[i, j] + inv * (B[i, j] - G[i, j])
                    Fn[i, j] = v if v > 0.0 else 0.0
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


@_jit(fastmath=_FM)
def _hals_rows(F, A, B, lam, max_sweeps, delta2):
    """In place: HALS sweeps over the rows of F for min 1/2<A, FF^T> - <B - lam 1^T, F>, F >= 0.

    Returns the number of sweeps. The residual row is built with the row index outermost so the inner loops
    stream over contiguous rows of F and B.
    """
    r, p = F.shape
    g = np.empty(p)
    first = 0.0
    sweeps = 0
    for sweep in range(max_sweeps):
        sweeps += 1
        moved = 0.0
        for k in range(r):
            akk = A[k, k]
            if akk <= 0.0:
                continue
            for j in range(p):
                g[j] = B[k, j] - lam[k]
            for l in range(r):
                alk = A[k, l]
                if alk != 0.0:
                    for j in range(p):
                        g[j] -= alk * F[l, j]
            nonzero = False
            for j in range(p):
                old = F[k, j]
                new = old + g[j] / akk
                if new < 0.0:
                    new = 0.0
                else:
                    nonzero = nonzero or new > 0.0
                d = new - old
                moved += d * d
                F[k, j] = new
            if not nonzero:
                # A dead row would stay dead forever (its A_kk from the other side goes to 0); a tiny positive
                # value lets the next update of the other factor revive the component.
                top = 0.0
                for l in range(r):
                    for j in range(p):
                        top = max(top, F[l, j])
                tiny = 1e-16 * top if top > 0.0 else 1e-16
                for j in range(p):
                    F[k, j] = tiny
        if sweep == 0:
            first = moved
        elif moved <= delta2 * first:
            break
    return sweeps


@_jit(fastmath=_FM)
def _vdot(a, b):
    s = 0.0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            s += a[i, j] * b[i, j]
    return s


@_jit(fastmath=_FM)
def _lipschitz(A, v):
    """An upper bound on the largest eigenvalue of a symmetric, entrywise non-negative A, tight to 1e-10.

    Power iteration from ``v`` (the previous call's Perron vector, updated in place: A changes little between
    outer iterations, so a few products of r x r suffice where eigvalsh costs ~8 us at r = 10). For a positive v
    the Collatz-Wielandt bounds min_i (Av)_i/v_i <= lambda_max <= max_i (Av)_i/v_i hold, so the returned upper
    bound is a valid Lipschitz constant however far the iteration got; when they do not close in 100 steps (a
    non-negative A with a zero row, a reducible A), or A has a negative entry, eigvalsh decides.
    """
    r = A.shape[0]
    w = np.empty(r)
    for i in range(r):
        for l in range(r):
            if A[i, l] < 0.0:
                return np.linalg.eigvalsh(A)[-1]
        if not v[i] > 0.0:
            v[:] = 1.0
    for _ in range(100):
        lo = math.inf
        hi = 0.0
        nw = 0.0
        for i in range(r):
            acc = 0.0
            for l in range(r):
                acc += A[i, l] * v[l]
            w[i] = acc
            nw = max(nw, acc)
            q = acc / v[i]
            lo = min(lo, q)
            hi = max(hi, q)
        if not (lo > 0.0 and hi < math.inf):
            break
        for i in range(r):
            v[i] = w[i] / nw
        if hi - lo <= 1e-10 * hi:
            return hi
    v[:] = 1.0
    return np.linalg.eigvalsh(A)[-1]


@_jit(fastmath=_FM)
def _update(F, A, B, s, use_fgm, max_inner, inner_ratio, delta2, mu, v):
    """One factor update; returns (F, ok, mu). ``s < 0``: no target (HALS or unprojected fast gradient);
    ``v``: the Perron vector of :func:`_lipschitz`."""
    if not use_fgm:
        _hals_rows(F, A, B, np.zeros(F.shape[0]), max_inner, delta2)
        return F, True, mu
    L = _lipschitz(A, v)
    if not L > 0.0:
        return F, True, mu
    Fn, _, ok, mu = fgm_rows(F, A, B, L, max(s, 0.0), s >= 0.0 and F.shape[1] >= 2, max_inner, inner_ratio, mu)
    return Fn, ok, mu


@_jit(fastmath=_FM)
def run_dense(X, Xt, Wt, H, sW, sH, fgm_free, update_W, update_H, balance, max_iter, tol, max_inner,
              inner_ratio, delta2, xnorm2, history, best_Wt, best_H, mus):
    """The Frobenius loop for a dense float64 X, compiled whole (the paper's sizes are overhead-bound).

    Same steps as ``_frobenius.factorize``: balance, update W (rows of Wt), update H, error from the cached
    products, keep the best iterate. ``sW``/``sH`` < 0 mean no target. Returns (iterations done, best
    iteration, converged, ok, Wt, H): ``ok`` False means iteration ``done + 1`` needs the core's tie handling;
    Wt and H are then the state before it, and the caller continues in Python.
    """
    best_err = history[0]
    best_it = 0
    vW = np.ones(Wt.shape[0])
    vH = np.ones(H.shape[0])
    prev = history[0]
    done = 0
    for it in range(1, max_iter + 1):
        W_start = Wt.copy()
        H_start = H.copy()
        if balance and update_W and update_H:
            for k in range(Wt.shape[0]):
                nw = math.sqrt(np.dot(Wt[k], Wt[k]))
                nh = math.sqrt(np.dot(H[k], H[k]))
                if nw > 0.0 and nh > 0.0:
                    d = math.sqrt(nh / nw)
                    Wt[k] *= d
                    H[k] /= d
        if update_W:
            HHt = H @ H.T
            HXt = H @ Xt
            Wt, ok, mus[0] = _update(Wt, HHt, HXt, sW, fgm_free or sW >= 0.0, max_inner, inner_ratio, delta2,
                                     mus[0], vW)
            if not ok:
                return done, best_it, False, False, W_start, H_start
        WtW = Wt @ Wt.T
        WtX = Wt @ X
        if update_H:
            H, ok, mus[1] = _update(H, WtW, WtX, sH, fgm_free or sH >= 0.0, max_inner, inner_ratio, delta2,
                                    mus[1], vH)
            if not ok:
                return done, best_it, False, False, W_start, H_start
        e2 = xnorm2 - 2.0 * _vdot(WtX, H) + _vdot(WtW, H @ H.T)
        new = math.sqrt(max(e2, 0.0) / xnorm2)
        history[it] = new
        done = it
        if new < best_err:
            best_err = new
            best_it = it
            best_Wt[:] = Wt
            best_H[:] = H
        if new == 0.0 or (tol > 0.0 and abs(prev - new) <= tol * max(prev, 1e-300)):
            return done, best_it, True, True, Wt, H
        prev = new
    return done, best_it, False, True, Wt, H


@_jit(fastmath=_FM)
def dot_at(indptr, indices, G, Ft, eps, out):
    """out[e] = G[i] . Ft[j] + eps for each stored entry e = (i, j) of a CSR pattern: the model WH where a sparse
    X has data (KL needs it only there); G (n x r) and Ft (m x r) C-contiguous."""
    r = G.shape[1]
    for i in range(indptr.shape[0] - 1):
        for e in range(indptr[i], indptr[i + 1]):
            j = indices[e]
            acc = 0.0
            for k in range(r):
                acc += G[i, k] * Ft[j, k]
            out[e] = acc + eps
