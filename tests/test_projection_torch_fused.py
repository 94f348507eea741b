"""The torch engine's fused passes (``GROUPSPARSE_TORCH_COMPILE=1``, ``projection/_torch_fused.py``): taken where
they should be, the same write bit for bit as the eager engine, sums within rounding of the eager ones, the
projection's contract over float32's whole exponent range (subnormals to 2^127, mixed in one group), ties and
near-ties against the numba engine, host and device loop agreeing bit for bit, and no recompiles across shapes.
Compiling takes seconds once per process (a C++ compiler is needed: skipped without one)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import groupsparse as gs
from groupsparse.projection._group import as_group
from groupsparse.projection._solver import solve_shared
from groupsparse.projection._torch import TorchEngine
from groupsparse.projection import _torch_fused
from groupsparse.projection._torch_fused import ENV

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="torch.compile's CPU backend needs a C++ compiler")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.function_scoped_fixture])


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    monkeypatch.setattr(_torch_fused, "FUSED_MIN", 0)  # (small groups here: the fused path on every size)
    monkeypatch.setattr(_torch_fused, "MIN_LENGTH", 2)


def _engine(x, compiled: bool, monkeypatch):
    monkeypatch.setenv(ENV, "1" if compiled else "0")
    monkeypatch.setattr(_torch_fused, "FUSED_MIN", 0)
    monkeypatch.setattr(_torch_fused, "MIN_LENGTH", 2)
    g = as_group(x) if isinstance(x, list) else as_group(x, axis=1)
    eng = TorchEngine(g.data, g.offsets, g.weights, g.uniform_length)
    eng.compact = False  # (the eager engine's CPU compaction sums in yet another order)
    return eng


def _cases():
    rng = np.random.default_rng(3)
    f32 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))
    x = rng.normal(size=(40, 30))
    x[rng.random(x.shape) < 0.3] = 0.0  # zeros, signed zeros too
    x[0] = -0.0
    x[1, :] = 0.0
    x[1, 3] = 2.0  # a one-hot row
    return {
        "normal": f32(rng.normal(size=(64, 27))),
        "zeros and one-hot": f32(x),
        "exponents": f32(rng.normal(size=(16, 12)) * 2.0 ** rng.integers(-140, 120, (16, 1))),
        "subnormal": f32(rng.normal(size=(12, 9)) * 2.0**-140),
        "ties": f32(0.5 * rng.choice([-1.0, 1.0], (24, 16))),
        "layers": [f32(rng.normal(0, 0.02, size=(r, n))) for r, n in ((64, 27), (32, 288), (16, 9))],
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_fused_write_is_the_eager_write_bit_for_bit(name, monkeypatch):
    """Same thresholds, scales and one-hot rows in: the same output bits, zeros' signs included."""
    x = _cases()[name]
    fused, eager = _engine(x, True, monkeypatch), _engine(x, False, monkeypatch)
    assert fused.fused is not None and eager.fused is None
    rng = np.random.default_rng(0)
    r = fused.n_vectors
    for level in (0.0, 0.3, 0.9, np.inf):
        t = torch.from_numpy(level * fused.ratio_host * rng.uniform(0.5, 1.0, r)) if level < np.inf else \
            torch.full((r,), np.inf, dtype=torch.float64)
        if level < np.inf:  # one threshold per row length in the caller's units, as the solver's thresholds are
            T = t[fused.lay.first] * fused.sigma[fused.lay.first]
            t = T[fused.lay.kind_rows] * fused.inv
        scale = torch.from_numpy(rng.uniform(0.5, 2.0, r))
        onehot = torch.where(torch.from_numpy(rng.random(r) < 0.2), fused.argmax_pos, -1)
        a, b = fused._write(t, scale, onehot), eager._write(t, scale, onehot)
        assert torch.equal(a, b) and torch.equal(a.signbit(), b.signbit()), level


