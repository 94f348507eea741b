"""Sparse NMF: estimator contract, function twin, solvers, sparsity targets, recovery, data loading."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

import groupsparse as gs
from groupsparse.nmf import SparseNMF, sparse_nmf
from groupsparse.nmf._fastproj import gsp_rows
from groupsparse.nmf.experiments import load_matrix, min_matched_cosine

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _avg_sp_rows(A):
    return float(np.mean(gs.hoyer_sparsity(A, axis=1)))


def _avg_sp_cols(A):
    return float(np.mean(gs.hoyer_sparsity(A, axis=0)))


def _synthetic(seed=0, m=40, n=30, r=4):
    rng = np.random.default_rng(seed)
    W = np.maximum(0.0, rng.standard_normal((m, r)))
    H = rng.random((r, n))
    return W, H, W @ H


@pytest.fixture(scope="module")
def X_small():
    return np.random.default_rng(3).random((30, 20))


def test_check_estimator():
    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        results = check_estimator(SparseNMF(max_iter=100), on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert not failed


def test_function_and_estimator_agree(X_small):
    kw = dict(sparsity_H=0.5, max_iter=40, tol=0, random_state=7)
    W1 = SparseNMF(5, **kw).fit_transform(X_small)
    est = SparseNMF(5, **kw).fit(X_small)
    W2, H2, info = sparse_nmf(X_small, 5, **kw)
    np.testing.assert_array_equal(W1, W2)
    np.testing.assert_array_equal(est.components_, H2)
    assert est.n_iter_ == info.n_iter == 40
    np.testing.assert_array_equal(est.history_, info.history)
    assert est.reconstruction_err_ == pytest.approx(np.linalg.norm(X_small - W2 @ H2), rel=1e-9)


def test_determinism_and_seed_matters(X_small):
    a = SparseNMF(4, sparsity_W=0.4, max_iter=30, tol=0, random_state=1).fit(X_small).components_
    b = SparseNMF(4, sparsity_W=0.4, max_iter=30, tol=0, random_state=1).fit(X_small).components_
    c = SparseNMF(4, sparsity_W=0.4, max_iter=30, tol=0, random_state=2).fit(X_small).components_
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_tol_zero_runs_max_iter_and_warning(X_small):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est = SparseNMF(3, max_iter=17, tol=0, random_state=0).fit(X_small)
    assert est.n_iter_ == 17 and est.history_.shape == (18,)
    with pytest.warns(ConvergenceWarning, match="maximum number of iterations"):
        SparseNMF(3, max_iter=2, tol=1e-12, random_state=0).fit(X_small)
    # A loose tolerance stops early, silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est = SparseNMF(3, max_iter=500, tol=1e-2, random_state=0).fit(X_small)
    assert est.n_iter_ < 500


def test_error_history_matches_products(X_small):
    """The cached-product error equals the directly computed one at the returned iterate."""
    W, H, info = sparse_nmf(X_small, 4, sparsity_H=0.6, max_iter=25, tol=0, random_state=0)
    direct = np.linalg.norm(X_small - W @ H) / np.linalg.norm(X_small)
    assert info.history[info.best_iter] == pytest.approx(direct, rel=1e-8)
    assert info.history[info.best_iter] == pytest.approx(info.history.min())


def test_synthetic_recovery_small():
    """A reduced version of the paper's synthetic problem: GSP recovers the sparse factor."""
    Wp, Hp, Xp = _synthetic(seed=0, m=60, n=60, r=5)
    s = _avg_sp_cols(Wp)
    W, H, info = sparse_nmf(Xp.T, 5, sparsity_H=s, max_iter=300, tol=0, random_state=0)
    assert info.history[-1] < 1e-4
    assert _avg_sp_rows(H) >= s - 1e-9
    assert min_matched_cosine(Wp, H.T) > 0.999
    # The column-wise variant has to force every column to s though the true columns differ: it stalls.
    _, _, info_c = sparse_nmf(Xp.T, 5, sparsity_H=s, projection="column", max_iter=60, tol=0, random_state=0)
    assert info_c.history[-1] > 10 * info.history[-1]


