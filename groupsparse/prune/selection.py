"""Which parameters a pruner touches.

A *target* is one weight tensor of one module. The default choice follows the paper (every convolution and
linear weight; biases, normalization and embedding tables stay dense) but every part is overridable: module
types, parameter names, and glob or regex patterns on the qualified parameter name (``"layer1.0.conv1.weight"``),
so the same call works on torchvision CNNs and on Hugging Face style transformer blocks.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ._layouts import is_mask_entry

# Linear-like layers of common libraries that are not nn.Linear subclasses are matched by class name, so that
# selecting them needs no import of those libraries (HF GPT-2 uses transformers.pytorch_utils.Conv1D).
DEFAULT_MODULE_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                          nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
DEFAULT_MODULE_NAMES: tuple[str, ...] = ("Conv1D",)
# nn.MultiheadAttention keeps Q/K/V in one (3E, E) parameter (or three when kdim/vdim differ), not in "weight".
_MHA_PARAMS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
# Output heads of language models stay dense by default, as one-shot LLM pruners (SparseGPT, Wanda) leave them:
# the head maps to every vocabulary logit and pruning it costs far more quality than any other layer.
LM_HEAD_NAMES = ("lm_head", "embed_out")

Pattern = str | re.Pattern


@dataclass(eq=False)
class Target:
    """One prunable tensor: ``getattr(module, param_name)``, known in the model as ``name``."""

    name: str  # qualified parameter name, e.g. "features.0.weight"
    module_name: str
    module: nn.Module
    param_name: str  # attribute on the module, e.g. "weight"
    param: torch.Tensor  # the nn.Parameter itself (identity kept across projections and masking)
    # Stored as (in, out, ...): HF Conv1D (GPT-2) and transposed convolutions. Vector modes are defined on the
    # (out, in, ...) layout, so these are seen through a transposed view and "filter" means the same everywhere.
    transposed: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    def canonical(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """``tensor`` (default the parameter) in the (out, in, ...) layout: a view, transposed when stored (in, out)."""
        t = self.param if tensor is None else tensor
        return t.transpose(0, 1) if self.transposed and t.dim() >= 2 else t

    def __repr__(self) -> str:
        return f"Target({self.name!r}, shape={self.shape}, module={type(self.module).__name__})"


def _compile(patterns: Pattern | Sequence[Pattern] | None, what: str) -> list[Callable[[str], bool]]:
    if patterns is None:
        return []
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    elif not isinstance(patterns, (list, tuple)):
        raise TypeError(f"{what}: got {type(patterns).__name__}, expected a glob string, 're:<regex>', a compiled regex "
                        "or a list of them")
    out = []
    for p in patterns:
        if isinstance(p, re.Pattern):
            out.append(lambda s, p=p: p.search(s) is not None)
        elif isinstance(p, str):
            # "re:" prefix for regular expressions, anything else is a shell-style glob on the full name
            if p.startswith("re:"):
                try:
                    rx = re.compile(p[3:])
                except re.error as e:
                    raise ValueError(f"{what}: got {p!r}, expected a valid regular expression after 're:' ({e})") from e
                out.append(lambda s, rx=rx: rx.search(s) is not None)
            else:
                out.append(lambda s, p=p: fnmatch.fnmatchcase(s, p))
        else:
            raise TypeError(f"{what}: got {type(p).__name__}, expected a glob string, 're:<regex>' or a compiled regex")
    return out


def _check_types(types: Any, what: str) -> tuple[type, ...]:
    if isinstance(types, type):
        types = (types,)
    types = tuple(types)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"{what}: got {t!r}, expected nn.Module subclasses")
    return types


def select_parameters(model: nn.Module, *, include: Pattern | Sequence[Pattern] | None = None,
                      exclude: Pattern | Sequence[Pattern] | None = None,
                      module_types: type | Iterable[type] | None = None,
                      exclude_module_types: type | Iterable[type] = (),
                      param_names: str | Sequence[str] = ("weight",),
                      min_ndim: int = 2, prune_lm_head: bool = False) -> list[Target]:
    """Return the targets of ``model`` a pruner acts on, in ``named_modules`` order.

    Parameters
    ----------
    include : glob (``"*.attn.*"``), ``"re:<regex>"`` or compiled regex, or a list of them
        Patterns on the qualified parameter name; when given, only matching parameters are kept (on top of
        the module-type filter: pass ``module_types=nn.Module`` to match any module).
    exclude : same kinds
        Patterns that remove parameters; they win over ``include``.
    module_types : module classes, default conv (1/2/3-d, transposed) and ``nn.Linear`` (+ classes named
        ``Conv1D``, the HF GPT-2 linear)
    exclude_module_types : module classes never pruned (default: none beyond norms and embeddings)
    param_names : attribute names looked at on each module (default ``"weight"``: biases stay dense)
    min_ndim : parameters with fewer dimensions are skipped (default 2: biases and norm scales)
    prune_lm_head : a language model's output head (a module named ``lm_head`` or ``embed_out``) stays dense
        unless this is True or an ``include`` pattern names it, as one-shot LLM pruners leave it (a head tied to
        the embedding stays dense in any case)

    ``nn.MultiheadAttention`` (and so ``nn.TransformerEncoderLayer``) contributes its ``in_proj_weight`` (Q, K
    and V) beside its ``out_proj``. HF ``Conv1D`` and transposed convolutions store ``(in, out, ...)``: their
    targets are marked ``transposed`` so vector modes mean the same thing as for ``nn.Linear``/``nn.Conv2d``.

    Normalization layers and embeddings are selected only when ``module_types`` names them or a base class
    of theirs (``module_types=nn.Module``); then ``exclude``/``exclude_module_types`` remove them.
    Shared (tied) parameters are returned once, and not at all when tied to an excluded module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: got {type(model).__name__}, expected a torch.nn.Module")
    custom_types = module_types is not None
    types = _check_types(module_types, "module_types") if custom_types else DEFAULT_MODULE_TYPES
    names_by_class = () if custom_types else DEFAULT_MODULE_NAMES
    never = _check_types(exclude_module_types, "exclude_module_types")
    # norms and embeddings stay dense unless module_types names them (or a base class of them, e.g. nn.Module)
    never = never + tuple(c for c in _NORM_AND_EMBEDDING if not any(issubclass(c, u) for u in types))
    param_names = (param_names,) if isinstance(param_names, str) else tuple(param_names)
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")

    # a weight tied to an excluded module (GPT-style lm_head = embedding) stays dense: pruning it through the
    # Linear would prune the embedding table too
    seen = {id(p) for m in model.modules() if never and isinstance(m, never) for p in m.parameters(recurse=False)}
    out = []
    for mname, module in model.named_modules():
        if never and isinstance(module, never):
            continue
        # (MHA keeps Q/K/V outside "weight": also when module_types names it or a base class, e.g. nn.Module)
        mha = isinstance(module, nn.MultiheadAttention) and "weight" in param_names and (
            not custom_types or isinstance(module, types))
        if not (mha or isinstance(module, types) or type(module).__name__ in names_by_class):
            continue
        head = not prune_lm_head and mname.rsplit(".", 1)[-1] in LM_HEAD_NAMES
        transposed = type(module).__name__ == "Conv1D" or isinstance(module, nn.modules.conv._ConvTransposeNd)
        for pname in (param_names + _MHA_PARAMS) if mha else param_names:
            p, foreign = _stored_weight(module, pname)
            if p is None or id(p) in seen:
                continue
            full = f"{mname}.{pname}" if mname else pname
            if inc and not any(f(full) for f in inc):
                continue
            if head and not inc:
                continue
            if any(f(full) for f in exc):
                continue
            if not p.dtype.is_floating_point or p.dim() < min_ndim:
                continue
            if foreign:
                # a mask on the stored tensor would not be a mask on the weight the module uses (orthogonal maps a
                # sparse original to a dense weight); removing the mask would remove the user's parametrization
                warnings.warn(f"{full}: skipped, it is computed by {foreign} from other tensors; expected a plain "
                              "weight (remove that parametrization to prune it)", stacklevel=2)
                continue
            seen.add(id(p))
            out.append(Target(full, mname, module, pname, p, transposed))
    return out


