"""The batched group solve (``_batched.solve_groups``): ``project_groups``'s path for tensors on a GPU, driven here
on CPU arrays (``_api_groups._BATCH_ON_CPU``) so that CI covers it without a device. Against the contract and one
``project`` call per group, over scales from 2^-60 to 2^60 per group, lengths 1-40, float32 and float64, ties,
zeros, already-sparse groups and weights, on both engines; and the skipping of settled groups: the result of
evaluating every group at every step, bit for bit, from fewer passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import groupsparse as gs
from groupsparse.projection import _api_groups, _batched, _torch_fused
from groupsparse.projection._torch import TorchEngine


@pytest.fixture
def batched(monkeypatch):
    monkeypatch.setattr(_api_groups, "_BATCH_ON_CPU", True)


def _measured(z):
    z = np.asarray(z, np.float64)
    return float(np.mean([gs.hoyer_sparsity(v) for v in z.reshape(-1, z.shape[-1])]))


@st.composite
def groups(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    out, targets = [], []
    for _ in range(draw(st.integers(1, 5))):
        r, n = draw(st.integers(1, 20)), draw(st.integers(2, 40))
        kind = draw(st.sampled_from(["normal", "ties", "zeros", "onehot", "uniform"]))
        x = rng.normal(size=(r, n)) if kind != "uniform" else rng.uniform(-1, 1, size=(r, n))
        if kind == "ties":
            x = np.round(x * 2) / 2  # many equal magnitudes in a row
        elif kind == "zeros":
            x[rng.random((r, n)) < 0.5] = 0.0
        elif kind == "onehot":  # already at sparsity 1 (target met before any step)
            x = np.zeros((r, n))
            x[np.arange(r), rng.integers(0, n, r)] = rng.normal(size=r)
        scale = draw(st.integers(-60, 60)) if dtype == np.float64 else draw(st.integers(-30, 30))
        out.append(np.ldexp(x, scale).astype(dtype))
        targets.append(draw(st.sampled_from([0.0, 0.3, 0.7, 0.9, 0.99])))
    return out, targets


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # (stays set)
@given(groups(), st.sampled_from(["numba", "torch"]), st.booleans(), st.booleans(), st.integers(0, 2**31))
def test_batched_groups_meet_the_contract_and_match_one_call_each(batched, case, engine, as_tensor, weighted, seed):
    mats, targets = case
    inputs = [torch.from_numpy(m) for m in mats] if as_tensor else mats
    if engine == "numba" and as_tensor:
        inputs = mats
    rng = np.random.default_rng(seed)
    ws = [rng.uniform(0.25, 4.0, size=m.shape).astype(m.dtype) for m in mats] if weighted else None
    if ws is not None and inputs is not mats:
        ws = [torch.from_numpy(w) for w in ws]
    res, infos = gs.project_groups(inputs, targets, axis=1, weights=ws, engine=engine, return_info=True)
    for g, (z, m, s, info) in enumerate(zip(res, mats, targets, infos)):
        z = z.numpy() if isinstance(z, torch.Tensor) else z
        if ws is not None:
            # the weighted measure is not the Hoyer sparsity of z, and near weighted ties a move of mu inside the
            # band moves entries by more than any fixed tolerance: the contract is on info, against one call
            _, ref = gs.project(inputs[g], s, axis=1, weights=ws[g], engine=engine, return_info=True)
            assert info.sparsity >= s - 1e-12 or info.already_sparse
            assert abs(info.sparsity - ref.sparsity) <= 1e-6 or (info.already_sparse and ref.already_sparse)
            continue
        ref = gs.project(m, s, axis=1, engine=engine)
        assert z.dtype == m.dtype and np.array_equal(np.signbit(z[z != 0]), np.signbit(m[z != 0]))
        top = float(np.abs(m).max(initial=0.0))
        np.testing.assert_allclose(z, ref, rtol=0, atol=1e-5 * top)
        sp = _measured(z)
        slack = 1e-9 if m.dtype == np.float64 else 2e-6  # (float32 outputs: rounding of the written entries)
        assert sp >= s - slack or _measured(m) >= s, (sp, s)
        assert info.sparsity >= s - 1e-12 or info.already_sparse


def _fused(monkeypatch, on: bool):
    monkeypatch.setenv(_torch_fused.ENV, "1" if on else "0")
    monkeypatch.setattr(_torch_fused, "FUSED_MIN", 0)  # (small groups here: the fused path on every size)
    monkeypatch.setattr(_torch_fused, "MIN_LENGTH", 2)


def _solve(mats, dtype, targets, skip: bool):
    """``solve_groups`` through the torch engine, each matrix one group of its rows."""
    x = torch.from_numpy(np.concatenate([m.ravel() for m in mats]).astype(dtype))
    offsets = np.concatenate([[0], np.cumsum([m.shape[1] for m in mats for _ in range(m.shape[0])])]).astype(np.int64)
    counts = [m.shape[0] for m in mats]
    gid_h = np.repeat(np.arange(len(mats)), counts).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    eng = TorchEngine(x, offsets, None, None)
    if not skip:  # every group evaluated at every step: the engine never hears which settled
        full = eng.evaluate_vec
        eng.evaluate_vec = lambda t, mu=None, live=None: full(t, mu)
    G = len(starts) - 1
    return _batched.solve_groups(eng, torch.from_numpy(gid_h), starts, np.asarray(targets), margin=np.zeros(G),
                                 tol=np.full(G, 1e-9), max_iter=100), eng


@pytest.mark.parametrize("dtype,fused", [(np.float32, False), (np.float64, False), (np.float32, True)])
def test_skipping_settled_groups_changes_no_bit_and_reads_less(dtype, fused, monkeypatch):
    """eager passes (float64 and float32) and the fused ones (float32, ``_torch_fused``): the entries each
    evaluation's sums read, counted per piece"""
    rng = np.random.default_rng(3)
    # groups of different lengths (their own pieces), which settle after different numbers of steps
    mats = [rng.normal(size=(40, 9)), rng.uniform(-1, 1, size=(30, 64)), rng.standard_t(2, size=(20, 300)),
            np.ldexp(rng.normal(size=(25, 17)), 40)]
    targets = [0.6, 0.85, 0.3, 0.95]
    read = []
    stats = TorchEngine._piece_stats
    monkeypatch.setattr(TorchEngine, "_piece_stats", lambda self, u, p: (read.append(p.e1 - p.e0), stats(self, u, p)))
    _fused(monkeypatch, fused)
    call = _torch_fused._call
    monkeypatch.setattr(_torch_fused, "_call", lambda name, *a: (read.append(a[0].numel()) if name == "sums" else None,
                                                                call(name, *a))[1])
    (out_a, mu_a, S_a, it_a, ev_a, jumped_a), eng = _solve(mats, dtype, targets, skip=True)
    assert (eng.fused is not None) == fused
    entries_skip = sum(read)
    read.clear()
    (out_b, mu_b, S_b, it_b, ev_b, jumped_b), _ = _solve(mats, dtype, targets, skip=False)
    entries_full = sum(read)
    assert np.array_equal(out_a.numpy().view(np.uint8), out_b.numpy().view(np.uint8))
    assert np.array_equal(mu_a, mu_b) and np.array_equal(S_a, S_b) and (it_a, ev_a) == (it_b, ev_b)
    assert not jumped_a.any()
    assert entries_skip < 0.8 * entries_full, (entries_skip, entries_full)


