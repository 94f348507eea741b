"""Data-aware GSP masks: the grouped projection applied to activation-scaled weights C = |W| · diag(‖X‖).

Why scaled weights and not the weighted GSP: the layer objective ‖(W − Ŵ)Xᵀ‖² with the diagonal of H = XᵀX is
Σ_ij (W_ij − Ŵ_ij)² ‖X_j‖², the squared Euclidean distance in the coordinates C_ij = W_ij‖X_j‖. The projection
is the nearest point (up to its rescale) under the Euclidean norm of its input, so projecting C projects in the
metric of the objective. The weighted GSP with w_j = 1/‖X_j‖ on W has the same soft-threshold *support*
(|W_ij| − μβw_j > 0 ⇔ |W_ij|‖X_j‖ > μβ) but measures distance and the rescale α in raw-weight units, i.e. in the
wrong metric, and changes the sparsity measure (weighted ℓ1) instead of the data. So we project C, unweighted.

From Hoyer sparsity to an exact zero count: GSP reaches an average Hoyer sparsity s, not a number of zeros. At
its dual solution μ the projection of a vector c_i (length n_i, unweighted: β_i = 1/(√n_i − 1)) is
(|c_i| − μβ_i)_+ rescaled, or the one-hot at its largest entry when nothing stays positive. So its zeros are
exactly the entries with |c_ij|(√n_i − 1) ≤ μ, except each vector's largest entry, and their number grows with
s through μ. The mask at an exact count k = round(p·N) is therefore the projection's zero set at the μ where k
entries fall: rank key_ij = |c_ij|(√n_i − 1) (+∞ for each vector's largest entry) and prune the k lowest. This
is what bisecting the target s until the projection zeros k entries converges to (``gsp_masks_bisect``, the
test reference, runs the projection itself); the ranking gets it exactly in one sort instead of ~30
projections. Within one vector the key is monotone in |C|, so a *row* group gives exactly Wanda's mask; the
projection adds something only when it shares μ across rows (``"layer"``: rows of equal length, a layer-wide
threshold on |C| that keeps at least one weight per row) or layers (``"model"``: each layer's C first divided
by the RMS of its row norms, so no layer is starved for its scale; longer rows get a lower threshold through
√n_i − 1).

N:M: the constraint fixes the count in every M-block, so the budget cannot move. Inside each M-block the
projection is again monotone in |C|; whatever group the blocks are projected in, keeping the N largest projected
entries of each block keeps the N largest |C|: the GSP N:M mask *is* Wanda's N:M mask. What is lost is exactly
the allocation GSP exists for; only the refit can still differ from Wanda.
"""

from __future__ import annotations

import torch

from ..vectors import project_tensors
from .._layouts import smallest_k


def gsp_masks(scores: list[torch.Tensor], fraction: float, *, scope: str = "layer", normalize="layer") -> list[torch.Tensor]:
    """Prune masks with exactly ``round(fraction · N)`` zeros: the GSP zero set at the dual μ that zeros that many.

    ``scope="layer"`` projects each matrix as its own group (its rows share μ), ``"model"`` all matrices as one
    ragged group (``normalize="layer"`` divides each by the RMS of its row norms first, ``None`` keeps raw scales).
    """
    if scope not in ("layer", "model"):
        raise ValueError(f"scope: got {scope!r}, expected 'layer' or 'model'")
    if scope == "layer" and len(scores) > 1:
        return [gsp_masks([s], fraction, scope="layer")[0] for s in scores]
    keys = []
    for c in scores:
        c = c.double().abs()
        if c.ndim != 2 or c.shape[1] < 2:
            raise ValueError(f"scores: got shape {tuple(c.shape)}, expected (rows, n) with n >= 2")
        if scope == "model" and normalize == "layer":
            rms = torch.sqrt(torch.mean(torch.sum(c * c, dim=1)))
            c = c / rms if rms > 0 else c
        elif normalize not in (None, "layer"):
            raise ValueError(f"normalize: got {normalize!r}, expected 'layer' or None")
        key = c * (c.shape[1] ** 0.5 - 1)
        # the projection never empties a vector: its largest entry survives every μ
        key.scatter_(1, c.argmax(dim=1, keepdim=True), float("inf"))
        # one ranking over layers that may sit on different devices (a model spread over several)
        keys.append(key.reshape(-1).to(keys[0].device if keys else key.device))
    total = sum(k.numel() for k in keys)
    k = round(fraction * total)
    rows = sum(s.shape[0] for s in scores)
    if k > total - rows:
        raise ValueError(f"sparsity: got {fraction}, expected at most {(total - rows) / total:.4f} for GSP "
                         "(the projection keeps the largest entry of every vector)")
    flat = smallest_k(torch.cat(keys), k)
    out, i = [], 0
    for c in scores:
        out.append(flat[i : i + c.numel()].reshape(c.shape).to(c.device))
        i += c.numel()
    return out


def gsp_masks_bisect(scores: list[torch.Tensor], fraction: float, *, scope: str = "layer", normalize="layer",
                     iters: int = 60) -> list[torch.Tensor]:
    """Reference (slow): bisect the Hoyer target s until the projection itself zeros round(p·N) entries."""
    k = round(fraction * sum(s.numel() for s in scores))
    lo, hi = 0.0, 1.0
    best = None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        res, _ = project_tensors([s.double() for s in scores], mid, vectors="filter", scope=scope, normalize=normalize)
        z = sum(int((r == 0).sum()) for r in res)
        if z <= k:
            lo, best = mid, [r == 0 for r in res]
        if z == k:
            break
        if z > k:
            hi = mid
    return best


def gsp_allocation(scores: dict[str, torch.Tensor], fraction: float, normalize="layer") -> dict[str, float]:
    """Per-layer zero fractions that one model-wide GSP group assigns at the overall ``fraction``."""
    names = list(scores)
    masks = gsp_masks([scores[n] for n in names], fraction, scope="model", normalize=normalize)
    return {n: float(m.sum()) / m.numel() for n, m in zip(names, masks)}
