"""The few pruning operations the experiment runner needs, written against the projection core.

A local adapter: the experiments were built in parallel with the pruning library (``groupsparse.prune``), so they
depend only on ``groupsparse.project`` here. The operations follow REFERENCE.md section 5: per-layer GSP with the
authors' CIFAR vector mode (columns of ``W.reshape(out, -1)``), global magnitude finalization to an exact zero
fraction, and mask enforcement that also zeros the momentum (so neither momentum nor weight decay revives a
pruned weight).
"""

from __future__ import annotations

import bisect

import torch

from .. import hoyer_sparsity, project

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
def project_layers(params: dict[str, torch.Tensor], sparsity: float) -> None:
    """Project every tensor in place, each layer its own group, vectors = columns of ``W.reshape(out, -1)``."""
    for w in params.values():
        mat = w.detach().reshape(w.shape[0], -1)  # a copy for channels_last convs: write back with copy_
        if mat.shape[0] < 2:
            continue  # a single output unit gives length-1 vectors, which have no Hoyer sparsity
        w.copy_(project(mat, sparsity, axis=0).reshape(w.shape))


@torch.no_grad()
def global_magnitude_masks(params: dict[str, torch.Tensor], zero_fraction: float) -> dict[str, torch.Tensor]:
    """Boolean keep-masks with exactly ``round(zero_fraction * total)`` zeros over all tensors together."""
    flat = torch.cat([w.detach().abs().flatten().float() for w in params.values()])
    n_keep = flat.numel() - int(round(zero_fraction * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if n_keep > 0:
        keep[torch.topk(flat, n_keep, sorted=False).indices] = True
    return _split(keep, params)


@torch.no_grad()
def random_masks(params: dict[str, torch.Tensor], zero_fraction: float, seed: int) -> dict[str, torch.Tensor]:
    """Per-layer uniformly random keep-masks, each with exactly ``round(zero_fraction * numel)`` zeros."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in params.items():
        n = w.numel()
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=gen)[: n - int(round(zero_fraction * n))]] = True
        out[name] = keep.reshape(w.shape).to(w.device)
    return out


def _split(flat: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, w in params.items():
        out[name] = flat[i:i + w.numel()].reshape(w.shape)
        i += w.numel()
    return out


class MaskEnforcer:
    """Keeps pruned weights at exactly zero: call after every optimizer step (and once before training)."""

    def __init__(self, params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]):
        self.pairs = [(params[k], masks[k].to(params[k].device)) for k in params]

    @torch.no_grad()
    def __call__(self, step: int | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        for w, m in self.pairs:
            w.mul_(m)
            if optimizer is not None:
                buf = optimizer.state.get(w, {}).get("momentum_buffer")
                if buf is not None:
                    buf.mul_(m)


def hoyer_square(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """DeepHoyer's Hoyer-Square regularizer, summed over layers: sum_l ||w_l||_1^2 / ||w_l||_2^2."""
    total = 0.0
    for w in params.values():
        total = total + w.abs().sum() ** 2 / (w.pow(2).sum() + 1e-12)
    return total


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