@pytest.mark.parametrize("fail_at", [4, 10, 18])
def test_a_fused_kernel_failing_mid_solve_falls_back_without_stale_sums(fail_at, monkeypatch):
    """A kernel that cannot be built after the first evaluations (``_call`` returns False, as on a compile error)
    drops the fused passes; the pieces skipped as settled then hold sums in the kernels' caller units, so the
    eager pass must take every piece again (it had read them as a-units: S = -48493 for 40 vectors)."""
    _fused(monkeypatch, True)
    real, count = _torch_fused._call, [0]

    def flaky(name, *a):
        count[0] += name == "sums"
        return False if name == "sums" and count[0] == fail_at else real(name, *a)

    rng = np.random.default_rng(3)
    mats = [np.ldexp(rng.normal(size=(40, 9)), 20), rng.uniform(-1, 1, size=(30, 64)),
            np.ldexp(rng.standard_t(2, size=(20, 300)), -30)]
    targets = [0.6, 0.85, 0.9]
    (out_ok, _, S_ok, *_), _ = _solve(mats, np.float32, targets, skip=True)
    results = []
    for skip in (True, False):
        count[0] = 0
        monkeypatch.setattr(_torch_fused, "_call", flaky)
        (out, mu, S, it, ev, jumped), eng = _solve(mats, np.float32, targets, skip=skip)
        monkeypatch.setattr(_torch_fused, "_call", real)
        assert eng.fused is None  # (the failure happened inside the solve)
        results.append((out.numpy(), S))
    (a, S_a), (b, S_b) = results
    assert np.array_equal(a.view(np.uint8), b.view(np.uint8)) and np.array_equal(S_a, S_b)
    np.testing.assert_allclose(S_a, S_ok, rtol=1e-7)  # (eager sums: the same values to rounding)
    for z, m, s in zip(np.split(a, np.cumsum([m.size for m in mats])[:-1]), mats, targets):
        assert _measured(z.reshape(m.shape)) >= s - 2e-6


def test_an_empty_group_is_rejected_on_the_batched_path_too(batched):
    with pytest.raises(ValueError, match=r"groups\[1\]: got an empty group"):
        gs.project_groups([np.ones((3, 4)), np.zeros((0, 4))], 0.5, axis=1)
