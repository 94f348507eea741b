"""Keeping pruned weights at zero through training: the masks cached in each parameter's dtype, a gradient hook
per masked parameter, and an optimizer step post-hook that zeros pruned weights and their optimizer state (the
part of :class:`~groupsparse.prune.Pruner` that runs every step)."""

from __future__ import annotations

from typing import Iterable, NamedTuple

import torch

from .selection import Target, _stored_weight


class _Enforcement(NamedTuple):
    """The masks of the masked targets in their parameters' dtype, valid while ``key`` matches the buffers."""

    key: tuple                              # _state of every masked target, in target order
    pairs: list                             # (parameter, mask) for the multi-tensor multiply
    masks: dict[str, torch.Tensor]          # target name -> mask, for its gradient hook
    versions: dict[str, tuple]              # target name -> its _state


def _state(t: Target, buf: torch.Tensor) -> tuple:
    """What the cached mask of ``t`` depends on: its buffer (a write moves ``_version``) and its parameter (a
    replaced one, or one moved to another dtype or device by ``model.half()``/``.to()``)."""
    return id(buf), buf._version, id(t.param), t.param.dtype, t.param.device


def _is_dtensor(p) -> bool:
    return type(p.data).__name__ == "DTensor" or type(p).__name__ == "DTensor"


class _GradMask:
    """A masked parameter's gradient hook (an object, not a closure: ``torch.save(model)`` pickles the hooks)."""

    def __init__(self, pruner, target: Target):
        self.pruner, self.target = pruner, target

    def __call__(self, grad):
        pr, t = self.pruner, self.target
        buf = pr._mask_buffer(t)
        if buf is None:
            return grad
        enf = pr._enf  # checking this target's own buffer keeps a backward pass O(targets)
        if enf is None or enf.versions.get(t.name) != _state(t, buf):
            enf = pr._enforcement()
        return grad * enf.masks[t.name]


class Enforcement:
    """Mixin of :class:`~groupsparse.prune.Pruner` (it provides ``targets``, ``_styles``, ``_mask_buffer``)."""

    def _hook_grad(self, t: Target) -> None:
        """Zero the pruned entries' gradients (a frozen parameter gets its hook once it requires grad: at the next
        ``attach``)."""
        h = self._grad_handles.get(t.name)
        if h is not None and h[0] is t.param:
            return
        if h is not None:
            h[1].remove()  # (a replaced parameter: load_state_dict(assign=True))
            del self._grad_handles[t.name]
        if not t.param.requires_grad:
            return
        self._grad_handles[t.name] = (t.param, t.param.register_hook(_GradMask(self, t)))

    def _refresh_targets(self, check: bool = True) -> None:
        """Follow parameters replaced in their modules, and hook masked ones that were frozen when masked."""
        for t in self.targets:
            p, foreign = _stored_weight(t.module, t.param_name)
            # (never into a foreign parametrization; FSDP2 swaps a sharded DTensor parameter for a plain unsharded
            # one and back: not a replacement)
            if (not foreign and p is not None and p is not t.param and _is_dtensor(p) == _is_dtensor(t.param)
                    and p.shape == t.param.shape):
                t.param = p
                self._enf = None
            if t.name in self._styles:
                if check and foreign:  # (a mask on the stored tensor would no longer mask the weight the module uses)
                    raise ValueError(f"{t.name}: got a masked weight now computed by {foreign}, expected the "
                                     "weight it was masked as (remove the masks first: pruner.remove())")
                self._hook_grad(t)

    # ------------------------------------------------------------ enforcement
    def _enforcement(self) -> _Enforcement:
        """The masked targets' masks in their parameters' dtype, cached while no mask buffer changes."""
        bufs = [(t, b) for t in self.targets if (b := self._mask_buffer(t)) is not None]
        key = tuple(_state(t, b) for t, b in bufs)
        if self._enf is None or self._enf.key != key:
            with torch.no_grad():
                masks = {t.name: b.to(device=t.param.device, dtype=t.param.dtype) for t, b in bufs}
            self._enf = _Enforcement(key, [(t.param, masks[t.name]) for t, _ in bufs], masks,
                                     {t.name: k for (t, _), k in zip(bufs, key)})
            self._enf_opt.clear()
        return self._enf

    def _state_tensors(self, opt: torch.optim.Optimizer, pairs) -> tuple[list, list]:
        """Optimizer state tensors shaped like a masked parameter (momentum, Adam moments) and their masks; cached
        per optimizer until its state dict is replaced or grows (states appear at the first step)."""
        key = (id(opt.state), len(opt.state), self._enf.key)
        hit = self._enf_opt.get(id(opt))
        if hit is not None and hit[0] == key:
            return hit[1], hit[2]
        ts, ms = [], []
        for p, m in pairs:
            for v in (opt.state.get(p) or {}).values():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    ts.append(v)
                    ms.append(m)
        self._enf_opt[id(opt)] = (key, ts, ms)
        return ts, ms

    @torch.no_grad()
    def apply_masks(self, optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None) -> None:
        """Zero pruned weights, and their gradients and optimizer state (attached optimizers and ``optimizers``).

        One multi-tensor multiply per kind of tensor (weights, gradients, optimizer states) with masks cached in
        the parameters' dtype: about one pass over the masked weights, no per-tensor kernel launches. (A weight
        that is inf or NaN at a pruned position would stay NaN: pruned weights are zero, so this cannot arise.)
        """
        opts = list(self._optimizers)
        if optimizers is not None:
            extra = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
            opts += [o for o in extra if all(o is not a for a in opts)]
        pairs = self._enforcement().pairs
        if not pairs:
            return
        torch._foreach_mul_([p.data for p, _ in pairs], [m for _, m in pairs])
        grads = [(p.grad, m) for p, m in pairs if p.grad is not None]
        if grads:
            torch._foreach_mul_([g for g, _ in grads], [m for _, m in grads])
        for opt in opts:
            ts, ms = self._state_tensors(opt, pairs)
            if ts:
                torch._foreach_mul_(ts, ms)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.apply_masks()  # (a method, not a lambda: torch.save(model) pickles the hooks with the model)

    def attach(self, optimizer: torch.optim.Optimizer):
        """Re-apply the masks after every ``optimizer.step()`` (weights and optimizer state). Returns ``self``."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: got {type(optimizer).__name__}, expected a torch.optim.Optimizer")
        self._refresh_targets()  # (weights unfrozen since they were masked get their gradient hook here)
        if any(o is optimizer for o in self._optimizers):
            return self
        self._optimizers.append(optimizer)
        self._handles.append(optimizer.register_step_post_hook(self._after_step))
        if self._styles:  # momentum gathered before the masks were fixed must not revive pruned weights
            self.apply_masks()
        return self

    def detach(self) -> None:
        """Stop enforcing masks on optimizer steps (masks stay installed)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._optimizers.clear()
