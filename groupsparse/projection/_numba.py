"""CPU engine: Numba kernels, multithreaded over chunks, compiled once and cached on disk.

Why Numba: every evaluation of g is one fused pass (threshold, three sums) over the still-active entries; NumPy
would allocate several temporaries of the whole group per evaluation, and a C extension would need a compiler on
every user's machine. ``parallel=True`` spreads chunks over cores; ``cache=True`` keeps start-up to one compile.

Layout: each vector is split into chunks of at most ``CHUNK`` entries so one long vector (a whole layer) still
uses every core. Once a lower bound mu_lo on the root is proven, entries with |c| <= mu_lo beta w can never be
nonzero again: they are compacted out of a work buffer, in place, inside the next evaluation's pass.
"""

from __future__ import annotations

import math
import os
import types

import numba as nb
import numpy as np

from ._group import NeedsRescale, scale_trouble
from ._solver import Evaluation

CHUNK = 1 << 14
_FM = {"reassoc", "nsz", "contract"}  # vectorize the sums; keep NaN/Inf semantics for input checks


@nb.njit(inline="always", fastmath=_FM)
def _plain_sums(xs, t):
    """(support size, sum u, sum u^2) of u = (|xs| - t)_+, branch-free so LLVM vectorizes it."""
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
    return m, su, suu


@nb.njit(inline="always")
def _write_onehot(x, out, s0, n, oh):
    for j in range(s0, s0 + n):
        out[j] = x[j] if j == oh else 0.0


# Weighted kernels (the unweighted group uses the vectorized twins below).


@nb.njit(parallel=True, cache=True, fastmath=_FM)
def _first_pass(x, w, cstart, clen, out):
    """Per chunk: [sum w^2 on the support, sum w a, sum a^2, max a/w, sum w^2, min w]."""
    for c in nb.prange(cstart.shape[0]):
        s0 = cstart[c]
        m = 0.0
        swa = 0.0
        saa = 0.0
        best = -1.0
        sww = 0.0
        wmin = math.inf
        for j in range(s0, s0 + clen[c]):
            a = abs(np.float64(x[j]))
            wj = np.float64(w[j])
            best = max(best, a / wj)
            if a > 0.0:
                m += wj * wj
            swa += wj * a
            saa += a * a
            sww += wj * wj
            wmin = min(wmin, wj)
        out[c, 0] = m
        out[c, 1] = swa
        out[c, 2] = saa
        out[c, 3] = best
        out[c, 4] = sww
        out[c, 5] = wmin


@nb.njit(parallel=True, cache=True, fastmath=_FM)
def _evaluate(src, srcw, sstart, slen, cvec, t, compact, tdrop, dst, dstw, dlen, out):
    """Per chunk, at thresholds t[vector]: [sum w^2 on support, sum w u, sum u^2] with u = (a - t w)_+.

    With ``compact``, entries with a > tdrop[vector] w are also copied (as |c|, with their weight) to ``dst`` at
    the same chunk start (``dst`` may be ``src``: the write index never passes the read index).
    """
    for c in nb.prange(sstart.shape[0]):
        i = cvec[c]
        ti = t[i]
        td = tdrop[i]
        s0 = sstart[c]
        m = 0.0
        swu = 0.0
        suu = 0.0
        kept = 0
        for j in range(s0, s0 + slen[c]):
            a = abs(np.float64(src[j]))
            wj = np.float64(srcw[j])
            u = a - ti * wj
            if u > 0.0:
                m += wj * wj
                swu += wj * u
                suu += u * u
            if compact and a > td * wj:
                dst[s0 + kept] = a
                dstw[s0 + kept] = wj
                kept += 1
        if compact:
            dlen[c] = kept
        out[c, 0] = m
        out[c, 1] = swu
        out[c, 2] = suu


@nb.njit(parallel=True, cache=True, fastmath=_FM)
def _write(x, w, cstart, clen, cvec, t, scale, onehot, out):
    """out = sign(x) (|x| - t w)_+ scale per vector; vectors with onehot[i] >= 0 keep only that entry."""
    for c in nb.prange(cstart.shape[0]):
        i = cvec[c]
        s0 = cstart[c]
        oh = onehot[i]
        if oh >= 0:
            _write_onehot(x, out, s0, clen[c], oh)
            continue
        ti = t[i]
        sc = scale[i]
        for j in range(s0, s0 + clen[c]):
            xv = np.float64(x[j])
            u = abs(xv) - ti * np.float64(w[j])
            out[j] = math.copysign(u * sc, xv) if u > 0.0 else 0.0


