"""Baselines against which GSP is compared: magnitude, random, and DeepHoyer's Hoyer-Square regularizer."""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import torch
from torch import nn

from .masks import Pruner, check_fraction, check_prune_scope
from .schedule import Schedule
from .vectors import as_vectors, check_mode


class MagnitudePruner(Pruner):
    """Zero the smallest-magnitude weights: an exact fraction globally or per layer, or below a threshold.

    >>> MagnitudePruner(model).prune(0.9, scope="global")   # exactly 90 % of the selected weights masked
    """

    def prune(self, zero_fraction: float | None = None, *, scope: str = "model", threshold: float | None = None,
              style: str = "buffer") -> dict[str, torch.Tensor]:
        """Install masks; give exactly one of ``zero_fraction`` (exact count) or ``threshold`` (|w| <= threshold)."""
        if (zero_fraction is None) == (threshold is None):
            raise ValueError(f"got zero_fraction={zero_fraction!r} and threshold={threshold!r}, expected exactly one")
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 <= threshold < math.inf:
                raise ValueError(f"threshold: got {threshold!r}, expected a non-negative finite float")
            masks = {t.name: t.param.detach().abs() > threshold for t in self.targets}
            for t in self.targets:
                m = self.mask(t)
                if m is not None:
                    masks[t.name] &= m
        else:
            masks = self._magnitude_masks(zero_fraction, scope, keep_zeros=False)
        self.set_masks(masks, style=style)
        return masks


class GradualMagnitudePruner(MagnitudePruner):
    """Gradual magnitude pruning (Zhu & Gupta 2017): during training, every ``schedule.every`` steps mask the
    smallest weights up to the schedule's zero fraction (cubic ramp: fast early, slow near the end).

    Masks only grow (entries already masked are pruned first) and are enforced after each optimizer step once
    :meth:`attach` is called, like every pruner here.

    >>> sched = Schedule(0.9, start=0, every=100, ramp="cubic", ramp_steps=5000)   # zero fraction, not Hoyer
    >>> gmp = GradualMagnitudePruner(model, sched).attach(optimizer)
    >>> for x, y in loader:
    ...     ...; optimizer.step(); gmp.step()
    """

    def __init__(self, model: nn.Module, schedule: Schedule, *, scope: str = "model", **selection: Any):
        super().__init__(model, **selection)
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule: got {type(schedule).__name__}, expected a groupsparse.prune.Schedule")
        self.schedule = schedule
        self.scope = check_prune_scope(scope)
        self.step_count = 0

    def step(self, step: int | None = None) -> bool:
        """Call after ``optimizer.step()``; prunes when the schedule says so. Returns whether masks changed."""
        if step is None:
            step = self.step_count
        elif isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step: got {step!r}, expected a non-negative int")
        step = int(step)
        self.step_count = step + 1
        if not self.schedule.should_project(step):
            return False
        f = self.schedule.value(step)
        if not f:
            return False
        self.prune(f, scope=self.scope)
        return True


class RandomPruner(Pruner):
    """Mask a uniformly random exact fraction of weights (a floor any real method must beat)."""

    def prune(self, zero_fraction: float, *, scope: str = "layer", seed: int | None = None,
              generator: torch.Generator | None = None, style: str = "buffer") -> dict[str, torch.Tensor]:
        check_fraction(zero_fraction, "zero_fraction")
        check_prune_scope(scope)
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        # (no seed, no generator: torch's global generator, so torch.manual_seed sets the draw; a fresh Generator
        # started from one fixed seed and gave every run the same "random" mask)
        scores = {t.name: torch.rand(t.shape, generator=generator) for t in self.targets}
        masks = self._magnitude_masks(zero_fraction, scope, keep_zeros=False, scores=scores)
        self.set_masks(masks, style=style)
        return masks


def hoyer_square(tensors: torch.Tensor | Sequence[torch.Tensor], *, vectors: str | None = None,
                 eps: float = 1e-12) -> torch.Tensor:
    r"""Hoyer-Square :math:`\|w\|_1^2 / \|w\|_2^2` summed over tensors (DeepHoyer, Yang et al. 2020); differentiable.

    ``vectors=None`` is the element-wise regularizer; a vector mode (e.g. ``"filter"``) gives DeepHoyer's group
    form :math:`(\sum_g \|w_g\|_2)^2 / \|w\|_2^2`, which pushes whole vectors to zero. It is scale invariant and
    lies in [1, N], computed in float32 at least (for half weights it exceeds 65504 from N ~ 1e5); ``eps`` guards all-zero tensors.
    """
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    total = None
    for w in tensors:
        # in float32 at least: the value itself is about N (for N entries), past float16's range from 65504
        w = w.to(torch.promote_types(w.dtype, torch.float32))
        if vectors is None:
            l1 = w.abs().sum()
        else:
            l1 = torch.linalg.vector_norm(as_vectors(w, check_mode(vectors)), dim=1).sum()
        hs = l1 * l1 / (w.pow(2).sum() + eps)
        total = hs if total is None else total + hs
    if total is None:
        raise ValueError("tensors: got an empty list, expected at least one tensor")
    return total


class HoyerSquareRegularizer(Pruner):
    """DeepHoyer baseline: add ``regularizer()`` to the loss while training, then :meth:`prune` by threshold.

    >>> reg = HoyerSquareRegularizer(model, strength=1e-4)
    >>> loss = criterion(model(x), y) + reg()
    >>> ...                                    # train
    >>> reg.prune(threshold=1e-3)              # or zero_fraction=0.9; then finetune with reg.attach(opt)
    """

    def __init__(self, model: nn.Module, strength: float = 1e-4, *, vectors: str | None = None, **selection: Any):
        super().__init__(model, **selection)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength < 0:
            raise ValueError(f"strength: got {strength!r}, expected a non-negative float")
        self.strength = float(strength)
        self.vectors = None if vectors is None else check_mode(vectors)

    def __call__(self) -> torch.Tensor:
        return self.strength * hoyer_square([t.canonical() for t in self.targets], vectors=self.vectors)

    def prune(self, zero_fraction: float | None = None, *, threshold: float | None = None, scope: str = "model",
              style: str = "buffer") -> dict[str, torch.Tensor]:
        """Mask |w| <= ``threshold`` (DeepHoyer's rule) or an exact ``zero_fraction`` by magnitude."""
        return MagnitudePruner.prune(self, zero_fraction, scope=scope, threshold=threshold, style=style)