@pytest.mark.parametrize("projection", ["group", "column"])
@pytest.mark.parametrize("which", ["H", "W", "both"])
def test_sparsity_reached(X_small, projection, which):
    kw = {}
    if which in ("H", "both"):
        kw["sparsity_H"] = 0.7
    if which in ("W", "both"):
        kw["sparsity_W"] = 0.6
    est = SparseNMF(4, projection=projection, max_iter=30, tol=0, random_state=0, **kw)
    W = est.fit_transform(X_small)
    H = est.components_
    if "sparsity_H" in kw:
        sp = gs.hoyer_sparsity(H, axis=1)
        assert np.mean(sp) >= 0.7 - 1e-9
        assert est.sparsity_H_ == pytest.approx(np.mean(sp), abs=1e-12)
        if projection == "column":
            np.testing.assert_allclose(sp, 0.7, atol=1e-6)
    if "sparsity_W" in kw:
        sp = gs.hoyer_sparsity(W, axis=0)
        assert np.mean(sp) >= 0.6 - 1e-9
        assert est.sparsity_W_ == pytest.approx(np.mean(sp), abs=1e-12)
    assert np.all(W >= 0) and np.all(H >= 0)


def test_l1_steers_toward_target():
    Wp, Hp, Xp = _synthetic(seed=1, m=50, n=50, r=4)
    s = 0.7
    _, H, info = sparse_nmf(Xp.T, 4, sparsity_H=s, projection="l1", max_iter=300, tol=0, random_state=0)
    _, H0, _ = sparse_nmf(Xp.T, 4, max_iter=300, tol=0, random_state=0)
    assert abs(_avg_sp_rows(H) - s) < abs(_avg_sp_rows(H0) - s)


@pytest.mark.parametrize("solver", ["hals", "fgm"])
def test_unconstrained_solvers_decrease_error(solver):
    _, _, X = _synthetic(seed=2)
    _, _, info = sparse_nmf(X, 4, solver=solver, max_iter=50, tol=0, random_state=0)
    h = info.history
    assert h[-1] < 0.1 * h[1]
    assert np.all(np.diff(h) <= 1e-12 * h[0])  # exact NNLS updates never increase the error


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtypes(X_small, dtype):
    X = X_small.astype(dtype)
    est = SparseNMF(3, sparsity_H=0.5, max_iter=20, tol=0, random_state=0)
    W = est.fit_transform(X)
    assert W.dtype == dtype and est.components_.dtype == dtype
    assert est.transform(X).dtype == dtype
    assert est.inverse_transform(W).dtype == dtype
    assert _avg_sp_rows(est.components_.astype(np.float64)) >= 0.5 - 1e-6


