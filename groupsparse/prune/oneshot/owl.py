"""OWL (Yin et al. 2023): outlier-weighted layerwise sparsity, the hand-made allocation GSP is compared with.

Each decoder block's outlier ratio D_l is the share of its Wanda scores (all Linear layers of the block pooled)
above ``m`` times their mean. Blocks with more outliers are pruned less: the ratios are min-max mapped onto
[0, 2λ], shifted so their mean is the target keep ratio 1 − p, and each block is pruned at 1 − (that keep
ratio), so sparsities lie in [p − λ, p + λ] and average exactly p over equally sized blocks.
"""

from __future__ import annotations

import torch


def outlier_ratio(scores: list[torch.Tensor], m: float = 5.0) -> float:
    flat = torch.cat([s.reshape(-1).double() for s in scores])
    return float((flat > m * flat.mean()).double().mean())


def owl_sparsities(ratios: list[float], fraction: float, lam: float = 0.08) -> list[float]:
    """Block sparsities from outlier ratios: mean ``fraction``, spread 2λ, more outliers -> fewer zeros."""
    if lam < 0:
        raise ValueError(f"lam: got {lam}, expected >= 0")
    r = torch.tensor(ratios, dtype=torch.float64)
    span = float(r.max() - r.min())
    keep = (r - r.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(r)
    keep = keep - keep.mean() + (1 - fraction)
    return [min(max(1 - float(k), 0.0), 1.0) for k in keep]
