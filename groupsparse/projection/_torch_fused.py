"""The torch engine's passes as fused kernels from ``torch.compile``: opt-in, ``GROUPSPARSE_TORCH_COMPILE=1``.

Eager torch runs one pass of the fast path (``TorchEngine._fast``) as about seven elementwise ops and reductions
over cache-sized chunks, and the write as six: each op streams the chunk again, so on the CPU the engine stays
3.5-4.7x the numba engine however the ops are arranged (docs/torch-engine.md). Inductor fuses each pass into one
loop over the caller's float32 rows (C++ with OpenMP on the CPU, Triton on a GPU) with float64 arithmetic inside
and no temporaries. Opt-in because compiling costs seconds once per process (9-22 s cold, ~5 s with Inductor's
disk cache on the 2-core machine): worth it for a caller that projects repeatedly (a training loop, NMF), not for
one call.

Same values as the eager pass, not the same bits: u = (|x| - T)_+ and the written entries are the same IEEE
operations (the write is bit for bit, zeros' signs included), but Inductor adds a row's sums in its own order.
Within one solve every pass goes through the same kernels, so the host solver and the device loop still agree.
Only groups whose every run of one length has at least two rows of at least two entries take it: Inductor
specializes sizes 0 and 1, so such shapes would compile again (they are small: eager is as fast)."""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import torch

from ._torch_layout import F64, Piece

ENV = "GROUPSPARSE_TORCH_COMPILE"
FUSED_MIN = 1 << 15  # entries: below, a call is fixed cost and dynamo's ~55 us a kernel call loses to eager ops


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0") and not _FAILED


def runs(offsets: np.ndarray) -> list[Piece] | None:
    """The group's maximal runs of equal-length vectors, or None where one is under 2 x 2 (see the module) or
    the group under ``FUSED_MIN`` entries."""
    if offsets[-1] < FUSED_MIN:
        return None
    lengths = np.diff(offsets)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(lengths)) + 1, [len(lengths)]]).astype(np.int64)
    out = []
    for v0, v1 in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        n = int(lengths[v0])
        if v1 - v0 < 2 or n < 2:
            return None
        out.append(Piece(int(offsets[v0]), int(offsets[v1]), v0, v1, n))
    return out


def _first(x):
    a = x.abs().to(F64)
    return a.amax(1), (a > 0).to(F64).sum(1), a.sum(1), (a * a).sum(1).sqrt()


def _sums(x, T):
    u = (x.to(F64).abs() - T[:, None]).clamp_min(0)  # (T per row: one value broadcast for a shared mu)
    return (u > 0).to(F64).sum(1), u.sum(1), (u * u).sum(1).sqrt()


def _write(x, T, scale, out):
    x64 = x.to(F64)  # copysign: x's sign on every entry, zeros included (a fused op costs nothing extra here)
    out.copy_(torch.copysign((x64.abs() - T).clamp_min(0) * scale[:, None], x64))


@functools.cache
def _compiled(name):
    return torch.compile({"first": _first, "sums": _sums, "write": _write}[name], dynamic=True)


_FAILED: list[str] = []  # the first failure to compile or run a kernel: from then on every engine stays eager


def _call(name, *args) -> bool:
    """Run kernel ``name``; False (and one warning per process) where ``torch.compile`` fails, e.g. without a
    C++ compiler: the caller then takes the eager passes, which give the same result."""
    try:
        out = _compiled(name)(*args)
    except Exception as e:  # (Inductor's errors have no common base class)
        if not _FAILED:
            warnings.warn(f"{ENV}=1: torch.compile failed ({type(e).__name__}: {str(e)[:300]}); the torch engine "
                          "runs its eager passes (same results, slower)", RuntimeWarning, stacklevel=2)
        _FAILED.append(type(e).__name__)
        return False
    return out if out is not None else True


def _scalar(T, like):
    return T if isinstance(T, torch.Tensor) else torch.tensor(T, dtype=F64, device=like.device)


class Fused:
    """Mixin of ``TorchEngine``: the fast path's three passes through the compiled kernels, one call per run of
    equal-length rows (``self.fused``: those runs, or None for the eager passes)."""

    def _rows(self, flat, p: Piece):
        return flat[p.e0 : p.e1].view(p.v1 - p.v0, p.n)

    # Each returns False where a kernel failed (``_call``): the engine then drops ``fused`` and runs the eager pass.

    def _fused_first(self, peak) -> bool:
        for p in self.fused:
            res = _call("first", self._rows(self.x, p))
            if res is False:
                self.fused = None
                return False
            for dst, val in zip((peak, *self._cs), res):
                dst[p.v0 : p.v1] = val
        return True

    def _fused_sums(self, tk=None, rows=None) -> bool:
        """The raw sums at one threshold per row length (``tk``, caller units) or one per row (``rows``: a-unit
        thresholds t, taken to caller units as t 2^e, exact as in ``_fast``; t = inf leaves no entry)."""
        if rows is not None:
            rows = torch.where(torch.isinf(rows), 1e300, rows) * self.sigma
        for p in self.fused:
            T = _scalar(tk[self.lay.kind[p.n]], self.x).expand(p.v1 - p.v0) if rows is None else rows[p.v0 : p.v1]
            res = _call("sums", self._rows(self.x, p), T)
            if res is False:
                self.fused = None
                return False
            for dst, val in zip(self._cs, res):
                dst[p.v0 : p.v1] = val
        return True

    def _fused_write(self, out, tk, scale) -> bool:
        for p in self.fused:
            if not _call("write", self._rows(self.x, p), _scalar(tk[self.lay.kind[p.n]], self.x),
                         scale[p.v0 : p.v1], self._rows(out, p)):
                self.fused = None
                return False
        return True
