"""Hoyer sparsity measures."""

from __future__ import annotations

from typing import Any

import numpy as np

from .projection._group import _check_float, _validate_axis, is_tensor


def _to_numpy64(x: Any, what: str) -> np.ndarray:
    _check_float(x, what)
    if is_tensor(x):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def hoyer_sparsity(x: Any, *, axis: int | None = None, weights: Any = None):
    r"""Hoyer sparsity :math:`(\sqrt n - \|x\|_1/\|x\|_2)/(\sqrt n - 1)` in [0, 1] (1 = one nonzero).

    Weighted form (``weights`` > 0, same shape): :math:`(\|w\|_2 - \sum_j w_j|x_j|/\|x\|_2)/(\|w\|_2 - \min_j w_j)`.

    Parameters
    ----------
    x : array or tensor, or a list of 1-D arrays/tensors
        With ``axis=None`` the whole input is one vector and a Python float is returned. With ``axis`` the
        vectors lie along that axis (as in ``numpy.linalg.norm``) and the per-vector values come back as an
        array (NumPy) or tensor (same device, float64) with that axis removed. A list gives a NumPy array of
        one value per vector: each entry one vector, or with ``axis`` every vector of every entry, in order
        (``weights`` then a list of the same length).

    A zero vector has sparsity 1.0 by convention; fewer than 2 entries is a ``ValueError``.
    """
    if isinstance(x, (list, tuple)):
        if weights is not None and (not isinstance(weights, (list, tuple)) or len(weights) != len(x)):
            got = f"{len(weights)} entries" if isinstance(weights, (list, tuple)) else type(weights).__name__
            raise ValueError(f"weights: got {got} for a list of {len(x)}, expected a list with one per entry of x")
        ws = weights if weights is not None else [None] * len(x)
        if axis is None:  # each entry one vector
            return np.array([hoyer_sparsity(v, weights=w) for v, w in zip(x, ws)])
        # each entry holds vectors along ``axis`` (as ``project`` reads a list with ``axis``): all of them, in order
        vals = [hoyer_sparsity(v, axis=axis, weights=w) for v, w in zip(x, ws)]
        return np.concatenate([np.ravel(v.cpu().numpy() if is_tensor(v) else v) for v in vals]) if vals else np.zeros(0)
    tensor = is_tensor(x)
    device = x.device if tensor else None
    a = np.abs(_to_numpy64(x, "x"))
    w = None
    if weights is not None:
        w = _to_numpy64(weights, "weights")
        if w.shape != a.shape:
            raise ValueError(f"weights: got shape {w.shape}, expected {a.shape} (the shape of x)")
        if not np.all(np.isfinite(w)) or not np.all(w > 0):
            raise ValueError("weights: got a non-positive or non-finite entry, expected strictly positive weights")
    if not np.all(np.isfinite(a)):
        raise ValueError("x: got NaN or Inf entries, expected finite values")
    if axis is None:
        a = a.reshape(1, -1)
        w = w.reshape(1, -1) if w is not None else None
        vec_axis = 1
    else:
        if a.ndim == 0:
            raise ValueError("x: got a 0-d scalar, expected an array of vectors")
        vec_axis = _validate_axis(axis, a.ndim)
    n = a.shape[vec_axis]
    if n < 2:
        raise ValueError(f"x: got vectors of length {n}, expected length >= 2 (Hoyer sparsity is 0/0 below that)")
    # scale invariant in x and in w: divide each vector (and its weights) by a power of two of its largest entry,
    # exactly, so squares neither overflow nor underflow (1e-300 or 1e+300 vectors, subnormals, huge weights)
    peak = a.max(axis=vec_axis, keepdims=True)
    a = np.ldexp(a, -np.clip(np.frexp(peak)[1], -1022, 1023))
    if w is not None:
        w = np.ldexp(w, -np.frexp(w.max(axis=vec_axis, keepdims=True))[1])
    l1 = (a if w is None else w * a).sum(axis=vec_axis)
    l2 = np.sqrt((a * a).sum(axis=vec_axis))
    if w is None:
        top, floor = np.sqrt(n), 1.0
    else:
        top, floor = np.sqrt((w * w).sum(axis=vec_axis)), w.min(axis=vec_axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        sp = np.where(l2 > 0, (top - l1 / np.where(l2 > 0, l2, 1.0)) / (top - floor), 1.0)
    sp = np.clip(sp, 0.0, 1.0)
    if axis is None:
        return float(sp[0])
    if tensor:
        import torch

        return torch.as_tensor(sp, device=device)
    return sp
