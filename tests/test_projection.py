"""The grouped sparse projection against brute force, its properties, and its input handling."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import groupsparse as gs
from groupsparse.projection import ProjectionWarning

from reference import normal, gsp_bruteforce, sparsity

ENGINES = ["numba", "torch"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

X_FIXTURE = np.array([
    [0.8147, 0.6324, 0.9575, 0.9572, 0.4218, 0.6557],
    [0.9058, 0.0975, 0.9649, 0.4854, 0.9157, 0.0357],
    [0.1270, 0.2785, 0.1576, 0.8003, 0.7922, 0.8491],
    [0.9134, 0.5469, 0.9706, 0.1419, 0.9595, 0.9340],
])
P_FIXTURE = np.array([
    [0.6646, 0.6324, 0.9460, 1.0705, 0, 0.1704],
    [0.9495, 0, 0.9657, 0, 0.9337, 0],
    [0, 0, 0, 0.5972, 0.5657, 0.7874],
    [0.9732, 0, 0.9809, 0, 1.0641, 1.0581],
])


def avg_sparsity(vectors, weights=None):
    ws = weights if weights is not None else [None] * len(vectors)
    return float(np.mean([sparsity(v, w) for v, w in zip(vectors, ws)]))


def objective(vectors, result):
    """sum_i <|c_i|, x_i> with x_i the unit-normalized result (the problem's objective)."""
    total = 0.0
    for c, z in zip(vectors, result):
        n = np.linalg.norm(z)
        if n > 0:
            total += float(np.dot(np.abs(c), np.abs(z)) / n)
    return total


# ---------------------------------------------------------------- fixture and brute force


@pytest.mark.parametrize("engine", ENGINES)
def test_authors_fixture(engine):
    P, info = gs.project(X_FIXTURE, 0.5, axis=0, engine=engine, return_info=True)
    # The fixture was printed at 4 decimals from a run at precision 1e-3; ours is exact, so the 4th decimal moves.
    np.testing.assert_allclose(P, P_FIXTURE, atol=1e-3)
    assert np.array_equal(P == 0, P_FIXTURE == 0)
    np.testing.assert_allclose(gs.hoyer_sparsity(P, axis=0), [0.290, 1.000, 0.268, 0.639, 0.318, 0.484], atol=2e-3)
    assert abs(info.sparsity - 0.5) < 1e-9 and info.engine == engine and info.converged


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("seed", range(6))
def test_matches_bruteforce_ragged_weighted(engine, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 30, size=rng.integers(1, 8))
    vecs = [rng.normal(size=n) * rng.uniform(0.1, 10) for n in lengths]
    weights = [rng.uniform(0.2, 3.0, size=n) for n in lengths] if seed % 2 else None
    s = float(rng.uniform(0.2, 0.95))
    ref, _ = gsp_bruteforce(vecs, s, weights)
    out, info = gs.project(vecs, s, weights=weights, engine=engine, return_info=True)
    for o, r in zip(out, ref):
        np.testing.assert_allclose(o, r, rtol=1e-6, atol=1e-8 * np.abs(r).max())
    assert avg_sparsity(out, weights) >= s - 1e-12
    if not info.already_sparse:
        assert avg_sparsity(out, weights) <= s + 1e-9


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("threads", [False, True])
def test_long_vectors_span_chunks(engine, threads, monkeypatch):
    """Vectors longer than the engine's chunk are split for threading: results must not depend on it."""
    import groupsparse.projection._numba as K

    monkeypatch.setattr(__import__("groupsparse.projection._small", fromlist=["x"]), "SMALL_MAX_ENTRIES", -1)  # the chunked kernels, not the whole-solve compiled path
    monkeypatch.setattr(K, "PARALLEL_MIN_ENTRIES", 0 if threads else 1 << 62)
    monkeypatch.setattr(K, "PARALLEL_MIN_THREADS", 1)
    monkeypatch.setattr(K, "COMPACT_AFTER", 1 if threads else 4)  # active-set compaction from the first step
    rng = np.random.default_rng(3)
    vecs = [rng.normal(size=40_000), rng.normal(size=17), rng.normal(size=70_001)]
    ref, _ = gsp_bruteforce(vecs, 0.7, iters=200)
    out = gs.project(vecs, 0.7, engine=engine)
    for o, r in zip(out, ref):
        np.testing.assert_allclose(o, r, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- precision and properties


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrays(np.float64, st.tuples(st.integers(2, 12), st.integers(1, 8)),
           elements=st.floats(-100, 100, allow_nan=False, allow_subnormal=False, width=64).filter(normal)),
    st.floats(0.0, 1.0),
)
def test_target_reached_float64(M, s):
    out, info = gs.project(M, s, axis=0, return_info=True)
    sp = float(np.mean(gs.hoyer_sparsity(out, axis=0)))
    assert sp >= s - 1e-9
    if not info.already_sparse and not info.discontinuity:
        assert sp <= s + 1e-9
    assert abs(info.sparsity - sp) < 1e-9


@settings(max_examples=25, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(2, 40), st.integers(1, 10)),
              elements=st.floats(-10, 10, allow_nan=False, allow_subnormal=False, width=32).filter(normal)), st.floats(0.05, 0.99))
