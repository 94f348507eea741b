"""Adversarial checks of the compiled equal-length path (``_uniform.solve_uniform``, docs/projection.md §8).

Each test pits the equal-length path against another route to the same answer: the general solver (module switch),
the ragged compiled path, the threaded kernels, other layouts and containers, or an independent optimality
certificate (the Lagrangian dual bound of tests/reference.py). What is attacked: ties and near-ties, -0.0, zero and
one-hot vectors, targets that make need == r or r - 1, float64 entries at and across the [2^-450, 2^450] window,
float32 subnormals, tiny max_iter with out= (speculative writes followed by a hand-over), the 4M+ sample start with
sampled parts unlike the rest, layouts, torch CPU tensors and bad input.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import groupsparse as gs
import groupsparse.projection._numba as engine_mod
import groupsparse.projection._small as small
import groupsparse.projection._uniform as uniform
from groupsparse.projection import ProjectionWarning
from reference import dual_bound

import os
FAST = settings(max_examples=int(os.environ.get("ATTACK_EXAMPLES", 30)), deadline=None)
M32 = 2 * 2.0**-24 / (1 - 2.0**-24) * np.sqrt(2) / (np.sqrt(2) - 1) * (1 + 1e-6) + 1e-15  # float32 margin bound
BAND = {np.float32: 4e-7 + 2 * M32, np.float64: 1e-12}


def run(x, s, path="uniform", axis=-1, **kw):
    """project through one path: 'uniform', 'ragged' (solve_plain_small), 'general', 'threads' (uniform, threaded)."""
    with pytest.MonkeyPatch.context() as mp:
        if path == "ragged":
            mp.setattr(uniform, "UNIFORM", False)
        elif path == "general":
            mp.setattr(small, "SMALL_MAX_ENTRIES", -1)
        elif path == "threads":
            mp.setattr(engine_mod, "PARALLEL_MIN_ENTRIES", 1)
            mp.setattr(engine_mod, "PARALLEL_MIN_THREADS", 1)
        return gs.project(x, s, axis=axis, return_info=True, **kw)


def bits(a):
    a = np.asarray(a)
    return a.view(f"u{a.itemsize}")


def mean_sparsity(z):
    z = np.abs(np.asarray(z, np.float64))
    n = z.shape[-1]
    z = z.reshape(-1, n)
    z = z / np.where(z.max(1, keepdims=True) > 0, z.max(1, keepdims=True), 1.0)
    l1, l2 = z.sum(1), np.sqrt((z * z).sum(1))
    ok = l2 > 0
    return float(np.mean(np.where(ok, (np.sqrt(n) - l1 / np.where(ok, l2, 1.0)) / (np.sqrt(n) - 1), 1.0)))


def check_band(x, s, z, info):
    sp = mean_sparsity(z)
    assert sp >= s - 1e-15, (sp, s)
    if not info.already_sparse and not info.discontinuity:
        assert sp <= s + BAND[x.dtype.type] + 1e-12, (sp, s)
    assert abs(info.sparsity - sp) < 1e-6


@st.composite
def nasty_group(draw, dtype=None):
    """Equal-length vectors with the structures the path special-cases or could get wrong."""
    dtype = dtype or draw(st.sampled_from([np.float32, np.float64]))
    n = draw(st.one_of(st.integers(2, 34), st.sampled_from([257])))
    r = draw(st.integers(1, 50))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    x = rng.normal(size=(r, n))
    kind = draw(st.sampled_from(["plain", "zeros", "negzero", "onehot", "near_tie", "scales", "identical"]))
    if kind == "zeros":
        x[rng.random((r, n)) < 0.4] = 0.0
        x[rng.random(r) < 0.3] = 0.0
    elif kind == "negzero":
        x[rng.random((r, n)) < 0.4] = -0.0
        x[rng.random(r) < 0.3] = -0.0
    elif kind == "onehot":
        x[rng.random(r) < 0.5, 1:] = 0.0
    elif kind == "near_tie":
        x = (1 + rng.integers(0, 5, size=(r, n)) * 1e-15) * rng.choice([-1.0, 1.0], size=(r, n))
    elif kind == "scales":
        x = np.ldexp(x, rng.integers(-100, 100, size=(r, 1)))
    elif kind == "identical":
        x = np.tile(x[:1], (r, 1))
    return x.astype(dtype)


def targets(r):
    """Sparsities near 0, near 1, and those that make need == r or r - 1 (float64: margin 0)."""
    return st.one_of(st.floats(0.0, 1.0), st.sampled_from([1e-9, 1e-3, 0.999999, 1.0, 1 - 1 / r, max(0.0, 1 - 1 / r - 1e-12),
                                                           max(0.0, 1 - 1 / r - M32), 1 - M32, 1 - M32 - 1e-9]))


@FAST
@given(st.data())
def test_band_and_agreement_with_the_other_paths(data):
    x = data.draw(nasty_group())
    s = data.draw(targets(x.shape[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no exhausted iterations on any of these
        z, info = run(x, s)
        check_band(x, s, z, info)
        for path in ("general", "ragged"):
            z2, info2 = run(x, s, path)
            check_band(x, s, z2, info2)
            assert info2.already_sparse == info.already_sparse
            if info.discontinuity or info2.discontinuity:
                # handed over to the general solver (ties): the same canonical split, bit for bit
                np.testing.assert_array_equal(bits(z), bits(run(x, s, "general")[0]))
            if path == "general":  # the same signs, -0.0 included
                assert np.array_equal(np.signbit(z), np.signbit(z2))
            scale = np.abs(x.astype(np.float64)).max(axis=-1, keepdims=True)
            assert np.all(np.abs(z.astype(np.float64) - z2) <= 1e-3 * scale * np.sqrt(x.shape[1]))
        np.testing.assert_array_equal(bits(z), bits(run(x, s, "threads")[0]))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(2, 6), st.floats(0.05, 0.95), st.integers(0, 2**31))
def test_objective_reaches_the_dual_bound(r, n, s, seed):
    """Optimal, not only feasible: the objective of the directions returned meets the Lagrangian dual bound."""
    x = np.random.default_rng(seed).normal(size=(r, n))
    z, info = run(x, s)
    if info.already_sparse:
        return
    a = np.abs(z)
    nrm = np.linalg.norm(a, axis=1, keepdims=True)
    obj = float(np.sum(np.abs(x) * a / np.where(nrm > 0, nrm, 1.0)) + np.sum(np.abs(x).max(1)[nrm[:, 0] == 0]))
    bound = dual_bound(list(x), s)
    assert obj <= bound + 1e-9 * bound and obj >= bound - 1e-6 * bound


@FAST
@given(st.integers(2, 34), st.integers(1, 12), st.floats(0.05, 0.95), st.integers(0, 2**31), st.integers(-4, 4),
       st.sampled_from([(440, 450), (-450, -440), (-452, -446), (446, 452)]))
def test_float64_window_edges(n, r, s, seed, k, window):
    """Entries at, inside and straddling [2^-450, 2^450]: inside, 2^k scaling is bit-exact; any group that leaves
    the window is the general solver's bit for bit; everything in the band."""
    rng = np.random.default_rng(seed)
    lo, hi = window
    x = np.ldexp(rng.uniform(0.5, 1.0, size=(r, n)) * rng.choice([-1.0, 1.0], size=(r, n)),
                 rng.integers(lo, hi + 1, size=(r, n)))
    z, info = run(x, s)
    check_band(x, s, z, info)
    inside = lambda a: np.abs(a).max() <= 2.0**450 and np.abs(a[a != 0]).min() >= 2.0**-450  # noqa: E731
    if not inside(x):
        np.testing.assert_array_equal(bits(z), bits(run(x, s, "general")[0]))
    xk = np.ldexp(x, k)
    if inside(x) and inside(xk):
        zk, infok = run(xk, s)
        np.testing.assert_array_equal(bits(zk), bits(np.ldexp(z, k)))
        assert infok.mu == np.ldexp(info.mu, k) and infok.iterations == info.iterations


