"""The sign contract: every output entry carries its input entry's sign bit, on every engine and path.

A projected entry is sign(x) times a magnitude, and a zeroed one is a zero with x's sign (-0.0 where x < 0 or
x is -0.0). The paths reach a zero in different ways: the thresholded write (scalar loop, the short-vector vector
code, torch's clamp form), a vector that empties out (one-hot writers), the weighted write, a group already sparse
(a copy). They used to differ in the sign of those zeros (+0.0 from the one-hot writers and the weighted write,
+0.0 for a -0.0 input in the numba writes), so two engines could disagree in bits on the same answer.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import groupsparse as gs
from test_projection_uniform_attack import nasty_group, run, targets

torch = pytest.importorskip("torch")

PATHS = ("uniform", "threads", "ragged", "general")


def same_signs(x, z):
    x, z = np.asarray(x), np.asarray(z)
    assert z.shape == x.shape
    bad = np.signbit(x) != np.signbit(z)
    assert not bad.any(), (x[bad][:5], z[bad][:5])


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gs.projection.ProjectionWarning)
        return fn(*a, **kw)


@st.composite
def short_or_long(draw):
    """nasty_group, or many short vectors (the eight-at-a-time kernels need r >= 8)."""
    x = draw(nasty_group())
    if draw(st.booleans()):
        reps = draw(st.integers(8, 40)) // x.shape[0] + 1
        x = np.tile(x, (reps, 1))[: max(8, x.shape[0])]
        x[np.random.default_rng(x.shape[0]).random(x.shape) < 0.2] *= -1  # not exact copies: other signs
    return x


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_numba_paths_keep_the_sign_bit(data):
    x = data.draw(short_or_long())
    s = data.draw(targets(x.shape[0]))
    for path in PATHS:
        z, _ = quiet(run, x, s, path)
        same_signs(x, z)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_torch_engine_and_weights_keep_the_sign_bit(data):
    x = data.draw(short_or_long())
    s = data.draw(targets(x.shape[0]))
    w = None
    if data.draw(st.booleans()):
        w = np.random.default_rng(x.shape[1]).random(x.shape) + 0.1
    for engine in ("numba", "torch"):
        wt = None if w is None else torch.from_numpy(w)
        z = quiet(gs.project, torch.from_numpy(x), s, axis=1, weights=wt, engine=engine)
        same_signs(x, z.numpy())
        z = quiet(gs.project_each, x, s, axis=1, weights=w, engine=engine)
        same_signs(x, z)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_ragged_lists_and_blocks_keep_the_sign_bit(data):
    x = data.draw(nasty_group())
    s = data.draw(targets(x.shape[0]))
    cut = [list(v[: 1 + i % x.shape[1]]) for i, v in enumerate(x)]  # other lengths (length 1 included)
    vecs = [np.asarray(v, x.dtype) for v in cut if len(v) >= 2] or [x[0]]
    for engine in ("numba", "torch"):
        for z, v in zip(quiet(gs.project, vecs, s, engine=engine), vecs):
            same_signs(v, z)
        out = quiet(gs.project_groups, [x, x[::-1]], s, axis=1, engine=engine)
        same_signs(x, out[0])
        same_signs(x[::-1], out[1])


@pytest.mark.parametrize("engine", ["numba", "torch"])
@pytest.mark.parametrize("n", [3, 9, 16, 40])
def test_one_hot_vectors_get_signed_zeros(engine, n):
    """s = 1: every vector one-hot; its zeros carry x's sign (a -0.0 input stays -0.0, a +0.0 stays +0.0)."""
    rng = np.random.default_rng(n)
    x = rng.normal(size=(24, n))
    x[:, ::3] = -0.0
    x[:, 1::5] = 0.0
    for dtype in (np.float32, np.float64):
        xd = x.astype(dtype)
        z = gs.project(xd, 1.0, axis=1, engine=engine)
        same_signs(xd, z)
        assert np.all(np.count_nonzero(z, axis=1) == 1)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_half_precision_tensors_keep_the_sign_bit(data):
    """float16 and bfloat16 tensors (solved in float32/float64, written back rounded, re-solved while short) keep
    the sign bit too, on both engines and through ``project_each``."""
    x = data.draw(short_or_long())
    s = data.draw(targets(x.shape[0]))
    dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16]))
    top = np.abs(x).max()
    scaled = x / top * 100.0 if top > 0 else x  # into float16's range (tiny entries round to signed zeros)
    xt = torch.from_numpy(np.ascontiguousarray(scaled)).to(dtype)
    xs = xt.float().numpy()  # the signs the tensor holds, -0.0 included
    for engine in ("numba", "torch"):
        z = quiet(gs.project, xt, s, axis=1, engine=engine)
        assert z.dtype == dtype
        same_signs(xs, z.float().numpy())
        z = quiet(gs.project_each, xt, s, axis=1, engine=engine)
        same_signs(xs, z.float().numpy())
