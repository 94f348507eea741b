"""PyTorch engine: the same solver with batched segment reductions, on the tensors' own device.

Everything per vector stays a device tensor; the only host syncs are two scalars per evaluation and the
per-vector tie data once at the end. Equal-length groups use a 2-D view (row sums); ragged groups use one int64
segment id per entry with ``index_add_``. Sums are taken in float64 whatever the input dtype, on each vector
divided by a power of two of its own peak (exact; see ``_solver`` for the units).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._solver import Evaluation, h_and_slope


class _Segments:
    def __init__(self, offsets: np.ndarray, uniform: int | None, device):
        self.r = len(offsets) - 1
        self.n = uniform
        self.device = device
        lengths = torch.as_tensor(np.diff(offsets), device=device)
        self.seg = None if uniform else torch.repeat_interleave(torch.arange(self.r, device=device), lengths)
        self.starts = torch.as_tensor(offsets[:-1], device=device)
        self.size = int(offsets[-1])

    def ids(self):
        if self.seg is not None:
            return self.seg
        return torch.arange(self.r, device=self.device).repeat_interleave(self.n)

    def expand(self, per_vector):
        """Per-vector values broadcast to entries (a view for equal lengths)."""
        if self.seg is None:
            return per_vector[:, None].expand(self.r, self.n).reshape(-1)
        return per_vector[self.seg]

    def sum(self, values):
        """values: (N,) or (N, c) -> (r,) or (r, c)."""
        if self.seg is None:
            return values.reshape(self.r, self.n, *values.shape[1:]).sum(1)
        out = torch.zeros((self.r, *values.shape[1:]), dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.seg, values)

    def reduce(self, values, how, fill):
        if self.seg is None:
            v = values.reshape(self.r, self.n)
            return v.amax(1) if how == "amax" else v.amin(1)
        out = torch.full((self.r,), fill, dtype=values.dtype, device=values.device)
        return out.scatter_reduce(0, self.seg, values, how)

    def argmax(self, values):
        """First position (flat index) of each vector's maximum."""
        if self.seg is None:  # torch.argmax returns the first maximal index
            return values.view(self.r, self.n).argmax(1) + self.starts
        mx = self.reduce(values, "amax", -math.inf)
        pos = torch.arange(self.size, device=values.device)
        cand = torch.where(values == self.expand(mx), pos, self.size)
        return self.reduce(cand, "amin", self.size)


def ldexp(values, shift):
    """values * 2^shift, exact even where 2^shift alone would overflow (two halves)."""
    half = torch.div(shift, 2, rounding_mode="floor")
    two = torch.tensor(2.0, dtype=torch.float64, device=values.device)
    return values * two.pow(half.double()) * two.pow((shift - half).double())


