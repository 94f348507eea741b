"""State-dict files: safetensors and torch ``.pt``/``.pth``/``.bin``, read safely and written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..io import atomic_path, check_distinct

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SUFFIXES = (".safetensors",) + TORCH_SUFFIXES
# keys under which training scripts commonly nest the weights in a .pt checkpoint
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


def _suffix(path: Path, what: str) -> str:
    s = path.suffix.lower()
    if s not in SUFFIXES:
        raise ValueError(f"{what}: got {str(path)!r}, expected a file ending in {', '.join(SUFFIXES)}")
    return s


def load_state_dict(path: str | os.PathLike, *, key: str | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a state_dict. ``.pt`` files load with ``weights_only=True`` (no arbitrary code runs); a dict whose
    weights sit under ``state_dict``/``model``/... is unwrapped (or name the ``key``); the ``module.`` prefix of
    DataParallel checkpoints is kept as is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: got {str(path)!r}, which is not a file")
    if _suffix(path, "checkpoint") == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            raise KeyError(f"key: got {key!r}, expected one of {list(obj) if isinstance(obj, Mapping) else []}")
        obj = obj[key]
    elif isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for k in _NESTED_KEYS:
            if isinstance(obj.get(k), Mapping):
                obj = obj[k]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint: {str(path)!r} holds a {type(obj).__name__}, expected a state_dict (name -> tensor)")
    return dict(obj)


def save_state_dict(state_dict: Mapping[str, Any], path: str | os.PathLike, *, input_path=None,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``state_dict`` atomically (temp file + rename); refuses to overwrite ``input_path``.

    safetensors needs contiguous tensors that share no storage, so tensors are made contiguous and
    deduplicated (shared/tied tensors are cloned); non-tensor entries are an error there. ``.pt`` keeps
    everything as given.
    """
    path = Path(path)
    suffix = _suffix(path, "out")
    if input_path is not None:
        check_distinct(input_path, path)
    with atomic_path(path) as tmp:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise TypeError(f"state_dict: got non-tensor entries {bad[:5]}, expected only tensors for .safetensors")
            seen, out = set(), {}
            for k, v in state_dict.items():
                v = v.detach()
                ptr = (v.untyped_storage().data_ptr(), v.device) if v.numel() else None
                if ptr is not None and ptr in seen:
                    v = v.clone()
                elif ptr is not None:
                    seen.add(ptr)
                out[k] = v.contiguous()
            save_file(out, str(tmp), metadata=dict(metadata) if metadata else None)
        else:
            torch.save(dict(state_dict), tmp)
    return path


def prune_state_dict(state_dict: Mapping[str, Any], sparsity: float, *, vectors: str = "filter",
                     scope: str = "layer", normalize: str | None = None, include=None, exclude=None, rule=None,
                     engine: str = "auto", tol: float | None = None) -> tuple[dict[str, Any], list[str], list]:
    """Single-shot GSP of a bare state_dict (no model code): returns ``(new_state_dict, pruned_names, infos)``.

    Tensors are chosen by :func:`~groupsparse.prune.select_state_dict_keys` (default rule: 2-D and 3-5-D
    floating ``*weight`` tensors not named like norms or embeddings). Tensors whose vectors in ``vectors`` mode
    would have one entry are left as they are. The input mapping is not modified.
    """
    from .selection import select_state_dict_keys
    from .vectors import check_mode, project_tensors, vector_shape

    mode = check_mode(vectors)
    names = select_state_dict_keys(state_dict, include=include, exclude=exclude, rule=rule)

    def projectable(v):
        try:
            return v.numel() > 0 and vector_shape(v.shape, mode)[1] >= 2
        except ValueError:
            return False

    names = [n for n in names if projectable(state_dict[n])]
    if not names:
        raise ValueError("state_dict: got no tensor to prune, expected at least one (check --include/--exclude, or "
                         "--any-tensor to drop the name rule)")
    out = dict(state_dict)
    results, infos = project_tensors([state_dict[n] for n in names], sparsity, vectors=mode, scope=scope,
                                     normalize=normalize, engine=engine, tol=tol)
    for n, r in zip(names, results):
        out[n] = r
    return out, names, infos
