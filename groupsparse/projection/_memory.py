"""Memory checks at the boundary: outputs and in-place targets whose entries share memory are refused before
anything is written (``project(out=)``, ``project_``)."""

from __future__ import annotations

import numpy as np

from ._group import is_tensor


def may_overlap(shape, strides) -> bool:
    """Whether two entries of a strided view can share memory: sorted by |stride|, each axis must step past the
    whole extent of the faster ones (C, F, transposed and sliced views pass; expand and overlapping as_strided
    views do not). Strides in elements; a stride that is not a whole number of elements counts as overlapping."""
    dims = sorted((abs(int(st)), int(n)) for st, n in zip(strides, shape) if n > 1)
    extent = 1  # elements spanned by the faster axes
    for st, n in dims:
        if st < extent:
            return True
        extent = st * (n - 1) + extent
    return False


def self_overlapping(a) -> bool:
    """Whether two entries of an array or tensor may share memory (``may_overlap`` in element strides)."""
    if is_tensor(a):
        return may_overlap(a.shape, a.stride())
    return may_overlap(a.shape, [st // a.itemsize if st % a.itemsize == 0 else st for st in a.strides])


def check_tensor_target(t, where: str) -> None:
    """What ``copy_`` into ``t`` would refuse, refused before any target is written."""
    import torch

    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{where}: got an inference tensor, expected one writable outside torch.inference_mode")
    if self_overlapping(t):  # (the test ``out=`` gets: expand, overlapping as_strided)
        raise ValueError(f"{where}: got a tensor whose entries share memory (expand, stride 0), expected one "
                         "with its own memory per entry (clone it first)")


def check_separate_targets(targets) -> None:
    """Two targets sharing memory would each be written with their own projection, the later write winning
    (overlapping slices of one tensor came back short of the target): refused. Targets whose byte ranges overlap
    (a sweep over sorted ranges, per memory space) are decided exactly from their element addresses, on the
    host or on the device: interleaved slices (``t[0::2]``, ``t[1::2]``) and column blocks of one matrix pass."""
    spans = sorted((_space(t), *_byte_range(t), i) for i, t in enumerate(targets))
    spans = [sp for sp in spans if sp[2] > sp[1]]
    group, space, hi = [], None, 0
    for sp, lo, h, i in spans + [(None, 0, 0, -1)]:
        if group and sp == space and lo < hi:
            group.append(i)
            hi = max(hi, h)
            continue
        if len(group) > 1:
            _check_disjoint(targets, group)
        group, space, hi = [i], sp, h


def _space(t) -> str:
    return "host" if not is_tensor(t) or t.device.type == "cpu" else str(t.device)


def _check_disjoint(targets, idx) -> None:
    """Raise if two of ``targets[idx]`` (one memory space, overlapping ranges) share an entry. With one item size
    two entries overlap exactly when their start addresses are equal (all congruent modulo the size). The
    addresses are arithmetic on shapes, strides and base pointers: no memory is read, on the host or a device."""
    layouts = [_layout(targets[i]) for i in idx]
    addr = [_addresses(*lay[:3]) for lay in layouts]
    a = np.concatenate(addr)
    owner = np.repeat(np.asarray(idx), [len(x) for x in addr])
    order = np.argsort(a, kind="stable")
    a, owner = a[order], owner[order]
    sizes = {lay[3] for lay in layouts}
    size = sizes.pop() if len(sizes) == 1 else 0
    if not size or np.any((a - a[0]) % size):  # mixed item sizes or misaligned views: undecided, refused
        pair = idx[:2]
    else:
        clash = np.flatnonzero(a[1:] == a[:-1])
        if not len(clash):
            return
        pair = [int(owner[clash[0]]), int(owner[clash[0] + 1])]
    first, second = sorted(pair)
    raise ValueError(f"vectors: got vectors[{first}] and vectors[{second}] sharing memory, expected targets "
                     "with separate memory for project_ (pass each tensor once; clone overlapping views)")


def _layout(t):
    """(base address, shape, strides in bytes, item size) of a strided array or tensor; None for anything else
    (e.g. sparse tensors, which the projection refuses on its own)."""
    if is_tensor(t):
        if str(t.layout) != "torch.strided":
            return None
        es = t.element_size()
        return t.data_ptr(), tuple(t.shape), tuple(st * es for st in t.stride()), es
    if not isinstance(t, np.ndarray):
        return None
    return t.__array_interface__["data"][0], t.shape, t.strides, t.itemsize


def _addresses(base, shape, strides):
    """The start address of every entry (int64)."""
    out = np.full(1, base, dtype=np.int64)
    for n, st in zip(shape, strides):
        out = (out[:, None] + np.arange(n, dtype=np.int64)[None, :] * st).reshape(-1)
    return out


def _byte_range(t) -> tuple:
    """[first, last) byte addresses a strided array or tensor can touch (an empty range for empty ones and those
    without a layout)."""
    lay = _layout(t)
    if lay is None or 0 in lay[1]:
        return 0, 0
    base, shape, strides, size = lay
    lo = base + sum((n - 1) * st for n, st in zip(shape, strides) if st < 0)
    return lo, lo + size + sum((n - 1) * abs(st) for n, st in zip(shape, strides))


def shares_memory(a, b):
    """Whether two host arrays or CPU tensors share an entry's bytes (exact), None for memory on a device."""
    va, vb = host_view(a), host_view(b)
    return None if va is None or vb is None else np.shares_memory(va, vb)


def host_view(t):
    """A NumPy view of a host array or CPU tensor's memory (bfloat16 as int16: the same bytes), None on a device."""
    if not is_tensor(t):
        return t
    import torch

    if t.device.type != "cpu":
        return None
    try:
        return (t.detach().view(torch.int16) if t.dtype == torch.bfloat16 else t.detach()).numpy()
    except (TypeError, RuntimeError):  # a dtype NumPy lacks (float8): undecided, like memory on a device
        return None
