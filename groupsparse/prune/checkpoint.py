"""State-dict files: safetensors and torch ``.pt``/``.pth``/``.bin``, read safely and written atomically.

A training checkpoint often nests the weights (``{"model": sd, "epoch": 3, "optimizer": ...}``): it is read as a
:class:`Checkpoint` that remembers the rest, so a pruned copy keeps everything else unchanged.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..io import atomic_path, check_distinct, check_safetensors_names, check_suffix
from ._ties import _PROJECTABLE, _dense, _partial_overlaps, find_ties  # noqa: F401 (public here too)

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SUFFIXES = (".safetensors",) + TORCH_SUFFIXES
# keys under which training scripts commonly nest the weights in a .pt checkpoint
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
# training state that may sit beside the weights: never flattened into names that --any-tensor would prune
_NOT_WEIGHTS = ("optimizer", "optimizer_state_dict", "optimizer_states", "optim", "scheduler", "lr_scheduler",
                "lr_schedulers", "scaler", "callbacks", "loops")


@dataclass
class Checkpoint:
    """A checkpoint file's content: the ``state_dict`` to prune and where it sits in the file.

    ``state_dict`` is flat (name -> value). Mappings of tensors nested inside the weights (``{"enc": {...},
    "dec": {...}}``) appear under dotted names (``enc.fc.weight``) and are put back in place on writing; the
    state_dict mapping keeps its type and attributes (an ``OrderedDict``'s ``_metadata`` versions)."""

    state_dict: dict[str, Any]
    container: Any = None  # the whole object of a .pt file whose state_dict is nested under ``path``
    key: str | None = None  # ``path`` for messages: "model", or "model.enc" when nested deeper
    metadata: dict[str, str] | None = None  # safetensors header metadata, written back
    config: dict | None = field(default=None, repr=False)  # config.json beside the file (Hugging Face layout)
    path: tuple = ()  # keys from the file's object down to the state_dict mapping
    original: Any = field(default=None, repr=False)  # that mapping as read (its type and attributes are kept)
    places: dict[str, tuple] = field(default_factory=dict, repr=False)  # dotted name -> keys inside ``original``

    @property
    def extras(self) -> list[str]:
        """Keys of the container besides the state_dict (``epoch``, ``optimizer``, ``ema``...)."""
        if self.container is None:
            return []
        out, node = [], self.container
        for i, k in enumerate(self.path):
            out += [".".join(map(str, self.path[:i] + (o,))) for o in node if o != k]
            node = node[k]
        return out

    def with_state_dict(self, state_dict: Mapping[str, Any]) -> Any:
        """The object to write: the file's object with the new tensors in place (copies along the way, the
        input objects are not modified), or a plain dict when the checkpoint was not read from a file."""
        if self.original is None:
            sd = dict(state_dict)
        else:
            sd = copy.copy(self.original)  # an OrderedDict stays one, with its _metadata
            copied = {(): sd}
            for name, v in state_dict.items():
                keys = self.places.get(name, (name,))
                node = sd
                for i in range(len(keys) - 1):
                    if keys[: i + 1] not in copied:
                        copied[keys[: i + 1]] = node[keys[i]] = copy.copy(node[keys[i]])
                    node = copied[keys[: i + 1]]
                node[keys[-1]] = v
        if self.container is None:
            return sd
        return _replace_at(self.container, self.path, sd)


def _replace_at(obj: Any, path: tuple, value: Any) -> Any:
    """A copy of nested mapping ``obj`` with ``obj[path[0]][path[1]]... = value``; the rest is shared."""
    if not path:
        return value
    out = copy.copy(obj)
    out[path[0]] = _replace_at(obj[path[0]], path[1:], value)
    return out


def _holds_tensor(v: Any, depth: int = 0) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    return isinstance(v, Mapping) and depth < 8 and any(_holds_tensor(x, depth + 1) for x in v.values())


def _find_state_dict(obj: Any, key: str | None, path: Path) -> tuple:
    """Keys from the loaded object down to the state_dict: ``key`` if given, then ``state_dict``/``model``/...
    or a lone mapping while a level holds no tensor itself (``{"model": {"enc": sd}, "epoch": 3}``)."""
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            raise KeyError(f"--key: got {key!r}, expected one of {list(obj) if isinstance(obj, Mapping) else []} "
                           f"(the keys of {str(path)!r})")
        keys, node = (key,), obj[key]
    else:
        keys, node = (), obj
    while isinstance(node, Mapping) and not any(isinstance(v, torch.Tensor) for v in node.values()):
        nxt = next((k for k in _NESTED_KEYS if isinstance(node.get(k), Mapping)), None)
        if nxt is None:
            maps = [k for k, v in node.items() if isinstance(v, Mapping) and _holds_tensor(v)]
            nxt = maps[0] if len(maps) == 1 and len(node) == 1 else None
        if nxt is None or len(keys) >= 8:
            break
        keys, node = keys + (nxt,), node[nxt]
    return keys


def _flatten(sd: Mapping, path: Path) -> tuple[dict[str, Any], dict[str, tuple]]:
    """(dotted name -> value, dotted name -> keys) of a state_dict whose values may be mappings of tensors."""
    flat, places = {}, {}

    def walk(m: Mapping, keys: tuple) -> None:
        for k, v in m.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):  # int: {"layers": {0: {...}}}, named "0"
                raise ValueError(f"checkpoint: {str(path)!r} has the entry {keys + (k,)!r} named by a "
                                 f"{type(k).__name__}, expected str names (name -> tensor)")
            here = keys + (k,)
            if isinstance(v, Mapping) and _holds_tensor(v) and len(here) < 8 and k not in _NOT_WEIGHTS:
                walk(v, here)
                continue
            name = ".".join(map(str, here))
            if name in flat:
                raise ValueError(f"checkpoint: {str(path)!r} holds two entries named {name!r} (one nested), "
                                 "expected unique dotted names")
            flat[name], places[name] = v, here

    walk(sd, ())
    return flat, places


