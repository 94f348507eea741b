"""Issue 8: the precision contract per output dtype, layouts, and the smaller defects (docs/projection.md §4-5)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import groupsparse as gs
import groupsparse.projection._numba as engine_mod
import groupsparse.projection._small as small
from groupsparse.projection._contract import _ROUNDOFF

ENGINES = ["numba", "torch"]
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def provable(n, dtype):
    """2u/(1-u) sqrt(n)/(sqrt(n)-1): the most rounding to ``dtype`` can move one vector's sparsity."""
    u = _ROUNDOFF[dtype]
    return 2 * u / (1 - u) * np.sqrt(n) / (np.sqrt(n) - 1)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(2, 40), st.floats(0.05, 0.95), st.sampled_from(sorted(HALF)),
       st.sampled_from(ENGINES), st.integers(0, 2**32 - 1), st.floats(-12, 12), st.booleans())
def test_feasible_in_the_output_dtype(r, n, s, dtype, engine, seed, log_scale, as_numpy):
    """Measured on the returned values (in their own dtype), the average is >= s, and above it by no more
    than the margin the solve aimed with plus the band and one rounding."""
    x = torch.from_numpy(np.random.default_rng(seed).normal(size=(r, n)) * 2.0 ** (log_scale if dtype != "float16" else 0))
    x = x.to(HALF[dtype])
    if as_numpy and dtype != "bfloat16":
        x = x.numpy()
    out, info = gs.project(x, s, axis=1, engine=engine, return_info=True)
    assert out.dtype == x.dtype
    sp = float(gs.hoyer_sparsity(out.astype(np.float64) if as_numpy and dtype != "bfloat16" else out.double(),
                                 axis=1).mean())
    assert sp >= s
    if not info.already_sparse and not info.discontinuity:
        tol = {"float32": 4e-7, "float16": 1e-5, "bfloat16": 1e-4}[dtype]
        assert sp <= s + info.margin + tol + provable(n, dtype) + 1e-12
        assert abs(info.sparsity - sp) < 1e-9 or dtype == "float32"


@pytest.mark.parametrize("engine", ENGINES)
def test_issue_half_examples(engine):
    x = torch.tensor([-0.453125, 1.609375], dtype=torch.bfloat16)
    out = gs.project(x, 0.5741393, engine=engine)
    assert gs.hoyer_sparsity(out.double()) >= 0.5741393
    with pytest.raises(ValueError, match="float16"):
        gs.project(np.array([6e4] + [5e4] * 50, np.float16), 0.3, engine=engine)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("engine", ENGINES)
def test_already_feasible_comes_back_bit_for_bit(dtype, engine):
    """Feasible as measured in its own dtype (even within the aiming margin): returned unchanged, -0.0 included."""
    x = np.random.default_rng(1).normal(size=(6, 9)).astype(dtype)
    x[0, 0] = -0.0
    s = float(gs.hoyer_sparsity(x.astype(np.float64), axis=1).mean()) - 1e-12
    out = gs.project(x, s, axis=1, engine=engine)
    assert out.dtype == x.dtype and out.tobytes() == x.tobytes()
    assert gs.project(x, 0.0, axis=1, engine=engine).tobytes() == x.tobytes()


def test_float64_overflow_raises_and_limits_are_kept():
    for big, s in ((np.array([1.7e308, 1.7e308, 1.0]), 1.0), (np.array([1e308, 3e307, 1e300]), 0.5)):
        out = gs.project(big, s)
        assert np.all(np.isfinite(out)) and gs.hoyer_sparsity(out) >= s
    with pytest.raises(ValueError, match="float64"):
        gs.project(np.array([1.7e308, 1.6e308, 1.5e308, 1e300]), 0.3)


# ---------------------------------------------------------------- layouts


def _layouts(M):
    base = np.asarray(M, np.float64)
    ro = base.copy()
    ro.flags.writeable = False
    wide = np.zeros((base.shape[0], 2 * base.shape[1]))
    wide[:, ::2] = base
    yield "view", wide[:, ::2]
    yield "fortran", np.asfortranarray(base)
    yield "big-endian", base.astype(">f8")
    yield "read-only", ro
    yield "parameter", torch.nn.Parameter(torch.from_numpy(base.copy()))