@pytest.mark.parametrize("name", list(_cases()))
def test_fused_sums_are_the_eager_sums_up_to_rounding(name, monkeypatch):
    x = _cases()[name]
    fused, eager = _engine(x, True, monkeypatch), _engine(x, False, monkeypatch)
    torch.testing.assert_close(fused.stats0, eager.stats0, rtol=1e-14, atol=0)
    assert torch.equal(fused.ratio_max, eager.ratio_max) and torch.equal(fused.e, eager.e)
    for eng in (fused, eager):
        solve_shared(eng, 0.6, tol=1e-12, max_iter=100)  # (the engine's units)
    mus = np.concatenate([[0.0], 10.0 ** np.linspace(-6, 1, 15)])
    pairs = [(fused.evaluate_shared(float(mu)), eager.evaluate_shared(float(mu))) for mu in mus]
    slope = max(abs(b.dS) for _, b in pairs)  # (ties: S(0) = 0 and S'(0) = 0 exactly in one order, ~1e-15 in another)
    for mu, (a, b) in zip(mus, pairs):
        assert a.S == pytest.approx(b.S, abs=1e-13 * fused.n_vectors), mu
        assert a.dS == pytest.approx(b.dS, abs=1e-12 * (1 + slope)), mu


@pytest.mark.parametrize("name", list(_cases()))
def test_fused_host_and_device_loop_agree_bit_for_bit(name, monkeypatch):
    eng = _engine(_cases()[name], True, monkeypatch)
    solve_shared(eng, 0.6, tol=1e-12, max_iter=100)
    for mu in 10.0 ** np.random.default_rng(0).uniform(-8, 2, 40):
        host = eng.evaluate_shared(float(mu))
        S, dS, _, _ = eng.evaluate_device(torch.tensor(float(mu), dtype=torch.float64))
        assert (host.S, host.dS) == (S.item(), dS.item()), mu


