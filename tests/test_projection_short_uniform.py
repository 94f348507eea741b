"""Issue 13: the compiled equal-length path (``_uniform.solve_uniform``) against the other paths.

Equal-length unweighted groups (an N-D array with ``axis``, or a list of equal-length vectors) take a whole-solve
compiled path with no per-vector arrays. It must agree with the general solver and the ragged compiled path, be
bit for bit equivariant under 2^k, hand ties/jumps and out-of-range float64 data to the general solver, and give
the same bits whatever the memory layout, ``out=`` or thread count.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import groupsparse as gs
import groupsparse.projection._numba as engine_mod
import groupsparse.projection._small as small
import groupsparse.projection._uniform as uniform
from groupsparse.projection._group import as_group
from reference import kkt_mu

FAST = settings(max_examples=40, deadline=None)
TOL = {np.float32: 4e-7, np.float64: 1e-12}
MARGIN32 = 4.2e-7  # the float32 provable margin bound (docs/projection.md §4)


def run(x, s, path, **kw):
    """project along the last axis through one path: 'uniform' (default), 'ragged' (solve_plain_small), 'general'."""
    with pytest.MonkeyPatch.context() as mp:
        if path == "ragged":
            mp.setattr(uniform, "UNIFORM", False)
        elif path == "general":
            mp.setattr(small, "SMALL_MAX_ENTRIES", -1)
        return gs.project(x, s, axis=-1, return_info=True, **kw)


def measured(z):
    z = np.asarray(z, np.float64)
    return float(np.mean([gs.hoyer_sparsity(v) for v in z.reshape(-1, z.shape[-1])]))


@st.composite
def uniform_group(draw, lo=-60, hi=60, dtype=None):
    """r vectors of one length n (2..34: every short-kernel load count and past the last, or a long one), each at
    its own binary exponent in [lo, hi]."""
    dtype = dtype or draw(st.sampled_from([np.float32, np.float64]))
    n = draw(st.one_of(st.integers(2, 34), st.sampled_from([64, 333, 1000])))
    r = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    # normal or uniform entries: on uniform ones (Kaiming-uniform weights) S is convex at first and Newton from 0
    # overshoots every entry (the secant and tightened top of docs/projection.md §1)
    base = rng.normal(size=(r, n)) if draw(st.booleans()) else rng.uniform(-1, 1, size=(r, n))
    if draw(st.booleans()):
        base[rng.random((r, n)) < 0.3] = 0.0  # zeros inside vectors, and maybe whole zero vectors
    exps = rng.integers(lo, hi + 1, size=(r, 1))
    return np.ldexp(base, exps).astype(dtype)


@FAST
@given(uniform_group(), st.floats(0.05, 0.95))
def test_uniform_agrees_with_general_and_ragged(x, s):
    """Feasible on the contract's band, KKT-certified, and within the band's resolution of the other paths."""
    z, info = run(x, s, "uniform")
    tol = TOL[x.dtype.type] + (2 * MARGIN32 if x.dtype == np.float32 else 0.0)
    assert np.all(np.isfinite(z)) and z.dtype == x.dtype
    sp = measured(z)
    assert sp >= s - 1e-12 and abs(info.sparsity - sp) < 1e-6
    if not info.already_sparse and not info.discontinuity:
        assert sp <= s + tol + 1e-9
    for other in ("general", "ragged"):
        z2, info2 = run(x, s, other)
        assert info2.already_sparse == info.already_sparse
        assert abs(info2.sparsity - info.sparsity) <= tol + 1e-9
        # the same point of the band up to rounding: each output within the band's effect of the other's
        scale = np.linalg.norm(np.asarray(x, np.float64), axis=-1, keepdims=True)
        diff = np.abs(np.asarray(z, np.float64) - np.asarray(z2, np.float64))
        assert np.all(diff <= 1e-3 * scale + 1e-300), (other, diff.max())
    if x.dtype == np.float64 and not info.already_sparse and not info.discontinuity:
        mus = [m for m, kind in kkt_mu(list(x), list(z)) if kind == "interior"]
        if len(mus) > 1:
            assert max(mus) / min(mus) - 1 < 1e-6


@FAST
@given(uniform_group(-30, 30), st.floats(0.05, 0.95), st.integers(-60, 60))
def test_uniform_power_of_two_scaling_is_bit_exact(x, s, k):
    """project(2^k x) == 2^k project(x) bit for bit (float32 anywhere it stays normal; float64 in [2^-450, 2^450])."""
    big = np.ldexp(np.abs(x.astype(np.float64)).max(), k)
    nz = np.abs(x[x != 0]).astype(np.float64)
    small_ = np.ldexp(nz.min(), k) if nz.size else 1.0
    limit = (2.0**-126, 2.0**100) if x.dtype == np.float32 else (2.0**-440, 2.0**440)
    if not (limit[0] < small_ and big < limit[1]):
        return
    ref, i1 = run(x, s, "uniform")
    got, i2 = run(np.ldexp(x, k).astype(x.dtype), s, "uniform")
    np.testing.assert_array_equal(np.ldexp(ref, k).astype(x.dtype), got)
    assert i2.mu == np.ldexp(i1.mu, k) and i1.evaluations == i2.evaluations


@pytest.mark.filterwarnings("error::RuntimeWarning")  # (an inf - inf in the solver's step once leaked one)
@FAST
@given(st.integers(2, 34), st.integers(1, 30), st.floats(0.05, 0.95), st.sampled_from([np.float32, np.float64]),
       st.integers(0, 2**31), st.booleans(), st.sampled_from(["numba", "torch"]))
def test_every_exponent_in_one_group(n, r, s, dtype, seed, zeros, engine):
    """Subnormals to the top of the range mixed in one group (zeros inside too), on both engines: the float64
    compiled path hands over (same bits as the general solver), float32 stays on it; feasible when measured, and
    the reported sparsity is the measured one."""
    rng = np.random.default_rng(seed)
    info_ = np.finfo(dtype)
    exps = rng.integers(info_.minexp - info_.nmant, info_.maxexp - 4, size=(r, 1))
    x = np.ldexp(rng.uniform(0.5, 1.0, size=(r, n)) * rng.choice([-1, 1], size=(r, n)), exps).astype(dtype)
    if zeros:
        x[rng.random((r, n)) < 0.2] = 0.0
    z, info = run(x, s, "uniform", engine=engine)
    assert np.all(np.isfinite(z))
    assert measured(z) >= s - 1e-12 and abs(info.sparsity - measured(z)) < 1e-6
    if engine == "numba" and dtype == np.float64 and (np.abs(x).max() > 2.0**450
                                                      or np.abs(x[x != 0]).min(initial=1.0) < 2.0**-450):
        z2, _ = run(x, s, "general")
        np.testing.assert_array_equal(z, z2)


def test_ties_go_to_the_general_solver_bit_for_bit():
    """Tied largest entries make S jump: the compiled path hands the group over, which lands exactly on s."""
    x = np.tile(np.array([0.1, -0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]), (64, 1))
    for dtype in (np.float32, np.float64):
        z, info = run(x.astype(dtype), 0.6, "uniform")
        z2, info2 = run(x.astype(dtype), 0.6, "general")
        np.testing.assert_array_equal(z, z2)
        assert info.discontinuity and abs(measured(z) - 0.6) < 1e-6


@FAST
@given(st.integers(2, 34), st.integers(2, 30), st.floats(0.1, 0.9), st.integers(0, 2**31), st.integers(1, 40))
def test_near_ties_agree_with_general(n, r, s, seed, ulps):
    """Largest entries a few ulps apart: continuous but steep; both paths feasible and on the band."""
    rng = np.random.default_rng(seed)
    x = np.full((r, n), 0.5) + rng.integers(0, ulps, size=(r, n)) * np.finfo(np.float64).eps
    x[:, 1:] *= rng.uniform(0.2, 1.0, size=(r, n - 1)) if n > 2 and rng.random() < 0.5 else 1.0
    z, info = run(x, s, "uniform")
    z2, info2 = run(x, s, "general")
    for zz, ii in ((z, info), (z2, info2)):
        sp = measured(zz)
        assert sp >= s - 1e-12
        if not ii.discontinuity and not ii.already_sparse:
            assert sp <= s + 1e-9


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [2, 3, 9, 17, 1000])
def test_layouts_and_out_give_the_same_bits(dtype, n):
    """C, F, strided, axis=0 and out= (direct and copied) all return the C-order result's bits."""
    rng = np.random.default_rng(n)
    base = rng.normal(size=(257, n)).astype(dtype)
    ref, info = run(base, 0.7, "uniform")
    f = np.asfortranarray(base)
    assert np.array_equal(gs.project(f, 0.7, axis=1), ref)
    wide = np.zeros((257, 2 * n), dtype)
    wide[:, ::2] = base
    assert np.array_equal(gs.project(wide[:, ::2], 0.7, axis=1), ref)
    assert np.array_equal(gs.project(np.ascontiguousarray(base.T), 0.7, axis=0), ref.T)
    out = np.full_like(base, np.nan)
    res = gs.project(base, 0.7, axis=1, out=out)
    assert res is out and np.array_equal(out, ref)
    outf = np.asfortranarray(np.full_like(base, np.nan))
    gs.project(base, 0.7, axis=1, out=outf)
    assert np.array_equal(outf, ref)
    z3, _ = run(base.reshape(1, 257, n), 0.7, "uniform")
    assert np.array_equal(z3[0], ref)