# Unweighted kernels: branch-free bodies that LLVM vectorizes. Each is compiled twice, serial and threaded:
# on small and medium groups the serial loop already runs at memory speed and threads only add overhead.


def _first_pass_plain(x, cstart, clen, out):
    """[nonzeros, sum a, sum a^2] per chunk (no max: it would block vectorization; sqrt(sum a^2) bounds it)."""
    for c in nb.prange(cstart.shape[0]):
        xs = x[cstart[c] : cstart[c] + clen[c]]  # slice + range(len): no negative-index checks, so it vectorizes
        m = 0.0
        sa = 0.0
        saa = 0.0
        for j in range(xs.shape[0]):
            a = abs(np.float64(xs[j]))
            m += 1.0 if a > 0.0 else 0.0
            sa += a
            saa += a * a
        out[c, 0] = m
        out[c, 1] = sa
        out[c, 2] = saa


def _evaluate_plain(src, sstart, slen, cvec, t, out):
    """[support size, sum u, sum u^2] per chunk with u = (a - t)_+."""
    for c in nb.prange(sstart.shape[0]):
        m, su, suu = _plain_sums(src[sstart[c] : sstart[c] + slen[c]], t[cvec[c]])
        out[c, 0] = m
        out[c, 1] = su
        out[c, 2] = suu


def _evaluate_plain_compact(src, sstart, slen, cvec, t, tdrop, dst, dlen, out):
    """As ``_evaluate_plain``, also compacting entries above tdrop into ``dst`` (a branch-free store; ``dst``
    may be ``src``: the write index never passes the read index)."""
    for c in nb.prange(sstart.shape[0]):
        i = cvec[c]
        ti = t[i]
        td = tdrop[i]
        xs = src[sstart[c] : sstart[c] + slen[c]]
        ds = dst[sstart[c] : sstart[c] + slen[c]]
        m = 0.0
        su = 0.0
        suu = 0.0
        kept = 0
        for j in range(xs.shape[0]):
            a = abs(np.float64(xs[j]))
            d = a - ti
            pos = d > 0.0
            u = d if pos else 0.0
            m += 1.0 if pos else 0.0
            su += u
            suu += u * u
            ds[kept] = a
            kept += 1 if a > td else 0
        dlen[c] = kept
        out[c, 0] = m
        out[c, 1] = su
        out[c, 2] = suu


def _write_plain(x, cstart, clen, cvec, t, scale, onehot, out):
    """out = sign(x) (|x| - t)_+ scale; one-hot vectors keep only their largest entry."""
    for c in nb.prange(cstart.shape[0]):
        i = cvec[c]
        oh = onehot[i]
        s0 = cstart[c]
        if oh >= 0:
            _write_onehot(x, out, s0, clen[c], oh)
            continue
        ti = t[i]
        sc = scale[i]
        xs = x[s0 : s0 + clen[c]]
        os_ = out[s0 : s0 + clen[c]]
        for j in range(xs.shape[0]):
            xv = np.float64(xs[j])
            d = abs(xv) - ti
            r = d * sc if d > 0.0 else 0.0
            os_[j] = r if xv >= 0.0 else -r


def _twin(fn):
    """(serial, threaded) dispatchers of one kernel; the threaded one gets its own name so caches don't mix."""
    par = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_threaded")
    par.__qualname__ = fn.__qualname__ + "_threaded"
    return (nb.njit(cache=True, fastmath=_FM)(fn), nb.njit(parallel=True, cache=True, fastmath=_FM)(par))


FIRST_PASS_PLAIN = _twin(_first_pass_plain)
EVALUATE_PLAIN = _twin(_evaluate_plain)
EVALUATE_PLAIN_COMPACT = _twin(_evaluate_plain_compact)
WRITE_PLAIN = _twin(_write_plain)
# Threads pay off only on large groups and with enough cores.
PARALLEL_MIN_ENTRIES = int(os.environ.get("GROUPSPARSE_PARALLEL_MIN_ENTRIES", 1 << 20))
# Measured: on a 2-core VM threads never beat the serial vectorized loop (1e7 entries: 18-97 ms threaded vs 32 ms
# serial; 1e8: 0.28-0.31 s both), while 16 cores ran 1e7 entries at 0.9 ns/entry, below a copy, and the ResNet-50
# benchmark at 3.1-3.7x copy with threads from 0.25-1M entries against 6.0x with threads only from 8M.
PARALLEL_MIN_THREADS = int(os.environ.get("GROUPSPARSE_PARALLEL_MIN_THREADS", 4))
# A vectorized pass over the whole group costs about half a copy, while compacting costs ~1 cycle per entry:
# on typical groups Newton needs 3-4 evaluations and compaction does not pay (measured: compacting from the first
# step made the ResNet-50 benchmark 1.2-1.5x slower). Solves that keep going (ties, bisection, weighted
# brackets) still shrink the active set.
COMPACT_AFTER = 4