@FAST
@given(st.integers(2, 34), st.integers(1, 30), st.floats(0.05, 0.99), st.integers(0, 2**31))
def test_float32_subnormals(n, r, s, seed):
    """float32 vectors down in the subnormals (and one normal vector beside them): feasible when measured in
    float32, info honest, threads bit for bit."""
    rng = np.random.default_rng(seed)
    x = np.ldexp(rng.normal(size=(r, n)), rng.integers(-149, -120, size=(r, 1))).astype(np.float32)
    if rng.random() < 0.5:
        x[0] = rng.normal(size=n)
    z, info = run(x, s)
    sp = mean_sparsity(z)
    assert sp >= s - 1e-15 and abs(sp - info.sparsity) < 1e-6
    np.testing.assert_array_equal(bits(z), bits(run(x, s, "threads")[0]))


@pytest.mark.parametrize("max_iter", [1, 2, 3])
def test_exhausted_iterations_after_a_speculative_write(max_iter):
    """A tiny max_iter can end the compiled solve after it wrote into out= speculatively: the general solver's
    result (and its warning) must be what comes back, every entry of out overwritten."""
    x = np.random.default_rng(0).normal(size=(300, 9))
    out = np.full_like(x, np.nan)
    with pytest.warns(ProjectionWarning):
        res, info = gs.project(x, 0.7, axis=1, max_iter=max_iter, out=out, return_info=True)
    ref, info_g = run(x, 0.7, "general", axis=1, max_iter=max_iter)
    assert res is out and np.array_equal(bits(out), bits(ref)) and not info.converged
    assert info.iterations == info_g.iterations


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layouts_3d_torch_and_out(dtype):
    """Axis in the middle, negative strides, F order, torch CPU tensors (auto and numba), out= direct and copied:
    the same bits; the input is never modified; overlapping or mistyped out= raises."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).normal(size=(6, 7, 9)).astype(dtype)
    x0 = x.copy()
    for ax in (0, 1, 2, -2):
        ref = np.moveaxis(run(np.ascontiguousarray(np.moveaxis(x, ax, -1)), 0.7)[0], -1, ax)
        for variant in (x, np.asfortranarray(x), x[::-1, ::-1, ::-1].copy()[::-1, ::-1, ::-1]):
            assert np.array_equal(bits(gs.project(variant, 0.7, axis=ax)), bits(ref))
        t = torch.from_numpy(x)
        for engine in ("auto", "numba"):
            assert np.array_equal(bits(gs.project(t, 0.7, axis=ax, engine=engine).numpy()), bits(ref))
        neg = x[:, ::-1]
        assert np.array_equal(bits(gs.project(neg, 0.7, axis=ax)), bits(gs.project(neg.copy(), 0.7, axis=ax)))
    assert np.array_equal(bits(x), bits(x0))
    flat = np.ascontiguousarray(x.reshape(-1, 9))
    ref = run(flat, 0.7)[0]
    for out in (np.empty_like(flat), np.asfortranarray(np.empty_like(flat))):
        assert gs.project(flat, 0.7, axis=1, out=out) is out and np.array_equal(bits(out), bits(ref))
    for bad in (flat, flat[::-1], flat.astype(np.float32 if dtype == np.float64 else np.float64)):
        with pytest.raises(ValueError):
            gs.project(flat, 0.7, axis=1, out=bad)
    inplace = flat.copy()
    gs.project_(inplace, 0.7, axis=1)
    assert np.array_equal(bits(inplace), bits(ref))


@pytest.mark.parametrize("n", [16385, 40000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_long_vectors_same_bits_threaded_or_not(n, dtype):
    """Regression: equal-length vectors longer than 16384 took this path serially but the ragged or general solver
    once the threading thresholds said threads, so the thresholds (and the machine's core count) changed the
    result's bits. Now every equal-length group takes this path; long vectors get parts of ~2^16 entries."""
    x = np.random.default_rng(n).normal(size=(3, n)).astype(dtype)
    for s in (0.5, 0.9):
        z, info = run(x, s)
        z2, info2 = run(x, s, "threads")
        assert (info.mu, info.evaluations) == (info2.mu, info2.evaluations)
        np.testing.assert_array_equal(bits(z), bits(z2))


def test_threading_env_knobs_give_the_same_bits(tmp_path):
    """GROUPSPARSE_PARALLEL_MIN_ENTRIES / _THREADS read at import: a subprocess forced onto threads reproduces the
    serial result bit for bit (short and long vectors, several parts)."""
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(11)
    xs = [rng.normal(size=(9000, 9)).astype(np.float32), rng.normal(size=(5, 20000))]
    for i, x in enumerate(xs):
        np.save(tmp_path / f"x{i}.npy", x)
    code = ("import sys, numpy as np, groupsparse as gs\n"
            "for i in range(2):\n"
            "    x = np.load(sys.argv[1] + f'/x{i}.npy')\n"
            "    np.save(sys.argv[1] + f'/z{i}.npy', gs.project(x, 0.8, axis=1))\n")
    env = dict(os.environ, GROUPSPARSE_PARALLEL_MIN_ENTRIES="1", GROUPSPARSE_PARALLEL_MIN_THREADS="1")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, check=True, timeout=300)
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(bits(np.load(tmp_path / f"z{i}.npy")), bits(run(x, 0.8)[0]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_inf_raise_whatever_the_path(bad, dtype):
    x = np.random.default_rng(2).normal(size=(5000, 3)).astype(dtype)
    x[4321, 1] = bad
    for path in ("uniform", "threads"):
        with pytest.raises(ValueError, match="NaN or Inf"):
            run(x, 0.5, path)


@pytest.mark.parametrize("parts", [uniform._SAMPLE_MIN_PARTS, 4 * uniform._SAMPLE_PARTS])
def test_sample_start_with_unlike_sampled_parts(parts):
    """The smallest sampled group (one or two parts sampled) and one of 1M+ vectors (stride from _SAMPLE_PARTS):
    the sampled parts (every stride-th block of 4096) are tied, zero or 2^60 larger than the rest. The sample is
    only a start: every result lands in the band, measured; threads give the same bits."""
    P = uniform.UNIFORM_PART
    r = parts * P + 5
    stride = max(uniform._SAMPLE_STRIDE, (r + P - 1) // P // uniform._SAMPLE_PARTS)
    x = np.random.default_rng(7).normal(size=(r, 2)).astype(np.float32)
    sampled = np.zeros(r, bool)
    for p in range(0, (r + P - 1) // P, stride):
        sampled[p * P : (p + 1) * P] = True
    for how, s in (("tied", 0.95), ("zero", 0.6), ("huge", 0.95), ("huge_rest", 0.8)):
        y = x.copy()
        if how == "huge_rest":  # the sample's largest norm 2^60 below the group's: its root in other units
            y[~sampled] *= np.float32(2.0**60)
        else:
            y[sampled] = {"tied": np.float32(1.0), "zero": np.float32(0.0)}.get(how, y[sampled] * np.float32(2.0**60))
        z, info = run(y, s)
        check_band(y, s, z, info)
        if how.startswith("huge"):
            np.testing.assert_array_equal(bits(z), bits(run(y, s, "threads")[0]))


def _sampled_rows(r):
    P = uniform.UNIFORM_PART
    stride = max(uniform._SAMPLE_STRIDE, (r + P - 1) // P // uniform._SAMPLE_PARTS)
    return np.concatenate([np.arange(p * P, min((p + 1) * P, r)) for p in range(0, (r + P - 1) // P, stride)])


@pytest.mark.parametrize("where", ["sampled", "unsampled"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e200, 1e-200])
def test_bad_entries_inside_or_outside_the_sample(where, bad):
    """The sample's first pass reads only its parts, the full first pass (which also evaluates at the sample's
    root) reads the rest: NaN and Inf raise wherever they are, and float64 entries outside the [2^-450, 2^450]
    window hand the group to the general solver wherever they are (results in the band, as the general path's)."""
    r = uniform._SAMPLE_MIN_PARTS * uniform.UNIFORM_PART + 5
    x = np.random.default_rng(3).normal(size=(r, 3))
    rows = _sampled_rows(r)
    row = rows[len(rows) // 2] if where == "sampled" else np.setdiff1d(np.arange(r), rows)[-1]
    x[row, 1] = bad
    for path in ("uniform", "threads"):
        if not np.isfinite(bad):
            with pytest.raises(ValueError, match="NaN or Inf"):
                run(x, 0.8, path)
            continue
        z, info = run(x, 0.8, path)
        check_band(x, 0.8, z, info)
        z2, _ = run(x, 0.8, "general")
        np.testing.assert_array_equal(bits(z), bits(z2))


@pytest.mark.parametrize("n", [2, 9, 300])
def test_sampled_solve_is_equivariant_under_powers_of_two(n):
    """The sample solves in its own units (2^E of its largest norm) and hands its root to the full solve in the
    group's: exact power-of-two rescaling, so scaling the data by 2^k scales the result by 2^k bit for bit."""
    P = uniform.part_size.py_func(n)
    r = uniform._SAMPLE_MIN_PARTS * P + 3
    x = np.random.default_rng(n).normal(size=(r, n)).astype(np.float32)
    z, _ = run(x, 0.8)
    for k in (-60, -1, 7, 60):
        zk, _ = run(x * np.float32(2.0**k), 0.8)
        np.testing.assert_array_equal(bits(zk), bits(z * np.float32(2.0**k)))


@pytest.mark.parametrize("n", [9, 1000, 4608])
@pytest.mark.parametrize("s", [0.8, 0.9, 0.95])
def test_uniform_data_does_not_stall_the_newton_loop(n, s):
    """Regression: on uniformly distributed entries (Kaiming-uniform weights) S is convex at first, Newton from
    mu = 0 overshot past the largest entry (every vector one-hot), and bisection on bit patterns from lo = 0 spent
    ~5 evaluations on mu ~ 1e-155 .. 1e-11: 13-27 evaluations per solve, against 4-6 on normal data. Now the
    overshoot pulls the bracket down to the largest |x| and steps that leave it are secants."""
    rng = np.random.default_rng(n)
    for path, most in (("uniform", 10), ("ragged", 10), ("general", 10)):
        x = rng.uniform(-1, 1, size=(max(64, 200_000 // n), n)).astype(np.float32)
        z, info = run(x, s, path)
        check_band(x, s, z, info)
        assert info.evaluations <= most, (path, info.evaluations)
