"""``prune_model``: one-shot pruning of a decoder LM (or any module with Linear layers) from calibration data."""

from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..masks import check_fraction
from ..selection import LM_HEAD_NAMES
from .gsp import gsp_allocation, gsp_masks
from .methods import layer_mask, nm_mask, parse_pattern, row_mask, sparsegpt, wanda_scores
from .owl import outlier_ratio, owl_sparsities
from .walker import find_blocks, is_language_model, linear_layers, set_weight_matrix, walk, weight_matrix

METHODS = ("magnitude", "wanda", "sparsegpt", "gsp", "owl")
GROUPS = ("row", "layer", "model")


@dataclass
class PruneResult:
    """What ``prune_model`` did: per-layer targets and achieved zeros, block allocation, time."""

    method: str
    pattern: str
    sparsity: float | None
    group: str | None
    refit: bool
    layers: list[dict] = field(default_factory=list)
    blocks: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def zero_fraction(self) -> float:
        n = sum(layer["numel"] for layer in self.layers)
        return sum(layer["zeros"] for layer in self.layers) / n if n else 0.0

    def to_dict(self) -> dict:
        return {"method": self.method, "pattern": self.pattern, "sparsity": self.sparsity, "group": self.group,
                "refit": self.refit, "zero_fraction": self.zero_fraction, "seconds": self.seconds,
                "blocks": self.blocks, "layers": self.layers}


def _selected(block: nn.Module, exclude, heads=frozenset()) -> dict[str, nn.Module]:
    return {n: m for n, m in linear_layers(block).items()
            if n not in heads and not any(fnmatch.fnmatchcase(n, p) for p in exclude)}


def _heads(model: nn.Module) -> frozenset[str]:
    """Linears of a block-less model that are an output head: named as one, or sharing an embedding's weight.
    Dense by policy, as the LM head is when the model has blocks (the head is then outside them)."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return frozenset(n for n, m in linear_layers(model).items()
                     if n.rsplit(".", 1)[-1] in LM_HEAD_NAMES or id(m.weight) in emb)


def _blocks(model: nn.Module) -> tuple[list[nn.Module], frozenset[str]]:
    blocks, _ = find_blocks(model)
    if blocks is not None:
        return list(blocks), frozenset()
    if is_language_model(model):
        # one block would prune the LM head and skip the block-by-block propagation, in silence
        raise ValueError(f"got a {type(model).__name__} with no decoder blocks (no nn.ModuleList of identical "
                         "modules holding Linear layers), expected a model whose blocks can be walked")
    return [model], _heads(model)


def _check(method, sparsity, pattern, group, refit):
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}, expected one of {METHODS}")
    nm = parse_pattern(pattern)
    if (sparsity is None) == (nm is None):
        raise ValueError(f"got sparsity={sparsity!r} and pattern={pattern!r}, expected exactly one of a sparsity "
                         "(unstructured) or an N:M pattern")
    if sparsity is not None:
        sparsity = check_fraction(sparsity, "sparsity")
    if group is not None and group not in GROUPS:
        raise ValueError(f"group: got {group!r}, expected one of {GROUPS}")
    if group is not None and method != "gsp":
        raise ValueError(f"group: got {group!r} for method {method!r}, expected it only with method='gsp'")
    if refit and method not in ("gsp", "wanda", "owl"):
        raise ValueError(f"refit: got True for {method!r}, expected it only for mask-only methods (SparseGPT refits itself)")
    return sparsity, nm


def _check_settings(exclude, batch_size, blocksize, damp, owl_m, owl_lambda, normalize):
    if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
        # a bare string would be iterated as one glob per character ("*" alone excludes everything)
        raise TypeError(f"exclude: got {exclude!r}, expected a tuple of glob strings such as ('*.o_proj',)")
    for name, v in (("batch_size", batch_size), ("blocksize", blocksize)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: got {v!r}, expected a positive integer")
    for name, v, lo, strict in (("damp", damp, 0.0, False), ("owl_m", owl_m, 0.0, True),
                                ("owl_lambda", owl_lambda, 0.0, False)):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > lo if strict else v >= lo)
        if not ok:
            raise ValueError(f"{name}: got {v!r}, expected a finite number {'>' if strict else '>='} {lo}")
    if normalize not in ("layer", None):
        raise ValueError(f"normalize: got {normalize!r}, expected 'layer' or None")


def check_options(method: str, sparsity: float | None = None, pattern: str | tuple | None = None,
                  group: str | None = None, refit: bool = False, *, exclude=(), batch_size: int = 8,
                  blocksize: int = 128, damp: float = 0.01, owl_m: float = 5.0, owl_lambda: float = 0.08,
                  normalize: str | None = "layer") -> None:
    """``prune_model``'s checks of its options, without a model (the CLI runs them before loading one)."""
    _check(method, sparsity, pattern, group, refit)
    _check_settings(exclude, batch_size, blocksize, damp, owl_m, owl_lambda, normalize)


