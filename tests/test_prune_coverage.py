"""Coverage gaps of groupsparse.prune: attention in_proj weights, (in, out)-stored layers, the lm_head policy,
step after finalize, gradual magnitude, finalization values, and every save/load path with masks installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from groupsparse.prune import (GSPPruner, GradualMagnitudePruner, MagnitudePruner, Pruner, Schedule,
                               select_parameters, sparsity_report)


def test_attention_in_proj_is_selected_and_pruned():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    names = [t.name for t in select_parameters(layer)]
    assert "self_attn.in_proj_weight" in names and "self_attn.out_proj.weight" in names
    assert "linear1.weight" in names and not any("norm" in n for n in names)
    pr = MagnitudePruner(layer)
    pr.prune(0.5, scope="layer")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    pr.attach(opt)
    layer(torch.randn(2, 5, 16)).sum().backward()
    opt.step()
    w = layer.self_attn.in_proj_weight
    assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    assert torch.equal(w == 0, ~pr.mask("self_attn.in_proj_weight"))


class Conv1D(nn.Module):
    """HF GPT-2's linear layer: weight stored (in, out), y = x @ W + b (matched by class name)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


@pytest.mark.parametrize("vectors", ["filter", "fan_out"])
def test_vector_modes_mean_the_same_for_every_layer_type(vectors):
    torch.manual_seed(0)
    lin, c1d = nn.Linear(12, 6, bias=False), Conv1D(6, 12)
    with torch.no_grad():
        c1d.weight.copy_(lin.weight.t())
    conv, convt = nn.Conv2d(4, 3, 3, bias=False), nn.ConvTranspose2d(4, 3, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(3, 4, 3, 3) * torch.rand(3, 1, 1, 1))
        convt.weight.copy_(conv.weight.transpose(0, 1))
    assert [t.transposed for t in select_parameters(nn.ModuleList([lin, c1d, conv, convt]))] == [False, True, False, True]
    for a, b, flip in ((lin, c1d, True), (conv, convt, True)):
        pa, pb = GSPPruner(a, 0.6, vectors=vectors), GSPPruner(b, 0.6, vectors=vectors)
        pa.project()
        pb.project()
        torch.testing.assert_close(b.weight.transpose(0, 1), a.weight)
        ha, hb = pa.report(vectors=vectors).hoyer, pb.report(vectors=vectors).hoyer
        assert ha == pytest.approx(hb) and ha == pytest.approx(0.6, abs=2e-3)


def test_lm_head_policy():
    class LM(nn.Module):
        def __init__(self, tied):
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.block = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 50, bias=False)
            if tied:
                self.lm_head.weight = self.embed.weight

    for tied in (False, True):
        assert [t.name for t in select_parameters(LM(tied))] == ["block.weight"]  # the head stays dense
    assert [t.name for t in select_parameters(LM(False), prune_lm_head=True)] == ["block.weight", "lm_head.weight"]
    assert [t.name for t in select_parameters(LM(False), include="lm_head.*")] == ["lm_head.weight"]
    assert [t.name for t in select_parameters(LM(True), prune_lm_head=True)] == ["block.weight"]  # tied: never


def test_step_after_finalize_does_not_project():
    torch.manual_seed(0)
    m = nn.Linear(16, 8)
    pr = GSPPruner(m, Schedule(0.7, every=1))
    assert pr.step()
    pr.finalize(0.8)
    before = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.mul_(1.5)  # as finetuning would move the kept weights
    assert not pr.step() and len(pr.history) == 1
    torch.testing.assert_close(m.weight, before * 1.5)


def test_gradual_magnitude_is_cubic_monotone_and_exact():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 10))
    gmp = GradualMagnitudePruner(m, Schedule(0.9, every=10, ramp="cubic", ramp_steps=100))
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    gmp.attach(opt)
    fractions = []
    for step in range(120):
        opt.zero_grad()
        m(torch.randn(4, 20)).pow(2).mean().backward()
        opt.step()
        if gmp.step(step):
            fractions.append(gmp.zero_fraction())
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(0.9, abs=1e-3)
    assert fractions[1] - fractions[0] > fractions[-1] - fractions[-2]  # cubic: fast early, slow late
    with pytest.raises(TypeError, match="Schedule"):
        GradualMagnitudePruner(m, 0.9)