@pytest.mark.parametrize("path", ["small", "general"])
@pytest.mark.parametrize("engine", ENGINES)
def test_layouts_give_the_same_result(engine, path, monkeypatch):
    if path == "general":
        monkeypatch.setattr(small, "SMALL_MAX_ENTRIES", -1)
    M = np.random.default_rng(2).normal(size=(7, 5))
    want = gs.project(np.ascontiguousarray(M), 0.6, engine=engine)
    for name, X in _layouts(M):
        got = gs.project(X, 0.6, engine=engine)
        got = got.detach().numpy() if isinstance(got, torch.Tensor) else got
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=name)
    Mb = np.arange(1.0, 7.0).reshape(2, 3).astype(">f8")
    np.testing.assert_allclose(gs.project(Mb, 0.5, engine=engine), gs.project(Mb.astype("<f8"), 0.5, engine=engine))


def test_inplace_validates_everything_before_writing():
    a = np.array([3.0, 1.0, 2.0])
    ro = np.array([1.0, 2.0, 5.0])
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        gs.project_([a, ro], 0.5)
    np.testing.assert_array_equal(a, [3.0, 1.0, 2.0])
    # tensors copy_ would refuse after the first target was written (a raw RuntimeError, a half-written list)
    t = torch.tensor([3.0, 1.0, 2.0, 0.5])
    with torch.inference_mode():
        inf = torch.ones(2, 4)
    for bad, match in ((torch.ones(1, 4).expand(2, 4), r"vectors\[1\]: .*share memory"),
                       (inf, r"vectors\[1\]: got an inference tensor")):
        with pytest.raises(ValueError, match=match):
            gs.project_([t, bad], 0.8, axis=-1)
        assert torch.equal(t, torch.tensor([3.0, 1.0, 2.0, 0.5]))
    with torch.inference_mode():  # inside inference mode an inference tensor is writable
        assert gs.hoyer_sparsity(gs.project_(torch.tensor([3.0, 1.0, 2.0, 0.5]), 0.8).numpy()) >= 0.8


