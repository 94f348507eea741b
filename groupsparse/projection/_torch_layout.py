"""How the torch engine walks a flat group: pieces of consecutive vectors, each at most a chunk of entries.

A piece is either *uniform* (rows of one length: a 2-D view, row reductions) or *ragged* (vectors of different
lengths: ``torch.segment_reduce`` over their lengths). Neither needs per-entry segment ids, and every full-size
temporary of the engine is one piece at a time, so the engine's extra memory is the output plus a few chunks
(docs/torch-engine.md). On the CPU a chunk stays in cache between the engine's successive elementwise ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

F64 = torch.float64
CPU_CHUNK = 32000  # entries: under torch's grain size (32768), so no op pays a thread barrier; ~8 ops reuse it from L2
DEVICE_CHUNK = 1 << 22  # on accelerators a piece is mostly a launch: large, yet a bounded share of the input
UNIFORM_MIN_ROWS = 8  # shorter runs of one length join ragged pieces (one Python step per piece, not per run)


@dataclass(frozen=True)
class Piece:
    e0: int  # first entry
    e1: int  # one past the last entry
    v0: int  # first vector
    v1: int  # one past the last vector
    n: int  # row length of a uniform piece; 0 for ragged


def _ragged(offsets: np.ndarray, v0: int, v1: int, chunk: int, out: list) -> None:
    """Vectors v0..v1 of mixed lengths as pieces of about ``chunk`` entries (vectorized: r can be 1e6)."""
    cut = (offsets[v0 + 1 : v1 + 1] - offsets[v0]) // chunk  # the chunk each vector's end falls in
    stops = np.flatnonzero(np.diff(cut)) + v0 + 1
    bounds = [v0, *stops.tolist(), v1] if len(stops) == 0 or stops[-1] != v1 else [v0, *stops.tolist()]
    for a, b in zip(bounds[:-1], bounds[1:]):
        out.append(Piece(int(offsets[a]), int(offsets[b]), int(a), int(b), 0))


def length_runs(lengths: np.ndarray) -> np.ndarray:
    """Bounds of the maximal runs of equal lengths: run k is vectors bounds[k] .. bounds[k + 1] - 1."""
    return np.concatenate([[0], np.flatnonzero(np.diff(lengths)) + 1, [len(lengths)]]).astype(np.int64)


def _pieces(lengths: np.ndarray, chunk: int) -> list[Piece]:
    out: list[Piece] = []
    r = len(lengths)
    offsets = np.zeros(r + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    bounds = length_runs(lengths)
    big = (np.diff(bounds) >= UNIFORM_MIN_ROWS) | (np.diff(offsets[bounds]) >= chunk)
    big &= lengths[bounds[:-1]] > 0
    rag = 0  # first vector not yet in a piece
    for k in np.flatnonzero(big):
        b0, b1, n = int(bounds[k]), int(bounds[k + 1]), int(lengths[bounds[k]])
        if b0 > rag:
            _ragged(offsets, rag, b0, chunk, out)
        step = max(1, chunk // n)
        for v in range(b0, b1, step):
            w = min(v + step, b1)
            out.append(Piece(int(offsets[v]), int(offsets[w]), v, w, n))
        rag = b1
    if r > rag:
        _ragged(offsets, rag, r, chunk, out)
    return out


class Layout:
    """Pieces of a group and the per-piece operations the engine needs (views, broadcasts, reductions)."""

    def __init__(self, offsets: np.ndarray, device, n_entries: int):
        lengths = np.diff(offsets)
        chunk = CPU_CHUNK if device.type == "cpu" else max(DEVICE_CHUNK, n_entries // 8)
        self.pieces = _pieces(lengths, chunk)
        self.lens = torch.as_tensor(lengths, device=device)
        # uniform pieces by row length: vectors of one length share a threshold in the caller's units
        ns = sorted({p.n for p in self.pieces if p.n})
        self.kind = {n: k for k, n in enumerate(ns)}
        self.first = torch.as_tensor([next(p.v0 for p in self.pieces if p.n == n) for n in ns], dtype=torch.long,
                                     device=device)
        rows = np.zeros(len(lengths), dtype=bool)
        kinds = np.zeros(len(lengths), dtype=np.int64)
        for p in self.pieces:
            rows[p.v0 : p.v1] = p.n > 0
            kinds[p.v0 : p.v1] = self.kind.get(p.n, 0)
        self.uniform_rows = torch.as_tensor(rows, device=device)
        self.kind_rows = torch.as_tensor(kinds, device=device)
        self.all_uniform = bool(rows.all())

    @staticmethod
    def rows(flat, p: Piece):
        seg = flat[p.e0 : p.e1]
        return seg.view(p.v1 - p.v0, p.n) if p.n else seg

    def col(self, per_vector, p: Piece):
        """Per-vector values lined up with the piece's entries (a broadcastable view for uniform pieces)."""
        return self.local(per_vector[p.v0 : p.v1], p)

    def local(self, v, p: Piece):
        """Values of the piece's own vectors (length v1 - v0) lined up with its entries."""
        if p.n:
            return v[:, None]
        return v.repeat_interleave(self.lens[p.v0 : p.v1], output_size=p.e1 - p.e0)

    def reduce(self, values, p: Piece, how: str):
        """Per-vector sum / amax / amin over a piece's entries (floating values)."""
        if p.n:
            return values.sum(1) if how == "sum" else (values.amax(1) if how == "max" else values.amin(1))
        # unsafe: the lengths are ours and sum to the piece (the check would cost a device-to-host sync)
        return torch.segment_reduce(values, how, lengths=self.lens[p.v0 : p.v1], unsafe=True)

    def argmax(self, values, p: Piece):
        """Flat position of the first maximum of each vector in the piece (float64 ``values``)."""
        if p.n:  # torch.argmax returns the first maximal index
            return values.argmax(1) + torch.arange(p.v1 - p.v0, device=values.device) * p.n + p.e0
        mx = self.reduce(values, p, "max")
        pos = torch.arange(p.e0, p.e1, device=values.device, dtype=F64)  # exact below 2^53 entries
        cand = torch.where(values == self.local(mx, p), pos, float(p.e1))
        return self.reduce(cand, p, "min").long()

    def count(self, mask, p: Piece):
        if p.n:
            return mask.sum(1).to(F64)
        return self.reduce(mask.to(F64), p, "sum")


