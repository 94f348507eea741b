"""PyTorch engine: the same solver on the tensors' own device, in bounded memory.

Vector i is read as a_i = |c_i| / 2^e_i in float64, recomputed piece by piece from the input (exact: a power
of two; see ``_solver`` for the units), never stored whole: the engine's extra memory is the output plus a few
chunk-sized temporaries (``_torch_layout``; docs/torch-engine.md). Equal-length runs are 2-D views with row
reductions, other vectors ``segment_reduce`` over their lengths: no per-entry segment ids. The host syncs once
per evaluation here (``solve_shared`` reads S); ``_torch_loop`` runs the whole Newton loop without one.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._solver import Evaluation, h_and_slope
from ._torch_first import FirstPass
from ._torch_fused import Fused, enabled, runs
from ._torch_layout import F64, Compacted, Layout, Piece
from ._torch_util import HOST_XP, empty_like, ldexp

COMPACT_MIN = 1 << 15  # entries: below, building the compacted copy costs more than the passes it shortens


class TorchEngine(FirstPass, Fused):
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
        self._buf, self._cache = None, {}
        # float32 rows of one length, unweighted: the caller's units (see ``_fast``)
        self.fast = data.dtype == torch.float32 and not self.weighted and bool(self.lay.kind)
        # fused passes (``_torch_fused``, opt-in): one compiled call per run of equal-length rows
        self.fused = runs(offsets) if self.fast and self.lay.all_uniform and enabled() else None
        self._cs = torch.empty((3, r), dtype=F64, device=self.device)  # a pass's raw sums, written per piece
        # active-set compaction (``confirm_lower``): the host solver on the CPU, one row length. Its sums add in
        # another order than a full pass: set False for the device loop's bits (``_torch_loop`` does)
        self.compact = (self.cpu and self.fast and self.lay.all_uniform and len(self.lay.kind) == 1
                        and data.numel() >= COMPACT_MIN and self.fused is None)
        # (the copy's budget: with the output and a few chunks the call stays under 2x the input)
        self._comp = Compacted(data, self._cs, int(0.6 * data.numel() * data.element_size())) if self.compact else None
        self._none = None
        # a compacting engine waits for ``plan`` (the target): its first pass then also keeps the entries above a
        # threshold estimated from a sample of rows, so the solve's first Newton step already runs compacted
        self._pending = self.compact
        if not self._pending:
            self._first_pass()

    @property
    def argmax_pos(self):
        """Flat position of each vector's first largest ratio a/w (its one-hot position as t -> its top)."""
        if self._argmax_pos is None:
            pos = torch.empty(self.n_vectors, dtype=torch.long, device=self.device)
            for p in self.lay.pieces:
                a = self._a(p)
                pos[p.v0 : p.v1] = self.lay.argmax(a / self.lay.rows(self.w, p) if self.weighted else a, p)
            self._argmax_pos = pos
        return self._argmax_pos

    # ---- per-piece arithmetic (one chunk of float64 temporaries at a time)

    def _views(self, p: Piece):
        """(input rows, scratch 0, scratch 1, 1/2^e column, and the piece's slices of the three raw sums), made once
        per call for every piece: slicing and viewing cost more than a 32K-entry op (``split`` makes a run of them
        in one call). The scratch buffers are reused by every pass, so no pass allocates (a fresh chunk costs page
        faults on every op on the CPU, about 5x the op itself)."""
        v = self._cache.get(p)
        if v is None:
            pieces = self.lay.pieces
            self._buf = torch.empty((2, max(q.e1 - q.e0 for q in pieces)), dtype=F64, device=self.device)
            xs = self.x.split([q.e1 - q.e0 for q in pieces])
            cs = [row.split([q.v1 - q.v0 for q in pieces]) for row in self._cs]
            shape = {}  # pieces of one shape share their scratch views
            for i, q in enumerate(pieces):
                key = (q.v1 - q.v0, q.n, q.e1 - q.e0)
                if key not in shape:
                    z = Piece(0, q.e1 - q.e0, q.v0, q.v1, q.n)
                    shape[key] = (self.lay.rows(self._buf[0], z), self.lay.rows(self._buf[1], z))
                inv = self.lay.col(self.inv, q) if q.n and not self._fast(q) else None  # (ragged: piece-sized)
                x = xs[i].view(q.v1 - q.v0, q.n) if q.n else xs[i]
                self._cache[q] = (x, *shape[key], inv, cs[0][i], cs[1][i], cs[2][i])
            v = self._cache[p]
        return v

    def _fast(self, p: Piece) -> bool:
        """Float32 rows of one length, unweighted: u' = (|x| - T)_+ in the caller's units, T = t 2^e the same for
        every row of that length. u' = u 2^e exactly (no float32 entry, square or sum of them leaves float64's
        normal range; a subnormal t is below half an ulp of every nonzero |x| in both units), so the sums are the
        a-unit sums times powers of two, bit for bit, in four elementwise ops instead of six with two broadcasts."""
        return self.fast and p.n > 0

    @staticmethod
    def _fast_sums(u, v):
        """The raw sums of u' >= 0 into the piece's slices: support size, sum u', ||u'|| (scaled in ``_finish``)."""
        torch.sign(u, out=v[2])  # 1 on the support, else 0 (exact); cheaper than a bool mask (and gt: a bool temporary)
        torch.sum(v[2], 1, out=v[4])
        torch.sum(u, 1, out=v[5])
        torch.linalg.vector_norm(u, dim=1, out=v[6])

    def _finish(self, fast: bool = True):
        """[sum w^2 on the support, sum w u, sum u^2] per vector in a-units from the raw sums of a pass."""
        m, su, q = self._cs[0], self._cs[1], self._cs[2]
        if not (self.fast and fast):
            return torch.stack([m, su, q], 1)
        su_a, suu_a = su * self.inv, (q * self.inv).square()  # powers of two: exact
        if not self.lay.all_uniform:
            su_a, suu_a = torch.where(self.lay.uniform_rows, su_a, su), torch.where(self.lay.uniform_rows, suu_a, q)
        return torch.stack([m, su_a, suu_a], 1)

    def _fast_thresholds(self, t, host: bool):
        """T = t 2^e per row length (``_fast``): Python floats where a host sync is free, else 0-d tensors."""
        tk = t[self.lay.first] * self.sigma[self.lay.first]
        return tk.tolist() if host else [tk[k] for k in range(tk.shape[0])]  # (shape: no tensor __len__)

    def _x64(self, p: Piece, k: int = 0):
        """The piece's entries in float64, in scratch buffer ``k`` (a copy: the caller's data is never written)."""
        v = self._views(p)
        return v[1 + k].copy_(v[0])

    def _a(self, p: Piece, x64=None):
        """a = |x| / 2^e of a piece in float64 (exact), in scratch 0. In-place ops on one float64 dtype: mixed-dtype
        ops take a slow path on the CPU (about 4x)."""
        v = self._views(p)
        a = v[1].copy_(v[0]).abs_() if x64 is None else torch.abs(x64, out=v[1])
        return a.mul_(v[3] if v[3] is not None else self.lay.col(self.inv, p))

    def _u(self, p: Piece, t, x64=None):
        """u = (a - t w)_+ for the piece (``t`` per vector, finite), in scratch 0."""
        tc = self.lay.col(t, p)
        a = self._a(p, x64)
        return (a.sub_(tc * self.lay.rows(self.w, p)) if self.weighted else a.sub_(tc)).clamp_min_(0)

    def _piece_stats(self, u, p: Piece):
        """[sum w^2 on the support, sum w u, sum u^2] of the piece's vectors, into the raw sums."""
        lay = self.lay
        v = self._views(p)
        on = torch.sign(u, out=v[2])  # 1 on the support, else 0 (exact); cheaper than a bool mask
        if self.weighted:
            wv = lay.rows(self.w, p)
            v[4].copy_(lay.reduce(on * wv * wv, p, "sum"))
            v[5].copy_(lay.reduce(wv * u, p, "sum"))
        else:
            v[4].copy_(lay.reduce(on, p, "sum"))
            v[5].copy_(lay.reduce(u, p, "sum"))
        v[6].copy_(torch.linalg.vector_norm(u, dim=1).square() if p.n else lay.reduce(u * u, p, "sum"))

    def _pass(self, t, host: bool, spec=None, shared: bool = True, finish: bool = True, live=None):
        """The raw sums at thresholds ``t`` and their a-unit stats. With ``spec`` (the host solver's mu) and
        compaction on, the survivors are kept too, for ``confirm_lower`` to compact to if mu turns out to be the
        bracket's lower end (the first Newton step almost always is). ``shared``: one mu for the group, so one
        threshold per row length in the caller's units; else (``_batched``: a threshold per vector or per group)
        the a-unit pass, over the pieces holding a vector flagged in ``live`` (host bools; None: all): the others
        keep the raw sums of the pass before, which the caller knows were taken at the same thresholds."""
        keep = None if live is None else (lambda p: bool(live[p.v0 : p.v1].any()))
        if not shared and self.fused is not None:
            if self._fused_sums(rows=t, keep=keep):
                return self._finish()
            keep = None  # (the kernels could not be built: every piece again, the kept sums are in caller units)
        if not shared:
            for p in self.lay.pieces:
                if keep is None or keep(p):
                    self._piece_stats(self._u(p, torch.where(torch.isinf(t), 1e300, t)), p)
            return self._finish(False)
        tk = None
        if self.fast and host and spec is not None:  # T from mu on the host: the same products, no tensor op
            tk = [spec * b * p1 * p2 for b, p1, p2, _ in self._tk_host]
            tk = [(v if math.isfinite(v) else 1e300) * h[3] for v, h in zip(tk, self._tk_host)]
        if tk is None or not self.lay.all_uniform:
            t = torch.where(torch.isinf(t), 1e300, t)
            tk = tk or (self._fast_thresholds(t, host) if self.fast else None)
        comp = self._comp if self.compact and host else None
        if comp is not None and comp.pad is not None and tk[0] >= comp.T:
            comp.sums(tk[0], self._fast_sums)
            return self._finish() if finish else None
        if self.fused is not None and self._fused_sums(tk):
            return self._finish() if finish else None
        if comp is not None and spec is not None:
            comp.start(spec, tk[0])
        kind = self.lay.kind
        for p in self.lay.pieces:
            if self._fast(p):
                v = self._views(p)
                u = v[1].copy_(v[0]).abs_().sub_(tk[kind[p.n]]).clamp_min_(0)
                self._fast_sums(u, v)
                if comp is not None:
                    comp.piece(u, p)  # (keeps the survivors' |x| while the piece is in cache)
            else:
                self._piece_stats(self._u(p, t), p)
        if comp is not None:
            comp.end()
        return self._finish() if finish else None

    def confirm_lower(self, mu: float) -> None:
        if self.compact:  # no later pass goes below mu: compact to its survivors (``Compacted``)
            self._comp.confirm(mu, self._buf)

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
        self._scales()

    def _scales(self):
        """The two powers of two ``ldexp`` multiplies by, for the current shift, once per solve (the same products
        in the same order: the same bits), and ldexp(beta, shift)."""
        if self.cpu:  # the same powers of two (exact either way) and products, in NumPy: small torch ops cost ~5 us
            shift = self.shift.numpy()
            half = shift // 2
            with np.errstate(over="ignore"):  # (inf past 2^1023, as torch's pow gives)
                beta, p1, p2 = self.beta.numpy(), np.ldexp(1.0, half), np.ldexp(1.0, shift - half)
                dT = beta * p1 * p2
            self._p1, self._p2, self._dT = torch.from_numpy(p1), torch.from_numpy(p2), torch.from_numpy(dT)
            self._np = (beta, p1, p2, dT, self.zero_mask.numpy())
            if self.fast:  # per row length: beta, the two powers, 2^e of its first row (``_pass``)
                f = self.lay.first.numpy()
                self._tk_host = np.stack([beta[f], p1[f], p2[f], self.sigma.numpy()[f]], 1).tolist()
            return
        half = torch.div(self.shift, 2, rounding_mode="floor")
        two = torch.full((), 2.0, dtype=F64, device=self.device)
        self._p1, self._p2 = two.pow(half.double()), two.pow((self.shift - half).double())
        self._dT = self.beta * self._p1 * self._p2

    def thresholds(self, mu):
        return mu * self.beta * self._p1 * self._p2

    def copy_input(self):
        return empty_like(self.x).copy_(self.x)

    def _onehot(self, stats, t, sync: bool = True):
        empty = (stats[:, 0] == 0) | self.zero_mask
        if self._none is None:  # (constants: never written into)
            self._none, self._ones = torch.full_like(self.e, -1), torch.ones_like(self.beta)
        none = self._none
        if sync and self.cpu and not bool(empty.any()):  # the common case; a host sync is free here
            return empty, none, self._ones
        if not self.weighted:
            return empty, torch.where(empty, self.argmax_pos, none), self._ones
        # t -> inf (and zero vectors): the smallest weight, ties to the largest |c|, decided exactly; read from the
        # whole input (a compacted copy lacks the entries an empty vector's argmax may be at)
        pos = torch.empty_like(none)
        limit = torch.isinf(t) | self.zero_mask
        tf = torch.where(torch.isinf(t), 0.0, t)
        for p in self.lay.pieces:
            a, wv = self._a(p), self.lay.rows(self.w, p)
            lightest = wv == self.lay.col(self.wmin, p)
            v = torch.where(self.lay.col(limit, p), torch.where(lightest, a, -1.0), a - self.lay.col(tf, p) * wv)
            pos[p.v0 : p.v1] = self.lay.argmax(v, p)
        return empty, torch.where(empty, pos, none), self.w[pos]

    def evaluate_vec(self, t, mu: float | None = None, live=None) -> Evaluation:
        if mu is not None and math.isinf(mu):
            stats = torch.zeros((self.n_vectors, 3), dtype=F64, device=self.device)
        elif mu == 0.0:
            stats = self.stats0  # thresholds 0: the first pass measured it
        else:
            stats = self._pass(t, self.cpu, mu, shared=mu is not None, live=live)
        empty, onehot, hval = self._onehot(stats, t)
        h, dh = h_and_slope(HOST_XP if self.cpu else torch, stats, empty, hval)
        return Evaluation(mu if mu is not None else math.nan, h, dh, (t, stats, onehot))

    def evaluate_device(self, mu):
        """``evaluate_shared`` at a 0-d device tensor ``mu``, without a host sync: (S, dS, sp, state) as device
        tensors. ``_torch_loop`` drives it."""
        t = self.thresholds(mu)
        stats = self._pass(t, False)
        empty, onehot, hval = self._onehot(stats, t, sync=False)
        h, dh = h_and_slope(HOST_XP if self.cpu else torch, stats, empty, hval)
        sp = self.beta * (self.wnorm - h)
        ds = torch.where(dh != 0, -self.beta * dh * self._dT, 0.0)
        return sp.sum(), ds.sum(), sp, (t, stats, onehot)

    def _evaluate_host(self, mu: float) -> Evaluation:
        """``evaluate_shared`` of an unweighted group on the CPU with the per-vector arithmetic in NumPy: about 30
        small torch ops an evaluation cost ~0.1 ms of dispatch, which dominated small layers (ResNet-50: 54 calls,
        ~4.5 evaluations each). The same IEEE operations in the same order as ``evaluate_device``, and S, dS summed
        by torch over the same values, so the device loop still agrees bit for bit."""
        beta, p1, p2, dT, zero = self._np  # (NumPy views of the CPU tensors, made in ``_scales``)
        with np.errstate(over="ignore", invalid="ignore"):  # (as torch: inf and NaN without a warning)
            t = mu * beta * p1 * p2
        if math.isinf(mu):
            stats = np.zeros((self.n_vectors, 3))
        elif mu == 0.0:
            stats = self.stats0.numpy()
        else:
            self._pass(torch.from_numpy(t), True, mu, finish=False)
            m, su, q = self._cs.numpy()
            if self.fast:  # (``_finish``: powers of two, exact)
                su_a, suu_a = su * self.inv_host, np.square(q * self.inv_host)
                if not self.lay.all_uniform:
                    rows = self.lay.uniform_rows.numpy()
                    su_a, suu_a = np.where(rows, su_a, su), np.where(rows, suu_a, q)
                su, q = su_a, suu_a
            stats = np.stack([m, su, q], 1)
        empty = (stats[:, 0] == 0) | zero
        if self._none is None:  # (constants: never written into)
            self._none, self._ones = torch.full_like(self.e, -1), torch.ones_like(self.beta)
        onehot = torch.where(torch.from_numpy(empty), self.argmax_pos, self._none) if empty.any() else self._none
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            h, dh = h_and_slope(np, stats, empty, 1.0)
            sp = beta * (self.wnorm_host - h)
            ds = np.where(dh != 0, -beta * dh * dT, 0.0)
        ev = Evaluation(mu, torch.from_numpy(h), torch.from_numpy(dh), (torch.from_numpy(t), torch.from_numpy(stats),
                                                                        onehot))
        ev.sp = torch.from_numpy(sp)
        ev.S, ev.dS = float(ev.sp.sum()), float(torch.from_numpy(ds).sum())
        return ev

    def evaluate_shared(self, mu: float) -> Evaluation:
        if self.cpu and not self.weighted:
            return self._evaluate_host(mu)
        ev = self.evaluate_vec(self.thresholds(mu), mu)
        ev.sp = self.beta * (self.wnorm - ev.h)
        ds = torch.where(ev.dh != 0, -self.beta * ev.dh * self._dT, 0.0)
        ev.S, ev.dS = torch.stack([ev.sp.sum(), ds.sum()]).tolist()
        return ev

    def _write(self, t, scale, onehot):
        out = empty_like(self.x)
        t = torch.where(torch.isinf(t), 1e300, t)
        oh = onehot >= 0
        any_oh = not self.cpu or bool(oh.any())  # (a host sync is free on the CPU; once per solve)
        tk = self._fast_thresholds(t, self.cpu) if self.fast else None
        if self.fast:  # one threshold per row length (not so where a jump mixes the bracket's ends): one sync
            tv = t * self.sigma
            same = tv == tv[self.lay.first][self.lay.kind_rows]
            # and T >= 0: the clamp form needs -T <= T (``project_each`` makes vectors denser with t < 0)
            fast = bool(((same | ~self.lay.uniform_rows).all() & (tv >= 0).all()))
            neg = -scale
        # (fused: a one-hot row's scale 0 gives zeros signed as x, as the masked fill below)
        fused = (self.fast and fast and self.fused is not None
                 and self._fused_write(out, tk, torch.where(oh, 0.0, scale) if any_oh else scale))
        for p in () if fused else self.lay.pieces:
            if self.fast and fast and p.n:
                # z = (clamp(x, -T, T) - x)(-scale) = copysign(u' scale, x) for |x| > T and -0 elsewhere; adding
                # 0 x then gives every zero the sign of x (copysign itself costs three of these ops)
                x, z, x64 = self._views(p)[:3]
                x64.copy_(x)
                T = tk[self.lay.kind[p.n]]
                z = torch.clamp(x64, -T, T, out=z).sub_(x64).mul_(self.lay.col(neg, p))
                if any_oh:  # (-0 + 0 x: the sign of x, as every other zero gets it below)
                    z.masked_fill_(self.lay.col(oh, p), -0.0)
                z.add_(x64, alpha=0)
            else:
                x64 = self._x64(p, 1)
                z = self._u(p, t, x64)
                # (u scale) then the power of two, in place: never one product that overflows where the result does not
                z.mul_(self.lay.col(scale, p)).mul_(self.lay.col(self.sigma, p))
                if any_oh:
                    z.masked_fill_(self.lay.col(oh, p), 0.0)
                z.copysign_(x64)
            self.lay.rows(out, p).copy_(z)
        if any_oh:
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
