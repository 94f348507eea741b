r"""Compiled kernels for NMF's small dense factors: GSP of the rows of an r x p matrix with a warm start, and the
projected fast gradient that calls it.

Why a module of its own, cached on disk: the projected fast gradient calls the projection up to 10 times per outer
iteration (~5 000 times per 500-iteration fit), so the whole inner loop runs as one Numba call. Numba's on-disk
cache only notices changes to the file that holds the cached function, so *everything* these functions call lives
in this file (no import of the projection core's kernels): a cached copy can never run a stale callee. When the
cache directory is not writable Numba would raise at decoration time; we then compile per process instead.

The GSP solve is REFERENCE.md §2 (unweighted, every row one vector, one shared mu): safeguarded Newton on g(mu) = k
inside a bracket. NMF projects nearly the same matrix again and again, so the solve starts from the previous
call's mu (``mu0``), evaluated in the fast gradient's own pass, and takes its Newton steps on the smooth piece of g
through the last evaluation in O(r) (the supports held fixed). Inside the fast gradient the root lies on the warm
start's piece in 93 % of the solves (paper's synthetic problem, measured); there the solve needs no pass over the
matrix at all (:func:`_piece_solve`; the pass that forms the step counts the supports to confirm it). When a solve
cannot finish (the average jumps at tied largest entries, or no convergence) the status is negative and the caller
redoes the step with ``groupsparse.project``, which resolves ties. The one-file rule above is why this file is
longer than the others (about 720 lines).

Every helper is ``inline="always"`` (inlined by Numba before LLVM sees it), so each entry point called from Python
(:func:`run_dense`, :func:`gsp_rows_warm`, :func:`fgm_rows`, :func:`_hals_rows`, :func:`dot_at`) compiles to one
function with no calls into other compiled functions. Why: a compiled callee is a symbol of its own library *and*
a ``linkonce_odr`` copy inside its caller's, optimized a second time there; under ``reassoc`` the two copies sum in
different orders. Which copy runs depended on the cache state: a process that compiles the caller has compiled the
callee first, and the loader binds the caller's calls to that earlier definition; a process that loads the caller
from Numba's cache has only the caller's own copy. The same fit then differed at rounding level (final error
5.2566e-7, last digits apart) between a fresh and a warm cache. With no calls left, the cached object is exactly
the code that ran when it was compiled.
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


@_jit(fastmath=_FM, inline="always")
def _targets(r, p, s, tol):
    """(beta, k, slack, band, aim) of r rows of length p at average sparsity s: g(mu) = beta sum_i ||u_i||_1 /
    ||u_i||_2 must come down to k = r beta sqrt(p) - r s, aiming half a band of width tol r below it."""
    sq = math.sqrt(p)
    beta = 1.0 / (sq - 1.0)
    base = r * beta * sq
    k = base - r * s
    band = tol * r
    return beta, k, 64 * _EPS * max(base, 1.0), band, k - 0.5 * band


@_jit(fastmath=_FM, inline="always")
def _g_sums(sums, beta):
    """g and g' from per-row sums (count, sum u, sum u^2) of u = (|x| - t)_+ (REFERENCE.md §2), stored as the
    rows of ``sums`` (3, r) so the loop over vectors runs on whole vector registers (no branch)."""
    g = 0.0
    dg = 0.0
    for i in range(sums.shape[1]):
        m, su, suu = sums[0, i], sums[1, i], sums[2, i]
        ok = suu > 0.0
        inu = 1.0 / math.sqrt(suu if ok else 1.0)
        h = su * inu if ok else 1.0  # one-hot (or zero) row: h = 1
        g += beta * h
        dg += beta * beta * (-m + h * h) * inu if ok else 0.0
    return g, dg


@_jit(fastmath=_FM, inline="always")
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
        sums[0, i] = m
        sums[1, i] = su
        sums[2, i] = suu
    return _g_sums(sums, 1.0 / (math.sqrt(p) - 1.0))


@_jit(fastmath=_FM, inline="always")
def _piece_root(sums, t0, aim, t_lo, t_hi, beta, band, max_steps):
    """Newton in O(r) on the smooth piece of g through t0: with the supports held fixed, the per-row sums at t
    follow from those at t0 (sum u - m dt, sum u^2 - 2 dt sum u + m dt^2). Returns a candidate t in
    (t_lo, t_hi), or NaN. Only a candidate: the caller evaluates g there directly (the supports may change).
    ``max_steps`` = 1 is the plain safeguarded Newton step on g (the core's iterates)."""
    dt = 0.0
    best = math.nan
    for it in range(max_steps + 1):
        g = 0.0
        dg = 0.0
        for i in range(sums.shape[1]):
            m = sums[0, i]
            su = sums[1, i] - m * dt
            suu = sums[2, i] - dt * (2.0 * sums[1, i] - m * dt)
            ok = (su > 0.0) & (suu > 0.0)
            inu = 1.0 / math.sqrt(suu if ok else 1.0)
            h = su * inu if ok else 1.0
            g += beta * h
            dg += beta * (-m + h * h) * inu if ok else 0.0
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


@_jit(fastmath=_FM, inline="always")
def _eval_write(x, t, sums, U, sc):
    """g(t), g'(t) evaluated directly, writing the projection in factored form: row i is sc_i U_i with
    U = (|x| - t)_+ and sc_i the least-squares scale alpha_i / ||U_i|| folded in (REFERENCE.md §2); a row with
    no entry above t is one-hot at its largest |x| (U holds that |x|, sc_i = 1). Signs are the caller's."""
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
            U[i, j] = u
        sums[0, i] = m
        sums[1, i] = su
        sums[2, i] = suu
        if suu > 0.0:
            sc[i] = (suu + t * su) / suu
        else:
            arg = 0
            amax = -1.0
            for j in range(p):
                a = abs(x[i, j])
                if a > amax:
                    amax = a
                    arg = j
            U[i, arg] = amax
            sc[i] = 1.0
    return _g_sums(sums, 1.0 / (math.sqrt(p) - 1.0))


@_jit(fastmath=_FM, inline="always")
def _solve(x, s, mu0, tol, max_iter, U, sc, sums, warm, piece_steps):
    """GSP of the rows of ``x`` given ``sums`` at mu = 0 and ``warm`` at mu0 (both as from :func:`_g_rows`;
    ``warm`` is overwritten). Returns (status, mu) as :func:`gsp_rows_warm`; the projection is left as
    (U, sc) of :func:`_eval_write` when status is 1, and status 0 leaves U = x, sc = 1.

    Between direct evaluations, up to ``piece_steps`` Newton steps on the current piece (:func:`_piece_root`):
    the fast gradient's warm-started solves then need one direct evaluation (measured: 1.07 on average); 1
    gives the plain Newton iterates of the core's solver (``groupsparse.project``), so the same point of the
    accepted band."""
    r, p = x.shape
    beta, k, slack, band, aim = _targets(r, p, s, tol)
    g, dg = _g_sums(sums, beta)
    top = 0.0
    for i in range(r):
        saa = sums[2, i]
        if not saa < math.inf or (saa < 2.2250738585072014e-308 and sums[1, i] > 0.0):
            return -1, 0.0
        top = max(top, saa)
    top = math.sqrt(top) / beta
    if g <= k + slack:
        U[:] = x
        sc[:] = 1.0
        return 0, 0.0
    if s >= 1.0:
        return -1, 0.0
    lo = 0.0
    hi = top
    mu = 0.0
    piece = sums
    if not 0.0 < mu0 < top and not sums[0, 0] >= 0.0:
        _g_rows(x, 0.0, sums)  # Newton from mu = 0 needs g'(0), so the counts
    if 0.0 < mu0 < top:  # warm start: the previous root usually lies on the new root's piece or next to it
        mu = mu0
        piece = warm
        g, dg = _g_sums(warm, beta)
        if g > k + slack:
            lo = mu
        else:
            hi = mu
            if g >= k - band:
                _eval_write(x, mu * beta, warm, U, sc)
                return 1, mu
    slow = 0
    prev_res = abs(g - aim)
    for _ in range(max_iter):
        cand = math.nan
        if slow < 2:
            cand = _piece_root(piece, mu * beta, aim, lo * beta, hi * beta, beta, band, piece_steps) / beta
        if not (lo < cand < hi):
            cand = 0.5 * (lo + hi)
            slow = 0
        mu = cand
        piece = warm
        g, dg = _eval_write(x, mu * beta, piece, U, sc)
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
    sums = np.empty((3, r))
    warm = np.empty((3, r))
    sc = np.empty(r)
    _g_rows(x, 0.0, sums)
    if mu0 > 0.0:
        _g_rows(x, mu0 / (math.sqrt(p) - 1.0), warm)
    status, mu = _solve(x, s, mu0, tol, max_iter, out, sc, sums, warm, 1)
    if status == 1:
        for i in range(r):
            for j in range(p):
                v = out[i, j] * sc[i]
                out[i, j] = v if x[i, j] >= 0.0 else -v
    return status, mu


def gsp_rows(C: np.ndarray, s: float, tol: float = 1e-12, max_iter: int = 100, mu0: float = 0.0):
    """GSP of the rows of a float64 matrix; ``None`` when the caller should use ``groupsparse.project``."""
    C = np.ascontiguousarray(C, dtype=np.float64)
    out = np.empty_like(C)
    status, _ = gsp_rows_warm(C, float(s), float(mu0), float(tol), int(max_iter), out)
    return None if status < 0 else out


@_jit(fastmath=_FM, inline="always")
def _grad_pass(Y, AY, B, inv, t, V, warm):
    """V = max(0, Y - (AY - B) / L), and in the same pass the sums of :func:`_g_rows` at the warm start t."""
    r, p = Y.shape
    for i in range(r):
        m = 0.0
        su = 0.0
        suu = 0.0
        for j in range(p):
            v = Y[i, j] - inv * (AY[i, j] - B[i, j])
            v = v if v > 0.0 else 0.0
            V[i, j] = v
            d = v - t
            pos = d > 0.0
            u = d if pos else 0.0
            m += 1.0 if pos else 0.0
            su += u
            suu += u * u
        warm[0, i] = m
        warm[1, i] = su
        warm[2, i] = suu


@_jit(fastmath=_FM, inline="always")
def _form_pass(V, t, sc, Vo, to, sco, Y, mom, cnt):
    """Iterates are kept as (V, t, sc): F_i = sc_i (V_i - t)_+ (no array for F itself, so a step touches five
    r x p arrays and this pass stores one). Writes the next extrapolated point Y = F + mom (F - Fo) and returns
    ||F - Fo||^2, with Fo = (Vo, to, sco) the previous iterate; ``cnt[i]``: the entries of V_i above t (the
    caller's check that the piece held)."""
    r, p = V.shape
    d2 = 0.0
    for i in range(r):
        s1 = sc[i]
        s0 = sco[i]
        m = 0.0
        for j in range(p):
            d = V[i, j] - t
            pos = d > 0.0
            f = s1 * d if pos else 0.0
            m += 1.0 if pos else 0.0
            do = Vo[i, j] - to
            fo = s0 * do if do > 0.0 else 0.0
            df = f - fo
            d2 += df * df
            Y[i, j] = f + mom * df
        cnt[i] = m
    return d2


@_jit(fastmath=_FM, inline="always")
def _piece_solve(s, mu0, p, warm, sc, tol):
    """The GSP root on the piece of g through the warm start, with no pass over the matrix: Newton in O(r) on the
    sums at mu0 (``warm``; supports held fixed, the sums at t follow as in :func:`_piece_root`), stopped by
    :func:`_solve`'s acceptance test (g in [k - band, k + slack]). Returns t = mu beta (``sc``: the rows' scales
    at t), or -1 when the root is not on this piece as far as the sums tell (a row without entries above t, a
    candidate outside the bracket, no convergence): the caller then solves by direct evaluations. The caller
    must check that no entry crossed between t0 and t (same counts above t as above t0); only then the sums
    were V's."""
    r = warm.shape[1]
    if not (mu0 > 0.0 and s < 1.0):
        return -1.0
    beta, k, slack, band, aim = _targets(r, p, s, tol)
    t0 = mu0 * beta
    lo = 0.0
    hi = math.inf
    dt = 0.0
    for _ in range(30):
        g = 0.0
        dg = 0.0
        for i in range(r):
            m = warm[0, i]
            su = warm[1, i] - m * dt
            suu = warm[2, i] - dt * (2.0 * warm[1, i] - m * dt)
            # also a guard against cancellation: far below the sums at t0 the formulas lose digits
            if not (su > 0.0 and suu > 1e-6 * warm[2, i] and suu > 2.2250738585072014e-308):
                return -1.0
            inu = 1.0 / math.sqrt(suu)
            h = su * inu
            g += h
            dg += (h * h - m) * inu
        g *= beta
        dg *= beta
        if g > k + slack:
            lo = t0 + dt
        elif g >= k - band:
            t = t0 + dt
            for i in range(r):
                m = warm[0, i]
                su = warm[1, i] - m * dt
                suu = warm[2, i] - dt * (2.0 * warm[1, i] - m * dt)
                sc[i] = (suu + t * su) / suu
            return t
        else:
            hi = t0 + dt
        if not dg < 0.0:
            return -1.0
        dt -= (g - aim) / dg
        if not lo < t0 + dt < hi:
            return -1.0
    return -1.0


@_jit(fastmath=_FM, inline="always")
def _fgm(F, A, B, L, s, project_rows, max_inner, inner_ratio, mu0, work, scs, sums, warm):
    """:func:`fgm_rows` in place on caller-provided work arrays (``work``: (3, r, p), ``scs``: (3, r),
    ``sums``/``warm``: (3, r)); F (C-contiguous) is overwritten with the result, or with garbage when not ``ok``.

    Per step two passes and one product: the gradient pass (V, with the sums at the warm start), the solve, the
    forming pass (:func:`_form_pass`: step length and the next extrapolated point Y), and AY = A Y by BLAS
    (about twice as fast as a compiled loop at r = 10, p = 100, measured). The solve usually needs no pass of its
    own: the root mostly lies on the warm start's piece of g (93 % of the solves on the paper's synthetic
    problem, measured), where it follows from the warm sums in O(r) (:func:`_piece_solve`); the forming pass
    counts the entries above the root, and when a count differs from the warm start's, :func:`_solve` evaluates
    directly and the step is formed again."""
    r, p = F.shape
    AY, Y = work[0], work[1]
    bufs = (F, work[2])  # V of the current iterate and of the next one, swapped each step (F: the start)
    cur = 0
    scs[0, :] = 1.0
    cnt = scs[2]
    tc = 0.0  # the start is (F, 0, 1)
    np.dot(A, F, AY)
    tb = 1.0 / (math.sqrt(p) - 1.0) if p >= 2 else 0.0  # t = mu * beta
    alpha = 0.1
    first = -1.0
    steps = 0
    inv = 1.0 / L
    mu = mu0
    for _ in range(max_inner):
        Vc = bufs[cur]
        Vn = bufs[1 - cur]
        scc = scs[cur]
        scn = scs[1 - cur]
        _grad_pass(Vc if steps == 0 else Y, AY, B, inv, mu * tb, Vn, warm)
        steps += 1
        alpha_next = 0.5 * (math.sqrt(alpha**4 + 4 * alpha**2) - alpha**2)
        mom = alpha * (1 - alpha) / (alpha**2 + alpha_next)
        alpha = alpha_next
        tn = 0.0
        d2 = -1.0
        if project_rows:
            tn = _piece_solve(s, mu, p, warm, scn, 1e-12)
            if tn > 0.0:
                d2 = _form_pass(Vn, tn, scn, Vc, tc, scc, Y, mom, cnt)
                for i in range(r):
                    if cnt[i] != warm[0, i]:  # an entry crossed: the piece's sums were not V's
                        d2 = -1.0
                        break
                if d2 >= 0.0:
                    mu = tn / tb
            if d2 < 0.0:
                _g_rows(Vn, 0.0, sums)
                status, mu_new = _solve(Vn, s, mu, 1e-12, 100, AY, scn, sums, warm, 30)  # AY: free until the product
                if status < 0:
                    return steps, False, mu0
                if status == 1:
                    mu = mu_new
                Vn[:] = AY
                tn = 0.0
        else:
            scn[:] = 1.0
        if d2 < 0.0:
            d2 = _form_pass(Vn, tn, scn, Vc, tc, scc, Y, mom, cnt)
        cur = 1 - cur
        tc = tn
        step = math.sqrt(d2)
        if first < 0.0:
            first = step
        elif step <= inner_ratio * first:
            break
        if steps < max_inner:
            np.dot(A, Y, AY)
    V = bufs[cur]
    sc = scs[cur]
    for i in range(r):  # V may be F itself: each entry is read before it is written
        for j in range(p):
            d = V[i, j] - tc
            F[i, j] = sc[i] * d if d > 0.0 else 0.0
    return steps, True, mu


@_jit(fastmath=_FM)
def fgm_rows(F, A, B, L, s, project_rows, max_inner, inner_ratio, mu0):
    """Projected Nesterov fast gradient for min 1/2<A, FF^T> - <B, F>, F >= 0 (rows at average sparsity s).

    Returns (F_new, steps, ok, mu): ``ok`` is False when a projection needs the core's tie handling (the caller
    then redoes this subproblem in Python); ``mu`` is the last projection's root, the next call's warm start.
    """
    r, p = F.shape
    Fn = F.copy()
    steps, ok, mu = _fgm(Fn, A, B, L, s, project_rows, max_inner, inner_ratio, mu0, np.empty((3, r, p)),
                         np.empty((3, r)), np.empty((3, r)), np.empty((3, r)))
    return (Fn if ok else F), steps, ok, mu


@_jit(fastmath=_FM, inline="always")
def _hals_rows_impl(F, A, B, lam, max_sweeps, delta2):
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
            l = 0
            while l + 5 <= r:  # five rows of F per pass over g: 10 % faster sweeps at r = 10 (measured)
                a0 = A[k, l]
                a1 = A[k, l + 1]
                a2 = A[k, l + 2]
                a3 = A[k, l + 3]
                a4 = A[k, l + 4]
                for j in range(p):
                    g[j] -= a0 * F[l, j] + a1 * F[l + 1, j] + a2 * F[l + 2, j] + a3 * F[l + 3, j] + a4 * F[l + 4, j]
                l += 5
            while l < r:
                alk = A[k, l]
                for j in range(p):
                    g[j] -= alk * F[l, j]
                l += 1
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
def _hals_rows(F, A, B, lam, max_sweeps, delta2):
    """:func:`_hals_rows_impl` as an entry point (Python calls it directly)."""
    return _hals_rows_impl(F, A, B, lam, max_sweeps, delta2)


@_jit(fastmath=_FM, inline="always")
def _vdot(a, b):
    s = 0.0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            s += a[i, j] * b[i, j]
    return s


@_jit(fastmath=_FM, inline="always")
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


@_jit(fastmath=_FM, inline="always")
def _update(F, A, B, s, use_fgm, max_inner, inner_ratio, delta2, mu, v, work, scs, sums, warm, lam):
    """One factor update of F in place; returns (ok, mu). ``s < 0``: no target (HALS or unprojected fast
    gradient); ``v``: the Perron vector of :func:`_lipschitz`; the rest: :func:`_fgm`'s work arrays."""
    if not use_fgm:
        _hals_rows_impl(F, A, B, lam, max_inner, delta2)
        return True, mu
    L = _lipschitz(A, v)
    if not L > 0.0:
        return True, mu
    _, ok, mu = _fgm(F, A, B, L, max(s, 0.0), s >= 0.0 and F.shape[1] >= 2, max_inner, inner_ratio, mu, work,
                     scs, sums, warm)
    return ok, mu


@_jit(fastmath=_FM, inline="always")
def _balance(Wt, H, HHt, e):
    """Scale each rank-one term so ||W_:k|| = ||H_k:|| (WH unchanged), and HH^T with it (no new product);
    ``e``: (r,) scratch."""
    r = Wt.shape[0]
    for k in range(r):
        nw = 0.0
        for j in range(Wt.shape[1]):
            nw += Wt[k, j] * Wt[k, j]
        nh = HHt[k, k]
        e[k] = 1.0
        if nw > 0.0 and nh > 0.0:
            dk = math.sqrt(math.sqrt(nh / nw))
            for j in range(Wt.shape[1]):
                Wt[k, j] *= dk
            idk = 1.0 / dk  # one division, not one per entry
            e[k] = idk
            for j in range(H.shape[1]):
                H[k, j] *= idk
    for k in range(r):
        for l in range(r):
            HHt[k, l] *= e[k] * e[l]


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
    ok = True
    r = Wt.shape[0]
    vW = np.ones(r)
    vH = np.ones(r)
    workW = np.empty((3, r, Wt.shape[1]))
    workH = np.empty((3, r, H.shape[1]))
    scs = np.empty((3, r))
    lam = np.zeros(r)
    inv_d = np.empty(r)
    sums = np.empty((3, r))
    warm = np.empty((3, r))
    W_start = np.empty_like(Wt)
    H_start = np.empty_like(H)
    HHt = np.empty((r, r))
    HXt = np.empty_like(Wt)
    WtW = np.empty((r, r))
    WtX = np.empty_like(H)
    np.dot(H, H.T, HHt)
    prev = history[0]
    done = 0
    # The best iterate is copied lazily: while the error keeps falling (nearly every iteration), the current
    # state is the best one (``pending``), and W_start/H_start hold it once the next iteration has begun.
    pending = False
    for it in range(1, max_iter + 1):
        W_start[:] = Wt
        H_start[:] = H
        if balance and update_W and update_H:
            _balance(Wt, H, HHt, inv_d)
        if update_W:
            np.dot(H, Xt, HXt)
            ok, mus[0] = _update(Wt, HHt, HXt, sW, fgm_free or sW >= 0.0, max_inner, inner_ratio, delta2, mus[0],
                                 vW, workW, scs, sums, warm, lam)
            if not ok:
                break
        np.dot(Wt, Wt.T, WtW)
        np.dot(Wt, X, WtX)
        if update_H:
            ok, mus[1] = _update(H, WtW, WtX, sH, fgm_free or sH >= 0.0, max_inner, inner_ratio, delta2, mus[1],
                                 vH, workH, scs, sums, warm, lam)
            if not ok:
                break
            np.dot(H, H.T, HHt)  # for the error and the next W update (rescaled there by the balance)
        e2 = xnorm2 - 2.0 * _vdot(WtX, H) + _vdot(WtW, HHt)
        new = math.sqrt(max(e2, 0.0) / xnorm2)
        history[it] = new
        done = it
        if new < best_err:
            best_err = new
            best_it = it
            pending = True
        elif pending:  # the best is iteration it - 1, whose state this iteration started from
            best_Wt[:] = W_start
            best_H[:] = H_start
            pending = False
        if new == 0.0 or (tol > 0.0 and abs(prev - new) <= tol * max(prev, 1e-300)):
            if pending:
                best_Wt[:] = Wt
                best_H[:] = H
            return done, best_it, True, True, Wt, H
        prev = new
    if not ok:  # iteration done + 1 needs the core's tie handling: hand back the state before it
        if pending:
            best_Wt[:] = W_start
            best_H[:] = H_start
        return done, best_it, False, False, W_start, H_start
    if pending:
        best_Wt[:] = Wt
        best_H[:] = H
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
