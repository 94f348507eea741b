"""Magnitude, random and Hoyer-Square baselines; the sparsity report."""

import json

import pytest
import torch
from torch import nn

from groupsparse.prune import (GSPPruner, HoyerSquareRegularizer, MagnitudePruner, RandomPruner, hoyer_square,
                               sparsity_report)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 3))


def masked_count(pruner):
    return sum(int((~m).sum()) for m in pruner.masks.values())


def test_magnitude_global_and_per_layer():
    model = mlp()
    p = MagnitudePruner(model)
    total = sum(t.param.numel() for t in p.targets)
    kept_before = {t.name: t.param.detach().abs().clone() for t in p.targets}
    p.prune(0.9, scope="global")
    assert masked_count(p) == round(0.9 * total)
    smallest_kept = min(float(kept_before[n][m].min()) for n, m in p.masks.items() if m.any())
    largest_pruned = max(float(kept_before[n][~m].max()) for n, m in p.masks.items() if (~m).any())
    assert largest_pruned <= smallest_kept
    p2 = MagnitudePruner(mlp())
    p2.prune(0.5, scope="layer")
    for t in p2.targets:
        assert int((~p2.mask(t)).sum()) == round(0.5 * t.param.numel())
    p3 = MagnitudePruner(mlp())
    p3.prune(threshold=0.1)
    assert all(torch.all(t.param.abs()[p3.mask(t)] > 0.1) for t in p3.targets)
    with pytest.raises(ValueError, match="exactly one"):
        p3.prune(0.5, threshold=0.1)


def test_random_exact_and_seeded():
    a, b = RandomPruner(mlp()), RandomPruner(mlp())
    ma, mb = a.prune(0.7, seed=3), b.prune(0.7, seed=3)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    for t in a.targets:
        assert int((~a.mask(t)).sum()) == round(0.7 * t.param.numel())


def test_hoyer_square_values_and_gradient():
    one_hot = torch.zeros(10)
    one_hot[3] = 2.0
    assert float(hoyer_square(one_hot)) == pytest.approx(1.0)
    assert float(hoyer_square(torch.ones(10))) == pytest.approx(10.0)
    assert float(hoyer_square([one_hot, torch.ones(4)])) == pytest.approx(5.0)
    w = torch.randn(4, 6)
    assert float(hoyer_square(w, vectors="filter")) == pytest.approx(
        float(torch.linalg.vector_norm(w, dim=1).sum() ** 2 / (w ** 2).sum()), rel=1e-5)
    assert float(hoyer_square(torch.zeros(3))) == 0.0
    model = mlp()
    reg = HoyerSquareRegularizer(model, strength=1e-3)
    loss = reg()
    loss.backward()
    assert all(t.param.grad is not None for t in reg.targets)
    reg.prune(threshold=0.05)
    assert reg.is_masked
    with pytest.raises(ValueError, match="strength"):
        HoyerSquareRegularizer(model, strength=-1)


def test_report_table_and_json(tmp_path):
    model = mlp()
    p = GSPPruner(model, 0.8)
    p.project()
    p.finalize(0.9)
    rep = sparsity_report(model)
    assert [layer.name for layer in rep.layers] == ["0.weight", "2.weight", "4.weight"]
    assert rep.zero_fraction == pytest.approx(0.9, abs=1e-3)
    d = json.loads(rep.to_json(tmp_path / "r.json"))
    assert set(d) >= {"zero_fraction", "hoyer", "layers", "numel", "zeros"}
    assert json.loads((tmp_path / "r.json").read_text()) == d
    assert "total" in str(rep)
    from rich.console import Console

    console = Console(record=True, width=120)
    rep.print(console)
    assert "4.weight" in console.export_text()
    sd_rep = sparsity_report(p.pruned_state_dict())
    assert sd_rep.zero_fraction == pytest.approx(rep.zero_fraction)
