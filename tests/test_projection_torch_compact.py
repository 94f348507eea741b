"""The torch engine's CPU fast path (float32 rows of one length, in the caller's units) and its active-set
compaction: the caller-unit sums are the a-unit sums bit for bit, and a compacted solve lands where the full one
does (docs/torch-engine.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import groupsparse as gs
from groupsparse.projection._group import as_group
from groupsparse.projection._solver import solve_shared
from groupsparse.projection._torch import TorchEngine
from groupsparse.projection._torch_fused import ENV


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    """These are the eager passes' properties (fused passes add in Inductor's order and never compact)."""
    monkeypatch.delenv(ENV, raising=False)


def _engine(x, compact=True):
    g = as_group(x, axis=1)
    eng = TorchEngine(g.data, g.offsets, g.weights, g.uniform_length)
    eng.compact = eng.compact and compact
    return eng


def _data(kind, r=300, n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(r, n))
    if kind == "mixed":  # vectors from float32's subnormals to near its top, entries over many binades
        x = x * 2.0 ** rng.integers(-20, 20, (r, n)) * 2.0 ** rng.integers(-140, 100, (r, 1))
    elif kind == "zeros":
        x[rng.random((r, n)) < 0.3] = 0.0
        x[rng.random((r, n)) < 0.2] = -0.0
        x[:3] = 0.0
    return torch.from_numpy(x.astype(np.float32))


@pytest.mark.parametrize("kind", ["normal", "mixed", "zeros"])
def test_caller_units_give_the_a_unit_sums_bit_for_bit(kind):
    """The same values as float64 take the a-unit path (|x| / 2^e, per-vector thresholds): every pass's stats and
    the written output agree bit for bit."""
    x32 = _data(kind)
    fast, ref = _engine(x32, compact=False), _engine(x32.double(), compact=False)
    assert fast.fast and not ref.fast
    assert torch.equal(fast.stats0, ref.stats0)
    E = int(ref.e_host.max())
    for eng in (fast, ref):
        eng.set_shift(E - eng.e_host)
    for mu in (1e-300, 0.03, 0.2, 0.5, 0.9):
        a, b = fast.evaluate_shared(mu), ref.evaluate_shared(mu)
        assert torch.equal(a.state[1], b.state[1]) and (a.S, a.dS) == (b.S, b.dS)
        assert torch.equal(fast.write_state(*a.state), ref.write_state(*b.state).float())


@pytest.mark.parametrize("s, compacts", [(0.3, False), (0.8, True), (0.97, True)])
def test_compacted_solve_matches_the_full_solve(s, compacts):
    x = _data("normal", r=400, n=300, seed=int(s * 100))
    eng = _engine(x)
    out, info = solve_shared(eng, s, tol=1e-12, max_iter=100)
    full, info_f = solve_shared(_engine(x, compact=False), s, tol=1e-12, max_iter=100)
    # compacted at the first lower end, unless too many entries survive there (s = 0.3: most of them)
    assert (eng._comp.pad is not None) == compacts
    assert info.evaluations == info_f.evaluations
    assert abs(info.sparsity - info_f.sparsity) <= 1e-12 and info.sparsity >= s
    assert abs(info.mu - info_f.mu) <= 1e-12 * info_f.mu
    np.testing.assert_allclose(out.numpy(), full.numpy(), rtol=1e-6, atol=1e-30)
    zn = gs.project(x, s, axis=1, engine="numba")
    assert abs(gs.hoyer_sparsity(out.view_as(x), axis=1).mean() - gs.hoyer_sparsity(zn, axis=1).mean()) <= 1e-6


def test_signed_zeros_and_one_hot_rows_through_the_fast_write():
    x = _data("zeros", r=200, n=400)
    z = gs.project(x, 0.9, axis=1, engine="torch")
    zn = gs.project(x, 0.9, axis=1, engine="numba")
    assert torch.equal(torch.signbit(z[x == 0]), torch.signbit(x[x == 0]))  # -0.0 stays -0.0
    assert torch.equal(torch.signbit(z[z != 0]), torch.signbit(x[z != 0]))
    assert not z[:3].any()  # zero rows stay zero
    assert abs(float(gs.hoyer_sparsity(z, axis=1).mean() - gs.hoyer_sparsity(zn, axis=1).mean())) <= 1e-6


def test_no_compaction_past_the_memory_budget_or_below_the_size_floor():
    dense = torch.from_numpy(np.random.default_rng(3).random((200, 400)).astype(np.float32) + 1.0)  # flat rows
    eng = _engine(dense)
    solve_shared(eng, 0.05, tol=1e-12, max_iter=100)  # nearly everything survives the first lower end
    assert eng._comp.pad is None
    small = _engine(_data("normal", r=20, n=50))
    assert not small.compact


def _ties(r=300, n=200, seed=5):
    rng = np.random.default_rng(seed)
    x = rng.choice([0.1, 0.5, 1.0], size=(r, n)) * rng.choice([-1.0, 1.0], size=(r, n))
    return torch.from_numpy(x.astype(np.float32))


def _subnormal(r=300, n=200, seed=6):
    x = _data("normal", r, n, seed).double() * 2.0**-140  # float32 subnormals beside normal entries
    x[::3] *= 2.0**100
    return x.float()


@pytest.mark.parametrize("kind", ["normal", "mixed", "zeros", "ties", "subnormal", "uniform"])
@pytest.mark.parametrize("s", [0.5, 0.8, 0.95])
def test_first_pass_compaction_lands_where_the_full_solve_does(kind, s, monkeypatch):
    """``plan`` makes the first pass keep the entries above an estimate of the first Newton step's threshold: the
    solve runs compacted from its first step and lands where the uncompacted solve does (sparsity, mu, output)."""
    from groupsparse.projection import _torch_layout

    monkeypatch.setattr(_torch_layout, "SAMPLE", 1 << 12)  # (groups from 8 samples: these 60000 entries)
    x = {"ties": _ties, "subnormal": _subnormal}.get(kind, lambda: None)()
    if kind == "uniform":
        x = torch.from_numpy(np.random.default_rng(7).uniform(-1, 1, (300, 200)).astype(np.float32))
    x = _data(kind) if x is None else x
    eng, full = _engine(x), _engine(x, compact=False)
    out, info = solve_shared(eng, s, tol=1e-12, max_iter=100)
    ref, info_f = solve_shared(full, s, tol=1e-12, max_iter=100)
    assert info.discontinuity == info_f.discontinuity and info.already_sparse == info_f.already_sparse
    assert abs(info.sparsity - info_f.sparsity) <= 1e-12 and info.sparsity >= s
    assert abs(info.mu - info_f.mu) <= 1e-12 * info_f.mu
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-6, atol=0)
    assert torch.equal(torch.signbit(out), torch.signbit(ref))  # zeros signed like x, on both paths
    if kind == "normal" and s >= 0.8:  # compacted at the first pass (the sample's estimate held)
        assert eng._comp.pad is not None and eng._comp.mu != eng._comp.mu  # (mu NaN: the first pass's copy)


def test_an_estimate_above_the_first_step_drops_the_copy_and_keeps_anew(monkeypatch):
    from groupsparse.projection import _torch_layout

    x = _data("normal", r=400, n=300, seed=8)
    monkeypatch.setattr(_torch_layout, "BELOW", 1.5)  # the first pass keeps above the root: no pass can use it
    monkeypatch.setattr(_torch_layout, "SAMPLE", 1 << 12)
    eng = _engine(x)
    eng.plan(0.8)
    first_T = eng._comp.T
    assert eng._comp.pad is not None
    out, info = solve_shared(eng, 0.8, tol=1e-12, max_iter=100)
    ref, info_f = solve_shared(_engine(x, compact=False), 0.8, tol=1e-12, max_iter=100)
    assert eng._comp.pad is not None and eng._comp.T < first_T  # compacted again at the confirmed lower end
    assert abs(info.sparsity - info_f.sparsity) <= 1e-12
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-6, atol=0)


def test_a_deferred_first_pass_runs_when_its_constants_are_read():
    """Without ``plan`` (``project_each``, a caller driving the engine) the first pass runs on first use, whole."""
    x = _data("mixed")
    eng, ref = _engine(x), _engine(x.double())  # (float64: the a-unit path, whose first pass is never deferred)
    assert eng.__dict__.get("_pending") and not ref.__dict__.get("_pending")
    assert torch.equal(eng.stats0, ref.stats0) and np.array_equal(eng.e_host, ref.e_host)
    assert eng._comp.pad is None


@pytest.mark.parametrize("r", [100, 300])  # below and above the compaction's size floor
def test_project_each_on_float32_rows_uses_a_threshold_per_vector(r):
    """Regression: the caller-unit pass took one threshold per row length, the first row's, also for
    ``project_each`` (a threshold per vector): float32 rows came back off numba's by up to 7.2 on N(0, 1)
    entries (and above the compaction floor the compaction's state raised AttributeError)."""
    x = _data("normal", r=r, n=200)
    zt = gs.project_each(x, 0.7, axis=1, engine="torch")
    zn = gs.project_each(x, 0.7, axis=1, engine="numba")
    np.testing.assert_allclose(zt.numpy(), zn.numpy(), rtol=1e-5, atol=1e-30)