def _stored_weight(module: nn.Module, pname: str):
    """(the tensor that holds ``pname``, the name of a foreign reparametrization computing it or ''). Masks of
    this library: torch.nn.utils.prune keeps the weight as "<name>_orig", a mask parametrization as ".original"."""
    p = module._parameters.get(pname)
    if p is not None:
        return p, ""
    if isinstance(module._buffers.get(pname + "_mask"), torch.Tensor) and pname + "_orig" in module._parameters:
        return module._parameters[pname + "_orig"], ""
    plist = getattr(module, "parametrizations", None)
    if plist is not None and pname in plist:
        kinds = [type(q).__name__ for q in plist[pname]]
        # elementwise masks compose with ours (torch.ao.pruning's FakeSparsity: original * mask)
        ours = all(getattr(q, "groupsparse_mask", False) or type(q).__name__ == "FakeSparsity"
                   for q in plist[pname]) and hasattr(plist[pname], "original")
        return (plist[pname].original, "") if ours else (next(iter(plist[pname].parameters()), None),
                                                         "a parametrization (" + ", ".join(kinds) + ")")
    if pname + "_orig" in module._parameters:  # a hook-based reparametrization (torch.nn.utils.spectral_norm)
        return module._parameters[pname + "_orig"], "a forward pre-hook (" + pname + "_orig)"
    return None, ""