def _unreadable(path: Path, e: BaseException) -> ValueError:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
    # torch's refusal starts with advice to trust the file; the line naming the refused class is the useful one
    first = next((ln for ln in lines if "Unsupported global" in ln), lines[0]).split(". ")[0][:300]
    if type(e).__name__ == "UnpicklingError":
        return ValueError(f"checkpoint: {str(path)!r} holds objects a safe load refuses ({first}); expected a "
                          "state_dict saved with torch.save(model.state_dict()): a pickled module or custom class "
                          "could run code when loaded")
    what = "declares more data than memory holds" if isinstance(e, MemoryError) else f"{type(e).__name__}: {first}"
    return ValueError(f"checkpoint: cannot read {str(path)!r} (truncated or not a {path.suffix} file? {what})")


def _read_config(path: Path) -> dict | None:
    cfg = path.parent / "config.json"
    if not cfg.is_file():
        return None
    try:
        doc = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"config: cannot read {str(cfg)!r} beside the checkpoint ({e})") from e
    return doc if isinstance(doc, dict) else None


def load_checkpoint(path: str | os.PathLike, *, key: str | None = None,
                    map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint. ``.pt`` files load with ``weights_only=True`` (no arbitrary code runs); a dict whose
    weights sit under ``state_dict``/``model``/... is unwrapped (or name the ``key``) and the rest kept in
    ``container``; the ``module.`` prefix of DataParallel checkpoints is kept as is. A file that cannot be
    parsed is a ``ValueError`` naming it."""
    path = Path(path)
    suffix = check_suffix(path, SUFFIXES, "checkpoint")
    if not path.is_file():
        if path.exists():  # a pipe or device: reading it could block or never end
            raise ValueError(f"checkpoint: got {str(path)!r}, which is not a regular file; expected a checkpoint file")
        raise FileNotFoundError(2, "checkpoint: no such file", str(path))
    if key is not None and suffix == ".safetensors":
        raise ValueError(f"--key: got {key!r} for {str(path)!r}, expected no --key: a .safetensors file holds one "
                         "flat name -> tensor map")
    config = _read_config(path)
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device=str(map_location)) as f:
                return Checkpoint({k: f.get_tensor(k) for k in f.keys()}, metadata=f.metadata(), config=config)
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        if e.errno is not None:
            raise
        raise _unreadable(path, e) from e
    except Exception as e:  # noqa: BLE001 - UnpicklingError, SafetensorError, RuntimeError, MemoryError...
        raise _unreadable(path, e) from e
    keys = _find_state_dict(obj, key, path)
    sd = obj
    for k in keys:
        sd = sd[k]
    if not isinstance(sd, Mapping):
        where = "".join(f"[{k!r}]" for k in keys)
        raise ValueError(f"checkpoint: {str(path)!r}{where} holds a {type(sd).__name__}, expected a state_dict "
                         "(name -> tensor)")
    flat, places = _flatten(sd, path)
    return Checkpoint(flat, container=obj if keys else None, key=".".join(map(str, keys)) or None, config=config,
                      path=keys, original=sd, places=places)


def load_state_dict(path: str | os.PathLike, *, key: str | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The state_dict of a checkpoint file (see :func:`load_checkpoint`, which also keeps the rest)."""
    return load_checkpoint(path, key=key, map_location=map_location).state_dict


def save_state_dict(state_dict: Mapping[str, Any], path: str | os.PathLike, *, input_path=None,
                    metadata: Mapping[str, str] | None = None, container: Checkpoint | None = None) -> Path:
    """Write ``state_dict`` atomically (temp file + fsync + rename); refuses to overwrite ``input_path``.

    With ``container`` (the :class:`Checkpoint` it came from) a ``.pt`` output holds the whole checkpoint with
    the new state_dict in place, and a ``.safetensors`` one keeps the header metadata. safetensors needs
    contiguous tensors that share no storage, so tensors are made contiguous and shared (tied) ones cloned;
    non-tensor entries are an error there. ``.pt`` keeps everything as given, storage sharing included.
    """
    path = Path(path)
    suffix = check_suffix(path, SUFFIXES, "out")
    if input_path is not None:
        check_distinct(input_path, path)
    if container is not None and metadata is None:
        metadata = container.metadata
    if suffix == ".safetensors":
        check_safetensors_names(state_dict, path, "the state_dict")
        bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"state_dict: got non-tensor entries {bad[:5]}, expected only tensors for .safetensors")
        bad = [k for k, v in state_dict.items() if not _dense(v)]
        if bad:
            raise TypeError(f"state_dict: got sparse or meta tensors {bad[:5]}, expected dense tensors with data for "
                            ".safetensors (use a .pt output)")
    with atomic_path(path, writer_errors=True) as tmp:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

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
            torch.save(container.with_state_dict(state_dict) if container is not None else dict(state_dict), tmp)
    return path


