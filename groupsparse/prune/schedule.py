"""When induced GSP projects, and to what target.

The paper trains densely, then from a start epoch projects every k iterations at a fixed target. A ramp
(linear, or the cubic schedule of Zhu & Gupta 2017 that prunes fast early and slowly near the end) lets the
network adapt gradually; a constant target reproduces the paper.
"""

from __future__ import annotations

import numbers

from dataclasses import dataclass

RAMPS = ("constant", "linear", "cubic")


def _nonneg_int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{what}: got {v!r}, expected a non-negative int")
    return v


@dataclass(frozen=True)
class Schedule:
    """Projection schedule in optimizer steps.

    Parameters
    ----------
    target : final average Hoyer sparsity in [0, 1]
    start : first step that projects (steps before it train densely)
    every : project at ``start``, ``start + every``, ... (>= 1)
    stop : last step allowed to project (``None``: no end)
    ramp : ``"constant"`` (``target`` from ``start``), ``"linear"`` or ``"cubic"`` from ``initial`` to ``target``
        over ``ramp_steps`` steps after ``start``. Cubic: ``target + (initial - target) * (1 - t)**3``.
    initial : sparsity at ``start`` for the ramps
    ramp_steps : length of the ramp (0 means the target is reached at ``start``)
    """

    target: float
    start: int = 0
    every: int = 1
    stop: int | None = None
    ramp: str = "constant"
    initial: float = 0.0
    ramp_steps: int = 0

    def __post_init__(self):
        for what in ("target", "initial"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= 1:
                raise ValueError(f"{what}: got {v!r}, expected a float in [0, 1]")
            object.__setattr__(self, what, float(v))  # (NumPy scalars in, plain floats kept: JSON, repr)
        _nonneg_int(self.start, "start")
        _nonneg_int(self.ramp_steps, "ramp_steps")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every: got {self.every!r}, expected a positive int")
        if self.stop is not None and (_nonneg_int(self.stop, "stop") < self.start):
            raise ValueError(f"stop: got {self.stop!r}, expected None or an int >= start ({self.start})")
        if self.ramp not in RAMPS:
            raise ValueError(f"ramp: got {self.ramp!r}, expected one of {RAMPS}")

    @classmethod
    def from_epochs(cls, target: float, steps_per_epoch: int, *, start_epoch: float = 0, every: int = 1,
                    stop_epoch: float | None = None, ramp: str = "constant", initial: float = 0.0,
                    ramp_epochs: float = 0) -> "Schedule":
        """Same schedule with epoch boundaries (``every`` stays in steps, as in the paper's 'every 150 iterations')."""
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch: got {steps_per_epoch!r}, expected a positive int")
        conv = lambda e: int(round(e * steps_per_epoch))  # noqa: E731
        return cls(target, start=conv(start_epoch), every=every,
                   stop=None if stop_epoch is None else conv(stop_epoch), ramp=ramp, initial=initial,
                   ramp_steps=conv(ramp_epochs))

    def value(self, step: int) -> float | None:
        """Target sparsity at ``step`` (``None`` before ``start``)."""
        if step < self.start:
            return None
        if self.ramp == "constant" or self.ramp_steps == 0:
            return float(self.target)
        t = min(1.0, (step - self.start) / self.ramp_steps)
        if self.ramp == "linear":
            return float(self.initial + (self.target - self.initial) * t)
        return float(self.target + (self.initial - self.target) * (1.0 - t) ** 3)

    def should_project(self, step: int) -> bool:
        if step < self.start or (self.stop is not None and step > self.stop):
            return False
        return (step - self.start) % self.every == 0
