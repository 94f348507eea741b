"""Lightning callback for induced GSP (``pip install groupsparse[lightning]``); importing this module imports Lightning."""

from __future__ import annotations

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    try:
        import pytorch_lightning as pl
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("groupsparse.prune.lightning needs Lightning: pip install 'groupsparse[lightning]'") from e

from .masks import check_fraction, check_prune_scope
from .pruner import GSPPruner


class GSPCallback(pl.Callback):
    """Drive a :class:`~groupsparse.prune.GSPPruner` from a Lightning ``Trainer``.

    Projects after optimizer steps as the pruner's schedule says (``trainer.global_step``), keeps masks enforced
    on every optimizer the trainer uses, and optionally fixes the masks at the start of ``finalize_epoch``.
    """

    def __init__(self, pruner: GSPPruner, *, finalize_epoch: int | None = None, zero_fraction: float | None = None,
                 finalize_scope: str = "model"):
        super().__init__()
        if not isinstance(pruner, GSPPruner):
            raise TypeError(f"pruner: got {type(pruner).__name__}, expected a GSPPruner")
        # checked now, not at finalize_epoch (hours into a run)
        if finalize_epoch is not None and (isinstance(finalize_epoch, bool) or not isinstance(finalize_epoch, int)
                                           or finalize_epoch < 0):
            raise ValueError(f"finalize_epoch: got {finalize_epoch!r}, expected a non-negative int or None")
        if zero_fraction is not None:
            if finalize_epoch is None:
                raise ValueError(f"zero_fraction: got {zero_fraction!r} with finalize_epoch=None, expected "
                                 "finalize_epoch (the masks are fixed then)")
            check_fraction(zero_fraction, "zero_fraction")
        check_prune_scope(finalize_scope)
        self.pruner = pruner
        self.finalize_epoch = finalize_epoch
        self.zero_fraction = zero_fraction
        self.finalize_scope = finalize_scope
        self.finalized = False
        self._last_step = -1

    def state_dict(self) -> dict:
        return {"finalized": self.finalized}

    def load_state_dict(self, state_dict: dict) -> None:
        # Resuming with Trainer.fit(ckpt_path=...): the pruner's load hook has already installed the saved masks
        # (the checkpoint's *_mask entries); a finalized run must not be projected or finalized again.
        self.finalized = bool(state_dict.get("finalized", False))
        self.pruner.finalized = self.pruner.finalized or self.finalized

    def on_fit_start(self, trainer, pl_module):
        for opt in trainer.optimizers:
            self.pruner.attach(opt)

    def on_train_epoch_start(self, trainer, pl_module):
        if not self.finalized and self.finalize_epoch is not None and trainer.current_epoch >= self.finalize_epoch:
            self.pruner.finalize(self.zero_fraction, scope=self.finalize_scope)
            self.finalized = True
            for opt in trainer.optimizers:  # momentum gathered before the masks must not revive pruned weights
                self.pruner.attach(opt)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # global_step already counts the step just taken; with gradient accumulation several batches share one
        # optimizer step, which must be scheduled once
        step = trainer.global_step - 1
        if self.finalized or step < 0 or step == self._last_step:
            return
        self._last_step = step
        self.pruner.step(step)

    def on_fit_end(self, trainer, pl_module):
        self.pruner.detach()
