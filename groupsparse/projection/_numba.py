"""CPU engine: Numba kernels (``_kernels``), multithreaded over chunks on large groups.

Units. Vector i is handled as a_i = |c_i| / sigma_i with sigma_i = 2^e_i an exact power of two taken from its own
size, and its (already normalized) weights; the solver hands over thresholds t_i in those units. Scaling by a power
of two is exact, and x_i(mu) depends only on a_i - t_i w_i, so no sum over- or underflows whatever the group
mixes (1e-300 beside 1e+300, subnormals). For ordinary vectors e_i comes from sqrt(sum |c|^2) of the first pass
(no extra pass); only vectors whose squares leave [2^-800, 2^800] get a max pass and a second, scaled first pass.

Layout: each vector is split into chunks of at most ``CHUNK`` entries so one long vector (a whole layer) still
uses every core. Once a lower bound mu_lo on the root is proven, entries with a <= t(mu_lo) w can never be
nonzero again: they are compacted out of a work buffer, in place, inside the next evaluation's pass.
"""

from __future__ import annotations

import math
import os

import numpy as np

from . import _kernels as K
from ._solver import Evaluation, h_and_slope
from ._threads import threads

CHUNK = 1 << 14
# Threads pay off only on large groups. Threads are Python threads running the cached serial kernels on blocks of
# chunks or parts that each thread claims when free (``_threads``): no Numba thread pool is started. Measured on
# the 2-core VM (docs/projection.md §7): equal-length groups of 1e7 entries 55 -> 27 ms (length 9) and 24 -> 14 ms
# (length 1000), the ResNet-50 layers 57 -> 42 ms; with another process busy on one core about the serial time
# (one static range per thread made that 64-77 ms). Ragged groups are the exception on few cores: the general
# engine on 2 threads (25 ms for 2.4M entries) loses to the compiled serial solve (20 ms), so they leave that
# path only from RAGGED_MIN_THREADS threads (16 cores: 1e7 entries at 0.9 ns/entry).
PARALLEL_MIN_ENTRIES = int(os.environ.get("GROUPSPARSE_PARALLEL_MIN_ENTRIES", 1 << 20))
PARALLEL_MIN_THREADS = int(os.environ.get("GROUPSPARSE_PARALLEL_MIN_THREADS", 2))
RAGGED_MIN_THREADS = int(os.environ.get("GROUPSPARSE_RAGGED_MIN_THREADS", 4))
# A vectorized pass costs about half a copy, compacting ~1 cycle per entry: typical solves need 3-4 evaluations,
# so compaction starts only on solves that keep going (ties, bisection, weighted brackets).
COMPACT_AFTER = 4
_SAFE_SQ = (2.0**-800, 2.0**800)  # sums of squares in this range leave every relevant entry's square normal


def threaded(n_entries: int) -> bool:
    """Whether a group of this size runs its passes on threads (a speed choice only: never changes a bit)."""
    return n_entries >= PARALLEL_MIN_ENTRIES and threads() >= PARALLEL_MIN_THREADS


def ragged_threaded(n_entries: int) -> bool:
    """Whether an unweighted ragged group leaves the compiled serial solve for the threaded general engine."""
    return threaded(n_entries) and threads() >= RAGGED_MIN_THREADS


def _reduce_rows(per_chunk, first):
    return per_chunk if first is None else np.add.reduceat(per_chunk, first, axis=0)


def ldexp(values, shift):
    with np.errstate(over="ignore"):  # inf is the right limit (a threshold past every entry; a scale to redo)
        return np.ldexp(values, shift)


