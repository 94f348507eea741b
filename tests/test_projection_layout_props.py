"""Memory layout as a drawn dimension: any strides, axis, order, dtype, engine, weights and ``out=`` give the bits of
the same data laid out C-contiguous with the vectors along the last axis, and never touch the input.

The parametrized layout tests (test_projection_short_uniform.py, test_projection_uniform_attack.py) pin chosen
cases; here hypothesis draws the layout together with the data, the exponents and the engine.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import groupsparse as gs

torch = pytest.importorskip("torch")


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


@st.composite
def laid_out(draw):
    """(array with some layout, axis, its canonical C-contiguous (..., n) copy, weights or None)."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    ndim = draw(st.integers(2, 3))
    shape = [draw(st.integers(1, 6)) for _ in range(ndim)]
    axis = draw(st.integers(-ndim, ndim - 1))
    shape[axis] = draw(st.integers(2, 40))  # vectors of length >= 2
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    spread = draw(st.sampled_from([0, 8, 60]))  # one scale, or vectors 2^±60 apart
    base = rng.normal(size=shape) * np.exp2(rng.integers(-spread, spread + 1, size=shape))
    if draw(st.booleans()):
        base[rng.random(shape) < 0.3] = 0.0
    if draw(st.booleans()):  # ties: repeat one magnitude
        base = np.sign(base) * np.abs(base).max()
    base = base.astype(dtype)
    # the same values in another layout: a transposed buffer, Fortran order, steps and negative strides
    layout = draw(st.sampled_from(["C", "F", "transposed", "stepped", "reversed"]))
    if layout == "F":
        x = np.asfortranarray(base)
    elif layout == "transposed":
        perm = draw(st.permutations(range(ndim)))
        x = np.ascontiguousarray(base.transpose(perm)).transpose(np.argsort(perm))
    elif layout == "stepped":
        big = np.zeros([2 * d for d in shape], dtype)
        big[tuple(slice(None, None, 2) for _ in shape)] = base
        x = big[tuple(slice(None, None, 2) for _ in shape)]
    elif layout == "reversed":
        x = base[tuple(slice(None, None, -1) for _ in shape)].copy()[tuple(slice(None, None, -1) for _ in shape)]
    else:
        x = base
    weights = None
    if draw(st.booleans()):
        weights = (rng.random(shape) + 0.1).astype(np.float64)
    return x, axis, base, weights


@settings(max_examples=60, deadline=None)
@given(laid_out(), st.floats(0.05, 0.95), st.sampled_from(["auto", "numba", "torch"]), st.booleans(),
       st.booleans())
def test_any_layout_gives_the_canonical_bits(case, s, engine, as_tensor, with_out):
    x, axis, base, weights = case
    canon = np.ascontiguousarray(np.moveaxis(base, axis, -1))
    wcanon = None if weights is None else np.ascontiguousarray(np.moveaxis(weights, axis, -1))
    ref = gs.project(canon, s, axis=-1, weights=wcanon, engine=engine)
    want = bits(np.moveaxis(ref, -1, axis))
    before = bits(x).copy()
    if as_tensor:
        t = torch.from_numpy(x) if x.strides[0] >= 0 else torch.from_numpy(x.copy())
        tw = None if weights is None else torch.from_numpy(weights)
        got = gs.project(t, s, axis=axis, weights=tw, engine=engine)
        assert isinstance(got, torch.Tensor) and got.dtype == t.dtype
        assert np.array_equal(bits(got.numpy()), want)
        assert np.array_equal(bits(t.numpy()), before)
    else:
        out = np.full(x.shape, np.nan, x.dtype, order="F" if x.flags.f_contiguous else "C") if with_out else None
        got = gs.project(x, s, axis=axis, weights=weights, engine=engine, out=out)
        assert got.dtype == x.dtype and got.shape == x.shape
        if with_out:
            assert got is out
        assert np.array_equal(bits(got), want)
    assert np.array_equal(bits(x), before), "the input was modified"
