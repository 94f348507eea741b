"""Layer-level pruning rules: magnitude and Wanda scores, N:M and per-row/per-layer masks, SparseGPT.

Every function works on one weight matrix ``W`` of shape (out, in) and returns a *prune* mask (True = set to
zero) or new weights; nothing here touches modules. Counts are exact: a comparison group of n entries pruned at
fraction p loses exactly ``round(p * n)`` entries (ties broken by position, via :func:`~groupsparse.prune.masks.smallest_k`).
"""

from __future__ import annotations

import torch

from .._layouts import smallest_k


def parse_pattern(pattern) -> tuple[int, int] | None:
    """``None``/``"unstructured"`` -> None; ``"2:4"`` or ``(2, 4)`` -> (N, M) keeping N of every M inputs."""
    if pattern is None or pattern == "unstructured":
        return None
    if isinstance(pattern, str):
        parts = pattern.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"pattern: got {pattern!r}, expected 'unstructured' or 'N:M' such as '2:4'")
        pattern = (int(parts[0]), int(parts[1]))
    n, m = pattern
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"pattern: got {n}:{m}, expected integers 0 < N < M")
    return n, m


def wanda_scores(w: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| · ‖X_j‖₂ (Sun et al. 2023): the error of removing W_ij under a diagonal Hessian, square-rooted."""
    return w.abs().double() * col_norm.to(w.device, torch.float64).unsqueeze(0)


def row_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Prune exactly ``round(fraction · in)`` lowest scores in every row (Wanda's comparison group)."""
    k = round(fraction * scores.shape[1])
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def layer_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Prune exactly ``round(fraction · numel)`` lowest scores of the whole matrix."""
    return smallest_k(scores, round(fraction * scores.numel()))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the M−N lowest scores in every group of M consecutive inputs of each row (in % M == 0 required)."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise ValueError(f"N:M pattern: got in_features={in_f}, expected a multiple of M={m}")
    g = scores.reshape(out_f, in_f // m, m)
    idx = torch.sort(g, dim=2, stable=True).indices[:, :, : m - n]
    return torch.zeros_like(g, dtype=torch.bool).scatter_(2, idx, True).reshape(out_f, in_f)


def sparsegpt(w: torch.Tensor, gram: torch.Tensor, *, fraction: float = 0.0, nm: tuple[int, int] | None = None,
              mask: torch.Tensor | None = None, blocksize: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): prune ``w`` (out, in) and update the kept weights to compensate.

    Minimizes ‖W Xᵀ − Ŵ Xᵀ‖² row by row with the Hessian H = XᵀX + λI (λ = ``damp`` × mean diag H). Columns are
    eliminated left to right; removing column j's pruned entries leaves the error e = (w_j − q_j)/[H⁻¹]_jj, which
    the OBS update spreads over the columns not yet processed: W[:, j:] −= e ⊗ U[j, j:], where U is the upper
    Cholesky factor of H⁻¹ (the rows of U are the H⁻¹ rows of the successively reduced problems, so no inverse is
    recomputed). Updates to columns beyond the current block of ``blocksize`` are batched (lazy) into one matmul.
    The mask is chosen per block from the OBS saliency w²/U_jj² with the block's weights already updated:
    exactly the right share of the block for unstructured pruning (cumulative rounding makes the layer total
    exactly ``round(fraction·numel)``), the M−N lowest of every M-column group for N:M, or ``mask`` as given
    (then the sweep only refits the kept weights: the "refit" used for GSP). Returns (new weights, prune mask).
    """
    out_f, in_f = w.shape
    W = w.detach().double().clone()
    H = gram.detach().to(w.device, torch.float64, copy=True)
    dead = torch.diag(H) == 0          # inputs never active: their weights cannot matter, prune them first
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(in_f, dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    prune = torch.zeros_like(W, dtype=torch.bool)
    total = round(fraction * W.numel())
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        d = torch.diag(U1)
        if mask is not None:
            m1 = mask[:, i1:i2].clone()
        elif nm is None:
            k = round(total * i2 / in_f) - round(total * i1 / in_f)
            m1 = smallest_k(W1 ** 2 / (d ** 2).unsqueeze(0), k)
        else:
            m1 = torch.zeros_like(W1, dtype=torch.bool)
        for j in range(i2 - i1):
            if nm is not None and mask is None and j % nm[1] == 0:
                sal = W1[:, j : j + nm[1]] ** 2 / (d[j : j + nm[1]] ** 2).unsqueeze(0)
                m1[:, j : j + nm[1]] = nm_mask(sal, *nm)
            col = W1[:, j]
            q = torch.where(m1[:, j], torch.zeros_like(col), col)
            err = (col - q) / d[j]
            W1[:, j:] -= err.unsqueeze(1) * U1[j, j:].unsqueeze(0)
            W1[:, j] = q
            Err1[:, j] = err
        W[:, i1:i2] = W1
        prune[:, i1:i2] = m1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    W[prune] = 0.0
    return W.to(w.dtype), prune


def layer_error(w_old: torch.Tensor, w_new: torch.Tensor, gram: torch.Tensor) -> float:
    """‖(W − Ŵ) Xᵀ‖²_F = tr(ΔW H ΔWᵀ) with H = XᵀX: the objective all layer-wise methods are judged by."""
    d = (w_old.double() - w_new.double())
    return float(torch.einsum("ij,jk,ik->", d, gram.double(), d))
