"""Masks over selected parameters: storing them, enforcing them through training, and making them permanent.

:class:`Pruner` is the base every strategy derives from (GSP, magnitude, random, threshold). It owns the
selected :class:`~groupsparse.prune.selection.Target` list and stores one boolean keep-mask per target in one of
three places, chosen by ``style``:

* ``"buffer"`` (default): a ``<name>_mask`` bool buffer on the module; the weight stays a plain parameter holding
  real zeros, so the forward pass costs nothing extra and ``state_dict()`` carries the mask.
* ``"torch_prune"``: :func:`torch.nn.utils.prune.custom_from_mask` (``weight_orig`` + ``weight_mask`` and a
  forward pre-hook), for code that expects ``torch.nn.utils.prune``'s layout.
* ``"parametrize"``: a :mod:`torch.nn.utils.parametrize` parametrization multiplying by the mask.

In every style the ``nn.Parameter`` object is the same one the optimizer holds. Masking in the forward pass
alone (the reference code's approach) lets momentum and weight decay keep moving pruned weights; here
:meth:`Pruner.attach` registers an optimizer step post-hook that zeros pruned weights *and* every optimizer state
tensor shaped like the parameter (SGD ``momentum_buffer``, Adam ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``),
and a gradient hook that zeros their gradients (so gradient clipping and norms see the pruned model).
"""

from __future__ import annotations

import functools
import numbers
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from ._layouts import pruned_state_dict, smallest_k  # noqa: F401 (public through this module too)
from ._enforce import Enforcement
from .selection import Target, select_parameters

MASK_STYLES = ("buffer", "torch_prune", "parametrize")
_SCOPES = {"model": "model", "global": "model", "layer": "layer"}


