"""Turning what the caller passed into one flat, contiguous group, and back.

Every engine sees the same thing: a 1-D buffer holding the vectors one after another, ``offsets`` (host int64,
length r + 1) marking where each starts, and optionally a weight buffer laid out the same way. Ragged groups are
concatenated (never padded); an N-D array has its vector axis moved last so each vector is contiguous.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import numpy as np


class _LazyTorch:
    """torch, imported on first use: NumPy-only callers (the CLI on a .npy file) skip its ~1 s import, and a
    broken torch install does not break them. A tensor argument means the caller has imported torch already."""

    def __getattr__(self, name: str) -> Any:
        import torch as _torch

        return getattr(_torch, name)


torch = _LazyTorch()


def is_tensor(x: Any) -> bool:
    t = sys.modules.get("torch")
    return t is not None and isinstance(x, t.Tensor)


def _dtype_name(x: Any) -> str:
    return str(x.dtype).replace("torch.", "")


def _check_float(x: Any, what: str) -> None:
    if is_tensor(x):
        ok = x.dtype.is_floating_point
    elif isinstance(x, np.ndarray):
        ok = np.issubdtype(x.dtype, np.floating)
    else:
        raise TypeError(f"{what}: got {type(x).__name__}, expected a NumPy array or a torch.Tensor")
    if not ok:
        raise TypeError(
            f"{what}: got dtype {_dtype_name(x)}, expected a floating dtype (float16/32/64 or bfloat16); "
            "cast first, e.g. x.astype(np.float64) or x.double()"
        )
    if not is_tensor(x) and x.dtype.itemsize > 8:
        _check_longdouble(x, what)


def _check_longdouble(x: np.ndarray, what: str) -> None:
    """long double is solved in float64 and returned as long double: accepted only where that is exact, i.e.
    every finite nonzero entry lies in float64's normal range (NaN/Inf are left to the usual check)."""
    with np.errstate(over="ignore", under="ignore"):
        y = x.astype(np.float64)
    a = np.abs(x)
    bad = (np.isfinite(a) & ~np.isfinite(y)) | ((a != 0) & (np.abs(y) < np.finfo(np.float64).tiny))
    if np.any(bad):
        raise ValueError(f"{what}: got {_dtype_name(x)} entries outside float64's normal range (e.g. "
                         f"{x.reshape(-1)[np.argmax(bad.reshape(-1))]!r}), expected long double values representable "
                         "in float64 (long double is solved in float64); rescale first")


def _flat_float_buffer(x: Any):
    """Contiguous 1-D view/copy in a dtype the kernels take (float32/float64)."""
    if is_tensor(x):
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.detach().resolve_neg().reshape(-1).contiguous()  # (a negative view's bit: its values, copied)
    if not x.dtype.isnative:  # big-endian input: every dtype decision below sees the native dtype
        x = x.astype(x.dtype.newbyteorder("="))
    if x.dtype == np.float16:
        x = x.astype(np.float32)
    elif x.dtype.itemsize > 8:  # long double: the kernels run in float64
        x = x.astype(np.float64)
    return np.ascontiguousarray(x).reshape(-1)


# Normalized weights below this (relative to their vector's largest) are rejected: ratios |c|/w must stay finite.
_W_SPAN = 2.0**-500


def _normalized_weights(w: Any, offsets: np.ndarray) -> Any:
    """float64 weights divided per vector by a power of two of their largest: beta_i w_i does not change when
    w_i is scaled, so this is exact, and the engines never see weights near the float64 limits."""
    r = len(offsets) - 1
    lengths = np.diff(offsets)
    if is_tensor(w):
        w = w.to(torch.float64)
        if r and np.all(lengths == lengths[0]):
            top = w.reshape(r, -1).amax(1)
        else:
            seg = torch.repeat_interleave(torch.arange(r, device=w.device), torch.as_tensor(lengths, device=w.device))
            top = torch.zeros(r, dtype=torch.float64, device=w.device).scatter_reduce(0, seg, w, "amax")
        f = torch.frexp(top).exponent.double()
        scale = torch.repeat_interleave(torch.pow(2.0, -f), torch.as_tensor(lengths, device=w.device))
        out = w * scale
        low = bool((out < _W_SPAN).any())
    else:
        w = np.asarray(w, dtype=np.float64)
        top = np.maximum.reduceat(w, offsets[:-1]) if r else np.zeros(0)
        out = np.ldexp(w, np.repeat(-np.frexp(top)[1], lengths))
        low = bool((out < _W_SPAN).any())
    if low:
        raise ValueError("weights: got a vector whose weights span more than 2^500 (largest over smallest), "
                         "expected weights within that range inside each vector")
    return out


