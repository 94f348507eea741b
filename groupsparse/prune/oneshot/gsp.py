"""Data-aware GSP masks: the grouped projection applied to activation-scaled weights C = |W| · diag(‖X‖).

Why scaled weights and not the weighted GSP: the layer objective ‖(W − Ŵ)Xᵀ‖² with the diagonal of H = XᵀX is
Σ_ij (W_ij − Ŵ_ij)² ‖X_j‖², the squared Euclidean distance in the coordinates C_ij = W_ij‖X_j‖. The projection
is the nearest point (up to its rescale) under the Euclidean norm of its input, so projecting C projects in the
metric of the objective. The weighted GSP with w_j = 1/‖X_j‖ on W has the same soft-threshold *support*
(|W_ij| − μβw_j > 0 ⇔ |W_ij|‖X_j‖ > μβ) but measures distance and the rescale α in raw-weight units, i.e. in the
wrong metric, and changes the sparsity measure (weighted ℓ1) instead of the data. So we project C, unweighted.

From Hoyer sparsity to an exact zero count: GSP reaches an average Hoyer sparsity s, not a number of zeros. Its
zeros are the entries below the shared threshold μβ_i (each vector keeps at least its largest entry), and the
zero count grows with s. We bisect on s for the largest target whose projection zeros at most k = round(p·N)
entries of the group, prune those, then fill the remaining (few) slots with the smallest |projected| entries
among the survivors. Within one vector the projection is monotone in |C|, so a *row* group gives exactly
Wanda's mask; the projection adds something only when it shares μ across rows (``"layer"``) or layers
(``"model"``, each layer's C first divided by the RMS of its row norms so no layer is starved for its scale).

N:M: the constraint fixes the count in every M-block, so the budget cannot move. Inside each M-block the
projection is again monotone in |C|; whatever group the blocks are projected in, keeping the N largest projected
entries of each block keeps the N largest |C|: the GSP N:M mask *is* Wanda's N:M mask. What is lost is exactly
the allocation GSP exists for; only the refit can still differ from Wanda.
"""

from __future__ import annotations

import torch

from ..vectors import project_tensors
from .methods import lowest_k


def _zeros_at(scores, s, scope, normalize):
    res, _ = project_tensors(scores, s, vectors="filter", scope=scope, normalize=normalize)
    return res, sum(int((r == 0).sum()) for r in res)


def gsp_masks(scores: list[torch.Tensor], fraction: float, *, scope: str = "layer", normalize="layer",
              iters: int = 30) -> tuple[list[torch.Tensor], float]:
    """Prune masks with exactly ``round(fraction · N)`` zeros over ``scores`` (N = their total size).

    ``scope="layer"`` expects one matrix (its rows share μ); ``"model"`` one ragged group over all matrices.
    Returns the masks and the Hoyer target the bisection settled on.
    """
    scores = [s.double() for s in scores]
    total = sum(s.numel() for s in scores)
    k = round(fraction * total)
    lo, hi = 0.0, 1.0
    best, _ = _zeros_at(scores, 0.0, scope, normalize)  # s = 0: the group is returned as it is
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        res, z = _zeros_at(scores, mid, scope, normalize)
        if z <= k:
            lo, best = mid, res
        else:
            hi = mid
        if z == k:
            break
    zero = [r == 0 for r in best]
    need = k - sum(int(m.sum()) for m in zero)
    if need > 0:
        # the remaining slots go to the smallest projected magnitudes; current zeros are excluded by +inf
        key = torch.cat([torch.where(m, torch.full_like(r, float("inf")), r.abs()).reshape(-1) for m, r in zip(zero, best)])
        extra = lowest_k(key, need)
        i = 0
        for m in zero:
            n = m.numel()
            m |= extra[i : i + n].reshape(m.shape)
            i += n
    return zero, lo


def gsp_allocation(scores: dict[str, torch.Tensor], fraction: float, normalize="layer") -> dict[str, float]:
    """Per-layer zero fractions that one model-wide GSP group assigns at the overall ``fraction``."""
    names = list(scores)
    masks, _ = gsp_masks([scores[n] for n in names], fraction, scope="model", normalize=normalize)
    return {n: float(m.sum()) / m.numel() for n, m in zip(names, masks)}