class TorchEngine:
    name = "torch"
    xp = torch

    def __init__(self, data: torch.Tensor, offsets: np.ndarray, weights, uniform: int | None):
        self.x = data
        self.offsets = offsets
        self.device = data.device
        self.n_vectors = len(offsets) - 1
        self.seg = _Segments(offsets, uniform, self.device)
        if not bool(torch.isfinite(data).all()):
            raise ValueError("vectors: got NaN or Inf entries, expected finite values")
        a = data.abs().double()
        peak = self.seg.reduce(a, "amax", 0.0)
        e = torch.frexp(peak).exponent.long().clamp(-1022, 1023)
        self.e = torch.where(peak > 0, e, 0)
        self.inv = ldexp(torch.ones_like(peak), -self.e)
        self.sigma = ldexp(torch.ones_like(peak), self.e)
        self.a = a.mul_(self.seg.expand(self.inv))  # in place: one full-size float64 copy of the data
        self.weighted = weights is not None
        self.w = weights.to(torch.float64) if self.weighted else None
        if self.weighted:
            ratio = self.a / self.w
            self.argmax_pos = self.seg.argmax(ratio)
            self.ratio_max = ratio[self.argmax_pos]
            del ratio
        else:
            self.argmax_pos = self.seg.argmax(self.a)
            self.ratio_max = self.a[self.argmax_pos]
        if self.weighted:
            self.wnorm = self.seg.sum(self.w * self.w).sqrt()
            self.wmin = self.seg.reduce(self.w, "amin", math.inf)
        else:
            self.wnorm = torch.as_tensor(np.sqrt(np.diff(offsets).astype(np.float64)), device=self.device)
            self.wmin = torch.ones_like(self.wnorm)
        self.beta = 1.0 / (self.wnorm - self.wmin)
        self.zero_mask = self.ratio_max == 0
        self.cnorm = self.seg.sum(self.a * self.a).sqrt()
        self.shift = -self.e
        host = torch.stack([self.beta, self.wnorm, self.wmin, self.ratio_max, self.inv, self.cnorm]).cpu().numpy()
        self.beta_host, self.wnorm_host, self.wmin_host, self.ratio_host, self.inv_host, self.cnorm_host = host
        self.e_host = self.e.cpu().numpy()

    def to_host(self, a):
        return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)

    def full(self, value):
        return torch.full((self.n_vectors,), value, dtype=torch.float64, device=self.device)

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
        pass  # no compaction on this engine: device passes are cheap and boolean compaction syncs

    def _stats(self, t):
        """[sum w^2 on the support, sum w u, sum u^2] per vector; one full-size temporary (u) at a time where
        the layout allows (equal lengths: row reductions, no stacked copies)."""
        te = self.seg.expand(t)
        u = (self.a - te * self.w) if self.weighted else (self.a - te)
        u.clamp_min_(0)
        if self.seg.seg is None and not self.weighted:
            rows = u.view(self.seg.r, self.seg.n)
            m = torch.count_nonzero(rows, dim=1).double()
            return torch.stack([m, rows.sum(1), torch.linalg.vector_norm(rows, dim=1).square()], 1)
        if self.weighted:
            cols = [torch.where(u > 0, self.w * self.w, 0.0), self.w * u, u * u]
        else:
            cols = [(u > 0).double(), u, u * u]
        return torch.stack([self.seg.sum(c) for c in cols], 1)

    def _onehot(self, stats, t):
        empty = (stats[:, 0] == 0) | self.zero_mask
        if self.weighted:
            # t -> inf (and zero vectors): the smallest weight, ties to the largest |c|, decided exactly
            limit = self.seg.expand(torch.isinf(t) | self.zero_mask)
            lightest = self.w == self.seg.expand(self.wmin)
            te = self.seg.expand(torch.where(torch.isinf(t), 0.0, t))
            v = torch.where(limit, torch.where(lightest, self.a, -1.0), self.a - te * self.w)
            pos = self.seg.argmax(v)
            hval = self.w[pos]
        else:
            pos = self.argmax_pos
            hval = torch.ones_like(t)
        return empty, torch.where(empty, pos, -1), hval

    def evaluate_vec(self, t, mu: float | None = None) -> Evaluation:
        if mu is not None and math.isinf(mu):
            stats = torch.zeros((self.n_vectors, 3), dtype=torch.float64, device=self.device)
        else:
            stats = self._stats(torch.where(torch.isinf(t), 1e300, t))
        empty, onehot, hval = self._onehot(stats, t)
        h, dh = h_and_slope(torch, stats, empty, hval)
        return Evaluation(mu if mu is not None else math.nan, h, dh, (t, stats, onehot))

    def evaluate_shared(self, mu: float) -> Evaluation:
        ev = self.evaluate_vec(self.thresholds(mu), mu)
        ev.sp = self.beta * (self.wnorm - ev.h)
        ds = torch.where(ev.dh != 0, -self.beta * ev.dh * ldexp(self.beta, self.shift), 0.0)
        ev.S, ev.dS = torch.stack([ev.sp.sum(), ds.sum()]).tolist()
        return ev

    def _write(self, t, scale, onehot):
        te = self.seg.expand(torch.where(torch.isinf(t), 1e300, t))
        z = (self.a - te * self.w) if self.weighted else (self.a - te)
        z.clamp_min_(0)
        # (u scale) then the power of two, in place: never one product that overflows where the result does not
        z.mul_(self.seg.expand(scale)).mul_(self.seg.expand(self.sigma))
        z.copysign_(self.x)
        oh = onehot >= 0
        z.masked_fill_(self.seg.expand(oh), 0.0)
        pos = onehot[oh]
        z[pos] = self.x[pos].double()
        return z.to(self.x.dtype)

    def vector_host(self, i):
        o0, o1 = int(self.offsets[i]), int(self.offsets[i + 1])
        w = self.w[o0:o1].cpu().numpy() if self.weighted else np.ones(o1 - o0)
        return self.x[o0:o1].double().cpu().numpy(), w

    def patch(self, out, i, values):
        out[int(self.offsets[i]) : int(self.offsets[i + 1])] = torch.as_tensor(values).to(out.dtype)

    def merge_vectors(self, a, b, use_b):
        return torch.where(self.seg.expand(use_b), b, a)

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
