"""Numba kernels of the CPU engine.

Every kernel reads the caller's entries x (float32/float64) and works in per-vector units: entry j of vector i
enters as a = |x_j| * inv_i with inv_i an exact power of two chosen per vector (``_numba.NumbaEngine``), so sums of
squares stay near 1 whatever the vector's scale (1e-300 and 1e+300 in one group, subnormals). Weights are
float64, already normalized per vector by a power of two (``_group``).

Floating-point flags: the evaluation kernels use ``reassoc`` (so LLVM vectorizes the sums) and ``nsz``;
reassociation there only reorders sums of O(1) values. No ``contract`` on a whole kernel: an entry's support
(u = a - t w > 0) must be decided with the same roundings in every kernel that decides it (the write, the host's
tie code), and an FMA would not round t w. The write kernels get no flags at all: there ``(|x| inv - t) S`` must
not be regrouped into products that overflow, and zeros keep their sign. Without ``nnan``/``ninf`` the input
checks keep IEEE semantics.

Each chunk kernel runs serially or on threads (``twin``): threads pay off only on large groups and many cores.

Compiled code never calls a separately compiled function that reassociates. Numba links a compiled callee into its
caller's library as a ``linkonce_odr`` copy, optimized a second time there; a process that compiles the caller binds
its calls to the callee's own library (compiled first), a process that loads the caller from Numba's disk cache runs
the caller's copy. Under ``reassoc`` the two copies sum in different orders, so results depended on the cache state
(groupsparse/nmf/_fastproj.py, 7b4ae2c). Hence the reductions add with :func:`radd` / :func:`rmul`, which carry
the summation flags on those instructions alone: the bodies compile without ``fastmath`` and can be inlined
(``inline="always"``, :func:`inline_copy`) into exact callers (the compiled solvers in ``_small`` and ``_uniform``)
with their flags intact, while every other instruction there keeps IEEE semantics. Separately compiled callees of
compiled code are then exact (no flags), and any copy of them gives the same bits.
"""

from __future__ import annotations

import math
import types

import numba as nb
import numpy as np
from numba.core import types as nbt
from llvmlite import ir
from numba.extending import intrinsic

from ._threads import run_chunks

# No "contract" on whole kernels: it fused u = a - t w into one FMA in the weighted evaluation, whose support then
# disagreed with the write's (a - t w rounded twice) when a entry sat within an ulp of its threshold (ties): a
# vector counted as supported came out all zeros. Reductions keep their flags on their own instructions (radd).
_FM_SUM = {"reassoc", "nsz"}
_FM_WRITE = False  # writes: IEEE, signed zeros included (every output entry carries x's sign bit)


def jit(fn=None, **kw):
    """``numba.njit(cache=True)``, falling back to no on-disk cache when no writable cache folder exists
    (numba raises ``RuntimeError: cannot cache function`` at decoration time then)."""
    if fn is None:
        return lambda f: jit(f, **kw)
    try:
        return nb.njit(cache=True, **kw)(fn)
    except RuntimeError:
        return nb.njit(cache=False, **kw)(fn)


_SUM_FLAGS = ("reassoc", "nsz", "contract")


@intrinsic
def radd(typingctx, a, b):
    """a + b (float64) with the summation flags on this instruction alone (a reduction LLVM may vectorize)."""
    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1], flags=_SUM_FLAGS)
    return nbt.float64(nbt.float64, nbt.float64), codegen


@intrinsic
def rmul(typingctx, a, b):
    """a * b (float64) with the summation flags (so ``radd(s, rmul(u, u))`` may fuse into one fma)."""
    def codegen(context, builder, signature, args):
        return builder.fmul(args[0], args[1], flags=_SUM_FLAGS)
    return nbt.float64(nbt.float64, nbt.float64), codegen


@intrinsic
def _f32_bits(typingctx, u):
    """The float32 whose bit pattern is the uint32 ``u``, widened to float64 (exact)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.FloatType()), ir.DoubleType())
    return nbt.float64(nbt.uint32), codegen


@intrinsic
def _f64_bits(typingctx, u):
    """The float64 whose bit pattern is the uint64 ``u``."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return nbt.float64(nbt.uint64), codegen


