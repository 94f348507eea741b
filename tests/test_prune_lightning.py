"""The Lightning callback (optional dependency: skipped when Lightning is not installed)."""

import importlib.util

import pytest
import torch
from torch import nn

HAVE_LIGHTNING = bool(importlib.util.find_spec("lightning") or importlib.util.find_spec("pytorch_lightning"))


def test_lazy_import_without_lightning():
    import groupsparse.prune as gp

    assert "GSPCallback" not in gp.__all__  # `from groupsparse.prune import *` must not need Lightning
    if not HAVE_LIGHTNING:
        with pytest.raises(ImportError, match="lightning"):
            gp.GSPCallback  # noqa: B018


@pytest.mark.skipif(not HAVE_LIGHTNING, reason="Lightning not installed (optional extra 'lightning')")
def test_callback_projects_and_finalizes(tmp_path):
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl
    from groupsparse.prune import GSPCallback, GSPPruner, Schedule

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    model = Tiny()
    pruner = GSPPruner(model, Schedule(0.7, start=1, every=2))
    cb = GSPCallback(pruner, finalize_epoch=2, zero_fraction=0.8)
    trainer = pl.Trainer(max_epochs=3, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(model, loader)
    assert pruner.history and cb.finalized
    assert pruner.zero_fraction() == pytest.approx(0.8, abs=1e-2)


@pytest.mark.skipif(not HAVE_LIGHTNING, reason="Lightning not installed (optional extra 'lightning')")
def test_callback_options_are_checked_at_construction():
    """Bad finalize options failed only when finalize_epoch came, hours into a run."""
    from groupsparse.prune import GSPCallback, GSPPruner

    p = GSPPruner(nn.Linear(8, 8), 0.7)
    for kw, match in ((dict(finalize_epoch=5, finalize_scope="globl"), "scope: got 'globl'"),
                      (dict(finalize_epoch=5, zero_fraction=1.5), "zero_fraction: got 1.5"),
                      (dict(finalize_epoch="5"), "finalize_epoch: got '5'"),
                      (dict(finalize_epoch=-1), "finalize_epoch: got -1"),
                      (dict(zero_fraction=0.9), "zero_fraction: got 0.9 with finalize_epoch=None")):
        with pytest.raises(ValueError, match=match):
            GSPCallback(p, **kw)
    GSPCallback(p, finalize_epoch=3, zero_fraction=0.9, finalize_scope="layer")