class NumbaEngine:
    name = "numba"
    xp = np

    def __init__(self, data: np.ndarray, offsets: np.ndarray, weights: np.ndarray | None, out=None):
        self.x = data
        self.out = out
        self.weighted = weights is not None
        self.w = weights if self.weighted else np.ones(1)  # unweighted kernels never read it
        self.offsets = offsets
        self.par = int(threaded(data.shape[0]))
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

        fp = self._first_pass(np.ones(len(self.cvec)), None)
        per = _reduce_rows(fp, self.first)
        sa, saa = per[:, 1], per[:, 2]
        trouble = ~((saa < _SAFE_SQ[1]) & ((saa >= _SAFE_SQ[0]) | (sa == 0.0)) & (sa < math.inf))
        e = np.zeros(r, dtype=np.int64)
        ok = ~trouble & (saa > 0)
        e[ok] = np.frexp(np.sqrt(saa[ok]))[1]
        if trouble.any():
            vids = np.flatnonzero(trouble)
            mx = np.empty(len(vids))
            K.vec_max(self.x, offsets, vids, mx)
            if not np.all(np.isfinite(mx)):
                raise ValueError("vectors: got NaN or Inf entries, expected finite values")
            # e within [-1022, 1023]: 2^e and 2^-e both exist (a subnormal vector's peak lands at >= 2^-52)
            e[vids] = np.clip(np.frexp(mx)[1], -1022, 1023)
        self.inv = np.ldexp(1.0, -e)
        if trouble.any():
            chunks = np.flatnonzero(trouble[self.cvec])
            fp[chunks] = self._first_pass(self.inv[self.cvec], chunks)[chunks]
            # then the same rule as the ordinary vectors (2^e just above sqrt(sum |c|^2)), exactly: scaling the
            # data by a power of two shifts e and changes no bit of the solve
            sq = _reduce_rows(fp, self.first)[vids, 2]
            adj = np.where(sq > 0, np.frexp(np.sqrt(sq))[1], 0)
            adj = np.clip(e[vids] + adj, -1022, 1023) - e[vids]
            e[vids] += adj
            scale = np.ldexp(1.0, -adj)[np.searchsorted(vids, self.cvec[chunks])]
            fp[chunks, 1] *= scale
            fp[chunks, 2] *= scale * scale
            if self.weighted:
                fp[chunks, 3] *= scale
            self.inv = np.ldexp(1.0, -e)
        self.e = e
        # the ordinary vectors' sums, rescaled exactly
        good = ~trouble[self.cvec]
        isq = self.inv[self.cvec[good]]
        if self.weighted:
            fp[good, 1] *= isq
            fp[good, 3] *= isq
        else:
            fp[good, 1] *= isq
        fp[good, 2] *= isq * isq
        per = _reduce_rows(fp, self.first)
        if self.weighted:
            maxratio = fp[:, 3] if self.first is None else np.maximum.reduceat(fp[:, 3], self.first)
            wmin = fp[:, 5] if self.first is None else np.minimum.reduceat(fp[:, 5], self.first)
            self.wnorm, self.wmin = np.sqrt(per[:, 4]), wmin
        else:
            # the largest a itself (one integer-max pass, ~0.4 of an evaluation), not the norm that bounds it: the
            # bracket's top, where S = r; on uniform data the norm is 18x higher at length 1000, and the secants
            # that follow a Newton overshoot (``_solver``) started from there took 20-23 evaluations, not 8-11
            cm = np.empty(len(self.cvec))
            K.chunk_abs_max(data, self.cstart, self.clen, cm)
            maxratio = (cm if self.first is None else np.maximum.reduceat(cm, self.first)) * self.inv
            self.wnorm, self.wmin = np.sqrt(lengths.astype(np.float64)), np.ones(r)
        self.beta = 1.0 / (self.wnorm - self.wmin)
        self.ratio_max = maxratio
        self.zero_mask = per[:, 1] == 0.0
        self.stats0 = np.ascontiguousarray(per[:, :3])
        self.cnorm = np.sqrt(per[:, 2])
        self.shift = -e  # thresholds until the solver sets its reference exponent
        self._argmax = None  # found when needed (one-hot vectors are few): keeps the first pass branch-free
        # active set: (source arrays, chunk lengths); the original until a lower bound is confirmed
        self.src, self.srcw, self.slen = self.x, self.w, self.clen
        self.work = None
        self.spec = None  # (mu, lengths) of a speculative compaction out of the original
        self.lo_applied = 0.0
        self.lo_confirmed = 0.0
        self.n_evals = 0

    def _run(self, kernels, *args):
        return kernels[self.par](*args)

    def _first_pass(self, cinv, chunks):
        cs, cl = (self.cstart, self.clen) if chunks is None else (self.cstart[chunks], self.clen[chunks])
        sub = cinv if chunks is None else cinv[chunks]
        out = np.zeros((len(cs), 6 if self.weighted else 3))
        if self.weighted:
            self._run(K.FIRST_PASS, self.x, self.w, cs, cl, sub, out)
        else:
            self._run(K.FIRST_PASS_PLAIN, self.x, cs, cl, sub, out)
        if chunks is None:
            return out
        full = np.zeros((len(self.cvec), out.shape[1]))
        full[chunks] = out
        return full

    # host views the solver reads
    beta_host = property(lambda self: self.beta)
    wnorm_host = property(lambda self: self.wnorm)
    wmin_host = property(lambda self: self.wmin)
    e_host = property(lambda self: self.e)
    ratio_host = property(lambda self: self.ratio_max)
    inv_host = property(lambda self: self.inv)
    cnorm_host = property(lambda self: self.cnorm)
    ldexp = staticmethod(ldexp)

    def merge_vectors(self, a, b, use_b):
        return np.where(np.repeat(use_b, np.diff(self.offsets)), b, a)

    def to_host(self, a):
        return np.asarray(a)

    def from_host(self, a):
        return np.asarray(a)

    def full(self, value):
        return np.full(self.n_vectors, value, dtype=np.float64)

    def group_sum(self, values, gid, n_groups):
        return np.bincount(gid, weights=values, minlength=n_groups)

    def set_shift(self, shift):
        """thresholds t_i = ldexp(mu beta_i, shift_i) (the solver's reference exponent minus e_i)."""
        self.shift = np.asarray(shift, dtype=np.int64)

    def thresholds(self, mu):
        return ldexp(mu * self.beta, self.shift)

    def _fresh(self):
        """The output buffer: the caller's (``project(out=...)``, when its layout matches) or new memory."""
        return self.out if self.out is not None else np.empty_like(self.x)

    def copy_input(self):
        out = self._fresh()
        np.copyto(out, self.x)
        return out

    # evaluation
    def _stats(self, t: np.ndarray, mu: float | None):
        out = np.empty((len(self.cvec), 3))
        scratch = np.empty(1, dtype=self.x.dtype)  # a writable stand-in: the caller's arrays may be read-only
        compact, tdrop, dst, dstw, dlen = False, t, scratch, self.w[:1].copy(), self.slen
        if mu is not None and mu > 0:
            self.n_evals += 1
        if mu is not None and mu > 0 and self.n_evals >= COMPACT_AFTER:
            if self.src is self.x:  # speculative: the original stays intact, so a wrong guess costs nothing
                if self.work is None:
                    self.work = np.empty_like(self.x)
                    self.workw = np.empty_like(self.w) if self.weighted else self.w
                compact, tdrop = True, t
                dst, dstw, dlen = self.work, self.workw, np.empty_like(self.clen)
            elif self.lo_confirmed > self.lo_applied:
                compact, tdrop = True, self.thresholds(self.lo_confirmed)
                dst, dstw, dlen = self.src, self.srcw, np.empty_like(self.clen)
                self.lo_applied = self.lo_confirmed
        if self.weighted:
            self._run(K.EVALUATE, self.src, self.srcw, self.cstart, self.slen, self.cvec, self.inv, t, compact,
                      tdrop, dst, dstw, dlen, out)
        elif compact:
            self._run(K.EVALUATE_PLAIN_COMPACT, self.src, self.cstart, self.slen, self.cvec, self.inv, t, tdrop,
                      dst, dlen, out)
        else:
            self._run(K.EVALUATE_PLAIN, self.src, self.cstart, self.slen, self.cvec, self.inv, t, out)
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
            K.argmax_abs(self.x, self.offsets, todo, pos)
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
                K.argmax_shifted(self.x, self.w, self.offsets, vids, self.inv, t, self.zero_mask, pos)
                hval[vids] = self.w[pos]
            else:
                pos = self.argmax(vids)
            onehot[vids] = pos
        return empty, onehot, hval

    def evaluate_vec(self, t: np.ndarray, mu: float | None = None, live=None) -> Evaluation:
        # (``live``: every vector is evaluated here; the skipped ones' sums would be the same)
        t = np.ascontiguousarray(t, dtype=np.float64)
        if mu == 0.0 or (mu is None and not np.any(t)):
            stats = self.stats0
        elif mu is not None and math.isinf(mu):
            stats = np.zeros((self.n_vectors, 3))
        else:
            stats = self._stats(t, mu)
        empty, onehot, hval = self._onehot_h(stats, t)
        h, dh = h_and_slope(np, stats, empty, hval)
        return Evaluation(mu if mu is not None else math.nan, h, dh, (t, stats, onehot))

    def evaluate_shared(self, mu: float) -> Evaluation:
        ev = self.evaluate_vec(self.thresholds(mu), mu)
        ev.sp = self.beta * (self.wnorm - ev.h)
        dt = ldexp(self.beta, self.shift)
        ev.S = float(np.sum(ev.sp))
        with np.errstate(invalid="ignore", over="ignore"):
            ev.dS = float(-np.sum(np.where(ev.dh != 0, self.beta * ev.dh * dt, 0.0)))
        return ev

    # output
    def _write(self, t, scale, onehot):
        """Kernel write with per-vector scale (normalized units); vectors whose scale times 2^e overflows are
        written here in two exact steps instead (rare: only vectors near the float64 limit)."""
        out = self._fresh()
        big = ldexp(scale, self.e)
        bad = ~np.isfinite(big) & (onehot < 0)
        big = np.where(bad, 0.0, big)
        # a subnormal factor keeps few of scale's bits (float64 vectors near 2^-1074; project_each at s = 0 has
        # scale ~ 1e-12 and lost 1e-4 of the norm): those vectors get scale in the kernel, then 2^e (one rounding)
        sub = (big != 0.0) & (np.abs(big) < np.finfo(np.float64).tiny) & (onehot < 0) & (out.dtype == np.float64)
        if sub.any():
            big = np.where(sub, scale, big)
        if self.weighted:
            self._run(K.WRITE, self.x, self.w, self.cstart, self.clen, self.cvec, self.inv, t, big, onehot, out)
        else:
            self._run(K.WRITE_PLAIN, self.x, self.cstart, self.clen, self.cvec, self.inv, t, big, onehot, out)
        if sub.any():
            v = np.flatnonzero(sub)
            lens = self.offsets[v + 1] - self.offsets[v]
            idx = np.repeat(self.offsets[v] - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
            out[idx] = np.ldexp(out[idx], np.repeat(self.e[v], lens))
        for i in np.flatnonzero(bad):
            xv, w = self.vector_host(i)
            u = np.maximum(np.abs(xv) * self.inv[i] - t[i] * w, 0.0)
            with np.errstate(over="ignore"):
                self.patch(out, i, np.copysign(np.ldexp(u * scale[i], self.e[i]), xv))
        return out

    def vector_host(self, i):
        """(entries as float64, normalized weights) of vector i."""
        o0, o1 = self.offsets[i], self.offsets[i + 1]
        w = self.w[o0:o1] if self.weighted else np.ones(o1 - o0)
        return self.x[o0:o1].astype(np.float64), w

    def patch(self, out, i, values):
        out[self.offsets[i] : self.offsets[i + 1]] = values

    def write_state(self, t, stats, onehot):
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
        out = self._write(t, scale, onehot)  # a one-hot vector keeps its l2 norm: the kept entry becomes +-||c||
        oh = np.flatnonzero(onehot >= 0)
        if len(oh):
            pos = onehot[oh]
            with np.errstate(over="ignore"):
                out[pos] = np.copysign(np.ldexp(self.cnorm[oh], self.e[oh]), self.x[pos])
        return out