class Group:
    """A group of vectors, flattened. ``rebuild(flat_out)`` returns results shaped like the input.

    ``offsets`` (int64, length r + 1) is built on first use when every vector has ``uniform_length`` entries: the
    compiled equal-length path never reads it, and for length-9 float32 vectors it alone would be 0.22x the input.
    """

    def __init__(self, data: Any, offsets: np.ndarray | None, weights: Any | None, backend: str,
                 rebuild: Callable[[Any], Any], uniform_length: int | None = None, out_dtypes: tuple = (),
                 out_flat: Any = None, vectors_last: bool = False, blocks: tuple = (), n_vectors: int | None = None):
        self.data = data  # 1-D float32/float64 ndarray or tensor
        self._offsets = offsets
        self._r = len(offsets) - 1 if offsets is not None else int(n_vectors)
        self.weights = weights
        self.backend = backend  # "numpy" or "torch"
        self.rebuild = rebuild
        self.uniform_length = uniform_length  # all vectors have this length (lets engines use 2-D layouts)
        self.out_dtypes = out_dtypes  # the dtypes results are returned in (they set the precision contract)
        self.out_flat = out_flat  # a caller's output buffer laid out like ``data`` (project(out=...)), or None
        self.vectors_last = vectors_last  # one array whose vectors already lie along its last axis (a view)
        self.blocks = blocks  # (start, end, output dtype) of each input block in the flat layout

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = np.arange(self._r + 1, dtype=np.int64) * self.uniform_length
        return self._offsets

    @property
    def n_vectors(self) -> int:
        return self._r


# A grouped target at or below this is taken as 0 (the group comes back unchanged): a measured average sparsity is
# exact only to about +-4e-16, so below it whether a group is "already there" followed the sign of a rounding error
# and paths summing in other orders decided differently (ties of equal entries at s = 8e-88: one path returned the
# group, another split the tie by 1.5e-10). The band [s, s + 1e-12] holds either way.
SUBROUNDING = 2.0**-50


def grouped_target(s: float) -> float:
    return 0.0 if s <= SUBROUNDING else s


def validate_sparsity(sparsity: Any) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.floating, np.integer)):
        raise TypeError(f"sparsity: got {type(sparsity).__name__}, expected a float in [0, 1]")
    s = float(sparsity)
    if not (0.0 <= s <= 1.0):  # also rejects NaN
        raise ValueError(f"sparsity: got {sparsity!r}, expected a float in [0, 1]")
    return s


def _validate_axis(axis: Any, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis: got {axis!r}, expected an int")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis: got {axis}, expected an int in [{-ndim}, {ndim - 1}] for a {ndim}-D input")
    return int(axis) % ndim


def _check_lengths(lengths: np.ndarray) -> None:
    if len(lengths) == 0:
        raise ValueError("vectors: got an empty group, expected at least one vector")
    bad = np.flatnonzero(lengths < 2)
    if len(bad):
        raise ValueError(
            f"vectors: got a vector of length {int(lengths[bad[0]])} (vector {int(bad[0])}), expected length >= 2; "
            "Hoyer sparsity is undefined (0/0) for fewer than 2 entries: drop such vectors from the group"
        )


def _same_structure_weights(weights: Any, vectors: Any, is_list: bool) -> None:
    if is_list:
        if not isinstance(weights, (list, tuple)) or len(weights) != len(vectors):
            n = len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__
            raise ValueError(f"weights: got {n}, expected a list of {len(vectors)} arrays matching the vectors")
        for i, (w, v) in enumerate(zip(weights, vectors)):
            _check_float(w, f"weights[{i}]")
            if tuple(w.shape) != tuple(v.shape):
                raise ValueError(f"weights[{i}]: got shape {tuple(w.shape)}, expected {tuple(v.shape)}")
    else:
        _check_float(weights, "weights")
        if tuple(weights.shape) != tuple(vectors.shape):
            raise ValueError(f"weights: got shape {tuple(weights.shape)}, expected {tuple(vectors.shape)} (the vectors' shape)")


def _check_weight_values(w: Any) -> None:
    if is_tensor(w):
        ok = bool(torch.isfinite(w).all()) and bool((w > 0).all())
    else:
        ok = bool(np.isfinite(w).all()) and bool((w > 0).all())
    if not ok:
        raise ValueError("weights: got a non-positive or non-finite entry, expected strictly positive finite weights")


def as_group(vectors: Any, *, axis: int = 0, weights: Any = None) -> Group:
    """Validate and flatten ``vectors`` (a list of 1-D arrays/tensors, or one N-D array/tensor)."""
    if isinstance(vectors, (list, tuple)):
        return _group_from_list(vectors, weights, axis)
    _check_float(vectors, "vectors")
    if vectors.ndim == 0:
        raise ValueError("vectors: got a 0-d scalar, expected a 1-D or N-D array of vectors")
    ax = _validate_axis(axis, vectors.ndim)
    if weights is not None:
        _same_structure_weights(weights, vectors, is_list=False)
    tensor = is_tensor(vectors)
    if weights is not None and is_tensor(weights) != tensor:
        raise TypeError("weights: got a mix of NumPy arrays and tensors, expected the same kind as the vectors")
    n = vectors.shape[ax]
    last = ax == vectors.ndim - 1  # vectors already contiguous: no axis shuffling on the way in or out

    def to_last(a):
        return a if last else (a.movedim(ax, -1) if tensor else np.moveaxis(a, ax, -1))

    moved = to_last(vectors)
    r = int(np.prod(moved.shape[:-1], dtype=np.int64))
    _check_lengths(np.array([n] if r else [], dtype=np.int64))
    offsets = None if weights is None else np.arange(r + 1, dtype=np.int64) * n  # else built on first use
    data = _flat_float_buffer(moved)
    w = None
    if weights is not None:
        w = to_last(weights)
        _check_weight_values(w)
        w = _normalized_weights(w.detach().resolve_neg().reshape(-1) if tensor else np.ascontiguousarray(w).reshape(-1),
                                offsets)
    moved_shape = tuple(moved.shape)
    orig_dtype = vectors.dtype

    def rebuild(flat):
        out = flat.reshape(moved_shape)
        if tensor:
            out = out if last else out.movedim(-1, ax)
            return out.to(orig_dtype).contiguous()
        out = out if last else np.moveaxis(out, -1, ax)
        return np.ascontiguousarray(out, dtype=orig_dtype)

    return Group(data, offsets, w, "torch" if tensor else "numpy", rebuild, uniform_length=n,
                 out_dtypes=(orig_dtype,), vectors_last=last or vectors.ndim == 1,
                 blocks=((0, r * n, orig_dtype),), n_vectors=r)