@nb.njit(inline="always")
def abs_max(x, o0, o1):
    """max |x[o0:o1]| in float64 (0 for an empty range), exact and without flags: an integer max of the
    sign-cleared bit patterns (nonnegative floats order like them) vectorizes where a float max does not (its NaN
    semantics: 1.4 ns/entry against 0.2). NaN comes out as NaN (its pattern tops inf's)."""
    if x.itemsize == 4:
        xb = x.view(np.uint32)
        m = np.uint32(0)
        for j in range(o0, o1):
            m = max(m, xb[j] & np.uint32(0x7FFFFFFF))
        return _f32_bits(m)
    yb = x.view(np.uint64)
    m64 = np.uint64(0)
    for j in range(o0, o1):
        m64 = max(m64, yb[j] & np.uint64(0x7FFFFFFFFFFFFFFF))
    return _f64_bits(m64)


def inline_copy(fn):
    """A copy of a kernel for compiled callers: no fastmath of its own (its reductions carry theirs, ``radd``),
    inlined into the caller by Numba, so no compiled code calls a separately compiled reassociating function."""
    cp = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_inline")
    cp.__qualname__ = fn.__qualname__ + "_inline"
    return nb.njit(inline="always")(cp)


def twin(fn, fastmath, per_chunk):
    """(serial, threaded) runners of one chunk kernel: the threaded one runs the same compiled (cached, GIL-free)
    kernel on ranges of chunks from Python threads (``_threads``), slicing the arguments at ``per_chunk``. One
    compiled kernel for both, so threads change no bit, and nothing is compiled per process (Numba's
    ``parallel=True`` could not be cached safely: ``_threads``)."""
    serial = jit(fn, fastmath=fastmath, nogil=True)
    return serial, lambda *args: run_chunks(serial, args, per_chunk)


@nb.njit(inline="always")
def plain_sums(xs, inv, t):
    """(support size, sum u, sum u^2) of u = (|xs| inv - t)_+, branch-free so LLVM vectorizes it."""
    m = 0.0
    su = 0.0
    suu = 0.0
    for j in range(xs.shape[0]):
        d = abs(np.float64(xs[j])) * inv - t
        pos = d > 0.0
        u = d if pos else 0.0
        m = radd(m, 1.0 if pos else 0.0)
        su = radd(su, u)
        suu = radd(suu, rmul(u, u))
    return m, su, suu


@nb.njit(inline="always")
def abs_sums(xs):
    """(nonzeros, sum a, sum a^2) of a = |xs|: plain_sums at t = 0, except that NaN shows in the sums."""
    m = 0.0
    sa = 0.0
    saa = 0.0
    for j in range(xs.shape[0]):
        a = abs(np.float64(xs[j]))
        m = radd(m, 1.0 if a > 0.0 else 0.0)
        sa = radd(sa, a)
        saa = radd(saa, rmul(a, a))
    return m, sa, saa


@nb.njit(inline="always", fastmath=_FM_WRITE)
def plain_write(xs, os_, inv, t, sc):
    """os_ = sign(xs) (|xs| inv - t)_+ sc, branch-free so LLVM vectorizes it."""
    for j in range(xs.shape[0]):
        xv = np.float64(xs[j])
        d = abs(xv) * inv - t
        r = d * sc if d > 0.0 else 0.0
        os_[j] = math.copysign(r, xv)  # every entry keeps x's sign bit, -0.0 and zeroed entries included


@nb.njit(inline="always")
def write_onehot(x, out, s0, n, oh):
    """x at oh, zeros elsewhere with x's sign bit (as the thresholded write gives them: a vector left with one entry
    and a vector with none then come out with the same bits)."""
    for j in range(s0, s0 + n):
        out[j] = x[j] if j == oh else math.copysign(0.0, np.float64(x[j]))


# ---- weighted