@pytest.mark.parametrize("n", [9, 1000])
def test_threaded_kernels_give_the_same_bits(monkeypatch, n):
    """Partial sums are fixed blocks of vectors, so the threaded passes reproduce the serial result exactly."""
    x = np.random.default_rng(1).normal(size=(20000 * 9 // n + 3, n)).astype(np.float32)
    ref, info = run(x, 0.8, "uniform")
    monkeypatch.setattr(engine_mod, "PARALLEL_MIN_ENTRIES", 1)
    monkeypatch.setattr(engine_mod, "PARALLEL_MIN_THREADS", 1)
    got, info2 = run(x, 0.8, "uniform")
    np.testing.assert_array_equal(ref, got)
    assert info.mu == info2.mu


def test_length_one_rejected_and_zero_vectors_kept():
    with pytest.raises(ValueError, match="length >= 2"):
        gs.project(np.ones((5, 1)), 0.5, axis=1)
    x = np.random.default_rng(2).normal(size=(50, 9)).astype(np.float32)
    x[::7] = 0.0
    z, info = run(x, 0.8, "uniform")
    assert np.all(z[::7] == 0) and measured(z) >= 0.8


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_rejected(bad):
    x = np.random.default_rng(5).normal(size=(10, 9)).astype(np.float32)  # (all-equal rows would jump first)
    x[3, 4] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        gs.project(x, 0.5, axis=1)


def test_tiny_float32_vectors_measured_after_writing():
    """float32 vectors near the subnormal range: the compiled path reports their exponent, the contract measures."""
    x = np.ldexp(np.random.default_rng(3).normal(size=(40, 9)), -135).astype(np.float32)
    z, info = run(x, 0.7, "uniform")
    assert measured(z) >= 0.7 and abs(info.sparsity - measured(z)) < 1e-6


def test_no_offsets_and_no_numpy_side_buffers():
    """An equal-length group builds no offsets array; with out= the call allocates (NumPy-side) almost nothing."""
    x = np.random.default_rng(4).normal(size=(100_000, 9)).astype(np.float32)
    assert as_group(x, axis=1)._offsets is None
    out = np.empty_like(x)
    gs.project(x, 0.8, axis=1, out=out)  # compile and warm
    tracemalloc.start()
    gs.project(x, 0.8, axis=1, out=out)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.02 * x.nbytes, peak


def test_sampled_warm_start_on_very_large_groups():
    """Groups of _SAMPLE_MIN_PARTS parts and more start from a solve on a sample of parts: same band as a start
    elsewhere (mu0 skips the sample), outputs close, and the same bits on threads."""
    from groupsparse.projection._uniform import UNIFORM_PART, _SAMPLE_MIN_PARTS

    r = _SAMPLE_MIN_PARTS * UNIFORM_PART
    x = np.random.default_rng(6).normal(size=(r, 2)).astype(np.float32)
    z, info = run(x, 0.6, "uniform")
    a = np.abs(z.astype(np.float64))
    l2 = np.hypot(a[:, 0], a[:, 1])
    sp = float(np.mean(np.where(l2 > 0, (np.sqrt(2) - a.sum(1) / np.where(l2 > 0, l2, 1)) / (np.sqrt(2) - 1), 1.0)))
    assert 0.6 <= info.sparsity <= 0.6 + TOL[np.float32] + 2 * MARGIN32 and abs(sp - info.sparsity) < 1e-5
    z2, info2 = run(x, 0.6, "uniform", mu0=info.mu * 1.01)
    assert 0.6 <= info2.sparsity <= 0.6 + TOL[np.float32] + 2 * MARGIN32
    assert np.max(np.abs(z - z2)) < 1e-4 * np.abs(x).max()

