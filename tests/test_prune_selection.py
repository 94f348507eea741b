"""Parameter selection on CNNs and a transformer-style block; the checkpoint name rule; schedules."""

import pytest
import torch
from torch import nn

from groupsparse.prune import Schedule, looks_like_layer_weight, select_parameters, select_state_dict_keys


class Conv1D(nn.Module):
    """Stand-in for HF GPT-2's Conv1D (a Linear with transposed weight, not an nn.Linear subclass)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


class Block(nn.Module):
    def __init__(self, d=8, vocab=20):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.ln_1 = nn.LayerNorm(d)
        self.attn = Attention(d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d)
        self.c_proj = Conv1D(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied


def names(targets):
    return [t.name for t in targets]


def test_default_selection_on_transformer_block():
    got = names(select_parameters(Block()))
    assert got == ["attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.o_proj.weight",
                   "mlp.fc1.weight", "mlp.fc2.weight", "c_proj.weight"]  # tied lm_head = embedding: skipped


def test_include_exclude_patterns():
    b = Block()
    assert names(select_parameters(b, include="attn.*")) == [f"attn.{n}_proj.weight" for n in "qkvo"]
    assert names(select_parameters(b, include=["mlp.*", "re:^attn\\.q"])) == ["attn.q_proj.weight", "mlp.fc1.weight",
                                                                             "mlp.fc2.weight"]
    assert "mlp.fc2.weight" not in names(select_parameters(b, exclude="re:fc2"))
    assert names(select_parameters(b, module_types=nn.Linear, exclude="*_proj.*")) == ["mlp.fc1.weight", "mlp.fc2.weight"]
    every = names(select_parameters(b, module_types=nn.Module))
    assert "embed_tokens.weight" in every and "ln_1.weight" not in every  # 1-D norm scales need min_ndim=1
    assert "ln_1.weight" in names(select_parameters(b, module_types=nn.Module, min_ndim=1))
    assert "mlp.fc1.bias" in names(select_parameters(b, param_names=("weight", "bias"), min_ndim=1))
    with pytest.raises(TypeError, match="expected"):
        select_parameters(b, include=3)
    with pytest.raises(TypeError, match="nn.Module"):
        select_parameters("model")


def test_cnn_selection_excludes_norms():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv1d(4, 4, 1), nn.GroupNorm(2, 4), nn.Linear(4, 2))
    assert names(select_parameters(m)) == ["0.weight", "2.weight", "4.weight"]


def test_checkpoint_rule():
    sd = {
        "conv1.weight": torch.randn(4, 3, 3, 3), "bn1.weight": torch.randn(4), "bn1.running_mean": torch.randn(4),
        "layer1.0.bn2.weight": torch.randn(4, 4),  # 2-D but named like a norm
        "fc.weight": torch.randn(2, 4), "fc.bias": torch.randn(2), "embed_tokens.weight": torch.randn(5, 4),
        "transformer.wte.weight": torch.randn(5, 4), "blocks.0.ln_1.weight": torch.randn(4),
        "blocks.0.norm1.weight": torch.randn(4, 4), "steps": torch.tensor(3), "fc.weight_mask": torch.ones(2, 4),
        "half.weight": torch.randn(3, 3).half(),
    }
    assert select_state_dict_keys(sd) == ["conv1.weight", "fc.weight", "half.weight"]
    assert select_state_dict_keys(sd, exclude="half.*") == ["conv1.weight", "fc.weight"]
    assert select_state_dict_keys(sd, include="conv*") == ["conv1.weight"]
    assert "bn1.weight" in select_state_dict_keys(sd, rule=lambda n, t: True)
    assert "steps" not in select_state_dict_keys(sd, rule=lambda n, t: True)  # never integer tensors
    assert not looks_like_layer_weight("x.weight", torch.randn(4))


def test_schedule_values():
    c = Schedule(0.8, start=10, every=5)
    assert c.value(9) is None and c.value(10) == 0.8 and c.value(1000) == 0.8
    assert [s for s in range(30) if c.should_project(s)] == [10, 15, 20, 25]
    lin = Schedule(0.8, start=10, ramp="linear", initial=0.2, ramp_steps=6)
    assert [lin.value(s) for s in (10, 13, 16, 100)] == pytest.approx([0.2, 0.5, 0.8, 0.8])
    cub = Schedule(0.8, start=0, ramp="cubic", initial=0.0, ramp_steps=10)
    assert cub.value(5) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)
    assert cub.value(5) > Schedule(0.8, ramp="linear", ramp_steps=10).value(5)  # cubic front-loads pruning
    stop = Schedule(0.5, start=2, every=2, stop=6)
    assert [s for s in range(12) if stop.should_project(s)] == [2, 4, 6]
    ep = Schedule.from_epochs(0.9, 100, start_epoch=40, every=150, ramp="cubic", ramp_epochs=2)
    assert (ep.start, ep.every, ep.ramp_steps) == (4000, 150, 200)
    for bad in (dict(target=1.5), dict(target=0.5, every=0), dict(target=0.5, ramp="exp"),
                dict(target=0.5, start=5, stop=3), dict(target=0.5, start=-1)):
        with pytest.raises(ValueError, match="got"):
            Schedule(**bad)