def test_float32_within_1e6(M, s):
    out, info = gs.project(M, s, axis=0, return_info=True)
    assert out.dtype == np.float32
    sp = float(np.mean(gs.hoyer_sparsity(out, axis=0)))
    assert sp >= s - 1e-6
    if not info.already_sparse and not info.discontinuity:
        assert sp <= s + 1e-6


@settings(max_examples=25, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(2, 10), st.integers(1, 6)),
              elements=st.floats(-5, 5, allow_nan=False, allow_subnormal=False).filter(normal)), st.floats(0.1, 0.95))
def test_idempotent(M, s):
    once = gs.project(M, s)
    twice, info = gs.project(once, s, return_info=True)
    assert info.already_sparse
    np.testing.assert_array_equal(once, twice)


@settings(max_examples=25, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(2, 10), st.integers(1, 6)),
              elements=st.floats(-5, 5, allow_nan=False, allow_subnormal=False).filter(normal)), st.floats(0.1, 0.95), st.floats(1e-3, 1e3))
def test_scale_equivariance(M, s, scale):
    a = gs.project(M, s)
    b = gs.project(M * scale, s)
    np.testing.assert_allclose(b, a * scale, rtol=1e-6, atol=1e-9 * scale * max(1.0, np.abs(M).max()))


@settings(max_examples=25, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(2, 16), st.integers(1, 8)),
              elements=st.floats(-3, 3, allow_nan=False, allow_subnormal=False).filter(normal)), st.floats(0.05, 0.95))
def test_float32_agrees_with_float64(M, s):
    d, di = gs.project(M, s, return_info=True)
    f, fi = gs.project(M.astype(np.float32), s, return_info=True)
    if di.discontinuity or fi.discontinuity:
        # entries tied in float32 may be a near-tie in float64: the optimal face is shared out differently
        # (both optimal), so compare what the contract promises instead of the entries
        assert gs.hoyer_sparsity(f.astype(np.float64), axis=0).mean() >= s
        return
    np.testing.assert_allclose(f, d, atol=5e-4 * max(1.0, np.abs(M).max()))


@settings(max_examples=25, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(2, 16), st.integers(1, 8)),
              elements=st.floats(-3, 3, allow_nan=False, allow_subnormal=False).filter(normal)), st.floats(0.05, 0.95))
def test_numpy_and_torch_engines_agree(M, s):
    a, ia = gs.project(M, s, return_info=True)
    t, it = gs.project(torch.from_numpy(M), s, return_info=True, engine="torch")
    assert isinstance(t, torch.Tensor) and it.engine == "torch" and ia.engine == "numba"
    np.testing.assert_allclose(t.numpy(), a, rtol=1e-7, atol=1e-10)