@nb.njit(parallel=True, cache=True)
def _argmax_abs(x, offsets, vids, out):
    for q in nb.prange(vids.shape[0]):
        i = vids[q]
        best = -1.0
        arg = offsets[i]
        for j in range(offsets[i], offsets[i + 1]):
            a = abs(np.float64(x[j]))
            if a > best:
                best = a
                arg = j
        out[q] = arg


@nb.njit(parallel=True, cache=True)
def _argmax_shifted(x, w, offsets, vids, t, zero, out):
    """Weighted one-hot position: argmax_j |x_j| - t w_j.

    In the limit t -> inf (and for a zero vector) that is the smallest weight, ties going to the largest |x_j|:
    decided exactly here, since |x| - t w rounds to -t w (or overflows) long before.
    """
    for q in nb.prange(vids.shape[0]):
        i = vids[q]
        arg = offsets[i]
        if zero[i] or math.isinf(t[i]):
            bw = math.inf
            ba = -1.0
            for j in range(offsets[i], offsets[i + 1]):
                wj = np.float64(w[j])
                aj = abs(np.float64(x[j]))
                if wj < bw or (wj == bw and aj > ba):
                    bw = wj
                    ba = aj
                    arg = j
        else:
            best = -math.inf
            for j in range(offsets[i], offsets[i + 1]):
                v = abs(np.float64(x[j])) - t[i] * np.float64(w[j])
                if v > best:
                    best = v
                    arg = j
        out[q] = arg


def _reduce_rows(per_chunk: np.ndarray, first: np.ndarray | None) -> np.ndarray:
    return per_chunk if first is None else np.add.reduceat(per_chunk, first, axis=0)


