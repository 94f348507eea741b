"""Sparse NMF on real-world data shapes: missing values, scipy.sparse, torch tensors, KL divergence, partial_fit,
held-out error, and the errors bad inputs give."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning

import groupsparse as gs
from groupsparse.nmf import SparseNMF, heldout_error, sparse_nmf

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def low_rank():
    rng = np.random.default_rng(0)
    W = np.maximum(0.0, rng.standard_normal((40, 4)))
    H = rng.random((4, 30))
    X = W @ H
    M = rng.random(X.shape) > 0.3
    M[:, 0] = True  # no row or column fully hidden
    M[0, :] = True
    return X, M


def _sp_rows(H):
    return float(np.mean(gs.hoyer_sparsity(np.asarray(H, dtype=np.float64), axis=1)))


SETTINGS = [
    dict(),
    dict(sparsity_H=0.5),
    dict(sparsity_W=0.4, solver="fgm"),
    dict(sparsity_H=0.5, projection="column"),
    dict(sparsity_H=0.5, projection="l1"),
    dict(sparsity_H=0.5, beta_loss="kullback-leibler"),
    dict(sparsity_W=0.4, beta_loss="kullback-leibler", projection="column"),
]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_masked_fit_ignores_hidden_values(low_rank, kw):
    X, M = low_rank
    X2 = X.copy()
    X2[~M] = 1e6  # anything at hidden entries, even huge values
    X3 = X.copy()
    X3[~M] = np.nan
    a = sparse_nmf(X, 4, mask=M, max_iter=25, tol=0, random_state=0, **kw)
    b = sparse_nmf(X2, 4, mask=M, max_iter=25, tol=0, random_state=0, **kw)
    c = sparse_nmf(X3, 4, max_iter=25, tol=0, random_state=0, **kw)  # NaN = missing, same fit
    for other in (b, c):
        np.testing.assert_array_equal(a[0], other[0])
        np.testing.assert_array_equal(a[1], other[1])
    for key, s in (("sparsity_H", a[2].sparsity_H), ("sparsity_W", a[2].sparsity_W)):
        if key in kw and kw.get("projection") != "l1":
            assert s >= kw[key] - 1e-9


def test_masked_frobenius_monotone_and_recovers(low_rank):
    X, M = low_rank
    W, H, info = sparse_nmf(X, 4, mask=M, max_iter=300, tol=0, random_state=0)
    assert np.all(np.diff(info.history) <= 1e-12)  # EM majorization + exact HALS: never increases
    hidden = np.sqrt(np.mean((X - W @ H)[~M] ** 2)) / np.sqrt(np.mean(X**2))
    assert hidden < 0.05  # an exact low-rank matrix is completed from 70 % of its entries


def test_transform_rows_with_nan_and_score(low_rank):
    X, M = low_rank
    est = SparseNMF(4, sparsity_H=0.4, max_iter=100, tol=0, random_state=0).fit(X)
    Xn = X.copy()
    Xn[~M] = np.nan
    W = est.transform(Xn)
    W2 = est.transform(X, mask=M)
    np.testing.assert_array_equal(W, W2)
    assert est.score(X) <= 0 and est.score(Xn) == pytest.approx(est.score(X, mask=M))
    errs = heldout_error(SparseNMF(4, max_iter=60, tol=0, random_state=0), X, fraction=0.1, n_splits=2,
                         random_state=0)
    assert errs.shape == (2,) and np.all(errs < 0.1 * X.mean())


def test_sparse_and_dense_agree():
    Xs = sp.random(50, 35, density=0.25, random_state=0, format="csr")
    for kw in (dict(sparsity_H=0.5), dict(sparsity_W=0.4, solver="fgm"), dict(beta_loss="kullback-leibler"),
               dict(beta_loss="kullback-leibler", sparsity_H=0.6)):
        a = sparse_nmf(Xs, 4, max_iter=20, tol=0, random_state=0, **kw)
        b = sparse_nmf(Xs.toarray(), 4, max_iter=20, tol=0, random_state=0, **kw)
        c = sparse_nmf(Xs.tocsc(), 4, max_iter=20, tol=0, random_state=0, **kw)
        np.testing.assert_allclose(a[1], b[1], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(c[1], b[1], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(a[2].history, b[2].history, rtol=1e-8)
    for loss in ("frobenius", "kullback-leibler"):
        est = SparseNMF(4, max_iter=10, tol=0, random_state=0, beta_loss=loss).fit(Xs)
        assert est.transform(Xs).shape == (50, 4)
        assert est.score(Xs) == pytest.approx(est.score(Xs.toarray()), rel=1e-9)  # sparse score stays sparse


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kw", [dict(), dict(sparsity_H=0.5), dict(sparsity_W=0.4, solver="fgm"),
                                dict(sparsity_H=0.5, beta_loss="kullback-leibler")],
                         ids=["plain", "gsp_H", "gsp_W_fgm", "kl_gsp"])
def test_torch_matches_numpy(low_rank, dtype, kw):
    X, M = low_rank
    Xt = torch.tensor(X, dtype=getattr(torch, dtype))
    # few iterations: the torch engine's projection costs milliseconds per call on a CPU
    W_t, H_t, info_t = sparse_nmf(Xt, 4, max_iter=3, tol=0, random_state=0, **kw)
    W_n, H_n, info_n = sparse_nmf(X, 4, max_iter=3, tol=0, random_state=0, **kw)
    assert isinstance(H_t, torch.Tensor) and H_t.dtype == Xt.dtype and H_t.device == Xt.device
    # float32: Armijo's accept/reject decisions (KL) can flip at single precision, so the paths drift apart a bit
    tol = 1e-9 if dtype == "float64" else (2e-2 if "beta_loss" in kw else 2e-3)
    np.testing.assert_allclose(H_t.double().numpy(), H_n, atol=tol * np.abs(H_n).max())
    np.testing.assert_allclose(info_t.history, info_n.history, rtol=tol)
    if "sparsity_H" in kw:
        assert _sp_rows(H_t) >= kw["sparsity_H"] - 1e-5
    # masked torch fits too, and the estimator keeps tensors
    est = SparseNMF(4, max_iter=2, tol=0, random_state=0, **kw)
    W = est.fit_transform(Xt, mask=torch.tensor(M))
    assert isinstance(W, torch.Tensor) and isinstance(est.components_, torch.Tensor)
    assert isinstance(est.transform(Xt), torch.Tensor)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (CPU-only machine)")
def test_torch_cuda_runs(low_rank):
    X, _ = low_rank
    Xt = torch.tensor(X, device="cuda")
    W, H, _ = sparse_nmf(Xt, 4, sparsity_H=0.5, max_iter=10, tol=0, random_state=0)
    _, H_n, _ = sparse_nmf(X, 4, sparsity_H=0.5, max_iter=10, tol=0, random_state=0)
    assert H.is_cuda
    np.testing.assert_allclose(H.cpu().numpy(), H_n, atol=1e-8 * np.abs(H_n).max())


@pytest.mark.parametrize("kw", [dict(sparsity_H=0.6), dict(sparsity_W=0.5), dict(sparsity_H=0.5, sparsity_W=0.3),
                                dict()])
def test_kl_monotone_and_target(low_rank, kw):
    X, _ = low_rank
    W, H, info = sparse_nmf(X, 4, beta_loss="kullback-leibler", max_iter=80, tol=0, random_state=1, **kw)
    h = info.history
    assert np.all(np.diff(h) <= 1e-12 * h[0])  # MU and Armijo-accepted steps never increase D
    assert h[-1] < 0.5 * h[0]
    if "sparsity_H" in kw:
        assert _sp_rows(H) >= kw["sparsity_H"] - 1e-9
    if "sparsity_W" in kw:
        assert _sp_rows(W.T) >= kw["sparsity_W"] - 1e-9
    # reconstruction_err is sqrt(2 D) at the returned factors, as scikit-learn reports it
    V = W @ H + 1e-10 * X.mean()
    D = np.sum(np.where(X > 0, X * np.log(np.where(X > 0, X, 1) / V), 0) - X + V)
    assert info.reconstruction_err == pytest.approx(np.sqrt(2 * D), rel=1e-6)


def test_partial_fit_approaches_batch(low_rank):
    X, _ = low_rank
    batch = SparseNMF(4, sparsity_H=0.5, max_iter=200, tol=0, random_state=0).fit(X)
    est = SparseNMF(4, sparsity_H=0.5, max_iter=50, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(15):
            for rows in np.array_split(np.arange(X.shape[0]), 4):
                est.partial_fit(X[rows])
                assert est.sparsity_H_ >= 0.5 - 1e-9  # the target holds after every block
        err = np.linalg.norm(X - est.transform(X) @ est.components_)
    assert est.n_steps_ == 60
    assert err <= 1.3 * batch.reconstruction_err_ + 1e-3 * np.linalg.norm(X)


def test_partial_fit_after_fit_goes_on_from_the_fit(low_rank):
    """As scikit-learn's MiniBatchNMF: a block after ``fit`` updates the fitted components, weighed against the
    whole fit (it used to restart from a random H: the fit was lost); ``fit`` resets the block count; the number
    of components cannot change midway; blocks may alternate NumPy and torch."""
    X, _ = low_rank
    est = SparseNMF(4, sparsity_H=0.5, max_iter=100, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X)
        H, score = est.components_.copy(), est.score(X)
        est.partial_fit(X[:8])
    assert est.n_steps_ == 1
    assert est.score(X) >= score - 0.02 * abs(score)
    assert np.abs(est.components_ - H).max() <= 0.25 * np.abs(H).max()
    est.fit(X)
    assert not hasattr(est, "n_steps_")
    with pytest.raises(ValueError, match="H: got starting components for a fitted estimator"):
        est.partial_fit(X[:8], H=est.components_)  # (it was ignored in silence)
    with pytest.raises(ValueError, match="n_components: got 5, expected 4"):
        est.set_params(n_components=5).partial_fit(X[:8])
    torch = pytest.importorskip("torch")
    est = SparseNMF(3, random_state=0, max_iter=20)
    est.partial_fit(torch.from_numpy(X[:10]))
    est.partial_fit(X[10:20])
    est.partial_fit(torch.from_numpy(X[20:30]))
    assert est.n_steps_ == 3 and torch.is_tensor(est.components_)


def test_bad_inputs(low_rank):
    X, M = low_rank
    with pytest.raises(ValueError, match=r"Negative values .*got X\[1, 2\]"):
        Xn = X.copy()
        Xn[1, 2] = -1
        SparseNMF(2).fit(Xn)
    Xi = X.copy()
    Xi[3, 4] = np.inf
    with pytest.raises(ValueError, match=r"infinity at observed entry \[3, 4\]"):
        SparseNMF(2).fit(Xi)
    Mi = M.copy()
    Mi[3, 4] = False
    SparseNMF(2, max_iter=2, tol=0).fit(Xi, mask=Mi)  # infinity at a hidden entry is fine
    with pytest.raises(ValueError, match=r"mask: got shape \(40, 29\), expected X's shape \(40, 30\)"):
        SparseNMF(2).fit(X, mask=M[:, 1:])
    with pytest.raises(TypeError, match="mask: got dtype float64, expected bool"):
        SparseNMF(2).fit(X, mask=M.astype(float))
    Mr = M.copy()
    Mr[5] = False
    with pytest.raises(ValueError, match="row 5 with no observed entry"):
        SparseNMF(2).fit(X, mask=Mr)
    with pytest.raises(ValueError, match="mask: got a mask with a scipy.sparse X"):
        SparseNMF(2).fit(sp.csr_matrix(X), mask=M)
    with pytest.raises(ValueError, match="beta_loss: got 'itakura-saito'"):
        SparseNMF(2, beta_loss="itakura-saito").fit(X)
    with pytest.raises(ValueError, match="projection: got 'l1' with beta_loss='kullback-leibler'"):
        SparseNMF(2, beta_loss="kullback-leibler", sparsity_H=0.5, projection="l1").fit(X)
    with pytest.raises(ValueError, match="forget_factor: got 0"):
        SparseNMF(2, forget_factor=0).partial_fit(X)
    with pytest.raises(ValueError, match="with partial_fit, expected 'frobenius'"):
        SparseNMF(2, beta_loss="kullback-leibler").partial_fit(X)
    with pytest.raises(TypeError, match="expected torch.float32 or torch.float64"):
        SparseNMF(2).fit(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="fraction: got 1.5"):
        heldout_error(SparseNMF(2), X, fraction=1.5)


def test_cached_kernels_call_only_their_own_module():
    """Numba's disk cache only watches the file of a cached function: every compiled callee of the cached
    kernels must live in _fastproj.py, or a cached copy could run a stale callee."""
    from numba.core.registry import CPUDispatcher

    from groupsparse.nmf import _fastproj

    kernels = {k: v for k, v in vars(_fastproj).items() if isinstance(v, CPUDispatcher)}
    assert {"run_dense", "fgm_rows", "gsp_rows_warm", "_hals_rows", "dot_at"} <= set(kernels)
    for name, disp in kernels.items():
        for ref in disp.py_func.__code__.co_names:
            target = disp.py_func.__globals__.get(ref)
            if isinstance(target, CPUDispatcher):
                assert target.py_func.__module__ == _fastproj.__name__, (name, ref)


def test_no_writable_cache_falls_back(monkeypatch):
    import numba as nb

    from groupsparse.nmf import _fastproj

    real = nb.njit

    def njit(*args, cache=False, **kw):
        if cache:
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x.py'")
        return real(*args, **kw)

    monkeypatch.setattr(_fastproj.nb, "njit", njit)
    with pytest.warns(RuntimeWarning, match="without a disk cache"):
        f = _fastproj._jit()(lambda x: x + 1)
    assert f(1) == 2


def test_warm_started_gsp_matches_cold():
    """The compiled GSP started from a previous root (NMF's repeated projections) returns the same projection."""
    from groupsparse.nmf._fastproj import gsp_rows

    rng = np.random.default_rng(4)
    for _ in range(30):
        C = np.maximum(0.0, rng.standard_normal((int(rng.integers(2, 12)), int(rng.integers(2, 200)))))
        s = float(rng.uniform(0.3, 0.95))
        cold = gsp_rows(C, s)
        ref = gs.project(C, s, axis=1)
        for mu0 in (1e-6, 0.05, 0.5, 5.0):  # below, near and above the root, and beyond the bracket
            warm = gsp_rows(C, s, mu0=mu0)
            np.testing.assert_allclose(warm, cold, rtol=1e-9, atol=1e-12 * C.max())
        # the core solver takes Halley-corrected steps, NMF's compiled loop plain Newton ones: two points of the
        # same 1e-12 sparsity band (measured: 2 of 1670 entries 8.2e-9 apart), so both feasible, entries close
        sps = [np.mean([gs.hoyer_sparsity(row) for row in z]) for z in (cold, ref)]
        assert min(sps) >= s - 1e-12 and abs(sps[0] - sps[1]) <= 2e-12, (sps, s)
        np.testing.assert_allclose(cold, ref, rtol=1e-7, atol=1e-12 * C.max())


def test_inverse_transform_across_array_kinds(low_rank):
    """A model fitted on tensors maps NumPy W back in NumPy and the reverse; a 1-D W is a ValueError naming the
    shape (an IndexError and a raw TypeError before)."""
    torch = pytest.importorskip("torch")
    X, _ = low_rank
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mt = SparseNMF(3, random_state=0, max_iter=20).fit(torch.from_numpy(X))
        mn = SparseNMF(3, random_state=0, max_iter=20).fit(X)
    W = np.ones((2, 3))
    for m in (mt, mn):
        H = m.components_.numpy() if torch.is_tensor(m.components_) else m.components_
        got = m.inverse_transform(W)
        assert isinstance(got, np.ndarray) and np.allclose(got, W @ H)
        got = m.inverse_transform(torch.from_numpy(W))
        assert torch.is_tensor(got) and np.allclose(got.numpy(), W @ H)
        with pytest.raises(ValueError, match=r"X: got shape \(3,\), expected \(n_samples, 3\)"):
            m.inverse_transform(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"got X\[1, 2\] = -1.0, expected"):  # a plain number, not np.float64(-1.0)
        Xn = X.copy()
        Xn[1, 2] = -1
        SparseNMF(2).fit(Xn)