@pytest.mark.parametrize("kind", ["numpy", "torch", "bfloat16", "mixed"])
def test_inplace_refuses_targets_sharing_memory(kind):
    """Overlapping targets were each written with their own projection, the later write winning: the group came
    back at 0.68 for a target of 0.7, in silence. Interleaved slices share no entry and are projected."""
    base = np.random.default_rng(0).normal(size=12)
    if kind == "numpy":
        t, view = base.copy(), lambda t, k: t[k]
    else:
        t = torch.from_numpy(base.copy()).to(torch.bfloat16 if kind == "bfloat16" else torch.float64)
        view = (lambda t, k: t[k]) if kind != "mixed" else (lambda t, k: t.numpy()[k] if k.start == 0 else t[k])
    before = t.clone() if kind != "numpy" else t.copy()
    for a, b in ((slice(0, 7), slice(5, 12)), (slice(0, 12), slice(0, 12)), (slice(0, 12, 2), slice(2, 3))):
        with pytest.raises(ValueError, match=r"vectors\[0\] and vectors\[1\] sharing memory"):
            gs.project_([view(t, a), view(t, b)], 0.7)
        assert (t == before).all()  # refused before any write
    if kind == "mixed":
        return  # (a list mixing arrays and tensors is a TypeError of its own)
    evens, odds = view(t, slice(0, 12, 2)), view(t, slice(1, 12, 2))
    gs.project_([evens, odds], 0.7)
    got = [np.asarray(v.float() if kind == "bfloat16" else v, dtype=np.float64) for v in (evens, odds)]
    assert np.mean(gs.hoyer_sparsity(got)) >= 0.7 - 1e-12
    strided = np.lib.stride_tricks.as_strided(np.zeros(4), shape=(3,), strides=(0,))
    with pytest.raises(ValueError, match="share memory"):
        gs.project_(strided, 0.5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_inplace_takes_disjoint_views_of_one_tensor(device):
    """Column blocks of a fused weight (GPT-2 c_attn's q/k/v) and interleaved columns have overlapping byte
    ranges but no shared entry: decided from the entries' addresses on the host and on a device (a device
    refused them in 2a4b2eb); 200 column slices take one sorted pass, not 20,000 pairwise checks."""
    w = torch.randn(64, 12, dtype=torch.float64, device=device)
    for views in (list(w.split(4, dim=1)), [w[:, 0::2], w[:, 1::2]], list(torch.randn(16, 2000).split(10, dim=1))):
        want = gs.project([v.clone() for v in views], 0.6, axis=1)
        gs.project_(views, 0.6, axis=1)
        assert all(torch.equal(v, r) for v, r in zip(views, want))
    with pytest.raises(ValueError, match=r"vectors\[0\] and vectors\[1\] sharing memory"):
        gs.project_([w[:, 3:9], w[:, 6:]], 0.6, axis=1)
    a = np.random.default_rng(0).normal(size=(64, 12))
    gs.project_([a[::-1][:32], a[::-1][32:]], 0.6, axis=1)  # negative strides
    with pytest.raises(ValueError, match="sharing memory"):
        gs.project_([a[:, ::-1][:, :6], a[:, 6:]], 0.6, axis=1)  # the same columns, reversed


def test_project_groups_empty_blocks_and_signed_zeros_on_torch():
    res = gs.project_groups([[np.zeros((0, 0)), np.ones(3)], np.ones((2, 3))], 0.5, engine="torch")
    assert res[0][0].shape == (0, 0) and gs.hoyer_sparsity(res[0][1]) >= 0.5
    x = torch.tensor([[-0.0, 1.0, 0.0], [0.0, -0.0, 2.0]])
    out = gs.project_groups([x], 0.5, axis=1, engine="torch")[0]
    assert torch.equal(torch.signbit(out), torch.signbit(x))


def test_weighted_kernels_respect_thread_thresholds(monkeypatch):
    rng = np.random.default_rng(4)
    x, w = rng.normal(size=(50, 40)), rng.uniform(0.5, 2, size=(50, 40))
    from groupsparse.projection._group import as_group

    g = as_group(x, axis=1, weights=w)
    assert engine_mod.NumbaEngine(g.data, g.offsets, g.weights).par == 0
    serial = gs.project(x, 0.7, axis=1, weights=w)
    monkeypatch.setattr(engine_mod, "PARALLEL_MIN_ENTRIES", 0)
    monkeypatch.setattr(engine_mod, "PARALLEL_MIN_THREADS", 1)
    np.testing.assert_allclose(gs.project(x, 0.7, axis=1, weights=w), serial, rtol=1e-12)


def test_numba_cache_falls_back_when_no_folder_is_writable(monkeypatch):
    import numba

    from groupsparse.projection import _kernels

    real = numba.njit

    def picky(*args, **kw):
        if kw.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available")
        return real(*args, **kw)

    monkeypatch.setattr(_kernels.nb, "njit", picky)

    def f(a):
        return a + 1

    assert _kernels.jit(f)(1) == 2


def test_concurrent_calls_under_workqueue():
    """Threads entering threaded kernels at once abort numba's workqueue layer: the engine serializes them."""
    code = textwrap.dedent("""
        import threading, numpy as np, groupsparse as gs
        import groupsparse.projection._numba as E
        E.PARALLEL_MIN_ENTRIES, E.PARALLEL_MIN_THREADS = 0, 1
        import groupsparse.projection._small as S
        S.SMALL_MAX_ENTRIES = -1
        x = np.random.default_rng(0).normal(size=(200, 300))
        want = gs.project(x, 0.8, axis=1)
        bad = []
        def work():
            for _ in range(5):
                if not np.array_equal(gs.project(x, 0.8, axis=1), want):
                    bad.append(1)
        ts = [threading.Thread(target=work) for _ in range(4)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        assert not bad
        print("ok")
    """)
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", NUMBA_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize("path", ["small", "general"])
def test_warm_start_changes_nothing_but_the_work(path, monkeypatch):
    if path == "general":
        monkeypatch.setattr(small, "SMALL_MAX_ENTRIES", -1)
    rng = np.random.default_rng(5)
    M = rng.normal(size=(60, 40))
    _, first = gs.project(M, 0.7, axis=1, return_info=True)
    M2 = M + 1e-3 * rng.normal(size=M.shape)
    cold, ci = gs.project(M2, 0.7, axis=1, return_info=True)
    for mu0 in (first.mu, 0.0, 1e-300, 1e300, first.mu * 1e-3):
        warm, wi = gs.project(M2, 0.7, axis=1, return_info=True, mu0=mu0)
        np.testing.assert_allclose(warm, cold, rtol=1e-9, atol=1e-12)
        assert 0.7 <= wi.sparsity <= 0.7 + 1e-12
    assert gs.project(M2, 0.7, axis=1, return_info=True, mu0=first.mu)[1].evaluations <= ci.evaluations
    with pytest.raises(ValueError, match="mu0"):
        gs.project(M, 0.7, mu0=-1.0)


@pytest.mark.parametrize("engine", ENGINES)
def test_out_receives_the_result(engine):
    rng = np.random.default_rng(6)
    for X, axis in ((rng.normal(size=(30, 20)), 1), (rng.normal(size=(30, 20)).astype(np.float32), 0),
                    (np.ones((4, 6)), 1), (torch.from_numpy(rng.normal(size=(8, 9))), 1)):
        want = gs.project(X, 0.6, axis=axis, engine=engine)
        out = torch.empty_like(X) if isinstance(X, torch.Tensor) else np.empty_like(X)
        got = gs.project(X, 0.6, axis=axis, engine=engine, out=out)
        assert got is out
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    X = rng.normal(size=(5, 4))
    with pytest.raises(ValueError, match="overlapping"):
        gs.project(X, 0.5, out=X)
    with pytest.raises(ValueError, match="shape"):
        gs.project(X, 0.5, out=np.empty((4, 5)))


def test_weighted_group_near_the_float64_limit():
    x, w = np.array([1e308, 5e307, 1e307]), np.array([1.0, 2.0, 3.0])
    for engine in ENGINES:
        out = gs.project(x, 0.9, weights=w, engine=engine)
        assert np.all(np.isfinite(out)) and gs.hoyer_sparsity(out, weights=w) >= 0.9


def _dist_worker(rank, world, port, q):
    import torch.distributed as dist

    import groupsparse.distributed as gd

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = np.array([3.0, 1.0, 2.0, 0.5])
        t3 = torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)
        vecs = [torch.tensor(x * 1e200), torch.tensor(x * 1e-200), t3, t3.clone()]
        got, info = gd.project(vecs[2 * rank : 2 * rank + 2], 0.55, return_info=True)
        want, winfo = gs.project(vecs, 0.55, return_info=True)
        ok = all(torch.allclose(a, b, rtol=1e-12) for a, b in zip(got, want[2 * rank : 2 * rank + 2]))
        q.put((rank, ok and info.n_partial == winfo.n_partial == 1 and 0.55 <= info.sparsity <= 0.55 + 1e-12))
    finally:
        dist.destroy_process_group()