def prune_state_dict(state_dict: Mapping[str, Any], sparsity: float, *, vectors: str = "filter",
                     scope: str = "layer", normalize: str | None = None, include=None, exclude=None, rule=None,
                     engine: str = "auto", tol: float | None = None, ties: list[list[str]] | None = None,
                     progress: Callable[[str, int, int], None] | None = None
                     ) -> tuple[dict[str, Any], list[str], list]:
    """Single-shot GSP of a bare state_dict (no model code): returns ``(new_state_dict, pruned_names, infos)``.

    Tensors are chosen by :func:`~groupsparse.prune.select_state_dict_keys` (default rule: 2-D and 3-5-D
    floating ``*weight`` tensors not named like norms or embeddings). Tensors whose vectors in ``vectors`` mode
    would have one entry are left as they are. The input mapping is not modified.

    Tied weights (``ties``, default :func:`find_ties`) stay tied: projected once and written to every name when
    all of them are selected, else left dense with a warning (as :class:`~groupsparse.prune.GSPPruner` does for a
    head tied to an embedding). ``infos`` has one entry per pruned name for ``scope="layer"``, one for
    ``"model"``. ``progress(name, done, total)`` (entries projected so far, of all) is called after each
    tensor (the layer scope then projects one tensor at a time).
    """
    from .selection import select_state_dict_keys
    from .vectors import check_mode, check_scope, project_tensors, vector_shape

    mode = check_mode(vectors)
    scope = check_scope(scope)
    names = select_state_dict_keys(state_dict, include=include, exclude=exclude, rule=rule)

    def projectable(v):
        try:
            return v.numel() > 0 and vector_shape(v.shape, mode)[1] >= 2
        except ValueError:
            return False

    unsupported = [n for n in names if not (_dense(state_dict[n]) and state_dict[n].dtype in _PROJECTABLE)]
    why_dense = ""
    if unsupported:
        v = state_dict[unsupported[0]]
        kind = v.layout if v.layout != torch.strided else v.device if v.device.type == "meta" else v.dtype
        why_dense = (f"left dense: {', '.join(unsupported[:5])}{' ...' if len(unsupported) > 5 else ''} "
                     f"({str(kind).replace('torch.', '')}; the projection needs dense float16, bfloat16, float32 "
                     "or float64 tensors with data)")
    names = [n for n in names if n not in unsupported and projectable(state_dict[n])]
    partial = _partial_overlaps(state_dict, names)
    if partial:
        warnings.warn(f"left dense: {', '.join(partial[:6])}{' ...' if len(partial) > 6 else ''} (they share memory "
                      "in different shapes or offsets: projecting one would change the other)", stacklevel=2)
        names = [n for n in names if n not in partial]
    group_of = {n: g for g in (find_ties(state_dict) if ties is None else ties) for n in g}
    chosen, reps = set(names), []
    for n in names:
        g = group_of.get(n, [n])
        left = [m for m in g if m not in chosen]
        if left:
            warnings.warn(f"{n} is tied to {', '.join(left)}, which is not selected: left dense (pruning it would "
                          f"prune {left[0]} too; select both to prune them together)", stacklevel=2)
        elif n == next(m for m in g if m in chosen):
            reps.append(n)
    if not reps:
        floating = sum(isinstance(v, torch.Tensor) and v.is_floating_point() for v in state_dict.values())
        raise ValueError(f"state_dict: got no tensor to prune among {len(state_dict)} entries ({floating} floating), "
                         "expected at least one (check --include/--exclude"
                         + (")" if rule is not None else ", or --any-tensor to drop the name rule)")
                         + (f"; {why_dense}" if why_dense else ""))
    if why_dense:
        warnings.warn(why_dense, stacklevel=2)
    out = dict(state_dict)
    kw = dict(vectors=mode, scope=scope, normalize=normalize, engine=engine, tol=tol)
    total = sum(state_dict[n].numel() for n in reps)
    try:
        if progress is not None and scope == "layer":
            results, infos, done = [], [], 0
            for n in reps:
                r, i = project_tensors([state_dict[n]], sparsity, **kw)
                results += r
                infos += i
                done += state_dict[n].numel()
                progress(n, done, total)
        else:
            results, infos = project_tensors([state_dict[n] for n in reps], sparsity, **kw)
            if progress is not None:
                progress(reps[-1], total, total)
    except ValueError as e:  # NaN entries, float16 overflow: name the tensor (NaN is the one we can find cheaply)
        bad = next((n for n in reps if not bool(state_dict[n].isfinite().all())), None)
        raise ValueError(f"{'tensor ' + repr(bad) + ': ' if bad else ''}{e}") from e
    pruned, pruned_infos = [], []
    for k, (n, r) in enumerate(zip(reps, results)):
        for m in group_of.get(n, [n]):
            out[m] = r  # one tensor for all tied names: a .pt output keeps them sharing storage
            pruned.append(m)
            pruned_infos.append(infos[k] if scope == "layer" else None)
    return out, pruned, pruned_infos if scope == "layer" else infos
