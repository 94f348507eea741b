"""The short-vector kernels (``groupsparse/projection/_shortvec.py``: LLVM vector code, eight vectors at a time)
against scalar references, over every length they take (1-32), both dtypes, thresholds at and between entries,
every float exponent (subnormals to the largest finite), signed zeros, NaN and Inf, and offsets up to the
array's last entry (the masked loads must read exactly the vector's own entries)."""

from __future__ import annotations

import numba as nb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from groupsparse.projection._shortvec import SHORT_MAX, abs_sums8, both8, sums8, write8


@nb.njit
def _run_sums(x, n, t, absolute, M, SU, SUU):
    """the sums of x's len(x) // n vectors through the kernels, eight vectors per call"""
    r = x.shape[0] // n
    for q in range(0, r - r % 8, 8):
        if absolute:
            abs_sums8(x, q * n, n, M, SU, SUU, q)
        else:
            sums8(x, q * n, n, t, M, SU, SUU, q)


@nb.njit
def _run_write(x, out, n, t, SC):
    """eight vectors per call (full groups of eight entries, a switch on n)"""
    r = x.shape[0] // n
    for q in range(0, r - r % 8, 8):
        write8(x, out, q * n, n, t, SC, q)


def _entries(draw, size, dtype):
    """entries at every binary exponent of the dtype (subnormals included), random signs, zeros of both signs"""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    fi = np.finfo(dtype)
    lo, hi = int(np.log2(fi.smallest_subnormal)), int(np.log2(fi.max))
    style = draw(st.sampled_from(["mixed", "one_scale", "ties"]))
    if style == "mixed":
        e = rng.integers(lo, hi, size)
    else:
        e = np.full(size, rng.integers(lo // 2, hi // 2))
    m = rng.uniform(0.5, 1.0, size) if style != "ties" else rng.choice([0.5, 0.75, 1.0], size)
    x = (np.ldexp(m, e) * rng.choice([-1.0, 1.0], size)).astype(dtype)
    x[rng.random(size) < 0.15] = 0.0
    x[rng.random(size) < 0.05] = -0.0
    return x


@st.composite
def short_group(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    n = draw(st.integers(1, SHORT_MAX))
    r = 8 * draw(st.integers(1, 6))
    x = _entries(draw, r * n, dtype)
    return x, n


@settings(max_examples=200, deadline=None)
@given(short_group(), st.integers(0, 2), st.data())
def test_sums_match_a_scalar_reference(group, how, data):
    """counts exactly; sums within the reordering's rounding (the reference adds in order, the kernel in a tree)"""
    x, n = group
    r = x.shape[0] // n
    a = np.abs(x.astype(np.float64)).reshape(r, n)
    if how == 0:  # threshold at an entry (ties: u = 0 exactly there)
        t = float(data.draw(st.sampled_from(list(a.ravel()))))
    elif how == 1:  # between entries
        t = float(np.median(a)) * 0.999
    else:
        t = -1.0  # the absolute sums
    M, SU, SUU = np.full(r, np.nan), np.full(r, np.nan), np.full(r, np.nan)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):  # (inf - inf where squares overflow)
        _run_sums(x, n, t, t < 0, M, SU, SUU)
        u = a if t < 0 else np.maximum(a - t, 0.0)
        m = (u > 0).sum(1)
        su, suu = u.sum(1), (u * u).sum(1)
        bound_su, bound_suu = n * 2.0**-52 * su, n * 2.0**-52 * suu
        assert np.array_equal(M, m)
        assert np.all(np.abs(SU - su) <= bound_su) and np.all((np.abs(SUU - suu) <= bound_suu) | (SUU == suu))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", range(1, SHORT_MAX + 1))
def test_nan_and_inf_show_in_the_absolute_sums(dtype, n):
    x = np.ones(8 * n, dtype)
    x[3 * n] = np.nan
    x[5 * n + n - 1] = -np.inf
    M, SU, SUU = np.zeros(8), np.zeros(8), np.zeros(8)
    _run_sums(x, n, -1.0, True, M, SU, SUU)
    assert np.isnan(SU[3]) and np.isnan(SUU[3]) and SU[5] == np.inf and SUU[5] == np.inf
    others = [q for q in range(8) if q not in (3, 5)]
    assert np.all(SU[others] == n) and np.all(M[others] == n)


@settings(max_examples=200, deadline=None)
@given(short_group(), st.data())
def test_write_is_the_scalar_loop_bit_for_bit(group, data):
    """copysign((|x| - t)_+ sc, x) with the same IEEE operations as the loop it replaces: same bits, every entry
    with x's sign bit (-0.0 for a -0.0 entry and for zeroed negative ones)"""
    x, n = group
    r = x.shape[0] // n
    a = np.abs(x.astype(np.float64))
    t = float(data.draw(st.sampled_from([0.0, float(np.median(a)), float(a.max())])))
    sc = np.array([data.draw(st.sampled_from([0.0, 1.0, 0.75, 3.0e-5, 1.5e300])) for _ in range(r)])
    with np.errstate(over="ignore", invalid="ignore"):
        xv = x.astype(np.float64)
        d = np.abs(xv) - t
        rr = np.where(d > 0, d * np.repeat(sc, n), 0.0)
        ref = np.copysign(rr, xv).astype(x.dtype)
        out = np.full_like(x, 7.0)
        _run_write(x, out, n, t, sc)
        assert np.array_equal(out.view(np.uint8), ref.view(np.uint8))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 17, 24, 25, 31, 32])
