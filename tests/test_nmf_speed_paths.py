"""The compiled NMF loop's fast paths (issue 13) against plain references: the Lipschitz bound, the fast gradient
in factored form with its warm-started piecewise-Newton GSP, and the whole loop (target met, deterministic)."""

import math

import numpy as np
import pytest

import groupsparse as gs
from groupsparse.nmf import sparse_nmf
from groupsparse.nmf._fastproj import _lipschitz, _piece_solve, _solve, fgm_rows
from groupsparse.nmf._solvers import Projector, fast_gradient, row_sparsity


def test_lipschitz_is_a_tight_upper_bound():
    rng = np.random.default_rng(0)
    v = np.ones(10)
    for trial in range(40):
        W = np.maximum(0.0, rng.standard_normal((int(rng.integers(2, 60)), 10))) * rng.random(10)
        A = W.T @ W
        lam = np.linalg.eigvalsh(A)[-1]
        L = _lipschitz(A, v)  # v carries over: the warm start of the next call
        assert lam <= L <= lam * (1 + 1e-9), trial
    # Zero row (a dead component), a negative entry, the zero matrix: still a bound (eigvalsh decides).
    A = np.diag([2.0, 0.0, 1.0])
    assert _lipschitz(A, np.ones(3)) == pytest.approx(2.0, rel=1e-12)
    A = np.array([[2.0, -1.0], [-1.0, 2.0]])
    assert _lipschitz(A, np.ones(2)) == pytest.approx(3.0, rel=1e-12)
    assert _lipschitz(np.zeros((3, 3)), np.ones(3)) == 0.0


def _solve_fgm_style(V, s, mu0):
    """The in-loop solve: sums at 0 (no counts) and at the warm start, as the fused gradient pass leaves them."""
    r, p = V.shape
    t = mu0 / (math.sqrt(p) - 1.0)
    sums = np.stack([np.full(r, np.nan), V.sum(1), (V * V).sum(1)])
    u = np.maximum(V - t, 0.0)
    warm = np.stack([(V > t).sum(1).astype(float), u.sum(1), (u * u).sum(1)])
    U, sc = np.empty_like(V), np.empty(r)
    status, mu = _solve(V, s, mu0, 1e-12, 100, U, sc, sums, warm, 30)
    return status, mu, U * sc[:, None]


def test_piecewise_newton_gsp_lands_in_the_band():
    """Warm-started from anywhere (below, near, above the root, beyond the bracket), the in-loop solve returns a
    projection whose average sparsity is in [s, s + tol] (the target met, as the core's) and that agrees with
    the core's to the band's precision."""
    rng = np.random.default_rng(1)
    for trial in range(30):
        V = np.maximum(0.0, rng.standard_normal((int(rng.integers(2, 12)), int(rng.integers(2, 200)))))
        s = float(rng.uniform(0.3, 0.95))
        ref = gs.project(V, s, axis=1)
        for mu0 in (0.0, 1e-6, 0.05, 0.5, 5.0):
            status, mu, out = _solve_fgm_style(V, s, mu0)
            if status == 0:
                assert row_sparsity(V).mean() >= s - 1e-12
                continue
            assert status == 1, (trial, mu0)
            sp = row_sparsity(out).mean()
            assert s - 1e-13 <= sp <= s + 1.1e-12, (trial, mu0, sp - s)
            np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-9 * V.max())


def test_piece_solve_is_exact_when_no_entry_crossed():
    """The pass-free solve of the fast gradient: from the sums at a warm start near the root it returns t (or -1),
    and whenever the supports at t are those at the warm start (what the fast gradient checks by counting),
    sc (V - t)_+ is the projection: average sparsity in the band, equal to the core's."""
    rng = np.random.default_rng(3)
    hits = 0
    for trial in range(40):
        r, p = int(rng.integers(2, 12)), int(rng.integers(20, 200))
        V = np.maximum(0.0, rng.standard_normal((r, p)))
        s = float(rng.uniform(0.3, 0.9))
        ref = gs.project(V, s, axis=1)
        _, mu_root, _ = _solve_fgm_style(V, s, 0.0)
        for f in (1.0, 1.0 + 1e-9, 1.0 - 1e-6, 1.001, 0.9, 2.0):
            mu0 = mu_root * f
            t0 = mu0 / (math.sqrt(p) - 1.0)
            u = np.maximum(V - t0, 0.0)
            warm = np.stack([(V > t0).sum(1).astype(float), u.sum(1), (u * u).sum(1)])
            sc = np.empty(r)
            t = _piece_solve(s, mu0, p, warm, sc, 1e-12)
            if not t > 0 or not np.array_equal((V > t).sum(1), warm[0]):
                continue
            hits += 1
            out = np.maximum(V - t, 0.0) * sc[:, None]
            sp = row_sparsity(out).mean()
            assert s - 1e-13 <= sp <= s + 1.1e-12, (trial, f, sp - s)
            np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-9 * V.max())
    assert hits >= 40  # the near starts (f = 1, 1 + 1e-9) land on the root's piece


@pytest.mark.parametrize("project", [True, False])
def test_factored_fast_gradient_matches_the_python_one(project):
    """fgm_rows (iterates kept as (V, t, row scales), most projections solved on the warm start's piece with no
    pass of their own, the step formed in one pass with the extrapolated point) takes the same steps as the plain
    Python fast gradient with the same projection."""
    rng = np.random.default_rng(2)
    for trial in range(10):
        r, p, n = 6, 40, 50
        W = np.maximum(0.0, rng.standard_normal((n, r)))
        X = W @ rng.random((r, p))
        F = rng.random((r, p))
        A, B = W.T @ W, W.T @ X
        L = float(np.linalg.eigvalsh(A)[-1])
        s = 0.6
        proj = Projector(s, "group") if project else (lambda Z: Z)
        ref, steps_ref = fast_gradient(F.copy(), A, B, proj, 10, 0.1)
        out, steps, ok, _ = fgm_rows(F, A, B, L, s, project, 10, 0.1, 0.0)
        assert ok and steps == steps_ref, trial
        np.testing.assert_allclose(out, ref, rtol=1e-7, atol=1e-9 * np.abs(ref).max())
        if project:
            assert row_sparsity(out).mean() >= s - 1e-12


def test_compiled_loop_meets_target_and_is_deterministic():
    """The paper's synthetic problem (REFERENCE.md §4) through the compiled loop: error at the 1e-6 level after
    500 iterations, the sparsity target met, bit-for-bit the same on a second run."""
    rng = np.random.default_rng(0)
    Wp = np.maximum(0.0, rng.standard_normal((100, 10)))
    X = (Wp @ rng.random((10, 100))).T
    s = float(row_sparsity(Wp.T).mean())
    W0, H0 = rng.random((100, 10)), rng.random((10, 100))
    W, H, info = sparse_nmf(X, 10, W=W0, H=H0, sparsity_H=s, max_iter=500, tol=0)
    assert info.projection_fallbacks == 0  # the compiled path ran throughout
    assert info.history[-1] < 2e-6
    assert row_sparsity(H).mean() >= s - 1e-12
    W2, H2, info2 = sparse_nmf(X, 10, W=W0, H=H0, sparsity_H=s, max_iter=500, tol=0)
    assert np.array_equal(W, W2) and np.array_equal(H, H2)
    np.testing.assert_array_equal(info.history, info2.history)