class Compacted:
    """Active-set compaction of a one-length group on the CPU (caller's units). A pass keeps the entries with
    |x| > T (``piece``: while each piece is in cache); once no later pass goes below T, the kept entries,
    left-aligned per row in an (r, W) float64 matrix padded with zeros ((0 - T')_+ = 0 adds nothing to any sum),
    replace the input for the sums of every pass at T' >= T. Two passes keep: the first pass, at a threshold
    estimated from a sample of rows (``first_step_threshold``), valid from the start; else the host solver's
    pass at a mu that ``confirm`` names as the bracket's lower end. Gathered with NumPy: torch has no fast stream
    compaction on the CPU (masked_select, nonzero: ~5 ns an entry; NumPy's flatnonzero of a bool mask ~1). The
    sums add in another order than a full pass (the device loop never compacts)."""

    def __init__(self, x: torch.Tensor, cs: torch.Tensor, budget: int):
        self.x = x.detach().numpy().reshape(-1)
        self.cs, self.budget = cs, budget  # the engine's raw sums (3, r); bytes the compacted copy may take
        self.kept = self.pad = self.keep = None

    def start(self, mu: float, T: float):
        """A full pass at mu (threshold T) begins: keep its survivors. A compacted copy that no longer serves
        (the pass goes below its threshold) is dropped first: its memory is the new copy's budget."""
        self.pad = self.views = None
        self.mu, self.T, self.n = mu, T, 0
        self.keep, self.counts = [], []

    def piece(self, u: torch.Tensor, p: Piece, above: float = 0.0):
        """The entries of the piece with u > above (u: |x| - T clamped at 0, or |x| with above = T)."""
        if self.keep is None:
            return
        idx = np.flatnonzero(np.greater(u.numpy().reshape(-1), above))  # a bool mask: the fast nonzero
        self.n += len(idx)
        if self.n > self.budget // 9:  # (8 bytes a value and 1 of mask; the padding is checked later)
            self.keep = None  # too many survivors at this mu
            return
        self.keep.append(np.abs(self.x[p.e0 : p.e1].take(idx)))  # (float32: exact)
        self.counts.append(np.diff(np.searchsorted(idx, np.arange(0, p.e1 - p.e0 + 1, p.n))))

    def end(self):
        if self.keep is not None:
            self.kept = (self.mu, self.T, self.keep, np.concatenate(self.counts))
        self.keep = self.counts = None

    def confirm(self, mu: float, buf: torch.Tensor) -> None:
        """mu is the bracket's lower end: compact to what its pass kept, if that was the last pass and fits."""
        if self.kept is not None and self.kept[0] == mu and self.pad is None:
            self.build(buf)
        self.kept = None

    def build(self, buf: torch.Tensor) -> None:
        kept, self.kept = self.kept, None
        if kept is None:
            return
        _, T, keep, counts = kept
        r, W = len(counts), max(int(counts.max()), 1)
        if 9 * W * r > self.budget:  # padded to the longest row: too much
            return
        vals = np.concatenate(keep)
        del keep, kept
        mask = np.arange(W) < counts[:, None]
        pad = np.zeros((r, W))
        pad[mask] = vals  # (float32 |x| to float64: exact)
        self.pad, self.T, self.W = torch.from_numpy(pad), T, W
        step = max(1, buf.shape[1] // W)  # rows a chunk, in the engine's scratch (at least one row)
        self.views = [(self.pad[a:b], buf[0, : (b - a) * W].view(b - a, W), buf[1, : (b - a) * W].view(b - a, W),
                       *self.cs[:, a:b].unbind()) for a in range(0, r, step) for b in [min(a + step, r)]]

    def sums(self, T: float, fast_sums):
        """A pass on the compacted entries (T >= the compaction's): the raw sums, as ``fast_sums`` writes them."""
        for rows, u, on, m, su, q in self.views:
            fast_sums(torch.sub(rows, T, out=u).clamp_min_(0), (None, None, on, None, m, su, q))


SAMPLE = 1 << 15  # entries of the rows ``first_step_threshold`` reads
BELOW = 0.97  # how far below the sample's first Newton step the first pass keeps: the sample's estimate of the
# group's step was within 2 % on normal rows (1e7 entries, ResNet-50 shapes, uniform entries) at s = 0.5-0.95


def first_step_threshold(x: np.ndarray, r: int, sparsity: float, budget: int) -> float | None:
    """Where the solve's first step from mu = 0 should land, in the caller's units (one row length, unweighted),
    estimated on evenly spaced rows, times ``BELOW``; None where the kept entries would not fit ``budget`` or the
    group looks sparse already. Only speed depends on it: a pass below the threshold runs in full (and keeps anew).
    The step is Newton's on S(0) and S'(0), or the secant of [0, top] where Newton's leaves it (S convex at
    first, uniformly distributed entries), as ``_solver.solve_shared`` takes them."""
    if len(x) < 8 * SAMPLE:  # (a smaller group: the sample would cost about what keeping later costs)
        return None
    n = len(x) // r
    m = min(r, max(8, SAMPLE // n))
    with np.errstate(all="ignore"):
        a = np.abs(x.reshape(r, n)[(np.arange(m) * r) // m]).astype(np.float64)
        sq = math.sqrt(n)
        beta = 1.0 / (sq - 1.0)
        q = np.einsum("ij,ij->i", a, a)
        ok = q > 0
        nu = np.sqrt(np.where(ok, q, 1.0))
        h = a.sum(1) / nu
        S0 = float(np.where(ok, beta * (sq - h), 1.0).mean())
        dS0 = float(np.where(ok, beta * (np.count_nonzero(a, 1) - h * h) / nu, 0.0).mean())
        top = float(a.max())
        T = (sparsity - S0) / dS0 if dS0 > 0 else math.inf
        if not 0 < T < top:
            T = (sparsity - S0) / (1.0 - S0) * top
    if not (math.isfinite(T) and 0 < T < top) or S0 >= sparsity:
        return None
    T *= BELOW
    if np.count_nonzero(a > T) * 9 * r / m > 0.8 * budget:
        return None
    return T