def prune_model(model: nn.Module, calibration=None, *, method: str = "wanda", sparsity: float | None = None,
                pattern: str | tuple | None = None, group: str | None = None, refit: bool = False,
                normalize: str | None = "layer", owl_m: float = 5.0, owl_lambda: float = 0.08,
                exclude: tuple[str, ...] = (), batch_size: int = 8, blocksize: int = 128, damp: float = 0.01,
                progress: bool = True, restore_on_error: bool = False) -> PruneResult:
    """Prune every Linear inside the decoder blocks of ``model`` in place (real zeros) and return a report.

    ``calibration``: (n, L) token ids for HF models, an (n, ...) input tensor for plain modules, or a list of
    batches; not needed for ``magnitude``. Exactly one of ``sparsity`` (unstructured zero fraction) and
    ``pattern`` ("2:4", "4:8") is given. ``group`` (GSP only): "row" (each output row, as Wanda), "layer"
    (default; the rows of a layer share the projection's μ) or "model" (all layers share it: a layer
    allocation). ``refit`` re-solves the kept weights by the SparseGPT sweep with the mask fixed. Embeddings,
    the LM head and anything outside the blocks stay dense; ``exclude`` adds globs of block-relative names
    (e.g. ``"*.o_proj"``). Blocks are found by :func:`find_blocks` (known layouts, else the largest ModuleList of
    identical blocks); a Hugging Face model without them is a ValueError. Plain modules without blocks are one
    block, whose ``lm_head``/``embed_out`` and embedding-tied Linears stay dense.

    Every selected Linear is checked (N:M divisibility, GSP's and OWL's maximum sparsity) before any weight is
    written. If pruning still fails part way (a non-finite Hessian, an interrupt) the weights written so far stay
    pruned, unless ``restore_on_error=True``: then they are restored from a CPU copy kept while pruning (host
    memory of every pruned weight: +13 GB for a 7B bf16 model, so it is off by default).
    """
    sparsity, nm = _check(method, sparsity, pattern, group, refit)
    _check_settings(exclude, batch_size, blocksize, damp, owl_m, owl_lambda, normalize)
    exclude = tuple(exclude)
    if method == "gsp" and group is None:
        group = "layer"
    if calibration is None and method != "magnitude":
        raise ValueError(f"calibration: got None for method {method!r}, expected calibration inputs")
    block_list, heads = _blocks(model)
    plan = [_selected(block, exclude, heads) for block in block_list]
    if not any(plan):
        n = sum(len(linear_layers(block)) for block in block_list)
        kept = f" and {len(heads)} output head(s) kept dense by policy" if heads else ""
        raise ValueError(f"got no Linear layer to prune: exclude={exclude!r}{kept} leave none of the {n} Linear "
                         f"layers of the {len(block_list)} block(s); expected at least one")
    max_owl = _check_feasible(plan, method, sparsity, nm, group)
    res = PruneResult(method, "unstructured" if nm is None else f"{nm[0]}:{nm[1]}", sparsity, group, refit)
    job = _Job(method, sparsity, nm, group, refit, exclude, heads, blocksize, damp, res,
               backups=[] if restore_on_error else None)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        if method == "magnitude":
            for b, block in enumerate(block_list):
                _prune_block(b, block, None, job)
        else:
            if nm is None and (method == "owl" or group == "model"):
                job.targets = _allocate(model, calibration, job, normalize, owl_m, owl_lambda, max_owl, batch_size,
                                        progress)

            def on_block(b, block, stats):
                _prune_block(b, block, stats, job)

            walk(model, calibration, on_block, gram=method == "sparsegpt" or refit, batch_size=batch_size,
                 progress=progress, description=f"{method} {res.pattern if nm else sparsity}")
    except BaseException:
        for mod, w in reversed(job.backups or []):
            mod.weight.data.copy_(w)
        raise
    finally:
        model.train(was_training)
    res.seconds = time.perf_counter() - t0
    return res


@dataclass
class _Job:
    method: str
    sparsity: float | None
    nm: tuple[int, int] | None
    group: str | None
    refit: bool
    exclude: tuple
    heads: frozenset
    blocksize: int
    damp: float
    res: PruneResult
    targets: dict = field(default_factory=dict)
    backups: list | None = None       # (module, original weight on the CPU) of every layer written so far


