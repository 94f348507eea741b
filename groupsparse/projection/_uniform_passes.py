"""The passes of the equal-length path (``_uniform``): per-part sums of r vectors of n entries, x[i n : (i + 1) n].

Each pass recomputes what it needs per vector from the entries it reads (no per-vector arrays outside a pass), in
the caller's units (threshold T = mu beta 2^E), buffering _Q vectors' sums so the sqrt/divide tail vectorizes.
Short vectors (n <= 32) take the vector code of ``_shortvec``. Every pass is compiled twice from one body: inlined
into the compiled solve (``inline_copy``) and on its own, run on ranges of parts by Python threads (``_threads``).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from ._kernels import abs_sums, inline_copy, jit, plain_sums, radd
from ._shortvec import SHORT_MAX, abs_sums8, both8, sums8, write8
from ._threads import run_parts

# Vectors per partial sum, the unit of threads: 4096 up to length 16, then about 2^16 entries (at least one vector),
# so long vectors still give threads work. A function of the length alone: the result's bits ignore thread counts
# and the threading thresholds (every equal-length group takes this path, threaded or not).
UNIFORM_PART = 4096
_PART_ENTRIES = 1 << 16


@nb.njit(inline="always")
def part_size(n):
    return UNIFORM_PART if n * UNIFORM_PART <= _PART_ENTRIES else max(1, _PART_ENTRIES // n)
_NO_LOW = 0x7FF0000000000000  # the bit pattern of +inf
_Q = 256  # per-vector sums buffered this many vectors at a time, so the sqrt/divide tail vectorizes across them


@nb.njit(inline="always")
def _tail(k, beta, wn, M, SU, SUU):
    """(sum of sparsities, sum of dh/dT) over k buffered vectors; a vector with no support counts as one-hot."""
    s1 = 0.0
    s2 = 0.0
    for q in range(k):
        suu = SUU[q]
        ok = suu > 0.0
        inv = 1.0 / math.sqrt(suu if ok else 1.0)  # one division, not two: the tail runs once per vector per pass
        h = SU[q] * inv
        s1 = radd(s1, beta * (wn - h) if ok else 1.0)
        s2 = radd(s2, (-M[q] + h * h) * inv if ok else 0.0)  # = -m/||u|| + <1,u>^2/||u||^3 without cubing tiny norms
    return s1, s2


@nb.njit(inline="always")  # exact arithmetic: no fastmath (the pass's reductions carry their own flags)
def _write_block(x, out, v0, k, n, T, SU, SUU, SC, ones):
    """Vectors v0 .. v0 + k - 1 projected at T from their buffered sums; a vector with no support goes one-hot on
    its first largest |x| (as the general engine writes it). The main loop is branch-free and never looks for a
    maximum (a data-dependent branch mispredicts on short vectors, where 4-15 % of vectors have no support at
    s = 0.8-0.9, and an argmax does not vectorize): those vectors are listed in ``ones`` and rewritten after."""
    for q in range(k):  # apart from the writes, so the divisions vectorize
        su, suu = SU[q], SUU[q]
        SC[q] = (suu + T * su) / suu if suu > 0.0 else 0.0  # alpha / ||u||, alpha = <x, |c|> = (u.u + T sum u) / ||u||
    c = 0
    k8 = k - k % 8 if n <= SHORT_MAX else 0
    for q in range(0, k8, 8):  # the same operations as the loop below, as vector code (_shortvec)
        write8(x, out, (v0 + q) * n, n, T, SC, q)
    for q in range(k):
        ones[c] = q
        c += 0 if SUU[q] > 0.0 else 1
    for q in range(k8, k):  # (short vectors: only the group's last r % 8, blocks holding 256 vectors)
        o0 = (v0 + q) * n
        sc = SC[q]
        xs = x[o0 : o0 + n]
        os_ = out[o0 : o0 + n]
        for j in range(n):
            xv = np.float64(xs[j])
            d = abs(xv) - T
            r = d * sc if d > 0.0 else 0.0
            os_[j] = math.copysign(r, xv)
    for i in range(c):
        o0 = (v0 + ones[i]) * n
        xs = x[o0 : o0 + n]
        os_ = out[o0 : o0 + n]
        amax = -1.0
        arg = 0
        for j in range(n):
            a = abs(np.float64(xs[j]))
            if a > amax:
                amax = a
                arg = j
        for j in range(n):
            os_[j] = xs[j] if j == arg else math.copysign(0.0, np.float64(xs[j]))  # (_kernels.write_onehot)


@nb.njit(inline="always")
def _short_sums(x, b, k, n, T, M, SU, SUU):
    """The sums of vectors b .. b + k8 - 1 (k8: k rounded down to eights) when they are short (``_shortvec``; T < 0:
    those of |x|, as ``abs_sums``); returns k8 (0 for long vectors), the first vector left to the loops. Which
    vectors go eight at a time depends on n and the part layout alone, not on threads."""
    if n > SHORT_MAX:
        return 0
    k8 = k - k % 8
    for q in range(0, k8, 8):
        if T < 0.0:
            abs_sums8(x, (b + q) * n, n, M, SU, SUU, q)
        else:
            sums8(x, (b + q) * n, n, T, M, SU, SUU, q)
    return k8


@nb.njit(inline="always")
def _short_both(x, b, k, n, T, M, SU, SUU, M2, SU2, SUU2):
    """``_short_sums`` of |x| into M, SU, SUU and at T (> 0) into M2, SU2, SUU2, sharing the loads; returns k8."""
    if n > SHORT_MAX:
        return 0
    k8 = k - k % 8
    for q in range(0, k8, 8):
        both8(x, (b + q) * n, n, T, M, SU, SUU, M2, SU2, SUU2, q)
    return k8


def _uniform_pass(x, n, P, T, beta, wn, stride, write, out, part, p0):
    """One pass at threshold T over the parts (P vectors each) p0, p0 + stride, p0 + 2 stride, ...: part[p] =
    [sum sp, sum dh/dT, vectors] of part p0 + p.
    With ``write`` the projection at T is also written to ``out`` (the solver's speculative last pass)."""
    r = x.shape[0] // n
    for p in range(part.shape[0]):
        M = np.empty(_Q)
        SU = np.empty(_Q)
        SUU = np.empty(_Q)
        SC = np.empty(_Q)
        ones = np.empty(_Q, np.int64)
        v0 = (p0 + p) * stride * P
        v1 = min(r, v0 + P)
        s1 = 0.0
        s2 = 0.0
        for b in range(v0, v1, _Q):
            k = min(_Q, v1 - b)
            for q in range(_short_sums(x, b, k, n, T, M, SU, SUU), k):
                o0 = (b + q) * n
                M[q], SU[q], SUU[q] = plain_sums(x[o0 : o0 + n], 1.0, T)
            if write:
                _write_block(x, out, b, k, n, T, SU, SUU, SC, ones)
            a1, a2 = _tail(k, beta, wn, M, SU, SUU)
            s1 += a1
            s2 += a2
        part[p, 0] = s1
        part[p, 1] = s2
        part[p, 2] = max(v1 - v0, 0)


def _uniform_first(x, n, P, stride, beta, wn, check, T, part, p0):
    """The pass at T = 0 over the parts (P vectors each) p0, p0 + stride, ..., also: [3] largest and [4] smallest
    nonzero vector sum of squares, [5] sum |x| (NaN and Inf show in it), and with ``check`` [6] largest and [7]
    smallest nonzero |x| (the float64 range rule). With T > 0 it is also the pass at T ([8] sum sp, [9] sum dh/dT:
    the bits ``_uniform_pass`` gives), while each block of vectors is in cache: the solve's first full evaluation
    (at the sample's root) then costs no pass of its own."""
    r = x.shape[0] // n
    for p in range(part.shape[0]):
        M = np.empty(_Q)
        SU = np.empty(_Q)
        SUU = np.empty(_Q)
        M2 = np.empty(_Q)  # (the sums at T)
        SU2 = np.empty(_Q)
        SUU2 = np.empty(_Q)
        bits = SUU.view(np.int64)  # nonnegative doubles order like their bit patterns: integer max/min vectorize
        v0 = (p0 + p) * stride * P
        v1 = min(r, v0 + P)
        s1 = 0.0
        s2 = 0.0
        t1 = 0.0
        t2 = 0.0
        top = 0
        low = _NO_LOW
        total = 0.0
        amax = 0.0
        amin = math.inf
        for b in range(v0, v1, _Q):
            k = min(_Q, v1 - b)
            k8 = _short_both(x, b, k, n, T, M, SU, SUU, M2, SU2, SUU2) if T > 0.0 else 0
            for q in range(k8 if T > 0.0 else _short_sums(x, b, k, n, -1.0, M, SU, SUU), k):
                o0 = (b + q) * n
                M[q], SU[q], SUU[q] = abs_sums(x[o0 : o0 + n])
            a1, a2 = _tail(k, beta, wn, M, SU, SUU)
            s1 += a1
            s2 += a2
            for q in range(k):
                total = radd(total, SU[q])
                sq = bits[q]
                top = max(top, sq)
                low = min(low, sq if sq > 0 else _NO_LOW)
            if T > 0.0:
                for q in range(k8, k):
                    o0 = (b + q) * n
                    M2[q], SU2[q], SUU2[q] = plain_sums(x[o0 : o0 + n], 1.0, T)
                a1, a2 = _tail(k, beta, wn, M2, SU2, SUU2)
                t1 += a1
                t2 += a2
            if check:
                for j in range(b * n, (b + k) * n):
                    a = abs(np.float64(x[j]))
                    amax = max(amax, a)
                    amin = min(amin, a if a > 0.0 else math.inf)
        part[p, 0] = s1
        part[p, 1] = s2
        part[p, 2] = max(v1 - v0, 0)
        if T > 0.0:
            part[p, 8] = t1
            part[p, 9] = t2
        bits[0] = top
        bits[1] = low
        part[p, 3] = SUU[0]
        part[p, 4] = SUU[1]
        part[p, 5] = total
        part[p, 6] = amax
        part[p, 7] = amin


# Serial: inlined into the solve. Threaded: the same function compiled on its own (cached, GIL-free), run on
# ranges of parts by Python threads (``_threads``), reached from the compiled solve through an object-mode hop.
_pass_ser, _pass_range = inline_copy(_uniform_pass), jit(_uniform_pass, nogil=True)
_first_ser, _first_range = inline_copy(_uniform_first), jit(_uniform_first, nogil=True)


@jit
def _pass_threaded(x, n, P, T, beta, wn, stride, write, out, part):
    with nb.objmode():
        run_parts(_pass_range, (x, n, P, T, beta, wn, stride, write, out), part)


@jit
def _first_threaded(x, n, P, stride, beta, wn, check, T, part):
    with nb.objmode():
        run_parts(_first_range, (x, n, P, stride, beta, wn, check, T), part)