def test_kernels_touch_only_the_vectors_entries(dtype, n):
    """the vectors end exactly at the array's end (a read past it would fault at a page edge, or read the guard)
    and a write leaves every entry outside [o0, o0 + n) alone"""
    buf = np.full(8 * n + 64, np.nan, dtype)  # NaN guards after the group: reading one would poison the sums
    x = buf[: 8 * n]
    x[:] = np.arange(1, 8 * n + 1)
    M, SU, SUU = np.zeros(8), np.zeros(8), np.zeros(8)
    _run_sums(x, n, 0.5, False, M, SU, SUU)
    assert np.all(np.isfinite(SU)) and np.all(M == n)
    out = np.full(8 * n + 64, 5.0, dtype)
    _run_write(x, out[: 8 * n], n, 0.5, np.ones(8))
    assert np.all(out[8 * n :] == 5.0) and np.all(out[: 8 * n] != 5.0)


@nb.njit
def _run_both(x, n, t, M, SU, SUU, M2, SU2, SUU2):
    r = x.shape[0] // n
    for q in range(0, r - r % 8, 8):
        both8(x, q * n, n, t, M, SU, SUU, M2, SU2, SUU2, q)


@settings(max_examples=150, deadline=None)
@given(short_group(), st.data())
def test_both_sums_are_the_two_kernels_bit_for_bit(group, data):
    """The first pass's fused kernel (sums of |x| and at t from one set of loads) gives each kernel's own bits"""
    x, n = group
    r = x.shape[0] // n
    a = np.abs(x.astype(np.float64))
    t = float(data.draw(st.sampled_from([float(np.median(a)), float(a.max()), float(a[a > 0].min(initial=1.0))])))
    ref = [np.full(r, 7.0) for _ in range(6)]
    _run_sums(x, n, t, True, *ref[:3])
    _run_sums(x, n, t, False, *ref[3:])
    got = [np.full(r, 7.0) for _ in range(6)]
    _run_both(x, n, t, *got)
    for g, e in zip(got, ref):
        assert np.array_equal(g.view(np.uint64), e.view(np.uint64))


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 16, 17, 24, 25, 32, 33, 1000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_first_pass_evaluation_is_the_pass_at_t(n, dtype):
    """``_uniform_first`` at T > 0 also evaluates at T (the solve's warm start): per part, the bits of
    ``_uniform_pass`` at T, and its own columns unchanged by it"""
    from groupsparse.projection._uniform_passes import _first_range, _pass_range, part_size

    rng = np.random.default_rng(n)
    P = part_size(n)
    r = 3 * P + 5
    x = (rng.normal(size=r * n) ** 3).astype(dtype)
    x[rng.random(x.size) < 0.1] = 0.0
    beta, wn = 1 / (np.sqrt(n) - 1) if n > 1 else 1.0, np.sqrt(n)
    T = float(np.median(np.abs(x)))
    nparts = (r + P - 1) // P
    f0, f1, part = np.zeros((nparts, 10)), np.zeros((nparts, 10)), np.zeros((nparts, 3))
    _first_range(x, n, P, 1, beta, wn, dtype == np.float64, 0.0, f0, 0)
    _first_range(x, n, P, 1, beta, wn, dtype == np.float64, T, f1, 0)
    _pass_range(x, n, P, T, beta, wn, 1, False, x[:0], part, 0)
    assert np.array_equal(f1[:, :8].view(np.uint64), f0[:, :8].view(np.uint64))
    assert np.array_equal(f1[:, 8:10].view(np.uint64), part[:, :2].view(np.uint64))