class _MaskParametrization(nn.Module):
    """``weight = original * mask`` (the mask is a buffer, so it follows ``.to(device)`` and ``state_dict``)."""

    groupsparse_mask = True  # (selection tells it from parametrizations it must not prune through)

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def check_fraction(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # (NumPy scalars too, as the projection)
        raise TypeError(f"{what}: got {type(value).__name__}, expected a float in [0, 1]")
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{what}: got {value!r}, expected a float in [0, 1]")
    return v


def check_prune_scope(scope: Any) -> str:
    if not isinstance(scope, str) or scope not in _SCOPES:
        raise ValueError(f"scope: got {scope!r}, expected 'model' (alias 'global') or 'layer'")
    return _SCOPES[scope]


class Pruner(Enforcement):
    """Base class: a selection of parameters with optional keep-masks.

    Parameters
    ----------
    model : nn.Module
    targets : list of :class:`Target`, optional
        Skip the selection below and use these.
    include, exclude, module_types, exclude_module_types, param_names :
        Forwarded to :func:`~groupsparse.prune.select_parameters` (default: every conv and Linear weight).
    """

    def __init__(self, model: nn.Module, *, targets: Sequence[Target] | None = None, include=None, exclude=None,
                 module_types=None, exclude_module_types=(), param_names=("weight",), prune_lm_head: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: got {type(model).__name__}, expected a torch.nn.Module")
        self.model = model
        if targets is None:
            targets = select_parameters(model, include=include, exclude=exclude, module_types=module_types,
                                        exclude_module_types=exclude_module_types, param_names=param_names,
                                        prune_lm_head=prune_lm_head)
        self.targets: list[Target] = list(targets)
        if not self.targets:
            raise ValueError("model: got no parameter to prune, expected at least one (check include/exclude/module_types)")
        self._styles: dict[str, str] = {}
        self._optimizers: list[torch.optim.Optimizer] = []
        self._handles: list[Any] = []
        self._grad_handles: dict[str, Any] = {}
        # Enforcement cache: the masks in each parameter's dtype, rebuilt when a mask buffer changes (its
        # _version moves on any in-place write, load_state_dict included) and per optimizer its state tensors.
        self._enf = None  # (an _enforce._Enforcement)
        self._enf_opt: dict[int, tuple] = {}
        self._adopt_existing()
        # model.load_state_dict() of a masked state_dict (a resume, Lightning's ckpt_path) installs the saved masks
        # first, so its *_mask entries match instead of failing as unexpected keys.
        self._load_hook = model.register_load_state_dict_pre_hook(self._masks_from_loaded)
        # load_state_dict(assign=True) puts new Parameter objects in the modules: follow them
        self._load_post_hook = model.register_load_state_dict_post_hook(self._after_load)

    def __init_subclass__(cls, **kwargs):
        # A subclass checks its own options after this constructor registered hooks on the model: if it raises,
        # the half-made pruner must leave none behind (they broke backward after another pruner's remove()).
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def guarded(self, *args, **kw):
            try:
                init(self, *args, **kw)
            except BaseException:
                if "_load_hook" in self.__dict__:
                    self._release()
                raise

        cls.__init__ = guarded

    def __getstate__(self):
        # torch.save(model) / copy.deepcopy(model) reach the pruner through the model's load hooks: the copy
        # takes the masks and the selection, not the optimizers (with their state), their hooks or the mask cache;
        # torch does not copy gradient hooks, so the copy registers its own at its next attach
        state = dict(self.__dict__)
        state.update(_optimizers=[], _handles=[], _grad_handles={}, _enf=None, _enf_opt={})
        return state

    def _release(self) -> None:
        """Remove every hook this pruner put on the model and its optimizers (masks stay as they are)."""
        self.detach()
        self._load_hook.remove()
        self._load_post_hook.remove()
        for _, h in self._grad_handles.values():
            h.remove()
        self._grad_handles.clear()

    def _adopt_existing(self) -> None:
        """Pick up masks already on the model (from another pruner, a reload, or torch.nn.utils.prune)."""
        for t in self.targets:
            plist = getattr(t.module, "parametrizations", None)
            if plist is not None and t.param_name in plist and getattr(plist[t.param_name], "original", None) is t.param:
                if any(isinstance(p, _MaskParametrization) for p in plist[t.param_name]):
                    self._styles[t.name] = "parametrize"
            elif t.module._parameters.get(t.param_name + "_orig") is t.param \
                    and isinstance(t.module._buffers.get(t.param_name + "_mask"), torch.Tensor):
                self._styles[t.name] = "torch_prune"
            elif t.module._parameters.get(t.param_name) is t.param \
                    and isinstance(t.module._buffers.get(t.param_name + "_mask"), torch.Tensor):
                self._styles[t.name] = "buffer"
            if t.name in self._styles:
                self._hook_grad(t)

    # ------------------------------------------------------------------ masks
    @property
    def params(self) -> list[torch.Tensor]:
        return [t.param for t in self.targets]

    def target(self, name: str) -> Target:
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(f"target: got {name!r}, expected one of {[t.name for t in self.targets]}")

    def mask(self, target: Target | str) -> torch.Tensor | None:
        """The bool keep-mask of ``target`` (True = kept), or ``None`` when it is not masked."""
        t = self.target(target) if isinstance(target, str) else target
        buf = self._mask_buffer(t)
        return None if buf is None else buf.to(torch.bool, copy=True)  # a copy: writing it must not change ours

    def _mask_buffer(self, t: Target) -> torch.Tensor | None:
        style = self._styles.get(t.name)
        if style is None:
            return None
        # (None where another pruner on the same model removed the mask since: its hooks then pass through)
        if style == "parametrize":
            plist = getattr(t.module, "parametrizations", None)
            if plist is None or t.param_name not in plist:
                return None
            return next((p.mask for p in plist[t.param_name] if isinstance(p, _MaskParametrization)), None)
        return t.module._buffers.get(t.param_name + "_mask")

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return {t.name: m for t in self.targets if (m := self.mask(t)) is not None}

    @property
    def is_masked(self) -> bool:
        return bool(self._styles)

    def set_masks(self, masks: Mapping[str, torch.Tensor], *, style: str = "buffer") -> None:
        """Install keep-masks (``{target name: bool tensor}``), zero the pruned weights and their optimizer state.

        Applied transactionally: every mask is validated before any module is changed. Targets missing from
        ``masks`` keep whatever mask they had.
        """
        if style not in MASK_STYLES:
            raise ValueError(f"style: got {style!r}, expected one of {MASK_STYLES}")
        checked = {}
        for name, m in masks.items():
            t = self.target(name)
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"masks[{name!r}]: got {type(m).__name__}, expected a tensor")
            if tuple(m.shape) != t.shape:
                raise ValueError(f"masks[{name!r}]: got shape {tuple(m.shape)}, expected {t.shape}")
            # our own copy: the caller's tensor (or another model's buffer, via load_state_dict) must not become
            # the buffer later updates write into
            checked[name] = m.detach().to(device=t.param.device, dtype=torch.bool, copy=True)
        for name, m in checked.items():
            t = self.target(name)
            old = self._styles.get(name)
            if old is not None and old != style:
                self._unmask(t, bake=True)
                old = None
            if old is None:
                self._install(t, m, style)
            else:
                self._update(t, m)
        self.apply_masks()

    def _install(self, t: Target, m: torch.Tensor, style: str) -> None:
        if style == "buffer":
            if hasattr(t.module, t.param_name + "_mask"):
                raise ValueError(f"{t.name}: the module already has {t.param_name}_mask, expected an unmasked parameter "
                                 "(is it pruned by torch.nn.utils.prune? use Pruner.from_torch_prune)")
            t.module.register_buffer(t.param_name + "_mask", m)
        elif style == "torch_prune":
            torch_prune.custom_from_mask(t.module, t.param_name, m.to(t.param.dtype))
        else:
            parametrize.register_parametrization(t.module, t.param_name, _MaskParametrization(m))
        self._styles[t.name] = style
        self._hook_grad(t)

    def _update(self, t: Target, m: torch.Tensor) -> None:
        buf = self._mask_buffer(t)
        with torch.no_grad():
            buf.copy_(m.to(buf.dtype))

    def _unmask(self, t: Target, *, bake: bool) -> None:
        m = self.mask(t)
        style = self._styles.pop(t.name, None)
        if style is None:
            return
        if m is None:  # another pruner on this model removed the mask already
            style = None
        if style == "buffer":
            m = t.module._buffers.pop(t.param_name + "_mask")
            if bake:
                with torch.no_grad():
                    t.param.masked_fill_(~m.bool(), 0)
        elif style == "torch_prune":
            if bake:
                torch_prune.remove(t.module, t.param_name)
            else:
                for k, hook in list(t.module._forward_pre_hooks.items()):
                    if isinstance(hook, torch_prune.BasePruningMethod) and hook._tensor_name == t.param_name:
                        del t.module._forward_pre_hooks[k]
                delattr(t.module, t.param_name)
                del t.module._buffers[t.param_name + "_mask"]
                del t.module._parameters[t.param_name + "_orig"]
                t.module.register_parameter(t.param_name, t.param)
        elif style == "parametrize":
            if bake:
                with torch.no_grad():
                    t.param.masked_fill_(~m, 0)
            parametrize.remove_parametrizations(t.module, t.param_name, leave_parametrized=False)
        h = self._grad_handles.pop(t.name, None)
        if h is not None:
            h[1].remove()

    def load_masks(self, state_dict: Mapping[str, torch.Tensor], *, style: str = "buffer") -> dict[str, torch.Tensor]:
        """Install the masks saved in a state_dict (``<param>_mask`` entries, e.g. from ``model.state_dict()`` of a
        masked model) so that ``model.load_state_dict(state_dict)`` then matches; returns the masks found."""
        found = {}
        for t in self.targets:
            m = state_dict.get(t.name + "_mask")
            if m is None:
                m = state_dict.get(f"{t.module_name}.parametrizations.{t.param_name}.0.mask".lstrip("."))
            if isinstance(m, torch.Tensor):
                found[t.name] = m
        # a key prefix such as "model." found nothing, in silence: said when a saved mask's name ends like one of
        # the targets' (not for other *_mask buffers, or masks of another pruner's targets)
        ends = tuple("." + t.name + "_mask" for t in self.targets)
        saved = [k for k in state_dict if k.endswith(ends)]
        if saved and not found:
            raise ValueError(f"state_dict: got {len(saved)} mask entries (e.g. {saved[0]!r}) and none for this "
                             f"pruner's targets, expected names like {self.targets[0].name + '_mask'!r} (strip or "
                             "add the prefix)")
        self.set_masks(found, style=style)
        return found

    def _after_load(self, module, incompatible_keys) -> None:
        self._refresh_targets(check=False)  # (refused at attach, not inside a load)

    def _masks_from_loaded(self, module, state_dict, prefix, *args) -> None:
        self._adopt_existing()  # masks another pruner installed since: adopt them, do not install twice
        by_style: dict[str, dict[str, torch.Tensor]] = {}
        for t in self.targets:
            key = prefix + t.name
            par = f"{prefix}{t.module_name + '.' if t.module_name else ''}parametrizations.{t.param_name}.0.mask"
            if isinstance(state_dict.get(key + "_mask"), torch.Tensor):
                style, m = ("torch_prune" if key + "_orig" in state_dict else "buffer"), state_dict[key + "_mask"]
            elif isinstance(state_dict.get(par), torch.Tensor):
                style, m = "parametrize", state_dict[par]
            else:
                continue
            # a target masked in another layout than the keys show is converted to theirs (they failed to load);
            # in the same layout the load itself copies the mask
            if self._styles.get(t.name) != style:
                by_style.setdefault(style, {})[t.name] = m
        for style, masks in by_style.items():
            self.set_masks(masks, style=style)

    # ---------------------------------------------------------------- finish
    def remove(self) -> nn.Module:
        """Make the pruning permanent: real zeros in plain parameters, no masks, hooks or optimizer hooks.

        Like :func:`torch.nn.utils.prune.remove`; the parameter objects stay the same. Returns the model.
        """
        self._refresh_targets(check=False)
        for t in self.targets:
            self._unmask(t, bake=True)
        self._release()
        return self.model

    def pruned_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state_dict with masks applied and mask entries dropped (the model is not modified)."""
        return pruned_state_dict(self.model)

    @classmethod
    def from_torch_prune(cls, model: nn.Module, **kwargs) -> "Pruner":
        """Wrap a model pruned with :mod:`torch.nn.utils.prune` (same as the constructor, which adopts any
        existing masks: ``<name>_mask`` buffers, torch-prune ``_orig``/``_mask`` pairs, mask parametrizations)."""
        return cls(model, **kwargs)

    # -------------------------------------------------------------- measures
    def zero_fraction(self) -> float:
        """Fraction of exact zeros over all targets (masked entries count once they are zeroed)."""
        zeros = total = 0
        with torch.no_grad():
            for t in self.targets:
                zeros += int((t.param == 0).sum())
                total += t.param.numel()
        return zeros / total if total else 0.0

    def report(self, *, vectors: str = "filter"):
        """A :class:`~groupsparse.prune.report.SparsityReport` over the targets."""
        from .report import sparsity_report

        sd = pruned_state_dict(self.model)
        return sparsity_report({t.name: t.canonical(sd[t.name]) for t in self.targets}, vectors=vectors,
                               names=[t.name for t in self.targets])

    def _magnitude_masks(self, zero_fraction: float, scope: str, *, keep_zeros: bool,
                         scores: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Keep-masks pruning exactly ``round(zero_fraction * N)`` entries of smallest score (default |w|)."""
        zero_fraction = check_fraction(zero_fraction, "zero_fraction")
        scope = check_prune_scope(scope)
        with torch.no_grad():
            sc = {t.name: (scores[t.name] if scores is not None else t.param.detach().abs()).float()
                  for t in self.targets}
            for t in self.targets:  # entries already masked are pruned first
                m = self.mask(t)
                if m is not None:
                    sc[t.name] = sc[t.name].masked_fill(~m, -1.0)
            groups = [[t] for t in self.targets] if scope == "layer" else [self.targets]
            out = {}
            for g in groups:
                flat = torch.cat([sc[t.name].reshape(-1).to(self.targets[0].param.device) for t in g])
                n = flat.numel()
                k = int(round(zero_fraction * n))
                if keep_zeros:
                    already = int((flat <= 0).sum())
                    if already > k:
                        warnings.warn(f"keep_zeros: {already} of {n} entries are already zero ({already / n:.4f}), more than "
                                      f"zero_fraction={zero_fraction}; keeping them all", stacklevel=3)
                        k = already
                pruned = smallest_k(flat, k)
                i = 0
                for t in g:
                    cnt = t.param.numel()
                    out[t.name] = ~pruned[i:i + cnt].reshape(t.shape).to(t.param.device)
                    i += cnt
        return out