def test_optimal_among_feasible_perturbations():
    """No small feasible perturbation of the unit-normalized solution improves the objective."""
    rng = np.random.default_rng(0)
    for trial in range(5):
        vecs = [np.abs(rng.normal(size=n)) for n in (4, 5, 3)]
        s = 0.6
        out = gs.project(vecs, s)
        xs = [o / np.linalg.norm(o) for o in out]
        best = sum(np.dot(v, x) for v, x in zip(vecs, xs))
        for _ in range(2000):
            cand = [np.maximum(x + rng.normal(scale=0.02, size=x.size), 0) for x in xs]
            if any(not c.any() for c in cand):
                continue
            cand = [c / np.linalg.norm(c) for c in cand]
            if avg_sparsity(cand) >= s:
                assert sum(np.dot(v, c) for v, c in zip(vecs, cand)) <= best + 1e-9


# ---------------------------------------------------------------- ties and discontinuities


@pytest.mark.parametrize("engine", ENGINES)
def test_plus_minus_matrix_at_authors_failure_case(engine):
    """64x32 of +-0.1 at s = 0.6: the authors' code returns average sparsity 0.0; g jumps straight to one-hot."""
    rng = np.random.default_rng(0)
    M = 0.1 * rng.choice([-1.0, 1.0], size=(64, 32))
    out, info = gs.project(M, 0.6, axis=0, engine=engine, return_info=True)
    sp = gs.hoyer_sparsity(out, axis=0)
    assert info.discontinuity
    assert 0.6 <= sp.mean() <= 0.6 + 1e-12
    # The tied face is shared out: 19 columns one-hot, one partially (sparsity 0.2), 12 stay dense; objective 12.16
    assert info.n_jumped == 19 and info.n_partial == 1 and np.sum(sp > 0.999) == 19
    assert np.sum(np.abs(sp - 0.2) < 1e-9) == 1 and np.sum(sp < 1e-12) == 12
    assert np.linalg.norm(out, axis=0).sum() == pytest.approx(12.16, abs=1e-9)
    # ... which beats the paper's answer (every column one-hot) on the objective
    assert objective(list(M.T), list(out.T)) > objective(list(M.T), [np.eye(64)[0]] * 32) + 1


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("s", [0.1, 0.5, 0.9, 1.0])
def test_constant_and_tied_columns_never_infeasible(engine, s):
    M = np.ones((6, 5))
    M[:, 2] = 3.0
    M[:3, 3] = 2.0  # three tied maxima
    M[:, 4] = 0.0  # zero vector: sparsity 1 by convention, stays zero
    out, info = gs.project(M, s, engine=engine, return_info=True)
    assert gs.hoyer_sparsity(out, axis=0).mean() >= s - 1e-12
    assert np.all(out[:, 4] == 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_ties_plus_continuous_vectors(engine):
    rng = np.random.default_rng(1)
    vecs = [np.ones(8), -np.ones(8), np.ones(5), rng.normal(size=20), rng.normal(size=7)]
    for s in np.linspace(0.05, 0.99, 15):
        out, info = gs.project(vecs, float(s), engine=engine, return_info=True)
        assert avg_sparsity(out) >= s - 1e-12, (s, info)


def test_sparsity_one_gives_one_nonzero_per_vector():
    rng = np.random.default_rng(2)
    M = rng.normal(size=(10, 7))
    out = gs.project(M, 1.0)
    assert np.all((out != 0).sum(axis=0) == 1)
    np.testing.assert_array_equal(out[np.abs(M).argmax(0), np.arange(7)], M[np.abs(M).argmax(0), np.arange(7)])


# ---------------------------------------------------------------- structure, dtypes, devices


def test_axis_and_shapes():
    rng = np.random.default_rng(0)
    T = rng.normal(size=(3, 4, 5))
    for axis in (0, 1, 2, -1):
        out = gs.project(T, 0.6, axis=axis)
        assert out.shape == T.shape
        assert gs.hoyer_sparsity(out, axis=axis).mean() == pytest.approx(0.6, abs=1e-9)
    np.testing.assert_allclose(gs.project(T[0], 0.6, axis=1), gs.project(T[0].T.copy(), 0.6, axis=0).T)


def test_already_sparse_returned_unchanged_with_signs():
    M = np.array([[0.0, -3.0], [-2.0, 0.0], [0.0, 0.1]])
    out, info = gs.project(M, 0.5, return_info=True)
    assert info.already_sparse
    np.testing.assert_array_equal(out, M)
    assert out is not M


def test_list_keeps_types_dtypes_and_inputs_untouched():
    rng = np.random.default_rng(0)
    vecs = [rng.normal(size=5).astype(np.float32), rng.normal(size=9)]
    copies = [v.copy() for v in vecs]
    out = gs.project(vecs, 0.7)
    assert [o.dtype for o in out] == [np.float32, np.float64] and [o.shape for o in out] == [(5,), (9,)]
    for v, c in zip(vecs, copies):
        np.testing.assert_array_equal(v, c)
    tv = [torch.tensor(v) for v in copies]
    tout = gs.project(tv, 0.7)
    assert all(isinstance(t, torch.Tensor) for t in tout) and tout[0].dtype == torch.float32
    for t, c in zip(tv, copies):
        np.testing.assert_array_equal(t.numpy(), c)


@pytest.mark.parametrize("engine", ENGINES)
def test_list_of_blocks_is_one_ragged_group(engine):
    """[M1, M2] with axis=1 is the group of all their rows (no Python lists of rows needed)."""
    rng = np.random.default_rng(4)
    blocks = [rng.normal(size=(5, 7)), rng.normal(size=(3, 2, 4)), rng.normal(size=6)]
    out = gs.project(blocks, 0.75, axis=-1, engine=engine)
    rows = list(blocks[0]) + list(blocks[1].reshape(-1, 4)) + [blocks[2]]
    ref = gs.project(rows, 0.75, engine=engine)
    assert [o.shape for o in out] == [b.shape for b in blocks]
    flat = list(out[0]) + list(out[1].reshape(-1, 4)) + [out[2]]
    for a, b in zip(flat, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    cols = gs.project([blocks[0]], 0.75, axis=0)[0]
    np.testing.assert_allclose(cols, gs.project(blocks[0], 0.75, axis=0))


def test_inplace_keeps_identity():
    p = torch.nn.Parameter(torch.randn(8, 16))
    before = p.detach().clone()
    ref = gs.project(before, 0.8, axis=1)
    same = p
    gs.project_(p, 0.8, axis=1)
    assert same is p and p.requires_grad
    torch.testing.assert_close(p.detach(), ref)
    arr = np.random.default_rng(0).normal(size=(5, 4))
    expect = gs.project(arr, 0.5)
    gs.project_(arr, 0.5)
    np.testing.assert_array_equal(arr, expect)


def test_half_precision_and_tensor_grad_input():
    x = torch.randn(20, 6, dtype=torch.bfloat16, requires_grad=True)
    out = gs.project(x, 0.7)
    assert out.dtype == torch.bfloat16 and not out.requires_grad


def test_max_iter_warns_and_stays_feasible():
    M = np.random.default_rng(0).normal(size=(50, 10))
    with pytest.warns(ProjectionWarning):
        out, info = gs.project(M, 0.8, max_iter=1, return_info=True)
    assert not info.converged and gs.hoyer_sparsity(out, axis=0).mean() >= 0.8 - 1e-12


@CUDA
def test_cuda_matches_cpu():
    M = torch.randn(300, 50, dtype=torch.float64)
    cpu = gs.project(M, 0.8)
    gpu, info = gs.project(M.cuda(), 0.8, return_info=True)
    assert gpu.device.type == "cuda" and info.engine == "torch"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-7, atol=1e-10)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad, err, match", [
    (dict(sparsity=1.5), ValueError, "sparsity: got 1.5"),
    (dict(sparsity=float("nan")), ValueError, "sparsity"),
    (dict(sparsity="0.5"), TypeError, "sparsity"),
    (dict(axis=3), ValueError, "axis: got 3"),
    (dict(engine="cuda"), ValueError, "engine: got 'cuda'"),
    (dict(tol=0.0), ValueError, "tol"),
    (dict(max_iter=0), ValueError, "max_iter"),
    (dict(weights=np.ones((2, 2))), ValueError, "weights: got shape"),
    (dict(weights=-np.ones((4, 3))), ValueError, "strictly positive"),
])
def test_bad_options(bad, err, match):
    kwargs = dict(sparsity=0.5)
    kwargs.update(bad)
    s = kwargs.pop("sparsity")
    with pytest.raises(err, match=match):
        gs.project(np.ones((4, 3)) + np.arange(3), s, **kwargs)


