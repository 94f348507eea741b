"""OWL (Yin et al. 2023): outlier-weighted layerwise sparsity, the hand-made allocation GSP is compared with.

Each decoder block's outlier ratio D_l is the share of its Wanda scores (all Linear layers of the block pooled)
above ``m`` times their mean. Blocks with more outliers are pruned less: the ratios are min-max mapped onto
[0, 2λ], shifted so their mean is the target keep ratio 1 − p, and each block is pruned at 1 − (that keep
ratio), so sparsities lie in [p − λ, p + λ] and average exactly p over equally sized blocks.

Near the ends of the range p ± λ can leave [0, max] (max = 1 − 1/in_features: every row keeps a weight). Clipping
there would move the mean off p and could empty a block, so the spread is shrunk instead: λ is scaled down to
the largest value for which every block lies in [0, max]. The mean stays exactly p and the order of the blocks
is kept; only a p outside [0, max] itself is refused.
"""

from __future__ import annotations

import torch


def outlier_ratio(scores: list[torch.Tensor], m: float = 5.0) -> float:
    flat = torch.cat([s.reshape(-1).to(scores[0].device, torch.float64) for s in scores])
    return float((flat > m * flat.mean()).double().mean())


def owl_sparsities(ratios: list[float], fraction: float, lam: float = 0.08, max_sparsity: float = 1.0) -> list[float]:
    """Block sparsities from outlier ratios: mean ``fraction``, spread up to 2λ (less where a block would leave
    [0, ``max_sparsity``]), more outliers -> fewer zeros."""
    if lam < 0:
        raise ValueError(f"lam: got {lam}, expected >= 0")
    if not 0.0 <= max_sparsity <= 1.0:
        raise ValueError(f"max_sparsity: got {max_sparsity}, expected a fraction in [0, 1]")
    if not 0.0 <= fraction <= max_sparsity:
        raise ValueError(f"fraction: got {fraction}, expected in [0, {max_sparsity:.4f}] (the largest block sparsity)")
    r = torch.tensor(ratios, dtype=torch.float64)
    span = float(r.max() - r.min())
    keep = (r - r.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(r)
    offset = keep - keep.mean()                       # sparsity of block l: fraction − offset_l
    scale = 1.0
    for d in offset.tolist():
        if d > 0:
            scale = min(scale, fraction / d)
        elif d < 0:
            scale = min(scale, (max_sparsity - fraction) / -d)
    # the clip only absorbs rounding of the scaled offsets (≤ 1 ulp), never a real excess
    return [min(max(fraction - scale * float(d), 0.0), max_sparsity) for d in offset]
