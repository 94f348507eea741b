"""Helpers of the mask machinery that need no Pruner: exact k-smallest selection, and flattening any of the three
mask layouts of a state_dict into plain tensors with real zeros."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def smallest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool tensor (same shape) marking exactly ``k`` entries with the smallest scores; ties broken by position.

    Uses a k-th value threshold plus an explicit tie pass instead of a full sort, so it stays O(N) in memory
    and exact when many scores tie (e.g. the zeros a projection leaves).
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k: got {k}, expected 0 <= k <= {n}")
    out = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k == 0:
        return out.reshape(scores.shape)
    if k == n:
        return ~out.reshape(scores.shape)
    # the threshold must be found and compared in one exact dtype: a float32 k-th value of float64 scores can sit
    # between two of them and mark one entry too few (widening half precision or ints to float64 is exact)
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.double()
    thr = torch.kthvalue(work, k).values
    below = work < thr
    out |= below
    need = k - int(below.sum())
    if need > 0:
        ties = torch.nonzero(work == thr).reshape(-1)[:need]
        out[ties] = True
    return out.reshape(scores.shape)


def is_mask_entry(k: str, state_dict) -> bool:
    """``x_mask`` beside ``x`` (buffer layout) or ``x_orig`` (torch.nn.utils.prune's): a mask, not a weight."""
    base = k[: -len("_mask")]
    return k.endswith("_mask") and (base in state_dict or base + "_orig" in state_dict)


def pruned_state_dict(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain state_dict with real zeros: ``x_orig * x_mask`` folded into ``x``, ``*_mask`` buffers applied and
    dropped, parametrizations flattened. Works on models pruned by this module or by torch.nn.utils.prune.

    From a model every parametrized weight is exported as the module computes it (a mask times the original,
    but also spectral_norm or orthogonal ones); from a bare state_dict only mask parametrizations can be folded
    (their ``original`` and ``0.mask``), other parametrizations keep their entries."""
    model = model_or_state if isinstance(model_or_state, nn.Module) else None
    sd = model.state_dict() if model is not None else dict(model_or_state)
    out: dict[str, torch.Tensor] = {}
    masks = {k[: -len("_mask")]: v for k, v in sd.items() if k.endswith("_mask") and isinstance(v, torch.Tensor)}
    computed = _parametrized_weights(model) if model is not None else {}
    parts = {k: _parametrization_entry(k) for k in sd}
    groups: dict[str, set] = {}  # parametrized name -> the leaves of its entries ("original", "0.mask", ...)
    for part in parts.values():
        if part is not None:
            groups.setdefault(part[0] + part[1], set()).add(part[2])
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and is_mask_entry(k, sd):
            continue
        if parts[k] is not None:
            head, pname, leaf = parts[k]
            name = head + pname
            if name in computed:
                out[name] = computed[name]
                continue
            if groups[name] <= {"original", "0.mask"}:  # a mask parametrization of this library: fold it
                if leaf == "original":
                    m = sd.get(f"{head}parametrizations.{pname}.0.mask")
                    w = v.detach().clone()
                    out[name] = w if m is None else w.masked_fill(~m.bool(), 0)
                continue
            out[k] = v  # (another parametrization: its tensors, unchanged)
            continue
        name = k[: -len("_orig")] if k.endswith("_orig") and k[: -len("_orig")] + "_mask" in sd else k
        w = v.detach().clone() if isinstance(v, torch.Tensor) else v
        m = masks.get(name)
        if m is not None and isinstance(w, torch.Tensor) and m.shape == w.shape:
            w = w.masked_fill(~m.bool(), 0)
        out[name] = w
    return out


def _parametrization_entry(k: str) -> tuple[str, str, str] | None:
    """``"<head>parametrizations.<name>.<leaf>"`` -> (head, name, leaf); None for other keys."""
    if not (k.startswith("parametrizations.") or ".parametrizations." in k):
        return None
    head, _, rest = k.rpartition("parametrizations.")
    pname, leaf = rest.split(".", 1)
    return head, pname, leaf


def _parametrized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parametrized tensor of ``model`` as its module computes it, by its plain state_dict name."""
    out = {}
    with torch.no_grad():
        for mname, mod in model.named_modules():
            plist = getattr(mod, "parametrizations", None)
            if isinstance(plist, nn.ModuleDict):
                # in eval mode: spectral_norm's power iteration must not advance because the model was exported
                modes = [(q, q.training) for q in plist.modules()]
                plist.eval()
                try:
                    for pname in plist.keys():
                        out[f"{mname}.{pname}" if mname else pname] = getattr(mod, pname).detach().clone()
                finally:
                    for q, training in modes:
                        q.training = training
    return out
