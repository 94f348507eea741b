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

One graph per kernel whatever the caller does: every call sees plain tensors (aliases of the same memory with no
view base, so no guard on how the caller's tensor was made), no grad mode, no inference mode and no torch-function
mode traced (``_plain``), a threshold per row (contiguous, a shared one filled in), and never as many rows as
entries a row (``runs``). Dynamo specializes sizes 0 and 1, so a call never has fewer than 2 rows of 2 entries,
and where the caller's dynamo would not compile (``TORCHDYNAMO_DISABLE``) the engine keeps its eager passes. A
call covers at most ``CALL_MAX`` entries: should dynamo still run a kernel uncompiled (its recompile limit), its
float64 temporaries stay bounded.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings

import numpy as np
import torch

from ._torch_layout import F64, Piece, length_runs

ENV = "GROUPSPARSE_TORCH_COMPILE"
# entries of every run of one length (and row length): below, a call is mostly fixed cost, and dynamo's 55-100 us
# a kernel call lost to the eager ops (ResNet-50 layer shapes: even at 32K entries; rows of 2 lost at 131K)
FUSED_MIN = 1 << 16
MIN_LENGTH = 4
CALL_MAX = 1 << 22  # entries of one kernel call


def enabled() -> bool:
    # (TORCHDYNAMO_DISABLE=1: torch.compile hands back the plain function, whose whole-run temporaries are slow)
    return os.environ.get(ENV, "") not in ("", "0") and not _FAILED and os.environ.get("TORCHDYNAMO_DISABLE") != "1"


def runs(offsets: np.ndarray) -> list[Piece] | None:
    """The kernel calls of a group: each maximal run of equal-length vectors cut into pieces of at most
    ``CALL_MAX`` entries and at least 2 rows; None where a run is under ``FUSED_MIN`` entries or its rows under
    ``MIN_LENGTH`` (see the module)."""
    lengths = np.diff(offsets)
    bounds = length_runs(lengths)
    out = []
    for v0, v1 in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        n = int(lengths[v0])
        if n < MIN_LENGTH or (v1 - v0) * n < FUSED_MIN:
            return None
        step = max(2, CALL_MAX // n)
        cuts = list(range(v0, v1, step)) + [v1]
        if cuts[-1] - cuts[-2] < 2:  # (a last piece of one row joins the one before)
            del cuts[-2]
        for a, b in zip(cuts[:-1], cuts[1:]):
            # never as many rows as entries a row: dynamo's duck sizing would tie the two sizes in the graph it
            # compiles first, and every other shape would compile again (halves of n >= 4 rows: >= 2 rows each)
            for c, d in ((a, a + n // 2), (a + n // 2, b)) if b - a == n else ((a, b),):
                out.append(Piece(int(offsets[c]), int(offsets[d]), c, d, n))
    return out


def _first(x):
    a = x.abs().to(F64)
    return a.amax(1), (a > 0).to(F64).sum(1), a.sum(1), (a * a).sum(1).sqrt()


def _sums(x, T):
    u = (x.to(F64).abs() - T[:, None]).clamp_min(0)
    return (u > 0).to(F64).sum(1), u.sum(1), (u * u).sum(1).sqrt()


def _write(x, T, scale, out):
    x64 = x.to(F64)  # copysign: x's sign on every entry, zeros included (a fused op costs nothing extra here)
    out.copy_(torch.copysign((x64.abs() - T[:, None]).clamp_min(0) * scale[:, None], x64))


@functools.cache
def _compiled(name):
    return torch.compile({"first": _first, "sums": _sums, "write": _write}[name], dynamic=True)


_FAILED: list[str] = []  # the first failure to compile a kernel: from then on every engine stays eager


def _plain(t):
    """An alias of ``t``'s memory with no view base, autograd or inference flag (made outside inference mode)."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.size(),
                                                                t.stride())


def _compile_error(e: BaseException) -> bool:
    return any(c.__module__.startswith(("torch._dynamo", "torch._inductor")) for c in type(e).__mro__)


def _user_stacklevel() -> int:
    """The warning's stack level of the first frame outside this package (the caller's line)."""
    root, f, level = os.path.dirname(os.path.dirname(__file__)), sys._getframe(1), 1
    while f is not None and f.f_code.co_filename.startswith(root):
        f, level = f.f_back, level + 1
    return level


def _call(name, *args):
    """Run kernel ``name`` on ``args``; False (one warning per process) where ``torch.compile`` cannot build it,
    e.g. without a C++ compiler: the engine then takes its eager passes, which give the same result. Any other
    error propagates."""
    try:
        with torch.inference_mode(False), torch.no_grad(), torch._C.DisableTorchFunction():
            out = _compiled(name)(*[_plain(a) for a in args])
    except Exception as e:
        if not _compile_error(e):
            raise
        if not _FAILED:
            warnings.warn(f"{ENV}=1: torch.compile failed ({type(e).__name__}: {str(e)[:300]}); the torch engine "
                          "runs its eager passes (same results, slower)", RuntimeWarning, stacklevel=_user_stacklevel())
        _FAILED.append(type(e).__name__)
        return False
    return out if out is not None else True


class Fused:
    """Mixin of ``TorchEngine``: the fast path's three passes through the compiled kernels, one call per piece of
    ``self.fused`` (``runs``), or None for the eager passes. Each returns False where a kernel could not be built
    (``_call``): the engine then drops ``fused`` and runs the eager pass."""

    def _thresholds(self, tk):
        """One threshold per row from one per row length (``tk``: floats or 0-d tensors, no host sync)."""
        T = self.__dict__.get("_T")
        if T is None:
            T = self._T = torch.empty(self.n_vectors, dtype=F64, device=self.device)
        for p in self.fused:
            T[p.v0 : p.v1].fill_(tk[self.lay.kind[p.n]])
        return T

    def _run(self, name, outs, per_row=(), per_entry=(), keep=None):
        """Kernel ``name`` on every piece (``keep``: those it accepts): the rows of ``self.x`` and of the
        ``per_entry`` tensors, the piece's slices of the ``per_row`` ones; its results into the piece's slices of
        ``outs``."""
        for p in self.fused:
            if keep is not None and not keep(p):
                continue
            rows = self.lay.rows
            args = [rows(self.x, p), *(v[p.v0 : p.v1] for v in per_row), *(rows(v, p) for v in per_entry)]
            res = _call(name, *args)
            if res is False:
                self.fused = None
                return False
            for k in range(len(outs)):  # (indexing, not iteration: no tensor __len__ in the device loop)
                outs[k][p.v0 : p.v1] = res[k]
        return True

    def _fused_first(self, peak) -> bool:
        return self._run("first", (peak, self._cs[0], self._cs[1], self._cs[2]))

    def _fused_sums(self, tk=None, rows=None, keep=None) -> bool:
        """The raw sums at one threshold per row length (``tk``, caller units) or one per row (``rows``: a-unit
        thresholds t, taken to caller units as t 2^e, exact as in ``_fast``; t = inf leaves no entry), on the
        pieces ``keep`` accepts (None: all)."""
        if rows is not None:
            T = torch.where(torch.isinf(rows), 1e300, rows) * self.sigma
        else:
            T = self._thresholds(tk)
        return self._run("sums", (self._cs[0], self._cs[1], self._cs[2]), (T,), keep=keep)

    def _fused_write(self, out, tk, scale) -> bool:
        return self._run("write", (), (self._thresholds(tk), scale), (out,))
