"""GSPPruner: grouped sparse projection of a model's weights, in place, on a schedule, then fixed masks."""

from __future__ import annotations

import numbers
import time
import warnings
from typing import Any

import torch
from torch import nn

from .masks import MASK_STYLES, Pruner, check_fraction
from .schedule import Schedule
from .vectors import as_vectors, check_mode, check_normalize, check_scope, from_vectors, project_tensors, vector_shape


class GSPPruner(Pruner):
    """Prune a model with the grouped sparse projection (induced or single-shot GSP).

    Parameters
    ----------
    model : nn.Module
    sparsity : float in [0, 1] or :class:`Schedule`
        Target average Hoyer sparsity of the vectors. A float is a constant schedule that projects on every
        :meth:`step`; single-shot use calls :meth:`project` directly.
    vectors : {"filter", "fan_out" (alias "kernel_position"), "kernel", "layer"}
        How each tensor is cut into vectors (see :mod:`groupsparse.prune.vectors`).
    scope : {"layer", "model"}
        ``"layer"``: each tensor is its own group at the target; ``"model"``: one ragged group over all.
    normalize : {None, "vector", "layer"}
        Rescale vectors before the projection and back after it; meant for ``scope="model"``, where raw norms
        starve small layers.
    engine, tol, max_iter : forwarded to :func:`groupsparse.project`.
    keep_pre_projection : bool
        Keep a copy of the selected weights from before each projection (``pre_projection``), for
        ``finalize(values="dense" | "rescaled")``; costs one copy of those weights.
    include, exclude, module_types, exclude_module_types, param_names, targets :
        Parameter selection (see :func:`~groupsparse.prune.select_parameters`).

    Tensors whose vectors would have one entry (a 1×1 conv in ``"kernel"`` mode, a one-output Linear in
    ``"fan_out"`` mode) cannot be projected; they are left out of the projection with a warning but still take
    part in :meth:`finalize`.

    Example
    -------
    >>> pruner = GSPPruner(model, Schedule(0.8, start=1000, every=150)).attach(optimizer)
    >>> for batch in loader:
    ...     loss(model, batch).backward(); optimizer.step(); optimizer.zero_grad()
    ...     pruner.step()
    >>> pruner.finalize(zero_fraction=0.9)   # exact 90 % zeros, global magnitude over the projected weights
    """

    def __init__(self, model: nn.Module, sparsity: float | Schedule, *, vectors: str = "filter",
                 scope: str = "layer", normalize: str | None = None, engine: str = "auto",
                 tol: float | None = None, max_iter: int | None = None, keep_pre_projection: bool = False,
                 **selection: Any):
        super().__init__(model, **selection)
        if isinstance(sparsity, Schedule):
            self.schedule = sparsity
        else:
            self.schedule = Schedule(check_fraction(sparsity, "sparsity"))
        self.vectors = check_mode(vectors)
        self.scope = check_scope(scope)
        self.normalize = check_normalize(normalize)
        self.engine, self.tol, self.max_iter = engine, tol, max_iter
        self.step_count = 0
        self.finalized = False
        # A copy of the weights before the latest projection, for finalize(values="dense"|"rescaled").
        self.keep_pre_projection = bool(keep_pre_projection)
        self.pre_projection: dict[str, torch.Tensor] | None = None
        self.last_info: list = []
        self.last_time = 0.0
        self.history: list[dict] = []  # one record per projection: step, target, time, achieved sparsity
        self._projectable = []
        skipped = []
        for t in self.targets:
            if t.param.numel() == 0:
                continue
            try:
                n = vector_shape(t.canonical().shape, self.vectors)[1]
            except ValueError:  # "kernel" on a Linear weight: no kernels to cut
                n = 1
            (self._projectable if n >= 2 else skipped).append(t)
        self.skipped = skipped
        if skipped:
            warnings.warn(f"vectors={vectors!r}: {len(skipped)} tensor(s) have vectors of one entry and are left out of "
                          f"the projection: {[t.name for t in skipped][:8]}", stacklevel=2)
        if not self._projectable:
            raise ValueError(f"vectors: got {vectors!r}, which leaves no tensor with vectors of length >= 2 to project")

    @torch.no_grad()
    def project(self, sparsity: float | None = None) -> list:
        """Project the selected weights in place now (single-shot GSP, or one induced step).

        ``sparsity`` defaults to the schedule's final target. Parameters keep their identity; masked entries
        stay zero. Returns the :class:`~groupsparse.ProjectionInfo` list (one per tensor, or one for the model).
        """
        s = self.schedule.target if sparsity is None else check_fraction(sparsity, "sparsity")
        t0 = time.perf_counter()
        if self.keep_pre_projection:
            self.pre_projection = {t.name: t.param.detach().clone() for t in self.targets}
        # (out, in) views of (in, out) weights: the projection writes through them into the parameters
        infos = self._project_params([t.canonical() for t in self._projectable], s)
        self.apply_masks()
        self.last_time = time.perf_counter() - t0
        self.last_info = infos
        self.history.append({"step": self.step_count, "target": s, "seconds": self.last_time,
                             "sparsity": [float(i.sparsity) for i in infos]})
        return infos

    def _project_params(self, params: list, s: float) -> list:
        """Write the projection of ``params`` into them; returns the infos (subclasses change where it runs)."""
        results, infos = project_tensors(params, s, vectors=self.vectors, scope=self.scope, normalize=self.normalize,
                                         engine=self.engine, tol=self.tol, max_iter=self.max_iter)
        for p, r in zip(params, results):
            p.copy_(r)
        return infos

    def step(self, step: int | None = None) -> bool:
        """Plain-loop hook, called after ``optimizer.step()``: projects when the schedule says so.

        ``step`` is the global optimizer step; without it an internal counter is used (and advanced).
        Returns whether a projection happened; never after :meth:`finalize` (the masks are fixed then, and a
        projection would move the surviving weights of a model that is being finetuned).
        """
        if step is None:
            step = self.step_count
            self.step_count += 1
        else:
            if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
                raise ValueError(f"step: got {step!r}, expected a non-negative int")
            step = int(step)
            self.step_count = step + 1
        if self.finalized or not self.schedule.should_project(step):
            return False
        s = self.schedule.value(step)
        if s is None or s <= 0:
            return False
        self.project(s)
        return True

    def finalize(self, zero_fraction: float | None = None, *, scope: str = "model", keep_zeros: bool = True,
                 style: str = "buffer", values: str = "projected",
                 reference: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Fix the masks for finetuning; returns ``{target name: bool keep-mask}``.

        ``zero_fraction=None`` masks exactly the zeros the projection left. With a value, magnitude pruning over
        the (projected) weights sets exactly ``round(zero_fraction * N)`` entries to zero, over all targets
        (``scope="model"``/``"global"``, the paper's choice) or per tensor (``scope="layer"``). ``keep_zeros``
        never unmasks an existing zero (if there are more zeros than the fraction asks for, all stay masked and
        a warning says so); with ``keep_zeros=False`` the count is exact and surplus zeros may regrow.
        ``style`` chooses where masks live (``"buffer"``, ``"torch_prune"``, ``"parametrize"``).
        Call :meth:`attach` (before or after) so optimizer steps keep pruned weights at zero.

        ``values`` chooses what the kept weights hold (the mask is the same in every case):

        * ``"projected"``: the projected values (the authors' choice). The projection is a soft threshold per
          vector, so it also shrinks every surviving weight.
        * ``"dense"``: the weights before the projection (``reference``, default the copy kept by a pruner made
          with ``keep_pre_projection=True``) at the kept positions: GSP chooses the mask, the values are undone.
        * ``"rescaled"``: the projected values times one factor per vector, the least-squares fit
          ``<p, w> / <p, p>`` of the kept projected vector ``p`` to the reference ``w``: undoes the shrinkage but
          keeps the projection's relative values inside each vector.
        """
        if values not in ("projected", "dense", "rescaled"):
            raise ValueError(f"values: got {values!r}, expected 'projected', 'dense' or 'rescaled'")
        if values != "projected":
            reference = self.pre_projection if reference is None else reference
            if reference is None:
                raise ValueError(f"values={values!r}: got no reference weights, expected reference= or a pruner made "
                                 "with keep_pre_projection=True that has projected")
            missing = [t.name for t in self.targets if t.name not in reference]
            if missing:
                raise ValueError(f"reference: got no tensor for {missing[:4]}, expected one per target")
            for t in self.targets:  # (all checked before any weight is written; a broadcastable shape was taken)
                r = reference[t.name]
                if not isinstance(r, torch.Tensor) or tuple(r.shape) != t.shape:
                    got = f"shape {tuple(r.shape)}" if isinstance(r, torch.Tensor) else type(r).__name__
                    raise ValueError(f"reference[{t.name!r}]: got {got}, expected a tensor of shape {t.shape}")
        if style not in MASK_STYLES:
            raise ValueError(f"style: got {style!r}, expected one of {MASK_STYLES}")
        if zero_fraction is None:
            masks = {t.name: (t.param.detach() != 0) for t in self.targets}
            for t in self.targets:
                m = self.mask(t)
                if m is not None:
                    masks[t.name] &= m
        else:
            masks = self._magnitude_masks(zero_fraction, scope, keep_zeros=keep_zeros)
        if values != "projected":
            with torch.no_grad():
                restored = [self._restored(t, masks[t.name], reference[t.name], values) for t in self.targets]
                for t, v in zip(self.targets, restored):
                    t.param.copy_(v)
        self.set_masks(masks, style=style)
        self.finalized = True
        return masks

    def _restored(self, t, mask: torch.Tensor, ref: torch.Tensor, values: str) -> torch.Tensor:
        if values == "dense":
            return ref.to(device=t.param.device, dtype=t.param.dtype) * mask
        # the fit's sums in float32 at least: in float16 a layer's sum of squares overflows (NaN weights)
        work = torch.promote_types(t.param.dtype, torch.float32)
        ref = ref.to(device=t.param.device, dtype=work)
        p, ref = t.canonical(t.param.detach().to(work) * mask), t.canonical(ref)
        try:
            pv, wv = as_vectors(p, self.vectors), as_vectors(ref, self.vectors)
        except ValueError:  # no vectors of this mode in this tensor ("kernel" on a Linear): one factor
            pv, wv = p.reshape(1, -1), ref.reshape(1, -1)
        den = (pv * pv).sum(1, keepdim=True)
        alpha = torch.where(den > 0, (pv * wv).sum(1, keepdim=True) / den.clamp_min(1e-30), torch.ones_like(den))
        out = (pv * alpha).reshape(p.shape) if pv.shape == (1, p.numel()) else from_vectors(pv * alpha, p.shape,
                                                                                               self.vectors)
        return t.canonical(out).to(t.param.dtype)