def _check_feasible(plan, method, sparsity, nm, group) -> float:
    """Raise before any write if a selected Linear cannot be pruned as asked; return OWL's largest block sparsity."""
    max_owl = 1.0
    for b, layers in enumerate(plan):
        for name, mod in layers.items():
            out_f, in_f = weight_matrix(mod).shape
            where = f"layer {name!r} of block {b}"
            if nm is not None and in_f % nm[1]:
                raise ValueError(f"N:M pattern: got in_features={in_f} for {where}, expected a multiple of M={nm[1]}")
            if nm is not None or method not in ("gsp", "owl") or group == "row":
                continue
            if in_f < 2:
                raise ValueError(f"{method}: got in_features={in_f} for {where}, expected >= 2 (every row keeps one)")
            # GSP keeps every row's largest entry; OWL's blocks are kept as far from empty rows
            top = (out_f * in_f - out_f) / (out_f * in_f)
            max_owl = min(max_owl, top)
            if method == "gsp" and group == "layer" and round(sparsity * out_f * in_f) > out_f * in_f - out_f:
                raise ValueError(f"sparsity: got {sparsity}, expected at most {top:.4f} for GSP on {where} "
                                 "(the projection keeps the largest entry of every row)")
    if method == "gsp" and group == "model" and nm is None:
        total = sum(weight_matrix(m).numel() for layers in plan for m in layers.values())
        rows = sum(weight_matrix(m).shape[0] for layers in plan for m in layers.values())
        if total and round(sparsity * total) > total - rows:
            raise ValueError(f"sparsity: got {sparsity}, expected at most {(total - rows) / total:.4f} for GSP "
                             "(the projection keeps the largest entry of every row)")
    if method == "owl" and nm is None and sparsity > max_owl:
        raise ValueError(f"sparsity: got {sparsity}, expected at most {max_owl:.4f} for OWL (every row keeps one weight)")
    return max_owl


def _allocate(model, calibration, job, normalize, owl_m, owl_lambda, max_owl, batch_size, progress):
    """Dense pass: Wanda scores of every layer from the unpruned model, then OWL's or GSP's per-layer budget."""
    scores: dict[tuple[int, str], torch.Tensor] = {}
    res = job.res

    def on_block(b, block, stats):
        for name, mod in _selected(block, job.exclude, job.heads).items():
            scores[(b, name)] = wanda_scores(weight_matrix(mod), stats[name].col_norm)

    walk(model, calibration, on_block, gram=False, batch_size=batch_size, progress=progress, description="allocation")
    n_blocks = 1 + max(b for b, _ in scores)
    if job.method == "owl":
        ratios = [outlier_ratio([s for (b, _), s in scores.items() if b == i], owl_m) for i in range(n_blocks)]
        sp = owl_sparsities(ratios, job.sparsity, owl_lambda, max_sparsity=max_owl)
        res.blocks = [{"block": i, "outlier_ratio": r, "sparsity": s} for i, r, s in zip(range(n_blocks), ratios, sp)]
        return {key: sp[key[0]] for key in scores}
    keys = list(scores)
    alloc = gsp_allocation({f"{b}/{n}": scores[(b, n)] for b, n in keys}, job.sparsity, normalize)
    targets = {key: alloc[f"{key[0]}/{key[1]}"] for key in keys}
    for i in range(n_blocks):
        ks = [k for k in keys if k[0] == i]
        tot = sum(scores[k].numel() for k in ks)
        res.blocks.append({"block": i, "sparsity": sum(targets[k] * scores[k].numel() for k in ks) / tot})
    return targets


def _prune_block(b, block, stats, job):
    method, nm, blocksize, damp = job.method, job.nm, job.blocksize, job.damp
    for name, mod in _selected(block, job.exclude, job.heads).items():
        w = weight_matrix(mod)
        st = stats[name] if stats else None
        frac = job.targets.get((b, name), job.sparsity)
        new_w = None
        if method == "sparsegpt":             # scores by its own OBS saliency inside the sweep
            new_w, mask = sparsegpt(w, st.gram, fraction=frac or 0.0, nm=nm, blocksize=blocksize, damp=damp)
        else:
            mask = _score_mask(w.abs().double() if method == "magnitude" else wanda_scores(w, st.col_norm),
                               method, frac, nm, job.group)
        if job.refit:
            new_w, mask = sparsegpt(w, st.gram, mask=mask, blocksize=blocksize, damp=damp)
        if new_w is None:
            new_w = w.masked_fill(mask, 0.0)
        if job.backups is not None:
            job.backups.append((mod, mod.weight.data.to("cpu", copy=True)))
        set_weight_matrix(mod, new_w)
        zeros = int((weight_matrix(mod) == 0).sum())
        job.res.layers.append({"block": b, "name": name, "shape": list(w.shape), "numel": w.numel(), "target": frac,
                               "zeros": zeros, "zero_fraction": zeros / w.numel()})


def _score_mask(sc, method, frac, nm, group):
    """Prune mask of a mask-only method from its scores (|W| for magnitude, Wanda's |W|·‖X‖ otherwise)."""
    if nm is not None:
        return nm_mask(sc, *nm)               # for GSP this is its N:M mask too (see gsp.py)
    if method == "magnitude":
        return layer_mask(sc, frac)
    if method in ("wanda", "owl") or group == "row":
        return row_mask(sc, frac)
    return gsp_masks([sc], frac, scope="layer")[0]   # gsp layer, or gsp model with the allocated fraction
