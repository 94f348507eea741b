"""Issue 8: exact at every scale, the optimum at ties, the precision contract (docs/projection.md).

Independent checks: the KKT certificate (one shared mu read back from the outputs, at any scale), the Lagrangian
dual bound (weak duality: no feasible point beats it), and hoyer_sparsity measured on the returned values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import groupsparse as gs
import groupsparse.projection._small as small
from reference import dual_bound, kkt_mu

ENGINES = ["numba", "torch"]
FAST = settings(max_examples=30, deadline=None)


def avg(out, weights=None):
    ws = weights if weights is not None else [None] * len(out)
    return float(np.mean([gs.hoyer_sparsity(np.asarray(o, np.float64), weights=w) for o, w in zip(out, ws)]))


def objective(out):
    return sum(float(np.linalg.norm(np.asarray(o, np.float64))) for o in out)  # alpha_i = ||z_i||


def paths(monkeypatch, path):
    if path == "general":
        monkeypatch.setattr(small, "SMALL_MAX_ENTRIES", -1)


# ---------------------------------------------------------------- 1. scale


@st.composite
def mixed_group(draw, lo=-1000, hi=1000):
    """A small group whose vectors sit at independent binary exponents in [lo, hi] (one group: 1e-300 beside 1e300)."""
    r = draw(st.integers(1, 4))
    vecs = []
    for _ in range(r):
        n = draw(st.integers(2, 6))
        base = np.array(draw(st.lists(st.floats(-10, 10, allow_nan=False).filter(lambda v: v == 0 or abs(v) > 1e-3),
                                      min_size=n, max_size=n)))
        vecs.append(np.ldexp(base, draw(st.integers(lo, hi))))
    return vecs


@FAST
@given(mixed_group(), st.floats(0.05, 0.95), st.sampled_from(ENGINES), st.booleans(), st.data())
def test_mixed_extreme_groups_feasible_and_certified(vecs, s, engine, weighted, data):
    """Whatever the exponents (of the data and of each vector's weights), the result is on target and one mu
    certifies every interior vector (KKT)."""
    ws = None
    if weighted:
        ws = [np.ldexp(np.array(data.draw(st.lists(st.floats(0.5, 2.0), min_size=len(v), max_size=len(v)))),
                       data.draw(st.integers(-1000, 1000))) for v in vecs]
    out, info = gs.project(vecs, s, engine=engine, weights=ws, return_info=True)
    assert all(np.all(np.isfinite(o)) for o in out)
    sp = avg(out, ws)
    assert sp >= s and abs(info.sparsity - sp) < 1e-9
    if not info.already_sparse and not info.discontinuity:
        assert sp <= s + 1e-9
        mus = [m for m, kind in kkt_mu(vecs, out, ws) if kind == "interior"]
        if len(mus) > 1:
            assert max(mus) / min(mus) - 1 < 1e-6, mus


@FAST
@given(mixed_group(-40, 40), st.floats(0.05, 0.95), st.integers(-1070, 1000), st.sampled_from(["small", "general"]))
def test_power_of_two_scaling_is_exact(vecs, s, k, path):
    """project(2^k c) == 2^k project(c) bit for bit while the entries stay normal doubles (every path)."""
    with np.errstate(over="ignore", under="ignore"):
        scaled = [np.ldexp(v, k) for v in vecs]
    if any(np.any((s_ != 0) & (np.abs(s_) < 2.0**-1022)) or not np.all(np.isfinite(s_)) for s_ in scaled):
        return
    if path == "small" and not all(-395 < np.frexp(np.abs(s_).max())[1] < 395 for s_ in scaled if s_.any()):
        return  # beyond 2^+-400 the compiled path hands over to the general one (other summation order)
    with pytest.MonkeyPatch.context() as mp:
        paths(mp, path)
        ref = gs.project(vecs, s)
        got = gs.project(scaled, s)
    for r_, g_ in zip(ref, got):
        np.testing.assert_array_equal(np.ldexp(r_, k), g_)


@FAST
@given(mixed_group(-30, 30), st.floats(0.05, 0.95), st.floats(1e-300, 1e300), st.sampled_from(ENGINES))
def test_any_scale_factor_is_equivariant(vecs, s, a, engine):
    with np.errstate(over="ignore", under="ignore"):
        scaled = [v * a for v in vecs]
    if not all(np.all(np.isfinite(v)) and np.all((v == 0) == (w == 0)) for v, w in zip(scaled, vecs)):
        return
    if any(np.abs(v).max() * np.sqrt(v.size) >= np.finfo(np.float64).max for v in scaled):
        return  # a projected entry can reach its vector's norm: past float64's largest the contract raises instead
    ref = gs.project(vecs, s, engine=engine)
    got = gs.project(scaled, s, engine=engine)
    for r_, g_ in zip(ref, got):
        if True:
            np.testing.assert_allclose(g_ / a, r_, rtol=1e-6, atol=1e-9 * np.abs(r_).max())


@FAST
@given(st.lists(st.floats(0.1, 10), min_size=4, max_size=4), st.floats(1e-300, 1e300), st.floats(0.05, 0.95),
       st.sampled_from(ENGINES))
def test_weight_scale_invariance(w, b, s, engine):
    x = np.array([3.0, 1.0, 2.0, 0.5])
    w = np.array(w)
    ref, ri = gs.project(x, s, weights=w, engine=engine, return_info=True)
    got, gi = gs.project(x, s, weights=w * b, engine=engine, return_info=True)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12)
    assert gs.hoyer_sparsity(got, weights=w) >= s and abs(gi.sparsity - ri.sparsity) < 1e-9
    assert gs.hoyer_sparsity(x, weights=w * b) == pytest.approx(gs.hoyer_sparsity(x, weights=w), abs=1e-12)


_TIE_S = st.sampled_from([0.3, 0.5, 0.6, 0.7, 0.8, 0.9])  # (targets where such groups often sit at a jump)
_ANY_C = st.sampled_from([3.0, 5.0, 0.3, 7.0, 1.7])  # (no power of two: beta w rounds)


@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=80, deadline=None)
@given(st.integers(1, 5), st.integers(2, 6), st.integers(0, 2**31), st.one_of(_TIE_S, _TIE_S, st.floats(0.05, 0.95)),
       st.one_of(_ANY_C, _ANY_C, st.floats(1e-3, 1e3)))
def test_constant_weights_of_any_value_are_the_plain_problem(engine, r, n, seed, s, c):
    """Weights c (any positive float, not only powers of two) on every entry define the plain problem: beta w and
    the sparsity do not depend on c. Tied groups (entries from {0, +-1, +-2}) make the solve bisect to a jump,
    where it ends within an ulp of the ties; the weighted kernels must decide each entry's support as the plain
    ones and as their own write do. The numba engine's weighted evaluation fused a - t w into one FMA (compiled
    with "contract") while its write rounded twice: a vector counted as supported came out all zeros, or ties went
    one-hot past the target (found by an adversarial review: c = 3, 5)."""
    rng = np.random.default_rng(seed)
    x = rng.choice([0.0, 1.0, -1.0, 2.0, -2.0], size=(r, n))
    x[np.abs(x).sum(1) == 0, 0] = 1.0
    ref = gs.project(x, s, axis=1, engine=engine)
    got, info = gs.project(x, s, axis=1, weights=np.full_like(x, c), engine=engine, return_info=True)
    # (1e-5: at a jump the two solves may end an ulp apart in mu, beta w rounding differently, and split the ties
    # a hair differently, both in the band: 3.7e-7 seen on 20 x 2 groups; the bug's differences were O(0.1-1))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-9)
    assert s - 1e-12 <= avg(list(got)) <= s + 1e-9 or info.already_sparse
    assert np.all((np.abs(got).sum(1) > 0) == (np.abs(x).sum(1) > 0))  # no nonzero vector comes out all zeros


@pytest.mark.parametrize("engine", ENGINES)
def test_issue_scale_examples(engine):
    x = np.array([3.0, 1.0, 2.0, 0.5])
    ref = gs.project(x, 0.5, engine=engine)
    for a in [1e103, 1e-108, 1e-110, 1e300, 1e-300]:
        np.testing.assert_allclose(gs.project(x * a, 0.5, engine=engine) / a, ref, rtol=1e-12)
    tiny = gs.project([x, x * 1e-120], 0.5, engine=engine)
    assert np.count_nonzero(tiny[1]) > 0 and avg(tiny) >= 0.5
    mixed = gs.project([np.array([1e100, 2e100, 3e100]), np.array([1e-200, 2e-200, 3e-200])], 0.5, engine=engine)
    assert avg(mixed) >= 0.5 and all(np.all(np.isfinite(m)) for m in mixed)
    for sub in ([5e-324, 1e-323, 0.0], [1e-310, 2e-310, 3e-310]):
        out = gs.project(np.array(sub), 0.5, engine=engine)
        assert gs.hoyer_sparsity(out) >= 0.5 - 1e-9 or gs.hoyer_sparsity(np.array(sub)) >= 0.5
    g = np.array([1e300, 1e-300, 3.0])
    assert gs.project(g, 0.0, engine=engine).tobytes() == g.tobytes()
    w = np.array([1, 2, 1.5, 1.2])
    want = gs.project(x, 0.6, weights=w, engine=engine)
    for b in [1e-200, 1e-160, 1e160]:
        got, info = gs.project(x, 0.6, weights=w * b, engine=engine, return_info=True)
        np.testing.assert_allclose(got, want, rtol=1e-9)
        assert info.sparsity == pytest.approx(gs.hoyer_sparsity(got, weights=w), abs=1e-12)
    assert np.isfinite(gs.hoyer_sparsity(x, weights=w * 1e200))


def test_weights_stay_float64_for_float32_vectors():
    w = 1 + 1e-9 * np.arange(100) / 100
    out = gs.project(np.ones(100, np.float32), 1e-3, weights=w)
    assert np.count_nonzero(out) > 1 and gs.hoyer_sparsity(out, weights=w) >= 1e-3
    out = gs.project(np.array([1.0, 2.0, 3.0], np.float32), 0.5, weights=np.full(3, 1e-50))
    assert gs.hoyer_sparsity(out) >= 0.5 - 1e-6


def test_info_reports_what_was_returned():
    M = np.random.default_rng(0).standard_normal((100000, 2))
    out, info = gs.project(M, 0.5, axis=1, return_info=True)
    sp = gs.hoyer_sparsity(out, axis=1).mean()
    assert 0.5 <= sp <= 0.5 + 1e-12 and abs(info.sparsity - sp) < 1e-13


# ---------------------------------------------------------------- 2. ties


@pytest.mark.parametrize("engine", ENGINES)
def test_issue_tie_examples(engine):
    out = gs.project(np.array([1.0, 1.0, 0.5]), 0.5, engine=engine)
    np.testing.assert_allclose(out, (1 + 3**0.5) / 2 * np.array([3**0.5 / 2, 0.5, 0]), rtol=1e-9)
    M = 0.1 * np.random.default_rng(0).choice([-1.0, 1.0], size=(64, 32))
    out = gs.project(M, 0.6, engine=engine)
    assert 0.6 <= avg(list(out.T)) <= 0.6 + 1e-12 and objective(list(out.T)) == pytest.approx(12.16, abs=1e-9)
    M = 0.1 * np.random.default_rng(0).choice([-1.0, 1.0], size=(64, 50))
    assert 0.6 <= avg(list(gs.project(M, 0.6, engine=engine).T)) <= 0.6 + 1e-12
    A, B = np.array([1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1]), np.array([1, 1] + [0.1] * 6)
    out = gs.project([A, B, B.copy()], 0.8126, engine=engine)
    assert 0.8126 <= avg(out) <= 0.8126 + 1e-12 and objective(out) > 4.0
    assert objective(out) == pytest.approx(dual_bound([A, B, B], 0.8126), abs=1e-6)


def test_ties_identical_across_engines_and_paths(monkeypatch):
    M = 0.1 * np.random.default_rng(3).choice([-1.0, 1.0], size=(16, 9))
    a = gs.project(M, 0.55, engine="numba")
    b = gs.project(M, 0.55, engine="torch")
    monkeypatch.setattr(small, "SMALL_MAX_ENTRIES", -1)
    c = gs.project(M, 0.55, engine="numba")
    np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("engine", ENGINES)
def test_tie_whose_top_mantissa_rounds_up_to_one(engine):
    """Tied largest entries of mantissa 1 - 2^-53 (top = ratio/beta exact): the solver's top key used to round
    to the next power of two and decode as mu_top = 0, returning the input (sparsity 0.586 for a 0.75 target)."""
    for a in (np.nextafter(0.5, 0), 1 - 2.0**-53):
        x = np.array([0.0, 0.0, a, a])
        out, info = gs.project([x], 0.75, engine=engine, return_info=True)
        assert avg(out) >= 0.75 and avg(out) <= 0.75 + 1e-9 and info.mu > 0


def assert_optimal_on_target(vecs, s, out, info):
    """Feasible, on the target band unless returned unchanged, and at the Lagrangian dual bound (the optimum)."""
    sp = avg(out)
    assert sp >= s - 1e-12
    if info.already_sparse:
        return
    assert sp <= s + 1e-9
    assert objective(out) >= dual_bound(vecs, s) - 1e-6


@st.composite
def tie_group(draw):
    r = draw(st.integers(1, 4))
    return [np.array(draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.0, -2.0]), min_size=n, max_size=n)))
            for n in [draw(st.integers(2, 5)) for _ in range(r)]]


@settings(max_examples=25, deadline=None)
@given(tie_group(), st.floats(0.05, 0.95), st.sampled_from(ENGINES))
def test_ties_reach_the_dual_bound(vecs, s, engine):
    """Feasible and as good as the Lagrangian dual allows: the optimum, on the target (docs/projection.md §3)."""
    out, info = gs.project(vecs, s, engine=engine, return_info=True)
    assert_optimal_on_target(vecs, s, out, info)


def test_each_near_tie_is_continuous():
    out, info = gs.project_each(np.array([1.0, 0.99999]), 0.28, return_info=True)
    assert np.count_nonzero(out) == 2 and info["sparsity"][0] == pytest.approx(0.28, abs=1e-9)
    assert gs.hoyer_sparsity(out) == pytest.approx(0.28, abs=1e-9)


@FAST
@given(mixed_group(-1000, 1000), st.floats(0.05, 0.95), st.sampled_from(ENGINES))
def test_each_exact_at_every_scale(vecs, s, engine):
    """project_each: every vector at exactly s (or its one-hot at a jump), whatever each vector's exponent, and
    equal to the per-vector solve of the same vector scaled to 1."""
    out, info = gs.project_each(vecs, s, engine=engine, return_info=True)
    for v, o, sp in zip(vecs, out, info["sparsity"]):
        assert np.all(np.isfinite(o))
        if not v.any():
            assert not o.any()
            continue
        got = gs.hoyer_sparsity(o)
        assert got == pytest.approx(sp, abs=1e-9) and (abs(got - s) < 1e-9 or got >= s)
        k = -int(np.frexp(np.abs(v).max())[1])
        unit = gs.project_each([np.ldexp(v, k)], s, engine=engine)[0]
        np.testing.assert_allclose(np.ldexp(o, k), unit, rtol=1e-9, atol=1e-12)


@st.composite
def full_range_group(draw):
    """Each entry at its own binary exponent over all of float64, mixed inside one vector: subnormals (down to
    5e-324) beside entries near 4e307 (kept below 2^1021 so a vector's norm stays finite)."""
    r = draw(st.integers(1, 4))
    vecs = []
    for _ in range(r):
        n = draw(st.integers(2, 6))
        mant = draw(st.lists(st.floats(0.5, 1.0, exclude_max=True), min_size=n, max_size=n))
        exps = draw(st.lists(st.integers(-1073, 1021), min_size=n, max_size=n))
        signs = draw(st.lists(st.sampled_from([-1.0, 0.0, 1.0]), min_size=n, max_size=n))
        vecs.append(np.ldexp(np.array(signs) * np.array(mant), np.array(exps)))
    return vecs


@FAST
@given(full_range_group(), st.floats(0.05, 0.95), st.sampled_from(ENGINES), st.sampled_from(["small", "general"]),
       st.booleans(), st.data())
def test_full_exponent_range_in_one_vector_is_feasible(vecs, s, engine, path, weighted, data):
    """Subnormals to near the float64 limit inside one vector and one group, every engine and CPU path, with or
    without weights at any exponent: finite, feasible measured on what was returned, and info reports it."""
    ws = None
    if weighted:
        ws = [np.ldexp(np.array(data.draw(st.lists(st.floats(0.5, 2.0), min_size=len(v), max_size=len(v)))),
                       data.draw(st.integers(-1000, 1000))) for v in vecs]
    with pytest.MonkeyPatch.context() as mp:
        paths(mp, path)
        out, info = gs.project(vecs, s, engine=engine, weights=ws, return_info=True)
    assert all(np.all(np.isfinite(o)) for o in out)
    sp = avg(out, ws)
    assert sp >= s and abs(info.sparsity - sp) < 1e-9


@st.composite
def near_tie_group(draw):
    """A tie group with each nonzero entry moved a few ulps (or not): near-ties, where the solve is continuous."""
    vecs = draw(tie_group())
    out = []
    for v in vecs:
        steps = np.array(draw(st.lists(st.integers(-3, 3), min_size=v.size, max_size=v.size))) * (v != 0)
        for _ in range(3):
            v = np.where(steps > 0, np.nextafter(v, np.inf), np.where(steps < 0, np.nextafter(v, -np.inf), v))
            steps = steps - np.sign(steps)
        out.append(v)
    return out


@settings(max_examples=25, deadline=None)
@given(near_tie_group(), st.floats(0.05, 0.95), st.sampled_from(ENGINES), st.sampled_from(["small", "general"]))
def test_near_ties_reach_the_dual_bound(vecs, s, engine, path):
    """Ties broken by a few ulps: feasible and as good as the Lagrangian dual allows, on every engine and path."""
    with pytest.MonkeyPatch.context() as mp:
        paths(mp, path)
        out, info = gs.project(vecs, s, engine=engine, return_info=True)
    assert_optimal_on_target(vecs, s, out, info)


@pytest.mark.parametrize("engine", ENGINES)
def test_results_past_the_largest_double_raise(engine):
    """Projected entries can exceed the input's largest (up to the vector's norm): past float64's largest finite
    value the call raises the contract's ValueError instead of returning inf (the equivariance test above skips
    such scales)."""
    v = [np.array([1.6e308, 1.5e308, 1.4e308, 1e300])]
    assert np.array_equal(gs.project(v, 0.05, engine=engine)[0], v[0])  # already sparse: returned as is
    with pytest.raises(ValueError, match="beyond the largest finite float64"):
        gs.project(v, 0.6, engine=engine)