def _group_from_list(vectors: Sequence[Any], weights: Any, axis: int) -> Group:
    """A ragged group from a list of blocks: 1-D vectors, or N-D arrays whose vectors lie along ``axis``.

    Blocks let a caller pass whole weight matrices (e.g. every layer of a model as one group) without splitting
    them into Python lists of rows.
    """
    if len(vectors) == 0:
        raise ValueError("vectors: got an empty list, expected at least one vector")
    for i, v in enumerate(vectors):
        _check_float(v, f"vectors[{i}]")
        if v.ndim == 0:
            raise ValueError(f"vectors[{i}]: got a 0-d scalar, expected a 1-D vector or an N-D block of vectors")
    kinds = {is_tensor(v) for v in vectors}
    if len(kinds) > 1:
        raise TypeError("vectors: got a mix of NumPy arrays and tensors, expected one kind")
    tensor = kinds.pop()
    if weights is not None:
        _same_structure_weights(weights, vectors, is_list=True)
        if any(is_tensor(w) != tensor for w in weights):
            raise TypeError("weights: got a mix of NumPy arrays and tensors, expected the same kind as the vectors")
    axes = [0 if v.ndim == 1 else _validate_axis(axis, v.ndim) for v in vectors]

    def moved(v, ax):
        return v if v.ndim == 1 else (v.movedim(ax, -1) if tensor else np.moveaxis(v, ax, -1))

    blocks = [moved(v, ax) for v, ax in zip(vectors, axes)]
    counts = np.array([int(np.prod(b.shape[:-1], dtype=np.int64)) for b in blocks], dtype=np.int64)
    lengths = np.repeat(np.array([b.shape[-1] for b in blocks], dtype=np.int64), counts)
    _check_lengths(lengths)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    dtypes = [v.dtype for v in vectors]
    if tensor:
        devices = {v.device for v in vectors}
        if len(devices) > 1:
            raise ValueError(f"vectors: got tensors on devices {sorted(map(str, devices))}, expected one device")
        work = torch.float64 if torch.float64 in dtypes else torch.float32
        data = torch.cat([b.detach().reshape(-1).to(work) for b in blocks])
        w = None
        if weights is not None:
            w = torch.cat([moved(x, ax).detach().reshape(-1).to(torch.float64) for x, ax in zip(weights, axes)])
    else:
        native = [d.newbyteorder("=") for d in dtypes]  # '>f8' == np.float64 is False
        work = np.float64 if any(d == np.float64 or d == np.longdouble for d in native) else np.float32
        data = np.concatenate([np.asarray(b, dtype=work).reshape(-1) for b in blocks])
        w = None
        if weights is not None:
            w = np.concatenate([np.asarray(moved(x, ax), dtype=np.float64).reshape(-1) for x, ax in zip(weights, axes)])
    if w is not None:
        for i, x in enumerate(weights):
            _check_weight_values(x)  # in its own dtype, before any cast
        w = _normalized_weights(w, offsets)
    uniform = int(lengths[0]) if np.all(lengths == lengths[0]) else None
    starts = np.concatenate([[0], np.cumsum([b.numel() if tensor else b.size for b in blocks])])

    def rebuild(flat):
        parts = []
        for i, (b, ax, d) in enumerate(zip(blocks, axes, dtypes)):
            seg = flat[starts[i] : starts[i + 1]].reshape(b.shape)
            if tensor:
                seg = seg if b.ndim == 1 else seg.movedim(-1, ax)
                parts.append(seg.to(d).clone().contiguous())
            else:
                seg = seg if b.ndim == 1 else np.moveaxis(seg, -1, ax)
                parts.append(np.array(seg, dtype=d, order="C"))
        return parts

    return Group(data, offsets, w, "torch" if tensor else "numpy", rebuild, uniform_length=uniform,
                 out_dtypes=tuple(dtypes), blocks=tuple((int(a), int(b), d) for a, b, d in zip(starts, starts[1:], dtypes)))

