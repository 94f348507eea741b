"""The torch engine's first pass (the peak, the sums at mu = 0, the per-vector constants), deferred until the
solve tells its target when the engine compacts: then the pass also keeps the entries the solve's first Newton
step will need (docs/torch-engine.md, active-set compaction)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ._torch_layout import F64, first_step_threshold
from ._torch_util import HOST_XP, ldexp

# what the first pass sets (a deferred first pass runs when one of them is first read)
_FIRST_PASS = frozenset({"e", "inv", "sigma", "ratio_max", "wnorm", "wmin", "stats0", "beta", "zero_mask", "cnorm",
                         "shift", "beta_host", "wnorm_host", "wmin_host", "ratio_host", "inv_host", "cnorm_host",
                         "e_host", "_p1", "_p2", "_dT", "_tk_host", "_np", "_argmax_pos"})

class FirstPass:
    """Mixin of ``TorchEngine``: ``_first_pass`` sets the attributes in ``_FIRST_PASS``."""

    def __getattr__(self, name):
        # the per-vector constants of a deferred first pass (a caller that never called ``plan``: no gathering)
        if name in _FIRST_PASS and self.__dict__.get("_pending"):
            self._first_pass()
            return getattr(self, name)
        raise AttributeError(name)

    def plan(self, sparsity: float) -> None:
        """``solve_shared`` tells the target before anything else: the first pass keeps the survivors of the
        threshold where the solve's first Newton step should land, a little below (``first_step_threshold``)."""
        if self.__dict__.get("_pending"):
            comp = self._comp if self.compact else None  # (a caller may turn compaction off after construction)
            self._first_pass(first_step_threshold(comp.x, self.n_vectors, sparsity, comp.budget) if comp else None)

    def _first_pass(self, gather: float | None = None):
        self._pending = False
        r, data = self.n_vectors, self.x
        comp = self._comp if gather is not None else None
        if comp is not None:
            comp.start(math.nan, gather)
        peak = torch.empty(r, dtype=F64, device=self.device)
        if self.fused is not None:
            self._fused_first(peak)
        for p in self.lay.pieces if self.fused is None else ():  # max |x| without an |x| temporary; NaN propagates
            if self._fast(p):  # one pass: the peak and the caller-unit sums at mu = 0 (u = |x|)
                v = self._views(p)
                a = v[1].copy_(v[0]).abs_()
                torch.amax(a, 1, out=peak[p.v0 : p.v1])
                if self.cpu and float(torch.amin(a)) > 0:  # no zero entry (the usual case): every row's support is
                    v[4].fill_(p.n)  # its length; one reduction instead of sign and a row sum (~2 ms per 1e7)
                    torch.sum(a, 1, out=v[5])
                    torch.linalg.vector_norm(a, dim=1, out=v[6])
                else:
                    self._fast_sums(a, v)
                if comp is not None:
                    comp.piece(a, p, gather)
                continue
            xs = self.lay.rows(data, p)
            peak[p.v0 : p.v1] = torch.maximum(self.lay.reduce(xs, p, "max"), -self.lay.reduce(xs, p, "min"))
        if not bool(torch.isfinite(peak).all()):
            raise ValueError("vectors: got NaN or Inf entries, expected finite values")
        host = self.cpu and not self.weighted  # the per-vector constants in NumPy: the same exact operations
        if host:  # without ~30 small torch ops (~5 us each: a small layer's call is mostly such overhead)
            pk = peak.numpy()
            e = np.where(pk > 0, np.clip(np.frexp(pk)[1], -1022, 1023), 0).astype(np.int64)
            self.e, self.inv, self.sigma = (torch.from_numpy(v) for v in (e, np.ldexp(1.0, -e), np.ldexp(1.0, e)))
        else:
            e = torch.frexp(peak).exponent.long().clamp(-1022, 1023)
            self.e = torch.where(peak > 0, e, 0)
            self.inv = ldexp(torch.ones_like(peak), -self.e)
            self.sigma = ldexp(torch.ones_like(peak), self.e)
        # one pass for everything per vector: the stats at mu = 0, the largest ratio, the weights' norms
        zero = torch.zeros(r, dtype=F64, device=self.device)
        self._argmax_pos = None  # found when first needed (one-hot vectors): one pass fewer in most solves
        if self.weighted:
            self.ratio_max, self.wnorm, self.wmin = torch.empty_like(zero), torch.empty_like(zero), torch.empty_like(zero)
        else:
            self.ratio_max = peak * self.inv  # the largest a, exactly (a power of two)
        for p in self.lay.pieces:
            if self._fast(p):
                continue
            a = self._a(p)
            self._piece_stats(a, p)  # u = (a - 0)_+ = a
            if self.weighted:
                wv = self.lay.rows(self.w, p)
                self.ratio_max[p.v0 : p.v1] = self.lay.reduce(a / wv, p, "max")
                self.wnorm[p.v0 : p.v1] = self.lay.reduce(wv * wv, p, "sum").sqrt()
                self.wmin[p.v0 : p.v1] = self.lay.reduce(wv, p, "min")
        self.stats0 = self._finish()
        if host:
            self._host_constants()
        else:
            self._device_constants()
        if comp is not None:  # (after the NaN check: a pass with NaN entries raises before)
            comp.end()
            comp.build(self._buf)

    def _host_constants(self):
        wnorm = np.sqrt(np.diff(self.offsets).astype(np.float64))
        wmin = np.ones_like(wnorm)
        beta, ratio = 1.0 / (wnorm - wmin), self.ratio_max.numpy()
        cnorm, zero = np.sqrt(self.stats0[:, 2].numpy()), ratio == 0
        self.wnorm, self.wmin, self.beta, self.zero_mask, self.cnorm = (torch.from_numpy(v) for v in (
            wnorm, wmin, beta, zero, cnorm))
        self.shift = torch.from_numpy(-self.e.numpy())
        self._scales()
        self.beta_host, self.wnorm_host, self.wmin_host = beta, wnorm, wmin
        self.ratio_host, self.cnorm_host = ratio, cnorm
        self.inv_host, self.e_host = self.inv.numpy(), self.e.numpy()

    def _device_constants(self):
        if not self.weighted:
            self.wnorm = torch.as_tensor(np.sqrt(np.diff(self.offsets).astype(np.float64)), device=self.device)
            self.wmin = torch.ones_like(self.wnorm)
        self.beta = 1.0 / (self.wnorm - self.wmin)
        self.zero_mask = self.ratio_max == 0
        self.cnorm = (HOST_XP if self.cpu else torch).sqrt(self.stats0[:, 2])
        self.shift = -self.e
        self._scales()
        host = torch.stack([self.beta, self.wnorm, self.wmin, self.ratio_max, self.inv, self.cnorm]).cpu().numpy()
        self.beta_host, self.wnorm_host, self.wmin_host, self.ratio_host, self.inv_host, self.cnorm_host = host
        self.e_host = self.e.cpu().numpy()