_NORM_AND_EMBEDDING = (nn.Embedding, nn.EmbeddingBag, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                       nn.LocalResponseNorm)


def select_state_dict_keys(state_dict: dict[str, Any], *, include: Pattern | Sequence[Pattern] | None = None,
                           exclude: Pattern | Sequence[Pattern] | None = None,
                           rule: Callable[[str, Any], bool] | None = None) -> list[str]:
    """Names of the tensors of a bare state_dict (no model code) to prune.

    Without the modules, layer types are unknown, so a tensor is selected when ``rule(name, tensor)`` holds;
    the default :func:`looks_like_layer_weight` accepts a floating tensor with 2 dims (linear) or 3-5 dims
    (convolutions) whose name ends in ``weight`` and does not look like a normalization or embedding (``norm``,
    ``bn``, ``ln``, ``embed``, ``wte``/``wpe``, ...). ``include`` narrows to matching names, ``exclude`` removes
    names, and ``rule=lambda name, t: True`` (CLI ``--any-tensor``) drops the heuristic.
    """
    rule = looks_like_layer_weight if rule is None else rule
    if not callable(rule):
        raise TypeError(f"rule: got {type(rule).__name__}, expected a callable (name, tensor) -> bool")
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    out = []
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point:
            continue
        if _is_mask_key(k, state_dict):  # (whatever the rule: projecting torch_prune's float masks broke them)
            continue
        if inc and not any(f(k) for f in inc):
            continue
        if any(f(k) for f in exc):
            continue
        if rule(k, v):
            out.append(k)
    return out


def _is_mask_key(k: str, state_dict) -> bool:
    """A mask of a pruned layout: ``x_mask`` beside ``x``/``x_orig``, or a mask parametrization's ``.0.mask``."""
    return is_mask_entry(k, state_dict) or (".parametrizations." in "." + k and k.endswith(".0.mask"))


_NOT_LAYER = re.compile(r"(norm|(^|[._])(bn|ln)\d*([._]|$)|embed|(^|[._])(wte|wpe)([._]|$)|cls_token|mask_token)",
                        re.IGNORECASE)


def looks_like_layer_weight(name: str, tensor: Any) -> bool:
    """Default checkpoint rule: 2-D (linear) or 3-5-D (conv) floating ``*weight`` not named like a norm/embedding."""
    if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
        return False
    if not name.endswith("weight") or name.endswith("_mask"):
        return False
    if tensor.dim() not in (2, 3, 4, 5):
        return False
    return _NOT_LAYER.search(name) is None