@pytest.mark.parametrize("vectors, err, match", [
    (np.array([[1.0, np.nan], [2.0, 3.0]]), ValueError, "NaN or Inf"),
    (np.array([[1.0, np.inf], [2.0, 3.0]]), ValueError, "NaN or Inf"),
    (np.array([[1, 2], [3, 4]]), TypeError, "floating dtype"),
    (np.array(["a", "b"]), TypeError, "floating dtype"),
    (np.ones((1, 5)), ValueError, "length >= 2"),
    (np.ones((0, 5)), ValueError, "length"),
    ([], ValueError, "empty"),
    ([np.ones(3), np.ones(1)], ValueError, "vector 1"),
    ([np.ones(3), torch.ones(3)], TypeError, "mix"),
    ([np.ones(3), np.float64(2.0)], TypeError, "expected a NumPy array"),
    ("abc", TypeError, "expected a NumPy array"),
])
def test_bad_vectors(vectors, err, match):
    with pytest.raises(err, match=match):
        gs.project(vectors, 0.5)


def test_nan_check_leaves_input_alone():
    M = np.array([[1.0, np.nan], [2.0, 3.0]])
    with pytest.raises(ValueError):
        gs.project(M, 0.5, engine="torch")
    assert np.isnan(M[0, 1])


def test_project_each_is_not_touched_by_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gs.project(np.random.default_rng(0).normal(size=(30, 5)), 0.9)