def _first_pass(x, w, cstart, clen, cinv, out):
    """Per chunk: [sum w^2 on the support, sum w a, sum a^2, max a/w, sum w^2, min w]."""
    for c in range(cstart.shape[0]):
        s0 = cstart[c]
        inv = cinv[c]
        m = 0.0
        swa = 0.0
        saa = 0.0
        best = -1.0
        sww = 0.0
        wmin = math.inf
        for j in range(s0, s0 + clen[c]):
            a = abs(np.float64(x[j])) * inv
            wj = w[j]
            best = max(best, a / wj)
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
        out[c, 4] = sww
        out[c, 5] = wmin


def _evaluate(src, srcw, sstart, slen, cvec, inv, t, compact, tdrop, dst, dstw, dlen, out):
    """Per chunk, at thresholds t[vector]: [sum w^2 on support, sum w u, sum u^2] with u = (a - t w)_+.

    With ``compact``, entries with a > tdrop[vector] w are also copied (as |x|, with their weight) to ``dst`` at
    the same chunk start (``dst`` may be ``src``: the write index never passes the read index).
    """
    for c in range(sstart.shape[0]):
        i = cvec[c]
        ti = t[i]
        td = tdrop[i]
        iv = inv[i]
        s0 = sstart[c]
        m = 0.0
        swu = 0.0
        suu = 0.0
        kept = 0
        for j in range(s0, s0 + slen[c]):
            araw = abs(np.float64(src[j]))
            a = araw * iv
            wj = srcw[j]
            u = a - ti * wj
            if u > 0.0:
                m += wj * wj
                swu += wj * u
                suu += u * u
            if compact and a > td * wj:
                dst[s0 + kept] = araw
                dstw[s0 + kept] = wj
                kept += 1
        if compact:
            dlen[c] = kept
        out[c, 0] = m
        out[c, 1] = swu
        out[c, 2] = suu


def _write(x, w, cstart, clen, cvec, inv, t, scale, onehot, out):
    """out = sign(x) (a - t w)_+ scale per vector; vectors with onehot[i] >= 0 keep only that entry."""
    for c in range(cstart.shape[0]):
        i = cvec[c]
        s0 = cstart[c]
        oh = onehot[i]
        if oh >= 0:
            write_onehot(x, out, s0, clen[c], oh)
            continue
        ti = t[i]
        sc = scale[i]
        iv = inv[i]
        for j in range(s0, s0 + clen[c]):
            xv = np.float64(x[j])
            u = abs(xv) * iv - ti * w[j]
            out[j] = math.copysign(u * sc if u > 0.0 else 0.0, xv)


# ---- unweighted: branch-free bodies that LLVM vectorizes


def _first_pass_plain(x, cstart, clen, cinv, out):
    """[nonzeros, sum a, sum a^2] per chunk (no max: it would block vectorization; sqrt(sum a^2) bounds it)."""
    for c in range(cstart.shape[0]):
        xs = x[cstart[c] : cstart[c] + clen[c]]  # slice + range(len): no negative-index checks, so it vectorizes
        inv = cinv[c]
        m = 0.0
        sa = 0.0
        saa = 0.0
        for j in range(xs.shape[0]):
            a = abs(np.float64(xs[j])) * inv
            m = radd(m, 1.0 if a > 0.0 else 0.0)
            sa = radd(sa, a)
            saa = radd(saa, rmul(a, a))
        out[c, 0] = m
        out[c, 1] = sa
        out[c, 2] = saa


def _evaluate_plain(src, sstart, slen, cvec, inv, t, out):
    """[support size, sum u, sum u^2] per chunk with u = (a - t)_+."""
    for c in range(sstart.shape[0]):
        i = cvec[c]
        m, su, suu = plain_sums(src[sstart[c] : sstart[c] + slen[c]], inv[i], t[i])
        out[c, 0] = m
        out[c, 1] = su
        out[c, 2] = suu