def test_distributed_extreme_scales_and_ties():
    """Groups at 1e+-200 with a tie split across two ranks: the same result as one process."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, port, q)) for r in range(2)]
    [p.start() for p in procs]
    [p.join(120) for p in procs]
    results = dict(q.get(timeout=5) for _ in range(2))
    assert results == {0: True, 1: True}


@pytest.mark.parametrize("engine", ["numba", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_out_tensor_of_every_dtype(engine, dtype):
    """``out=`` takes a tensor of the vectors' dtype, any float dtype (bfloat16 crashed: NumPy has none)."""
    x = torch.randn(6, 9, generator=torch.Generator().manual_seed(0)).to(dtype)
    want = gs.project(x, 0.7, axis=1, engine=engine)
    out = torch.full_like(x, float("nan"))
    got = gs.project(x, 0.7, axis=1, engine=engine, out=out)
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]  # (bits: -0.0 and NaN count)
    assert got is out and torch.equal(out.view(as_int), want.view(as_int))
    with pytest.raises(ValueError, match="overlapping"):
        gs.project(x, 0.7, axis=1, engine=engine, out=x)


def test_out_whose_entries_share_memory_is_refused():
    """A stride-0 ``out`` would receive every vector's values in one place (garbage): refused like an overlap."""
    x = np.random.default_rng(0).normal(size=(4, 6))
    flat = np.zeros(6)
    out = np.lib.stride_tricks.as_strided(flat, shape=(4, 6), strides=(0, 8), writeable=True)
    with pytest.raises(ValueError, match="out: got an array whose entries may share memory"):
        gs.project(x, 0.7, axis=1, out=out)
    with pytest.raises(ValueError, match="out: got a tensor whose entries may share memory"):
        gs.project(torch.from_numpy(x), 0.7, axis=1, out=torch.zeros(1, 6, dtype=torch.float64).expand(4, 6))
    assert not flat.any()
    # overlapping rows without a zero stride (as_strided), on both kinds
    with pytest.raises(ValueError, match="may share memory"):
        gs.project(x, 0.7, axis=1, out=np.lib.stride_tricks.as_strided(np.zeros(12), (4, 6), (16, 8), writeable=True))
    with pytest.raises(ValueError, match="may share memory"):
        gs.project(torch.from_numpy(x), 0.7, axis=1, out=torch.zeros(12, dtype=torch.float64).as_strided((4, 6), (2, 1)))
    # views with their own memory per entry are fine: sliced, transposed
    want = gs.project(x, 0.7, axis=1)
    for o in (np.zeros((8, 12))[::2, ::2], np.zeros((6, 4)).T):
        assert gs.project(x, 0.7, axis=1, out=o) is o and np.array_equal(o, want)
