"""PyTorch engine: the same solver with batched segment reductions, on the tensors' own device.

Everything per vector stays a device tensor; the only host syncs are two scalars (g, g') per evaluation and the
per-vector tie data once at the end. Equal-length groups use a 2-D view (row sums); ragged groups use one int64
segment id per entry with ``index_add_``. Sums are taken in float64 whatever the input dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._group import NeedsRescale, scale_trouble
from ._numba import h_and_slope
from ._solver import Evaluation


class _Segments:
    def __init__(self, offsets: np.ndarray, uniform: int | None, device):
        self.r = len(offsets) - 1
        self.n = uniform
        self.device = device
        lengths = torch.as_tensor(np.diff(offsets), device=device)
        self.seg = None if uniform else torch.repeat_interleave(torch.arange(self.r, device=device), lengths)
        self.starts = torch.as_tensor(offsets[:-1], device=device)
        self.size = int(offsets[-1])

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

    def argmax(self, values):
        """First position (flat index) of each vector's maximum."""
        if self.seg is None:
            v = values.reshape(self.r, self.n)
            mx = v.max(1, keepdim=True).values
            idx = torch.arange(self.n, device=values.device).expand(self.r, self.n)
            first = torch.where(v == mx, idx, self.n).min(1).values
            return first + self.starts
        mx = torch.full((self.r,), -math.inf, dtype=values.dtype, device=values.device)
        mx = mx.scatter_reduce(0, self.seg, values, "amax")
        pos = torch.arange(self.size, device=values.device)
        cand = torch.where(values == mx[self.seg], pos, self.size)
        first = torch.full((self.r,), self.size, dtype=pos.dtype, device=values.device)
        return first.scatter_reduce(0, self.seg, cand, "amin")


class TorchEngine:
    name = "torch"
    xp = torch

    def __init__(self, data: torch.Tensor, offsets: np.ndarray, weights, uniform: int | None):
        self.x = data
        self.device = data.device
        self.n_vectors = len(offsets) - 1
        self.seg = _Segments(offsets, uniform, self.device)
        if not bool(torch.isfinite(data).all()):
            raise ValueError("vectors: got NaN or Inf entries, expected finite values")
        self.a = data.abs().double()
        self.weighted = weights is not None
        self.w = weights.double() if self.weighted else None
        w = self.w if self.weighted else torch.ones_like(self.a)
        ratio = self.a / w
        self.argmax = self.seg.argmax(ratio)
        self.ratio_max = ratio[self.argmax]
        if self.weighted:
            self.wnorm = self.seg.sum(w * w).sqrt()
            wmin = torch.full((self.n_vectors,), math.inf, dtype=torch.float64, device=self.device)
            self.wmin = wmin.scatter_reduce(0, self._seg_ids(), w, "amin")
        else:
            lengths = torch.as_tensor(np.diff(offsets), dtype=torch.float64, device=self.device)
            self.wnorm = lengths.sqrt()
            self.wmin = torch.ones_like(self.wnorm)
        self.beta = 1.0 / (self.wnorm - self.wmin)
        self.zero_mask = self.ratio_max == 0
        sq = self.seg.sum(torch.stack([self.a, self.a * self.a], 1))
        self.cnorm = sq[:, 1].sqrt()
        if scale_trouble(*sq.T.cpu().numpy()):
            raise NeedsRescale
        self.beta_host, self.wnorm_host, self.wmin_host = torch.stack([self.beta, self.wnorm, self.wmin]).cpu().numpy()

    def _seg_ids(self):
        if self.seg.seg is not None:
            return self.seg.seg
        return torch.arange(self.n_vectors, device=self.device).repeat_interleave(self.seg.n)

    def to_host(self, a):
        return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)

    def full(self, value):
        return torch.full((self.n_vectors,), value, dtype=torch.float64, device=self.device)

    def from_host(self, a):
        return torch.as_tensor(a, device=self.device)

    def group_sum(self, values, gid, n_groups):
        out = torch.zeros(n_groups, dtype=values.dtype, device=self.device)
        return out.index_add_(0, gid, values)

    def group_max(self, values, gid, n_groups):
        out = torch.full((n_groups,), -math.inf, dtype=values.dtype, device=self.device)
        return out.scatter_reduce(0, gid, values, "amax")

    def mu_top(self) -> float:
        return float((self.ratio_max / self.beta).max()) if self.n_vectors else 0.0

    def copy_input(self):
        return self.x.clone()

    def confirm_lower(self, mu: float) -> None:
        pass  # no compaction on this engine: device passes are cheap and boolean compaction syncs

    def _stats(self, t):
        te = self.seg.expand(t)
        if self.weighted:
            u = (self.a - te * self.w).clamp_min(0)
            cols = [torch.where(u > 0, self.w * self.w, 0.0), self.w * u, u * u]
        else:
            u = (self.a - te).clamp_min(0)
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
            pos = self.argmax
            hval = torch.ones_like(t)
        onehot = torch.where(empty, pos, -1)
        return empty, onehot, hval

    def evaluate_vec(self, t, mu: float | None = None) -> Evaluation:
        if mu is not None and math.isinf(mu):
            stats = torch.zeros((self.n_vectors, 3), dtype=torch.float64, device=self.device)
        else:
            stats = self._stats(torch.where(torch.isinf(t), 1e300, t))
        empty, onehot, hval = self._onehot(stats, t)
        h, dh = h_and_slope(torch, stats, empty, hval)
        return Evaluation(mu if mu is not None else math.nan, h, dh, (t, stats, onehot))

    def evaluate_shared(self, mu: float) -> Evaluation:
        ev = self.evaluate_vec(mu * self.beta, mu)
        g, dg = torch.stack([(self.beta * ev.h).sum(), (self.beta * self.beta * ev.dh).sum()]).tolist()
        ev.g, ev.dg = g, dg
        return ev

    def _write(self, t, scale, onehot):
        te = self.seg.expand(torch.where(torch.isinf(t), 1e300, t))
        w = self.w if self.weighted else 1.0
        u = (self.a - te * w).clamp_min(0)
        z = torch.copysign(u * self.seg.expand(scale), self.x.double())
        oh = onehot >= 0
        z = torch.where(self.seg.expand(oh), 0.0, z)
        pos = onehot[oh]
        z[pos] = self.x[pos].double()
        return z.to(self.x.dtype)

    def write_shared(self, hi: Evaluation, lo: Evaluation | None, use_lo):
        t, stats, onehot = hi.state
        if lo is not None:
            ul = torch.as_tensor(use_lo, device=self.device)
            tl, sl, ol = lo.state
            t = torch.where(ul, tl, t)
            stats = torch.where(ul[:, None], sl, stats)
            onehot = torch.where(ul, ol, onehot)
        suu = stats[:, 2]
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
        out[pos] = torch.copysign(self.cnorm[oh], self.x[pos].double()).to(out.dtype)
        return out
