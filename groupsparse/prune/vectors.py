"""How a weight tensor is cut into vectors, and how tensors are grouped for one projection.

Vector modes (``W`` has shape ``(out, in, *kernel)``; a Linear is ``(out, in)``):

======================  =====================================  =================================================
mode                    vectors (rows of the returned matrix)  shape of ``as_vectors(W, mode)``
======================  =====================================  =================================================
``"filter"``            rows of ``W.reshape(out, -1)``: one    ``(out, in*k*k)``
                        output unit's fan-in
``"fan_out"``           columns of ``W.reshape(out, -1)``: the ``(in*k*k, out)``
(``"kernel_position"``) ``out`` weights reading one (input
                        channel, ky, kx) position
``"kernel"``            each ``k×k`` kernel ``W[o, i]``        ``(out*in, k*k)`` (conv only)
``"layer"``             the whole tensor                       ``(1, numel)``
======================  =====================================  =================================================

Sparsity is averaged over vectors, so the mode decides what "sparse" means: ``filter`` spreads zeros inside each
unit's fan-in and rarely kills a unit, ``fan_out`` tends to silence whole input channels/positions (closer to
structured pruning), ``kernel`` keeps a few taps per 3×3 kernel (fails on 1×1 convs and Linear layers: their
vectors have one entry), ``layer`` lets the projection move zeros anywhere in the tensor (like magnitude pruning
with a soft threshold).

Group scopes:

* ``"layer"``: each tensor is one projection at the target, so every layer ends at the same average sparsity.
  Predictable, no cross-layer effects; cannot give more zeros to over-parameterised layers.
* ``"model"``: one ragged group over the vectors of all selected tensors, so a single dual variable μ shares the
  sparsity budget across layers. μ thresholds magnitudes, so layers with small weights (and, for ``layer`` mode,
  long vectors) are sparsified far more; without normalization short or low-scale layers are driven to one
  nonzero per vector. ``normalize`` rescales vectors before the projection (and back after it):
  ``"vector"`` makes every vector unit-norm (all vectors compete on relative shape only; a whole low-norm
  filter is no longer cheaper to prune), ``"layer"`` divides each tensor by the RMS norm of its vectors (keeps
  the norm differences between vectors of one layer, removes scale differences between layers).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

VECTOR_MODES = ("filter", "fan_out", "kernel_position", "kernel", "layer")
SCOPES = ("layer", "model")
NORMALIZATIONS = (None, "vector", "layer")


def check_mode(mode: str) -> str:
    if not isinstance(mode, str) or mode not in VECTOR_MODES:
        raise ValueError(f"vectors: got {mode!r}, expected one of {VECTOR_MODES}")
    return "fan_out" if mode == "kernel_position" else mode


def check_scope(scope: str) -> str:
    if not isinstance(scope, str) or scope not in SCOPES:
        raise ValueError(f"scope: got {scope!r}, expected one of {SCOPES}")
    return scope


def check_normalize(normalize):
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: got {normalize!r}, expected one of {NORMALIZATIONS}")
    return normalize


def vector_shape(shape: Sequence[int], mode: str) -> tuple[int, int]:
    """``(number of vectors, vector length)`` of a tensor of ``shape`` in ``mode``."""
    mode = check_mode(mode)
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        raise ValueError("tensor: got a 0-d scalar, expected a weight tensor")
    numel = math.prod(shape)
    if mode == "layer":
        return 1, numel
    if len(shape) < 2:
        raise ValueError(f"vectors={mode!r}: got a tensor of shape {shape}, expected at least 2 dims (use 'layer')")
    out, fan_in = shape[0], numel // shape[0] if shape[0] else 0
    if mode == "filter":
        return out, fan_in
    if mode == "fan_out":
        return fan_in, out
    if len(shape) < 3:
        raise ValueError(f"vectors='kernel': got a tensor of shape {shape}, expected a convolution weight (>= 3 dims)")
    k = math.prod(shape[2:])
    return out * shape[1], k


def as_vectors(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """2-D matrix whose rows are the vectors of ``weight`` in ``mode`` (a view when the layout allows)."""
    mode = check_mode(mode)
    r, n = vector_shape(weight.shape, mode)
    if mode == "fan_out":
        return weight.reshape(weight.shape[0], -1).t()
    return weight.reshape(r, n)


def from_vectors(matrix: torch.Tensor, shape: Sequence[int], mode: str) -> torch.Tensor:
    """Inverse of :func:`as_vectors`."""
    mode = check_mode(mode)
    shape = tuple(shape)
    if mode == "fan_out":
        return matrix.t().reshape(shape)
    return matrix.reshape(shape)


def scale_factors(mats: Sequence[torch.Tensor], normalize) -> list[torch.Tensor | None]:
    """Per-row divisors for a model-scope projection (``None`` where no scaling applies)."""
    normalize = check_normalize(normalize)
    out = []
    for m in mats:
        if normalize is None:
            out.append(None)
            continue
        norms = torch.linalg.vector_norm(m.double(), dim=1)
        if normalize == "vector":
            f = norms
        else:
            f = torch.sqrt(torch.mean(norms * norms)).expand_as(norms)
        # zero rows stay zero; dividing them by 1 keeps them finite
        f = torch.where(f > 0, f, torch.ones_like(f)).to(m.dtype)
        out.append(f.unsqueeze(1))
    return out


def project_tensors(tensors: Sequence[torch.Tensor], sparsity: float, *, vectors: str = "filter",
                    scope: str = "layer", normalize=None, engine: str = "auto", tol: float | None = None,
                    max_iter: int | None = None) -> tuple[list[torch.Tensor], list]:
    """Project weight tensors (not in place) by mode and scope; returns new tensors and the projection infos.

    ``scope="layer"`` gives one info per tensor, ``scope="model"`` a single info. ``normalize`` is meant for the
    model scope; in the layer scope ``"layer"`` changes nothing (one tensor, one scale) and ``"vector"`` makes the
    vectors of one tensor compete on shape only (no filter is sparsified more for being small).
    """
    from .. import project, project_groups

    mode = check_mode(vectors)
    scope = check_scope(scope)
    normalize = check_normalize(normalize)
    tensors = list(tensors)
    if not tensors:
        return [], []
    kw = dict(engine=engine, tol=tol, max_iter=max_iter)
    mats = [as_vectors(t.detach(), mode) for t in tensors]
    scales = scale_factors(mats, normalize)
    scaled = [m if f is None else m / f for m, f in zip(mats, scales)]
    if scope == "layer":
        # one call for all layers: batched on GPUs, one layer at a time (cache-friendly) on CPUs
        res, infos = project_groups(scaled, sparsity, axis=1, return_info=True, **kw)
    else:
        # the matrices themselves form the ragged group: no Python list of rows
        res, info = project(scaled, sparsity, axis=1, return_info=True, **kw)
        infos = [info]
    results = [from_vectors(r if f is None else r * f, t.shape, mode) for t, r, f in zip(tensors, res, scales)]
    return results, infos