@pytest.mark.parametrize("seed", range(4))
def test_compiled_small_path_equals_general_solver(seed, monkeypatch):
    import groupsparse.projection._small as small

    rng = np.random.default_rng(seed)
    vecs = [rng.normal(size=n) for n in rng.integers(2, 50, size=12)]
    s = float(rng.uniform(0.1, 0.95))
    fast, fi = gs.project(vecs, s, return_info=True)
    monkeypatch.setattr(small, "SMALL_MAX_ENTRIES", -1)
    slow, si = gs.project(vecs, s, return_info=True)
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert fi.evaluations == si.evaluations and abs(fi.mu - si.mu) <= 1e-12 * si.mu


@pytest.mark.parametrize("engine", ENGINES)
def test_identical_tied_rows_jump_only_as_needed(engine):
    """Four identical constant rows at s = 0.6: two go one-hot, the third takes sparsity 0.4, the last stays dense:
    exactly 0.6 on average (the optimum: every split of the tied face that meets s has the same objective)."""
    out, info = gs.project(np.ones((4, 6)), 0.6, axis=1, engine=engine, return_info=True)
    assert info.discontinuity and info.n_jumped == 2 and info.n_partial == 1
    sp = gs.hoyer_sparsity(out, axis=1)
    np.testing.assert_allclose(sp, [1, 1, 0.4, 0], atol=1e-9)
    assert info.sparsity == pytest.approx(0.6, abs=1e-12) and 0.6 <= sp.mean() <= 0.6 + 1e-12


@pytest.mark.parametrize("engine", ENGINES)
def test_project_groups_equals_one_call_per_group(engine):
    rng = np.random.default_rng(7)
    groups = [rng.normal(size=(20, 30)), [rng.normal(size=5), rng.normal(size=(3, 8))], np.ones((4, 6)),
              rng.normal(size=(50, 9)).astype(np.float32), np.abs(rng.normal(size=(6, 6))) * np.eye(6)]
    targets = [0.8, 0.5, 0.6, 0.9, 0.3]
    res, infos = gs.project_groups(groups, targets, axis=1, engine=engine, return_info=True)
    for grp, r, s, info in zip(groups, res, targets, infos):
        ref, rinfo = gs.project(grp, s, axis=1, engine=engine, return_info=True)
        for a, b in zip(r if isinstance(r, list) else [r], ref if isinstance(ref, list) else [ref]):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
        assert info.sparsity == pytest.approx(rinfo.sparsity, abs=1e-9) and info.discontinuity == rinfo.discontinuity
    assert infos[2].discontinuity and infos[4].already_sparse
    with pytest.raises(ValueError, match="one per group"):
        gs.project_groups(groups, [0.5, 0.5], axis=1)