def test_transform_and_inverse(X_small):
    est = SparseNMF(6, max_iter=300, tol=1e-10, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W = est.fit_transform(X_small)
        W2 = est.transform(X_small)
    # W from fit is optimal for H up to the convergence tolerance: transform (H fixed) finds nearly the same fit.
    e1 = np.linalg.norm(X_small - W @ est.components_)
    e2 = np.linalg.norm(X_small - W2 @ est.components_)
    assert e2 <= e1 * (1 + 1e-3)
    np.testing.assert_allclose(est.inverse_transform(W), W @ est.components_)
    with pytest.raises(ValueError, match="n_components columns"):
        est.inverse_transform(W[:, :2])


def test_custom_init_and_inputs_untouched(X_small):
    rng = np.random.default_rng(0)
    W0, H0 = rng.random((30, 4)), rng.random((4, 20))
    X = X_small.copy()
    copies = (X.copy(), W0.copy(), H0.copy())
    a = SparseNMF(4, init="custom", sparsity_H=0.6, max_iter=10, tol=0).fit(X, W=W0, H=H0)
    b = SparseNMF(4, sparsity_H=0.6, max_iter=10, tol=0).fit(X, W=W0, H=H0)  # init=None + factors = custom
    np.testing.assert_array_equal(a.components_, b.components_)
    for before, after in zip(copies, (X, W0, H0)):
        np.testing.assert_array_equal(before, after)
    with pytest.raises(ValueError, match=r"got shape \(4, 21\), expected \(4, 20\)"):
        SparseNMF(4, init="custom").fit(X, W=W0, H=rng.random((4, 21)))
    with pytest.raises(ValueError, match="got None with init='custom'"):
        SparseNMF(4, init="custom").fit(X, W=W0)
    with pytest.raises(ValueError, match="init='random'"):
        SparseNMF(4, init="random").fit(X, W=W0, H=H0)
    with pytest.raises(ValueError, match="Negative"):
        SparseNMF(4, init="custom").fit(X, W=-W0, H=H0)


@pytest.mark.parametrize(
    "params, exc, match",
    [
        (dict(sparsity_H=1.5), ValueError, r"sparsity_H: got 1.5, expected a value in \[0, 1\]"),
        (dict(sparsity_W="a"), TypeError, "sparsity_W: got 'a', expected a real number"),
        (dict(projection="row"), ValueError, "projection: got 'row', expected one of"),
        (dict(init="nndsvd"), ValueError, "init: got 'nndsvd'"),
        (dict(max_iter=0), ValueError, "max_iter: got 0, expected an int >= 1"),
        (dict(max_iter=2.5), TypeError, "max_iter: got 2.5, expected an int"),
        (dict(tol=-1.0), ValueError, "tol: got -1.0"),
        (dict(n_components=0), ValueError, "n_components: got 0"),
        (dict(n_components=True), TypeError, "n_components: got True"),
        (dict(solver="mu"), ValueError, "solver: got 'mu'"),
        (dict(inner_ratio=1.0), ValueError, "inner_ratio: got 1.0"),
    ],
)
def test_bad_params(X_small, params, exc, match):
    est = SparseNMF(**{"n_components": 2, **params})
    with pytest.raises(exc, match=match):
        est.fit(X_small)


def test_bad_data():
    with pytest.raises(ValueError, match="Negative values"):
        SparseNMF(2).fit(np.array([[1.0, -1.0], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="row 0 with no observed entry"):
        SparseNMF(2).fit(np.array([[np.nan, np.nan], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="infinity"):
        sparse_nmf(np.array([[1.0, np.inf], [2.0, 3.0]]), 2)
    with pytest.raises(ValueError, match="n_features >= 2"):
        SparseNMF(1, sparsity_H=0.5).fit(np.ones((4, 1)))
    with pytest.raises(ValueError, match="n_samples >= 2"):
        SparseNMF(1, sparsity_W=0.5).fit(np.ones((1, 4)))
    # An all-zero X is factorized exactly by zeros.
    W, H, info = sparse_nmf(np.zeros((5, 4)), 2)
    assert not W.any() and not H.any() and info.reconstruction_err == 0.0


def test_compiled_gsp_matches_core():
    rng = np.random.default_rng(5)
    for trial in range(40):
        r, p = int(rng.integers(1, 12)), int(rng.integers(2, 80))
        C = np.maximum(0.0, rng.standard_normal((r, p))) * rng.random((r, 1))
        if trial % 4 == 0:
            C = rng.standard_normal((r, p))
        s = float(rng.random())
        fast = gsp_rows(C, s)
        core = gs.project(C, s, axis=1)
        assert fast is not None
        np.testing.assert_allclose(fast, core, rtol=1e-9, atol=1e-12 * np.abs(C).max())
    # Tied largest entries make the average jump: the compiled path defers to the core.
    C = np.ones((3, 5))
    assert gsp_rows(C, 0.9) is None


def test_tied_rows_fall_back_to_core():
    X = np.kron(np.eye(3), np.ones((4, 4)))  # blocks: tied entries everywhere
    W, H, info = sparse_nmf(X + 1e-3, 3, sparsity_H=0.9, max_iter=10, tol=0, random_state=0)
    assert info.projection_fallbacks > 0  # the path under test was taken
    assert _avg_sp_rows(H) >= 0.9 - 1e-9


def test_load_matrix_formats(tmp_path):
    X = np.random.default_rng(0).random((6, 5))
    np.save(tmp_path / "x.npy", X)
    np.savetxt(tmp_path / "x.csv", X, delimiter=",")
    from scipy.io import savemat

    savemat(tmp_path / "x.mat", {"X": X, "other": np.ones((2, 2))})
    for name in ("x.npy", "x.csv", "x.mat"):
        np.testing.assert_allclose(load_matrix(tmp_path / name), X)
    np.save(tmp_path / "neg.npy", -X)
    with pytest.raises(ValueError, match="non-negative"):
        load_matrix(tmp_path / "neg.npy")
    with pytest.raises(FileNotFoundError, match="CBCL.mat"):
        load_matrix(tmp_path / "missing.mat")


def test_cli_registered():
    from click.testing import CliRunner

    from groupsparse.cli import main

    res = CliRunner().invoke(main, ["nmf", "--help"])
    assert res.exit_code == 0 and "synthetic" in res.output and "cbcl" in res.output
    res = CliRunner().invoke(main, ["nmf", "cbcl", "--data", "/nonexistent/CBCL.mat"])
    assert res.exit_code != 0 and "CBCL.mat" in res.output


def test_cli_synthetic_tiny(tmp_path):
    from click.testing import CliRunner

    from groupsparse.cli import main

    res = CliRunner().invoke(main, ["nmf", "synthetic", "--trials", "1", "--iters", "8", "--out", str(tmp_path),
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    for f in ("table.csv", "history.csv", "trials.csv", "summary.json", "error.png"):
        assert (tmp_path / f).stat().st_size > 0


@pytest.mark.skipif(not (DATA / "CBCL.mat").exists(),
                    reason=f"CBCL data absent: put CBCL.mat (variable X, 361 x 2429) in {DATA}")
def test_cbcl_loads_and_fits_briefly():
    X = load_matrix(DATA / "CBCL.mat")
    assert X.shape == (361, 2429) and X.dtype == np.float64 and X.min() >= 0
    sub = X[:, :300].T  # samples x pixels
    est = SparseNMF(16, sparsity_H=0.7, max_iter=15, tol=0, random_state=0).fit(sub)
    assert est.sparsity_H_ >= 0.7 - 1e-9
    assert est.history_[-1] < est.history_[0]


def test_cbcl_pipeline_on_user_matrix(tmp_path):
    """The CBCL command on a user's own .npy file: tables, JSON and basis grids for 2x3 'images'."""
    from click.testing import CliRunner

    from groupsparse.cli import main

    X = np.random.default_rng(0).random((6, 40))  # 6 features (2x3 images) x 40 samples, columns are samples
    np.save(tmp_path / "mine.npy", X)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["nmf", "cbcl", "--data", str(tmp_path / "mine.npy"), "--out", str(out),
                                    "--rank", "4", "--iters", "5", "--sparsity", "0.6", "--image-shape", "2x3",
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert [r["method"].split()[0] for r in summary["results"]] == ["A-HALS", "GSP", "GSP"]
    assert summary["results"][2]["sparsity"] >= 0.6 - 1e-9
    assert (out / "basis_gsp_0.6.png").stat().st_size > 0
    res = CliRunner().invoke(main, ["nmf", "cbcl", "--data", str(tmp_path / "mine.npy"), "--out", str(out),
                                    "--image-shape", "5x5", "--rank", "2", "--iters", "2", "--no-progress"])
    assert res.exit_code != 0 and "expected a shape with 6 pixels" in res.output
    res = CliRunner().invoke(main, ["nmf", "cbcl", "--data", str(tmp_path / "mine.npy"), "--out", str(out),
                                    "--image-shape", "-2x-3", "--rank", "2", "--iters", "2", "--no-progress"])
    assert res.exit_code != 0 and "expected positive H and W" in res.output  # (-2 x -3 has 6 pixels too)