@pytest.mark.parametrize("values", ["projected", "dense", "rescaled"])
def test_finalize_values(values):
    torch.manual_seed(0)
    m = nn.Linear(32, 16, bias=False)
    w0 = m.weight.detach().clone()
    pr = GSPPruner(m, 0.6, keep_pre_projection=True)
    pr.project()
    projected = m.weight.detach().clone()
    masks = pr.finalize(0.7, values=values)
    keep = masks["weight"]
    assert (keep.float().mean().item()) == pytest.approx(0.3, abs=1e-3)
    w = m.weight.detach()
    if values == "projected":
        torch.testing.assert_close(w, projected * keep)
    elif values == "dense":
        torch.testing.assert_close(w, w0 * keep)
    else:  # each row (filter) of the kept projection, scaled by its least-squares factor onto the dense row
        p = projected * keep
        alpha = (p * w0).sum(1, keepdim=True) / (p * p).sum(1, keepdim=True)
        torch.testing.assert_close(w, p * alpha)
        assert ((w - w0) * keep).norm() < ((p - w0) * keep).norm()
    with pytest.raises(ValueError, match="keep_pre_projection"):
        q = GSPPruner(nn.Linear(8, 8), 0.5)
        q.project()
        q.finalize(0.5, values="dense")


@pytest.mark.parametrize("style", ["buffer", "torch_prune", "parametrize"])
def test_load_state_dict_of_a_masked_model_installs_the_masks(style):
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    MagnitudePruner(a).prune(0.6, style=style)
    b = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    pb = Pruner(b)
    b.load_state_dict(a.state_dict())  # strict: the *_mask entries must be expected
    assert set(pb.masks) == {"0.weight", "2.weight"}
    assert sparsity_report(pb.pruned_state_dict()).zero_fraction == pytest.approx(0.6, abs=0.02)


HAVE_LIGHTNING = bool(importlib.util.find_spec("lightning"))


@pytest.mark.skipif(not HAVE_LIGHTNING, reason="Lightning not installed")
def test_lightning_resume_with_ckpt_path_and_masks(tmp_path):
    import lightning.pytorch as pl

    from groupsparse.prune import GSPCallback

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randint(0, 2, (32,))), batch_size=16)

    def trainer(epochs, cb):
        return pl.Trainer(max_epochs=epochs, callbacks=[cb], logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                          accelerator="cpu")

    m1 = Tiny()
    p1 = GSPPruner(m1, Schedule(0.7, every=1))
    t1 = trainer(2, GSPCallback(p1, finalize_epoch=1, zero_fraction=0.8))
    t1.fit(m1, loader)
    t1.save_checkpoint(tmp_path / "last.ckpt")
    m2 = Tiny()
    p2 = GSPPruner(m2, Schedule(0.7, every=1))
    cb2 = GSPCallback(p2, finalize_epoch=1, zero_fraction=0.8)
    trainer(3, cb2).fit(m2, loader, ckpt_path=tmp_path / "last.ckpt")
    assert cb2.finalized and len(p2.history) == 0  # resumed finalized: no projection after the masks
    assert torch.equal(p2.masks["net.0.weight"], p1.masks["net.0.weight"])
    assert p2.zero_fraction() == pytest.approx(0.8, abs=1e-2)


@pytest.mark.skipif(not importlib.util.find_spec("transformers"), reason="transformers not installed")
def test_save_pretrained_with_masks_round_trips(tmp_path):
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(cfg)
    pr = GSPPruner(model, 0.6)
    assert "lm_head.weight" not in [t.name for t in pr.targets]  # tied to wte: stays dense
    assert all(t.transposed for t in pr.targets if ".attn.c_" in t.name or ".mlp.c_" in t.name)
    pr.project()
    pr.finalize(0.7)
    model.save_pretrained(tmp_path)
    back = GPT2LMHeadModel.from_pretrained(tmp_path)
    sd_back = back.state_dict()
    for t in pr.targets:  # the weights come back with their zeros...
        assert torch.equal(sd_back[t.name], t.param.detach())
    again = Pruner(back)  # ... and the masks from the saved file, which keeps the *_mask entries
    again.load_masks(load_file(str(tmp_path / "model.safetensors")))
    assert all(torch.equal(again.masks[k], v) for k, v in pr.masks.items())