@st.composite
def float32_groups(draw):
    """(r, n) float32 rows, r >= 8 (the fused path needs uniform pieces): each row at its own exponent anywhere in
    float32's range, subnormals included, entries inside a row spread over many binades; zeros sometimes."""
    r, n = draw(st.integers(8, 24)), draw(st.integers(2, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spread = draw(st.integers(0, 40))
    base = draw(st.integers(-149, 97 - spread))  # the largest entry stays below 2^127
    x = rng.normal(size=(r, n)) * 2.0 ** rng.integers(-spread, spread + 1, (r, n)) * 2.0 ** (
        base + rng.integers(0, 27 - spread // 2 + 1, (r, 1)))
    if draw(st.booleans()):
        x[rng.random(x.shape) < 0.3] = 0.0
    return torch.from_numpy(x.astype(np.float32))


@SETTINGS
@given(x=float32_groups(), s=st.floats(0.05, 0.95))
@example(x=torch.from_numpy((np.random.default_rng(5).normal(size=(9, 4)) * 2.0**-147).astype(np.float32)), s=0.7)
def test_fused_keeps_the_contract_over_float32_exponents(fused, x, s):
    g = as_group(x, axis=1)
    assert TorchEngine(g.data, g.offsets, None, g.uniform_length).fused is not None  # (the path under test)
    zt, it = gs.project(x, s, axis=1, engine="torch", return_info=True)
    zn, inb = gs.project(x, s, axis=1, engine="numba", return_info=True)
    for info in (it, inb):
        assert s <= info.sparsity or info.already_sparse
        if info.low >= -60 and not info.already_sparse and not info.discontinuity:
            assert info.sparsity <= s + 2 * info.margin + 4e-7 + 1e-12
    assert it.already_sparse == inb.already_sparse
    assert abs(it.sparsity - inb.sparsity) <= 8e-7
    zt, zn = zt.numpy(), np.asarray(zn)
    assert np.all(np.isfinite(zt)) and zt.dtype == np.float32
    assert np.array_equal(np.signbit(zt), np.signbit(x.numpy()))  # every entry keeps its sign, zeros included
    if not (it.discontinuity or inb.discontinuity or it.low < -60):  # (ties split, subnormal outputs re-solved)
        peak = np.abs(x.numpy()).max(1, keepdims=True)  # each row in its own units
        assert np.all(np.abs(zt - zn) <= 1e-5 * peak)


@st.composite
def tied32(draw):
    r, n = draw(st.integers(8, 16)), draw(st.integers(2, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.choice([0.1, 0.5, 1.0], size=(r, n)) * rng.choice([-1.0, 1.0], size=(r, n))
    if draw(st.booleans()):
        x = x * (1 + rng.integers(-3, 4, size=(r, n)) * 2.0**-23)  # near-ties: a few float32 ulps apart
    return torch.from_numpy(x.astype(np.float32))


@SETTINGS
@given(x=tied32(), s=st.floats(0.05, 0.95))
def test_fused_ties_and_near_ties_land_like_numba(fused, x, s):
    zt, it = gs.project(x, s, axis=1, engine="torch", return_info=True)
    zn, inb = gs.project(x, s, axis=1, engine="numba", return_info=True)
    if it.already_sparse:
        assert inb.already_sparse and torch.equal(zt, torch.as_tensor(zn))
        return
    assert s <= it.sparsity and s <= inb.sparsity
    obj_t, obj_n = float((zt.double() ** 2).sum()), float((torch.as_tensor(zn).double() ** 2).sum())
    assert obj_t == pytest.approx(obj_n, rel=1e-5)


def test_small_groups_stay_eager(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    for shape, fused in (((64, 27), False), ((128, 512), True), ((65536, 2), False)):
        g = as_group(torch.zeros(shape), axis=1)
        assert (TorchEngine(g.data, g.offsets, None, g.uniform_length).fused is not None) == fused


def test_fused_kernels_do_not_recompile_across_shapes_modes_and_layouts(fused):
    """One graph per kernel whatever the call: shapes (square first too), axis, NumPy and 3-D inputs, grad,
    no_grad and inference mode, one threshold per row (project_each), two row lengths in a group; a user's
    torch-function mode adds one (dynamo guards on the mode stack) and its state none."""
    from torch._dynamo.utils import counters

    rng = np.random.default_rng(0)
    f32 = lambda *shape: torch.from_numpy(rng.normal(size=shape).astype(np.float32))  # noqa: E731
    gs.project(f32(64, 64), 0.8, axis=1, engine="torch")  # a square shape first
    gs.project_each(f32(64, 64), 0.8, axis=1, engine="torch")
    before = counters["stats"]["unique_graphs"]
    calls = [lambda: gs.project(f32(r, n), 0.8, axis=1, engine="torch") for r, n in ((65, 64), (512, 576), (33, 2))]
    calls += [lambda: gs.project(f32(40, 7), 0.8, axis=0, engine="torch"),
              lambda: gs.project(f32(6, 40, 7), 0.8, axis=2, engine="torch"),
              lambda: gs.project(f32(40, 9).numpy(), 0.8, axis=1, engine="torch"),
              lambda: gs.project(f32(40, 9).requires_grad_(), 0.8, axis=1, engine="torch"),
              lambda: gs.project([*f32(20, 9), *f32(30, 5)], 0.8, engine="torch"),
              lambda: gs.project_each(f32(50, 12), 0.7, axis=1, engine="torch")]
    for call in calls:
        call()
        with torch.no_grad():
            call()
        with torch.inference_mode():
            call()
    assert counters["stats"]["unique_graphs"] == before

    class Counting(torch.overrides.TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Counting.n += 1
            return func(*args, **(kwargs or {}))

    with Counting():
        for call in calls:
            call()
    assert counters["stats"]["unique_graphs"] <= before + 3 and Counting.n > 0


@pytest.mark.parametrize("s", [0.3, 0.8, 0.97])
def test_fused_batched_groups_and_project_each_match_numba(fused, s):
    """``project_groups`` (one threshold per group, ``_batched``) and ``project_each`` (one per vector) take the
    fused sums with per-row thresholds; both land where the numba engine does."""
    rng = np.random.default_rng(7)
    mats = [torch.from_numpy((rng.normal(size=(r, n)) * 2.0 ** rng.integers(-100, 100)).astype(np.float32))
            for r, n in ((64, 27), (32, 288), (16, 9), (12, 2))]
    zt, it = gs.project_groups(mats, s, axis=1, engine="torch", return_info=True)
    zn, inb = gs.project_groups([m.numpy() for m in mats], s, axis=1, engine="numba", return_info=True)
    for a, b, m in zip(zt, zn, mats):
        assert np.array_equal(np.signbit(a.numpy()), np.signbit(m.numpy()))
        np.testing.assert_allclose(a.numpy(), b, rtol=0, atol=1e-5 * float(m.abs().max()))
    for a, b in zip(it, inb):
        assert abs(a.sparsity - b.sparsity) <= 8e-7 and a.sparsity >= s - 1e-12
    m = mats[1]
    each_t = gs.project_each(m, s, axis=1, engine="torch")
    each_n = gs.project_each(m.numpy(), s, axis=1, engine="numba")
    np.testing.assert_allclose(each_t.numpy(), each_n, rtol=0, atol=1e-5 * float(m.abs().max()))


def test_a_failing_compile_warns_once_and_gives_the_eager_result(fused, monkeypatch):
    """Without a working compiler the call still succeeds, on the eager passes; other errors propagate."""
    from torch._inductor.exc import CppCompileError

    def broken(error):
        def compiled(name):
            def fail(*args):
                raise error
            return fail
        return compiled

    monkeypatch.setattr(_torch_fused, "_FAILED", [])
    x = _cases()["normal"]
    monkeypatch.setattr(_torch_fused, "_compiled", broken(MemoryError("not a compile error")))
    with pytest.raises(MemoryError):
        gs.project(x, 0.8, axis=1, engine="torch")
    assert _torch_fused.enabled()  # (not taken for a compiler failure)
    monkeypatch.setattr(_torch_fused, "_compiled", broken(CppCompileError(["g++"], "g++: not found")))
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*C.. compile error") as rec:
        z = gs.project(x, 0.8, axis=1, engine="torch")
    assert rec[0].filename == __file__  # (pointing at the caller's line, not the library's)
    monkeypatch.setenv(ENV, "0")
    torch.testing.assert_close(z, gs.project(x, 0.8, axis=1, engine="torch"), rtol=0, atol=0)
    monkeypatch.setenv(ENV, "1")
    g = as_group(x, axis=1)
    assert TorchEngine(g.data, g.offsets, None, g.uniform_length).fused is None  # later engines stay eager


@pytest.mark.parametrize("name", ["normal", "zeros and one-hot", "exponents", "ties"])
def test_fused_device_loop_equals_host_under_the_no_sync_guard(name, monkeypatch):
    """The device loop with fused passes under the loop test's guard (a torch-function mode that fails on any
    host sync): no sync inside, and the host solver's result bit for bit."""
    from test_projection_torch_loop import NoSync

    from groupsparse.projection._torch_loop import solve_device

    x = _cases()[name]
    a, ia = solve_shared(_engine(x, True, monkeypatch), 0.6, tol=1e-12, max_iter=100)
    b, ib = solve_device(_engine(x, True, monkeypatch), 0.6, tol=1e-12, max_iter=100, check_every=3, guard=NoSync)
    assert torch.equal(a, b) and ia.as_dict() == ib.as_dict()


def test_calls_cut_to_call_max_give_the_same_bits(fused, monkeypatch):
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(300, 27)).astype(np.float32))
    whole, info = gs.project(x, 0.8, axis=1, engine="torch", return_info=True)
    monkeypatch.setattr(_torch_fused, "CALL_MAX", 64)  # 2 rows a call, a last call of 2
    g = as_group(x, axis=1)
    pieces = TorchEngine(g.data, g.offsets, None, g.uniform_length).fused
    assert len(pieces) == 150 and all(p.v1 - p.v0 == 2 for p in pieces)
    cut, info_cut = gs.project(x, 0.8, axis=1, engine="torch", return_info=True)
    assert torch.equal(whole, cut) and info.as_dict() == info_cut.as_dict()
    assert [p.v1 - p.v0 for p in _torch_fused.runs(np.arange(0, 8 * 40, 40))] == [2, 2, 3]  # (no piece of 1 row)


def test_no_fused_passes_where_dynamo_is_off_or_groups_are_small(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    assert _torch_fused.enabled()
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    assert not _torch_fused.enabled()
    offsets = lambda r, n: np.arange(0, r * n + 1, n)  # noqa: E731
    assert _torch_fused.runs(offsets(4096, 16)) is not None
    assert _torch_fused.runs(offsets(65536, 2)) is None  # rows under MIN_LENGTH
    assert _torch_fused.runs(np.concatenate([offsets(4096, 16), 65536 + offsets(100, 9)[1:]])) is None  # a small run


def test_projection_inside_a_users_compiled_function(fused):
    """A user's torch.compile region around a projection (a pruner's step inside a compiled training step): the
    solver is host code, so the projection runs eagerly there (a graph break), with the same result."""
    x = _cases()["normal"]

    @torch.compile(backend="eager")
    def step(w):
        return gs.project(w, 0.8, axis=1, engine="torch") * 2

    torch.testing.assert_close(step(x), gs.project(x, 0.8, axis=1, engine="torch") * 2, rtol=0, atol=0)


def test_square_pieces_are_cut_so_no_graph_ties_rows_to_columns(fused):
    """A piece never has as many rows as entries a row (dynamo's duck sizing would tie them in the graph it
    compiles first, and every other shape would recompile): also after a dynamo reset, a square first call."""
    from torch._dynamo.utils import counters

    assert [p.v1 - p.v0 for p in _torch_fused.runs(np.arange(0, 65 * 64 + 1, 64)[:65])] == [32, 32]
    torch._dynamo.reset()
    rng = np.random.default_rng(1)
    gs.project(torch.from_numpy(rng.normal(size=(64, 64)).astype(np.float32)), 0.8, axis=1, engine="torch")
    before = counters["stats"]["unique_graphs"]
    for shape in ((100, 64), (300, 7), (512, 512)):
        gs.project(torch.from_numpy(rng.normal(size=shape).astype(np.float32)), 0.8, axis=1, engine="torch")
    assert counters["stats"]["unique_graphs"] == before


@pytest.mark.parametrize("compiled", [True, False])
def test_a_negative_view_projects_its_values(compiled, monkeypatch):
    """A tensor with the negative bit set (``torch._neg_view``) is its negated values: the fused write's aliases
    of raw memory lost the bit (every sign wrong), the eager engine could not read it into NumPy."""
    monkeypatch.setenv(ENV, "1" if compiled else "0")
    monkeypatch.setattr(_torch_fused, "FUSED_MIN", 0)
    x = torch.from_numpy(np.random.default_rng(4).normal(size=(256, 512)).astype(np.float32))
    neg = torch._neg_view(x)
    assert neg.is_neg()
    for engine in ("torch", "numba"):
        z = gs.project(neg, 0.8, axis=1, engine=engine)
        assert torch.equal(z, gs.project(-x, 0.8, axis=1, engine=engine))


def test_jit_trace_is_refused_with_a_clear_error():
    x = torch.randn(8, 5)
    with pytest.raises(RuntimeError, match="torch.jit.trace"):
        torch.jit.trace(lambda w: gs.project(w, 0.5, axis=1), (x,), check_trace=False)