class NumbaEngine:
    name = "numba"
    xp = np

    def __init__(self, data: np.ndarray, offsets: np.ndarray, weights: np.ndarray | None):
        self.x = data
        self.w = weights if weights is not None else data  # unweighted kernels never read it
        self.weighted = weights is not None
        self.offsets = offsets
        self.par = int(data.shape[0] >= PARALLEL_MIN_ENTRIES and nb.get_num_threads() >= PARALLEL_MIN_THREADS)
        r = len(offsets) - 1
        self.n_vectors = r
        lengths = np.diff(offsets)
        nch = -(-lengths // CHUNK)
        self.cvec = np.repeat(np.arange(r, dtype=np.int64), nch)
        first = np.zeros(r, dtype=np.int64)
        np.cumsum(nch[:-1], out=first[1:])
        within = np.arange(len(self.cvec), dtype=np.int64) - first[self.cvec]
        self.cstart = offsets[self.cvec] + within * CHUNK
        self.clen = np.minimum(CHUNK, offsets[self.cvec + 1] - self.cstart)
        self.first = None if len(self.cvec) == r else first

        fp = np.zeros((len(self.cvec), 6))  # columns as in _first_pass
        if self.weighted:
            _first_pass(self.x, self.w, self.cstart, self.clen, fp)
        else:
            FIRST_PASS_PLAIN[self.par](self.x, self.cstart, self.clen, fp)
            # An upper bound on max |c| is all the bracket needs; sum |c| stands in when squares underflow.
            fp[:, 3] = np.where(fp[:, 2] > 0, np.sqrt(fp[:, 2]), fp[:, 1])
        if not np.all(np.isfinite(fp[:, 1])):
            raise ValueError("vectors: got NaN or Inf entries, expected finite values")
        if scale_trouble(fp[:, 1], fp[:, 2]):
            raise NeedsRescale
        per = _reduce_rows(fp, self.first)
        if self.first is None:
            maxratio, wmin = fp[:, 3], fp[:, 5]
        else:
            maxratio = np.maximum.reduceat(fp[:, 3], self.first)
            wmin = np.minimum.reduceat(fp[:, 5], self.first)
        wsq = per[:, 4] if self.weighted else lengths.astype(np.float64)
        self.wnorm = np.sqrt(wsq)
        self.wmin = wmin if self.weighted else np.ones(r)
        self.beta = 1.0 / (self.wnorm - self.wmin)
        self.ratio_max = maxratio
        self._argmax = None  # found when needed (one-hot vectors are few): keeps the first pass branch-free
        self.zero_mask = maxratio == 0.0
        self.stats0 = np.ascontiguousarray(per[:, :3])
        self.cnorm = np.sqrt(per[:, 2])
        # active set: (source arrays, chunk lengths); the original until a lower bound is confirmed
        self.src, self.srcw, self.slen = self.x, self.w, self.clen
        self.work = None
        self.spec = None  # (mu, lengths) of a speculative compaction out of the original
        self.lo_applied = 0.0
        self.lo_confirmed = 0.0
        self.n_evals = 0

    # host views the solver reads
    @property
    def beta_host(self):
        return self.beta

    @property
    def wnorm_host(self):
        return self.wnorm

    @property
    def wmin_host(self):
        return self.wmin

    def to_host(self, a):
        return np.asarray(a)

    def full(self, value):
        return np.full(self.n_vectors, value, dtype=np.float64)

    def from_host(self, a):
        return np.asarray(a)

    def group_sum(self, values, gid, n_groups):
        return np.bincount(gid, weights=values, minlength=n_groups)

    def group_max(self, values, gid, n_groups):
        out = np.full(n_groups, -np.inf)
        np.maximum.at(out, gid, values)
        return out

    def mu_top(self) -> float:
        return float(np.max(self.ratio_max / self.beta)) if self.n_vectors else 0.0

    def copy_input(self):
        return self.x.copy()

    # evaluation
    def _stats(self, t: np.ndarray, mu: float | None):
        nch = len(self.cvec)
        out = np.empty((nch, 3))
        # a writable stand-in when nothing is compacted: the caller's arrays may be read-only
        scratch = np.empty(1, dtype=self.x.dtype)
        compact, tdrop, dst, dstw, dlen = False, t, scratch, scratch, self.slen
        if mu is not None and mu > 0:
            self.n_evals += 1
        if mu is not None and mu > 0 and self.n_evals >= COMPACT_AFTER:
            if self.src is self.x:  # speculative: the original stays intact, so a wrong guess costs nothing
                if self.work is None:
                    self.work = np.empty_like(self.x)
                    self.workw = np.empty_like(self.x) if self.weighted else self.work
                compact, tdrop = True, t
                dst, dstw, dlen = self.work, self.workw, np.empty_like(self.clen)
            elif self.lo_confirmed > self.lo_applied:
                compact, tdrop = True, self.lo_confirmed * self.beta
                dst, dstw, dlen = self.src, self.srcw, np.empty_like(self.clen)
                self.lo_applied = self.lo_confirmed
        if self.weighted:
            _evaluate(self.src, self.srcw, self.cstart, self.slen, self.cvec, t, compact, tdrop, dst, dstw, dlen,
                      out)
        elif compact:
            EVALUATE_PLAIN_COMPACT[self.par](self.src, self.cstart, self.slen, self.cvec, t, tdrop, dst, dlen, out)
        else:
            EVALUATE_PLAIN[self.par](self.src, self.cstart, self.slen, self.cvec, t, out)
        if compact and self.src is self.x:
            self.spec = (mu, dlen)
        elif compact:
            self.slen = dlen
        return _reduce_rows(out, self.first)

    def confirm_lower(self, mu: float) -> None:
        if self.spec is not None and self.spec[0] == mu:
            self.src, self.srcw, self.slen = self.work, self.workw, self.spec[1]
            self.lo_applied = mu
        self.spec = None
        self.lo_confirmed = max(self.lo_confirmed, mu)

    def argmax(self, vids: np.ndarray) -> np.ndarray:
        """Flat position of the largest |c| of each listed vector (unweighted one-hot position)."""
        if self._argmax is None:
            self._argmax = np.full(self.n_vectors, -1, dtype=np.int64)
        todo = vids[self._argmax[vids] < 0]
        if len(todo):
            pos = np.empty(len(todo), dtype=np.int64)
            _argmax_abs(self.x, self.offsets, todo, pos)
            self._argmax[todo] = pos
        return self._argmax[vids]

    def _onehot_h(self, stats: np.ndarray, t: np.ndarray):
        """h for vectors with empty support (and zero vectors), with their one-hot positions."""
        empty = (stats[:, 0] == 0.0) | self.zero_mask
        onehot = np.full(self.n_vectors, -1, dtype=np.int64)
        hval = np.ones(self.n_vectors)
        vids = np.flatnonzero(empty)
        if len(vids):
            if self.weighted:
                pos = np.empty(len(vids), dtype=np.int64)
                _argmax_shifted(self.x, self.w, self.offsets, vids, t, self.zero_mask, pos)
                hval[vids] = self.w[pos]
            else:
                pos = self.argmax(vids)
            onehot[vids] = pos
        return empty, onehot, hval

    def evaluate_vec(self, t: np.ndarray, mu: float | None = None) -> Evaluation:
        t = np.ascontiguousarray(t, dtype=np.float64)
        if mu == 0.0:
            stats = self.stats0
        elif mu is not None and math.isinf(mu):
            stats = np.zeros((self.n_vectors, 3))
        else:
            stats = self._stats(t, mu)
        empty, onehot, hval = self._onehot_h(stats, t)
        h, dh = h_and_slope(np, stats, empty, hval)
        return Evaluation(mu if mu is not None else math.nan, h, dh, (t, stats, onehot))

    def evaluate_shared(self, mu: float) -> Evaluation:
        ev = self.evaluate_vec(mu * self.beta, mu)
        ev.g = float(np.dot(self.beta, ev.h))
        ev.dg = float(np.dot(self.beta * self.beta, ev.dh))
        return ev

    # output
    def _write(self, t, scale, onehot):
        out = np.empty_like(self.x)
        if self.weighted:
            _write(self.x, self.w, self.cstart, self.clen, self.cvec, t, scale, onehot, out)
        else:
            WRITE_PLAIN[self.par](self.x, self.cstart, self.clen, self.cvec, t, scale, onehot, out)
        return out

    def write_shared(self, hi: Evaluation, lo: Evaluation | None, use_lo):
        t, stats, onehot = hi.state
        if lo is not None:
            tl, sl, ol = lo.state
            t = np.where(use_lo, tl, t)
            stats = np.where(use_lo[:, None], sl, stats)
            onehot = np.where(use_lo, ol, onehot)
        suu = stats[:, 2]
        t = np.where(np.isfinite(t), t, 0.0)  # one-hot vectors (t = inf) are written from ``onehot``
        # alpha_i = <x_i, a_i> = (sum u^2 + t sum w u) / ||u||; z = sign * u / ||u|| * alpha
        scale = np.where(suu > 0, (suu + t * stats[:, 1]) / np.where(suu > 0, suu, 1.0), 0.0)
        return self._write(t, scale, onehot)

    def write_each(self, ev: Evaluation):
        t, stats, onehot = ev.state
        suu = stats[:, 2]
        scale = np.where(suu > 0, self.cnorm / np.sqrt(np.where(suu > 0, suu, 1.0)), 0.0)
        onehot = np.where(self.zero_mask, -1, onehot)
        # a one-hot vector keeps its l2 norm: the kept entry becomes +-||c||
        out = self._write(t, scale, onehot)
        oh = onehot >= 0
        if np.any(oh):
            pos = onehot[oh]
            out[pos] = np.copysign(self.cnorm[oh], self.x[pos])
        return out


def h_and_slope(xp, stats, empty, hval):
    """h_i and dh_i/dt_i from the support sums (shared by the engines)."""
    m, swu, suu = stats[:, 0], stats[:, 1], stats[:, 2]
    ok = (~empty) & (suu > 0)
    nu = xp.sqrt(xp.where(ok, suu, 1.0))
    h = xp.where(ok, swu / nu, hval)
    dh = xp.where(ok, (-m + h * h) / nu, 0.0)  # = -m/||u|| + <w,u>^2/||u||^3 without cubing tiny norms
    return h, dh


# ---- The whole unweighted grouped projection in one compiled call, for small groups.
#
# Why: the general solver (``_solver.solve_shared``) drives the kernels from Python, ~60 us of interpreter work per
# evaluation. Callers that project small groups thousands of times (NMF's projected gradient: a 10 x 100 factor,
# up to 10 projections per iteration) pay that overhead many times over the arithmetic. This part runs the same
# safeguarded Newton (same bracket, same aim inside the feasible band, same slow-progress switch to bisection) as
# ``solve_shared`` entirely in Numba. A jump of g over k (tied largest entries) or an exhausted ``max_iter`` returns a
# status that sends the caller to the general solver, which resolves ties; tests check that both paths agree.

EPS = 2.220446049250313e-16
# Measured (ResNet-50 layers, 2-core VM): the compiled loop beats Python-driven kernels up to ~1M entries (no
# per-evaluation interpreter cost; the layer stays in cache); beyond, compaction and threads take over.
SMALL_MAX_ENTRIES = 1 << 20


@nb.njit(cache=True, fastmath={"reassoc", "nsz", "contract"})
def _g_from_sums(beta, sums):
    """g = sum_i beta_i h_i and g' from per-vector (support size, sum u, sum u^2), unweighted."""
    g = 0.0
    dg = 0.0
    for i in range(beta.shape[0]):
        m, su, suu = sums[i, 0], sums[i, 1], sums[i, 2]
        if suu > 0.0:
            nu = math.sqrt(suu)
            h = su / nu
            g += beta[i] * h
            dg += beta[i] * beta[i] * (-m + h * h) / nu
        else:
            g += beta[i]  # one-hot (or zero) vector: h = 1
    return g, dg


@nb.njit(cache=True, fastmath={"reassoc", "nsz", "contract"})
def _g_plain(x, offsets, beta, mu, sums):
    """g(mu) and g'(mu), unweighted (REFERENCE.md §2). The per-vector sums stay in ``sums``: the output pass
    after the last evaluation reuses them instead of another pass over the data."""
    for i in range(offsets.shape[0] - 1):
        sums[i, 0], sums[i, 1], sums[i, 2] = _plain_sums(x[offsets[i] : offsets[i + 1]], mu * beta[i])
    return _g_from_sums(beta, sums)


@nb.njit(cache=True, fastmath={"reassoc", "nsz", "contract"})
def solve_plain_small(x, offsets, s, tol, max_iter, out, stats):
    """Returns 0 (already sparse: out = x), 1 (solved), -1 (ask the general solver), -2 (rescale first).

    ``stats`` receives [mu, iterations, evaluations, achieved average sparsity].
    """
    r = offsets.shape[0] - 1
    beta = np.empty(r)
    sums = np.empty((r, 3))
    base = 0.0
    top = 0.0
    for i in range(r):
        n = offsets[i + 1] - offsets[i]
        sq = math.sqrt(n)
        beta[i] = 1.0 / (sq - 1.0)
        base += beta[i] * sq
        sums[i, 0], sa, saa = _plain_sums(x[offsets[i] : offsets[i + 1]], 0.0)
        sums[i, 1] = sa
        sums[i, 2] = saa
        if not saa < math.inf or (saa < 2.2250738585072014e-308 and sa > 0.0):
            return -2  # squares over/underflow: the caller rescales
        # an upper bound on max |x| (a max reduction would not vectorize); sum |x| if squares underflow
        top = max(top, (math.sqrt(saa) if saa > 0.0 else sa) / beta[i])
    k = base - r * s
    slack = 64 * EPS * max(base, 1.0)
    band = tol * r
    aim = k - 0.5 * band
    g, dg = _g_from_sums(beta, sums)  # at mu = 0 the sums above are the evaluation
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
        g, dg = _g_plain(x, offsets, beta, mu, sums)
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
        su, suu = sums[i, 1], sums[i, 2]  # the loop ended on an evaluation at hi
        if suu > 0.0:
            sc = (suu + t * su) / suu  # alpha_i / ||u_i|| with alpha_i = <x_i, a_i> = (sum u^2 + t sum u) / ||u_i||
            xs = x[o0:o1]
            os_ = out[o0:o1]
            for j in range(xs.shape[0]):
                xv = np.float64(xs[j])
                d = abs(xv) - t
                rr = d * sc if d > 0.0 else 0.0
                os_[j] = rr if xv >= 0.0 else -rr
        else:
            amax = -1.0
            arg = o0
            for j in range(o0, o1):
                a = abs(np.float64(x[j]))
                if a > amax:
                    amax = a
                    arg = j
            _write_onehot(x, out, o0, o1 - o0, arg)
    stats[0] = hi
    stats[1] = it
    stats[2] = evals
    stats[3] = (base - g_hi) / r
    return 1
