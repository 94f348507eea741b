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

import numba as nb
import numpy as np

from ._solver import Evaluation

CHUNK = 1 << 14
_FM = {"reassoc", "nsz", "contract"}  # vectorize the sums; keep NaN/Inf semantics for input checks


@nb.njit(parallel=True, cache=True, fastmath=_FM)
def _first_pass(x, w, weighted, cstart, clen, out):
    """Per chunk: [support size or sum w^2 on support, sum w a, sum a^2, max a/w, argmax, sum w^2, min w]."""
    for c in nb.prange(cstart.shape[0]):
        s0 = cstart[c]
        m = 0.0
        swa = 0.0
        saa = 0.0
        best = -1.0
        arg = s0
        sww = 0.0
        wmin = math.inf
        for j in range(s0, s0 + clen[c]):
            a = abs(np.float64(x[j]))
            wj = np.float64(w[j]) if weighted else 1.0
            ratio = a / wj
            if ratio > best:
                best = ratio
                arg = j
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
        out[c, 4] = arg
        out[c, 5] = sww
        out[c, 6] = wmin


@nb.njit(parallel=True, cache=True, fastmath=_FM)
def _evaluate(src, srcw, weighted, sstart, slen, cvec, t, compact, tdrop, dst, dstw, dlen, out):
    """Per chunk, at thresholds t[vector]: [sum w^2 on support, sum w u, sum u^2] with u = (a - t w)_+.

    With ``compact``, entries with a > tdrop[vector] w are also copied (as |c|) to ``dst`` at the same chunk start
    (``dst`` may be ``src``: the write index never passes the read index).
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
            wj = np.float64(srcw[j]) if weighted else 1.0
            u = a - ti * wj
            if u > 0.0:
                m += wj * wj
                swu += wj * u
                suu += u * u
            if compact and a > td * wj:
                dst[s0 + kept] = a
                if weighted:
                    dstw[s0 + kept] = wj
                kept += 1
        if compact:
            dlen[c] = kept
        out[c, 0] = m
        out[c, 1] = swu
        out[c, 2] = suu


@nb.njit(parallel=True, cache=True, fastmath=_FM)
def _write(x, w, weighted, cstart, clen, cvec, t, scale, onehot, out):
    """out = sign(x) (|x| - t w)_+ scale per vector; vectors with onehot[i] >= 0 keep only that entry."""
    for c in nb.prange(cstart.shape[0]):
        i = cvec[c]
        s0 = cstart[c]
        oh = onehot[i]
        if oh >= 0:
            for j in range(s0, s0 + clen[c]):
                out[j] = x[j] if j == oh else 0.0
            continue
        ti = t[i]
        sc = scale[i]
        for j in range(s0, s0 + clen[c]):
            xv = np.float64(x[j])
            wj = np.float64(w[j]) if weighted else 1.0
            u = abs(xv) - ti * wj
            out[j] = math.copysign(u * sc, xv) if u > 0.0 else 0.0


@nb.njit(parallel=True, cache=True)
def _argmax_shifted(x, w, offsets, vids, t, zero, out):
    """Weighted one-hot position: argmax_j |x_j| - t w_j (for a zero vector: the smallest weight)."""
    for q in nb.prange(vids.shape[0]):
        i = vids[q]
        best = -math.inf
        arg = offsets[i]
        for j in range(offsets[i], offsets[i + 1]):
            v = -np.float64(w[j]) if zero[i] else abs(np.float64(x[j])) - t[i] * np.float64(w[j])
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
        self.w = weights if weights is not None else data  # placeholder keeps one kernel signature
        self.weighted = weights is not None
        self.offsets = offsets
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

        fp = np.empty((len(self.cvec), 7))
        _first_pass(self.x, self.w, self.weighted, self.cstart, self.clen, fp)
        if not np.all(np.isfinite(fp[:, 1])):
            raise ValueError("vectors: got NaN or Inf entries, expected finite values")
        if self.first is None:
            per = fp
            maxratio, argmax, wmin = fp[:, 3], fp[:, 4].astype(np.int64), fp[:, 6]
        else:
            per = np.add.reduceat(fp, self.first, axis=0)
            maxratio = np.maximum.reduceat(fp[:, 3], self.first)
            wmin = np.minimum.reduceat(fp[:, 6], self.first)
            # the argmax of the chunk holding each vector's max
            hit = fp[:, 3] == maxratio[self.cvec]
            pick = np.full(r, -1, dtype=np.int64)
            rows = np.flatnonzero(hit)[::-1]  # reversed so the first chunk wins on assignment
            pick[self.cvec[rows]] = fp[rows, 4].astype(np.int64)
            argmax = pick
        wsq = per[:, 5] if self.weighted else lengths.astype(np.float64)
        self.wnorm = np.sqrt(wsq)
        self.wmin = wmin if self.weighted else np.ones(r)
        self.beta = 1.0 / (self.wnorm - self.wmin)
        self.ratio_max = maxratio
        self.argmax = argmax
        self.zero_mask = maxratio == 0.0
        self.stats0 = np.ascontiguousarray(per[:, :3])
        self.cnorm = np.sqrt(per[:, 2])
        # active set: (source arrays, chunk lengths); the original until a lower bound is confirmed
        self.src, self.srcw, self.slen = self.x, self.w, self.clen
        self.work = None
        self.spec = None  # (mu, lengths) of a speculative compaction out of the original
        self.lo_applied = 0.0
        self.lo_confirmed = 0.0

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

    def mu_top(self) -> float:
        return float(np.max(self.ratio_max / self.beta)) if self.n_vectors else 0.0

    def copy_input(self):
        return self.x.copy()

    # evaluation
    def _stats(self, t: np.ndarray, mu: float | None):
        nch = len(self.cvec)
        out = np.empty((nch, 3))
        compact, tdrop, dst, dstw, dlen = False, t, self.src, self.srcw, self.slen
        if mu is not None and mu > 0:
            if self.src is self.x:  # speculative: the original stays intact, so a wrong guess costs nothing
                if self.work is None:
                    self.work = np.empty_like(self.x)
                    self.workw = np.empty_like(self.x) if self.weighted else self.work
                compact, tdrop = True, t
                dst, dstw, dlen = self.work, self.workw, np.empty_like(self.clen)
            elif self.lo_confirmed > self.lo_applied:
                compact, tdrop = True, self.lo_confirmed * self.beta
                dlen = np.empty_like(self.clen)
                self.lo_applied = self.lo_confirmed
        _evaluate(self.src, self.srcw, self.weighted, self.cstart, self.slen, self.cvec, t, compact, tdrop,
                  dst, dstw, dlen, out)
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

    def _onehot_h(self, stats: np.ndarray, t: np.ndarray):
        """h for vectors with empty support (and zero vectors), with their one-hot positions."""
        empty = (stats[:, 0] == 0.0) | self.zero_mask
        onehot = np.full(self.n_vectors, -1, dtype=np.int64)
        hval = np.ones(self.n_vectors)
        vids = np.flatnonzero(empty)
        if len(vids):
            if self.weighted:
                pos = np.empty(len(vids), dtype=np.int64)
                _argmax_shifted(self.x, self.w, self.offsets, vids, np.where(np.isinf(t), 1e300, t),
                                self.zero_mask, pos)
                hval[vids] = self.w[pos]
            else:
                pos = self.argmax[vids]
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
        _write(self.x, self.w, self.weighted, self.cstart, self.clen, self.cvec, t, scale, onehot, out)
        return out

    def write_shared(self, hi: Evaluation, lo: Evaluation | None, use_lo):
        t, stats, onehot = hi.state
        if lo is not None:
            tl, sl, ol = lo.state
            t = np.where(use_lo, tl, t)
            stats = np.where(use_lo[:, None], sl, stats)
            onehot = np.where(use_lo, ol, onehot)
        suu = stats[:, 2]
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
    dh = xp.where(ok, -m / nu + swu * swu / (nu * nu * nu), 0.0)
    return h, dh
