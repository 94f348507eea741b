"""Small helpers of the experiment runner beside ``groupsparse.prune``: the default Hoyer target for a zero
fraction, and per-layer figures for report.json."""

from __future__ import annotations

import bisect

import torch

from .. import hoyer_sparsity

# REFERENCE.md section 3: zero fraction produced by a filter-wise projection of Gaussian weights at Hoyer target s.
_HOYER_TO_ZEROS = ((0.5, 0.56), (0.6, 0.71), (0.7, 0.83), (0.8, 0.92), (0.9, 0.97), (0.95, 0.99))


def hoyer_target_for(zero_fraction: float) -> float:
    """Default GSP Hoyer target for a final zero fraction: invert the table of REFERENCE.md section 3 (piecewise
    linear, clamped to [0.5, 0.95]), so the projection alone makes about as many zeros as the target and the
    final magnitude step only trims the rest."""
    zs = [z for _, z in _HOYER_TO_ZEROS]
    if zero_fraction <= zs[0]:
        return _HOYER_TO_ZEROS[0][0]
    if zero_fraction >= zs[-1]:
        return _HOYER_TO_ZEROS[-1][0]
    i = bisect.bisect_left(zs, zero_fraction)
    (s0, z0), (s1, z1) = _HOYER_TO_ZEROS[i - 1], _HOYER_TO_ZEROS[i]
    return round(s0 + (s1 - s0) * (zero_fraction - z0) / (z1 - z0), 4)


@torch.no_grad()
def layer_report(params: dict[str, torch.Tensor]) -> list[dict]:
    rows = []
    for name, w in params.items():
        t = w.detach().float().cpu()
        zeros = int((t == 0).sum())
        rows.append({"name": name, "shape": list(t.shape), "numel": t.numel(), "zeros": zeros,
                     "zero_fraction": zeros / t.numel(), "hoyer_sparsity": float(hoyer_sparsity(t.flatten()))})
    return rows


def zero_fraction(params: dict[str, torch.Tensor]) -> float:
    n = sum(w.numel() for w in params.values())
    z = sum(int((w.detach() == 0).sum()) for w in params.values())
    return z / n
