"""PyTorch engine: the same solver on the tensors' own device, in bounded memory.

Vector i is read as a_i = |c_i| / 2^e_i in float64, recomputed piece by piece from the input (exact: a power
of two; see ``_solver`` for the units), never stored whole: the engine's extra memory is the output plus a few
chunk-sized temporaries (``_torch_layout``; docs/torch-engine.md). Equal-length runs are 2-D views with row
reductions, other vectors ``segment_reduce`` over their lengths: no per-entry segment ids.

On the CPU, where a host sync is free, each pass at mu > 0 also gathers the entries still above its thresholds;
once the solver confirms that mu as a lower bound (``confirm_lower``), later passes read only those (entries with
a <= t w stay outside the support for every larger threshold). On accelerators nothing is compacted (sizes would
need syncs): ``_torch_loop`` runs the whole Newton loop there without a host sync.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._solver import Evaluation, h_and_slope
from ._torch_layout import F64, Layout, Piece

# A compacted copy (float64 values, and weights when weighted) may use at most this share of the input's bytes.
COMPACT_SHARE = 0.25


def ldexp(values, shift):
    """values * 2^shift, exact even where 2^shift alone would overflow (two halves)."""
    half = torch.div(shift, 2, rounding_mode="floor")
    two = torch.full((), 2.0, dtype=F64, device=values.device)  # a fill, not a host-to-device copy
    return values * two.pow(half.double()) * two.pow((shift - half).double())


class _Source:
    """What a pass reads: the input itself (scaled on the fly) or a compacted float64 copy of a subset."""

    def __init__(self, data, weights, layout: Layout, scaled: bool, mu: float = 0.0):
        self.data, self.w, self.layout, self.scaled, self.mu = data, weights, layout, scaled, mu


class TorchEngine:
    name = "torch"
    xp = torch

    def __init__(self, data: torch.Tensor, offsets: np.ndarray, weights, uniform: int | None):
        self.x = data
        self.offsets = offsets
        self.device = data.device
        self.cpu = data.device.type == "cpu"
        r = self.n_vectors = len(offsets) - 1
        self.lay = Layout(offsets, self.device, int(offsets[-1]))
        self.weighted = weights is not None
        self.w = weights.to(F64) if self.weighted else None
        peak = torch.empty(r, dtype=F64, device=self.device)
        for p in self.lay.pieces:  # max |x| without an |x| temporary; NaN propagates, inf stays inf
            xs = self.lay.rows(data, p)
            peak[p.v0 : p.v1] = torch.maximum(self.lay.reduce(xs, p, "max"), -self.lay.reduce(xs, p, "min"))
        if not bool(torch.isfinite(peak).all()):
            raise ValueError("vectors: got NaN or Inf entries, expected finite values")
        e = torch.frexp(peak).exponent.long().clamp(-1022, 1023)
        self.e = torch.where(peak > 0, e, 0)
        self.inv = ldexp(torch.ones_like(peak), -self.e)
        self.sigma = ldexp(torch.ones_like(peak), self.e)
        self.full_src = _Source(data, self.w, self.lay, scaled=False)
        self.src, self.spec = self.full_src, None
        self.compact = self.cpu  # gather survivors (host syncs: free on the CPU only)
        budget = COMPACT_SHARE * data.numel() * data.element_size()
        self.compact_max = int(budget // (16 if self.weighted else 8))
        # one pass for everything per vector: the stats at mu = 0, the largest ratio, the weights' norms
        zero = torch.zeros(r, dtype=F64, device=self.device)
        self.stats0 = torch.empty((r, 3), dtype=F64, device=self.device)
        self._argmax_pos = None  # found when first needed (one-hot vectors): one pass fewer in most solves
        if self.weighted:
            self.ratio_max, self.wnorm, self.wmin = torch.empty_like(zero), torch.empty_like(zero), torch.empty_like(zero)
        else:
            self.ratio_max = peak * self.inv  # the largest a, exactly (a power of two)
        for p in self.lay.pieces:
            a = self._a(self.full_src, p)
            self.stats0[p.v0 : p.v1] = self._piece_stats(a, self.full_src, p, zero, None)
            if self.weighted:
                wv = self.lay.rows(self.w, p)
                self.ratio_max[p.v0 : p.v1] = self.lay.reduce(a / wv, p, "max")
                self.wnorm[p.v0 : p.v1] = self.lay.reduce(wv * wv, p, "sum").sqrt()
                self.wmin[p.v0 : p.v1] = self.lay.reduce(wv, p, "min")
        if not self.weighted:
            self.wnorm = torch.as_tensor(np.sqrt(np.diff(offsets).astype(np.float64)), device=self.device)
            self.wmin = torch.ones_like(self.wnorm)
        self.beta = 1.0 / (self.wnorm - self.wmin)
        self.zero_mask = self.ratio_max == 0
        self.cnorm = self.stats0[:, 2].sqrt()
        self.shift = -self.e
        host = torch.stack([self.beta, self.wnorm, self.wmin, self.ratio_max, self.inv, self.cnorm]).cpu().numpy()
        self.beta_host, self.wnorm_host, self.wmin_host, self.ratio_host, self.inv_host, self.cnorm_host = host
        self.e_host = self.e.cpu().numpy()

    @property
    def argmax_pos(self):
        """Flat position of each vector's first largest ratio a/w (its one-hot position as t -> its top)."""
        if self._argmax_pos is None:
            pos = torch.empty(self.n_vectors, dtype=torch.long, device=self.device)
            for p in self.lay.pieces:
                a = self._a(self.full_src, p)
                pos[p.v0 : p.v1] = self.lay.argmax(a / self.lay.rows(self.w, p) if self.weighted else a, p)
            self._argmax_pos = pos
        return self._argmax_pos

    # ---- per-piece arithmetic (one chunk of float64 temporaries at a time)

    def _a(self, src: _Source, p: Piece):
        """a = |x| / 2^e of a piece, float64 (a fresh tensor: never a view of the caller's data)."""
        if src.scaled:
            return src.layout.rows(src.data, p)
        return torch.mul(torch.abs(self.lay.rows(src.data, p)), self.lay.col(self.inv, p))  # float64 by promotion

    def _u(self, a, src: _Source, p: Piece, t):
        """u = (a - t w)_+ for the piece (``t`` per vector, finite)."""
        tc = src.layout.col(t, p)
        if self.weighted:
            return torch.sub(a, tc * src.layout.rows(src.w, p)).clamp_min_(0)
        return torch.sub(a, tc).clamp_min_(0)

    def _piece_stats(self, a, src: _Source, p: Piece, t, keep):
        """[sum w^2 on the support, sum w u, sum u^2] of the piece's vectors; ``keep`` (a list) also collects the
        support (values, weights, per-vector counts) for a speculative compaction."""
        lay = src.layout
        u = self._u(a, src, p, t)
        pos = u > 0
        if self.weighted:
            wv = lay.rows(src.w, p)
            m = lay.reduce(torch.where(pos, wv * wv, 0.0), p, "sum")
            swu = lay.reduce(wv * u, p, "sum")
        else:
            m = lay.count(pos, p)
            swu = lay.reduce(u, p, "sum")
        suu = torch.linalg.vector_norm(u, dim=1).square() if p.n else lay.reduce(u * u, p, "sum")
        if keep is not None:
            cnt = m if not self.weighted else lay.count(pos, p)
            keep.append((a[pos], lay.rows(src.w, p)[pos] if self.weighted else None, cnt))
        return torch.stack([m, swu, suu], 1)

    def _pass(self, src: _Source, t, spec: bool):
        stats = torch.empty((self.n_vectors, 3), dtype=F64, device=self.device)
        keep, kept = ([], 0) if spec else (None, 0)
        for p in src.layout.pieces:
            stats[p.v0 : p.v1] = self._piece_stats(self._a(src, p), src, p, t, keep)
            if keep is not None:
                kept += keep[-1][0].numel()
                if kept > self.compact_max:  # too many survivors to be worth a copy (memory rule)
                    keep = None
        return stats, keep

    def _compacted(self, keep, mu: float) -> _Source:
        a = torch.cat([k[0] for k in keep])
        w = torch.cat([k[1] for k in keep]) if self.weighted else None
        lens = torch.cat([k[2] for k in keep]).round().long()
        offsets = np.zeros(self.n_vectors + 1, dtype=np.int64)
        np.cumsum(lens.numpy(), out=offsets[1:])
        return _Source(a, w, Layout(offsets, self.device, int(offsets[-1]), one_piece=True), scaled=True, mu=mu)

    # ---- the engine protocol (``_solver.solve_shared``, ``_batched``)

    def to_host(self, a):
        return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)

    def full(self, value):
        return torch.full((self.n_vectors,), value, dtype=F64, device=self.device)

    def from_host(self, a):
        return torch.as_tensor(a, device=self.device)

    def group_sum(self, values, gid, n_groups):
        out = torch.zeros(n_groups, dtype=values.dtype, device=self.device)
        return out.index_add_(0, gid, values)

    ldexp = staticmethod(ldexp)

    def set_shift(self, shift):
        self.shift = torch.as_tensor(np.asarray(shift, dtype=np.int64), device=self.device)

    def thresholds(self, mu):
        return ldexp(mu * self.beta, self.shift)

    def copy_input(self):
        return self.x.clone()

    def confirm_lower(self, mu: float) -> None:
        if self.spec is not None and self.spec[0] == mu:
            self.src = self._compacted(self.spec[1], mu)
        self.spec = None

    def _stats(self, t, mu):
        src = self.src if mu is not None and mu >= self.src.mu else self.full_src
        spec = self.compact and mu is not None and mu > 0
        stats, keep = self._pass(src, t, spec)
        self.spec = (mu, keep) if keep is not None else None
        return stats

    def _onehot(self, stats, t, sync: bool = True):
        empty = (stats[:, 0] == 0) | self.zero_mask
        none = torch.full_like(self.e, -1)
        if sync and self.cpu and not bool(empty.any()):  # the common case; a host sync is free here
            return empty, none, torch.ones_like(t)
        if not self.weighted:
            return empty, torch.where(empty, self.argmax_pos, none), torch.ones_like(t)
        # t -> inf (and zero vectors): the smallest weight, ties to the largest |c|, decided exactly; read from the
        # whole input (a compacted copy lacks the entries an empty vector's argmax may be at)
        pos = torch.empty_like(none)
        limit = torch.isinf(t) | self.zero_mask
        tf = torch.where(torch.isinf(t), 0.0, t)
        for p in self.lay.pieces:
            a, wv = self._a(self.full_src, p), self.lay.rows(self.w, p)
            lightest = wv == self.lay.col(self.wmin, p)
            v = torch.where(self.lay.col(limit, p), torch.where(lightest, a, -1.0), a - self.lay.col(tf, p) * wv)
            pos[p.v0 : p.v1] = self.lay.argmax(v, p)
        return empty, torch.where(empty, pos, none), self.w[pos]

    def evaluate_vec(self, t, mu: float | None = None) -> Evaluation:
        if mu is not None and math.isinf(mu):
            stats = torch.zeros((self.n_vectors, 3), dtype=F64, device=self.device)
        elif mu == 0.0:
            stats = self.stats0  # thresholds 0: the first pass measured it
        else:
            stats = self._stats(torch.where(torch.isinf(t), 1e300, t), mu)
        empty, onehot, hval = self._onehot(stats, t)
        h, dh = h_and_slope(torch, stats, empty, hval)
        return Evaluation(mu if mu is not None else math.nan, h, dh, (t, stats, onehot))

    def evaluate_device(self, mu):
        """``evaluate_shared`` at a 0-d device tensor ``mu``, without a host sync: (S, dS, sp, state) as device
        tensors, from the whole input (no compaction: its sizes would need syncs). ``_torch_loop`` drives it."""
        t = self.thresholds(mu)
        stats, _ = self._pass(self.full_src, torch.where(torch.isinf(t), 1e300, t), False)
        empty, onehot, hval = self._onehot(stats, t, sync=False)
        h, dh = h_and_slope(torch, stats, empty, hval)
        sp = self.beta * (self.wnorm - h)
        ds = torch.where(dh != 0, -self.beta * dh * ldexp(self.beta, self.shift), 0.0)
        return sp.sum(), ds.sum(), sp, (t, stats, onehot)

    def evaluate_shared(self, mu: float) -> Evaluation:
        ev = self.evaluate_vec(self.thresholds(mu), mu)
        ev.sp = self.beta * (self.wnorm - ev.h)
        ds = torch.where(ev.dh != 0, -self.beta * ev.dh * ldexp(self.beta, self.shift), 0.0)
        ev.S, ev.dS = torch.stack([ev.sp.sum(), ds.sum()]).tolist()
        return ev

    def _write(self, t, scale, onehot):
        self.src, self.spec = self.full_src, None  # the compacted copy goes before the output comes
        out = torch.empty_like(self.x)
        t = torch.where(torch.isinf(t), 1e300, t)
        oh = onehot >= 0
        any_oh = not self.cpu or bool(oh.any())  # (a host sync is free on the CPU; once per solve)
        for p in self.lay.pieces:
            z = self._u(self._a(self.full_src, p), self.full_src, p, t)
            # (u scale) then the power of two, in place: never one product that overflows where the result does not
            z.mul_(self.lay.col(scale, p)).mul_(self.lay.col(self.sigma, p))
            z.copysign_(self.lay.rows(self.x, p))
            if any_oh:
                z.masked_fill_(self.lay.col(oh, p), 0.0)
            self.lay.rows(out, p).copy_(z)
        pos = onehot[oh]
        out[pos] = self.x[pos]
        return out

    def vector_host(self, i):
        o0, o1 = int(self.offsets[i]), int(self.offsets[i + 1])
        w = self.w[o0:o1].cpu().numpy() if self.weighted else np.ones(o1 - o0)
        return self.x[o0:o1].double().cpu().numpy(), w

    def patch(self, out, i, values):
        out[int(self.offsets[i]) : int(self.offsets[i + 1])] = torch.as_tensor(values).to(out.dtype)

    def merge_vectors(self, a, b, use_b):
        """``a`` with the vectors flagged in ``use_b`` taken from ``b``; written into ``a`` (no third buffer)."""
        for p in self.lay.pieces:
            dst = self.lay.rows(a, p)
            dst.copy_(torch.where(self.lay.col(use_b, p), self.lay.rows(b, p), dst))
        return a

    def write_state(self, t, stats, onehot):
        suu = stats[:, 2]
        t = torch.where(torch.isfinite(t), t, 0.0)
        safe = torch.where(suu > 0, suu, 1.0)
        scale = torch.where(suu > 0, (suu + t * stats[:, 1]) / safe, 0.0)
        return self._write(t, scale, onehot)

    def write_each(self, ev: Evaluation):
        t, stats, onehot = ev.state
        suu = stats[:, 2]
        scale = torch.where(suu > 0, self.cnorm / torch.where(suu > 0, suu, 1.0).sqrt(), 0.0)
        onehot = torch.where(self.zero_mask, -1, onehot)
        out = self._write(t, scale, onehot)
        oh = onehot >= 0
        pos = onehot[oh]
        out[pos] = torch.copysign(self.cnorm[oh] * self.sigma[oh], self.x[pos].double()).to(out.dtype)
        return out