def _evaluate_plain_compact(src, sstart, slen, cvec, inv, t, tdrop, dst, dlen, out):
    """As ``_evaluate_plain``, also compacting entries above tdrop into ``dst`` (a branch-free store of |x|;
    ``dst`` may be ``src``: the write index never passes the read index)."""
    for c in range(sstart.shape[0]):
        i = cvec[c]
        ti = t[i]
        td = tdrop[i]
        iv = inv[i]
        xs = src[sstart[c] : sstart[c] + slen[c]]
        ds = dst[sstart[c] : sstart[c] + slen[c]]
        m = 0.0
        su = 0.0
        suu = 0.0
        kept = 0
        for j in range(xs.shape[0]):
            araw = abs(np.float64(xs[j]))
            a = araw * iv
            d = a - ti
            pos = d > 0.0
            u = d if pos else 0.0
            m += 1.0 if pos else 0.0
            su += u
            suu += u * u
            ds[kept] = araw
            kept += 1 if a > td else 0
        dlen[c] = kept
        out[c, 0] = m
        out[c, 1] = su
        out[c, 2] = suu


def _write_plain(x, cstart, clen, cvec, inv, t, scale, onehot, out):
    """out = sign(x) (a - t)_+ scale; one-hot vectors keep only their largest entry."""
    for c in range(cstart.shape[0]):
        i = cvec[c]
        oh = onehot[i]
        s0 = cstart[c]
        if oh >= 0:
            write_onehot(x, out, s0, clen[c], oh)
            continue
        plain_write(x[s0 : s0 + clen[c]], out[s0 : s0 + clen[c]], inv[i], t[i], scale[i])


FIRST_PASS = twin(_first_pass, _FM_SUM, (2, 3, 4, 5))
EVALUATE = twin(_evaluate, _FM_SUM, (2, 3, 4, 11, 12))
WRITE = twin(_write, _FM_WRITE, (2, 3, 4))
FIRST_PASS_PLAIN = twin(_first_pass_plain, _FM_SUM, (1, 2, 3, 4))
FIRST_PASS_PLAIN_INLINE = inline_copy(_first_pass_plain)  # for compiled callers (``_small``)
EVALUATE_PLAIN = twin(_evaluate_plain, _FM_SUM, (1, 2, 3, 6))
EVALUATE_PLAIN_COMPACT = twin(_evaluate_plain_compact, _FM_SUM, (1, 2, 3, 8, 9))
WRITE_PLAIN = twin(_write_plain, _FM_WRITE, (1, 2, 3))


# ---- per-vector helpers for the few vectors that need them (serial: they run on a handful of vectors)


@jit(nogil=True)
def chunk_abs_max(x, cstart, clen, out):
    """out[c] = max |x| over chunk c (``abs_max``: an integer max, 0.2 ns/entry)."""
    for c in range(cstart.shape[0]):
        out[c] = abs_max(x, cstart[c], cstart[c] + clen[c])


@jit
def vec_max(x, offsets, vids, out):
    """max |x| of each listed vector; NaN if the vector holds a NaN."""
    for q in range(vids.shape[0]):
        i = vids[q]
        best = 0.0
        bad = False
        for j in range(offsets[i], offsets[i + 1]):
            a = abs(np.float64(x[j]))
            bad |= a != a
            best = max(best, a)
        out[q] = math.nan if bad else best


@jit
def argmax_abs(x, offsets, vids, out):
    for q in range(vids.shape[0]):
        i = vids[q]
        best = -1.0
        arg = offsets[i]
        for j in range(offsets[i], offsets[i + 1]):
            a = abs(np.float64(x[j]))
            if a > best:
                best = a
                arg = j
        out[q] = arg


@jit
def argmax_shifted(x, w, offsets, vids, inv, t, zero, out):
    """Weighted one-hot position: argmax_j a_j - t w_j.

    In the limit t -> inf (and for a zero vector) that is the smallest weight, ties going to the largest |x_j|:
    decided exactly here, since a - t w rounds to -t w (or overflows) long before.
    """
    for q in range(vids.shape[0]):
        i = vids[q]
        arg = offsets[i]
        if zero[i] or math.isinf(t[i]):
            bw = math.inf
            ba = -1.0
            for j in range(offsets[i], offsets[i + 1]):
                wj = w[j]
                aj = abs(np.float64(x[j]))
                if wj < bw or (wj == bw and aj > ba):
                    bw = wj
                    ba = aj
                    arg = j
        else:
            best = -math.inf
            for j in range(offsets[i], offsets[i + 1]):
                v = abs(np.float64(x[j])) * inv[i] - t[i] * w[j]
                if v > best:
                    best = v
                    arg = j
        out[q] = arg