# ---------------------------------------------------------------- found in review


@pytest.mark.parametrize("engine", ENGINES)
def test_weighted_sparsity_one_keeps_largest_among_lightest(engine):
    x = np.array([[1.0, 5.0, 2.0], [3.0, -7.0, 0.5]])
    plain = gs.project(x, 1.0, axis=1, engine=engine)
    for scale in (1.0, 1e9):  # equal weights; huge weights once overflowed t * w
        np.testing.assert_array_equal(gs.project(x, 1.0, axis=1, weights=np.full_like(x, scale), engine=engine), plain)
    w = np.array([[1.0, 2.0, 1.0], [1.0, 1.0, 3.0]])
    out = gs.project(x, 1.0, axis=1, weights=w, engine=engine)
    np.testing.assert_array_equal(out, [[0, 0, 2.0], [0, -7.0, 0]])
    assert np.allclose(gs.hoyer_sparsity(out, axis=1, weights=w), 1.0)


@pytest.mark.parametrize("engine", ENGINES)
def test_read_only_inputs(engine):
    x = np.random.default_rng(0).random((6, 8))
    w = np.ones_like(x) + 1
    x.setflags(write=False)
    w.setflags(write=False)
    a = gs.project(x, 0.7, axis=1, weights=w, engine=engine)
    b = gs.project_each(x, 0.7, axis=1, weights=w, engine=engine)
    assert gs.hoyer_sparsity(a, axis=1, weights=w).mean() == pytest.approx(0.7, abs=1e-9)
    np.testing.assert_allclose(gs.hoyer_sparsity(b, axis=1, weights=w), 0.7, atol=1e-9)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_results_stay_feasible(engine, dtype):
    for seed in range(8):
        x = torch.from_numpy(np.random.default_rng(seed).normal(size=(50, 20))).to(dtype)
        out = gs.project(x, 0.6, axis=1, engine=engine)
        assert out.dtype == dtype
        sp = gs.hoyer_sparsity(out.double(), axis=1).mean().item()
        assert 0.6 <= sp <= 0.6 + (2e-3 if dtype == torch.bfloat16 else 2e-4)


def test_long_double_input():
    x = np.random.default_rng(0).random((4, 6)).astype(np.longdouble)
    out = gs.project(x, 0.5)
    assert out.dtype == np.longdouble
    np.testing.assert_allclose(out.astype(np.float64), gs.project(x.astype(np.float64), 0.5))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("scale", [1e154, 1e300, 1e-160, 1e-300])
def test_extreme_scales_are_rescaled_exactly(engine, scale):
    """Squares over/underflow float64 beyond ~1e154 / below ~1e-154: solved on a power-of-two rescaled copy."""
    x = np.array([[1.0, 2, 3, 0.5], [2, -1, 0.3, 0.2]])
    out, info = gs.project(x * scale, 0.6, axis=1, engine=engine, return_info=True)
    np.testing.assert_allclose(out, gs.project(x, 0.6, axis=1) * scale, rtol=1e-12, atol=0)
    assert info.sparsity == pytest.approx(0.6, abs=1e-9)
    np.testing.assert_allclose(gs.project_each(x * scale, 0.6, axis=1, engine=engine),
                               gs.project_each(x, 0.6, axis=1) * scale, rtol=1e-12, atol=0)
    np.testing.assert_allclose(gs.hoyer_sparsity(x * scale, axis=1), gs.hoyer_sparsity(x, axis=1), rtol=1e-12)
