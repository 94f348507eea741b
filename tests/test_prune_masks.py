"""Masks: enforcement through optimizers, parameter identity, exact finalize fractions, styles, export."""

import pytest
import torch
from torch import nn

from groupsparse.prune import GSPPruner, MagnitudePruner, Pruner, pruned_state_dict, smallest_k


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 5))


def train(model, opt, steps=5):
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def pruned_entries_zero(pruner, opt):
    for t in pruner.targets:
        off = ~pruner.mask(t)
        assert torch.all(t.param[off] == 0), t.name
        for v in opt.state[t.param].values():
            if isinstance(v, torch.Tensor) and v.shape == t.param.shape:
                assert torch.all(v[off] == 0), t.name


@pytest.mark.parametrize("style", ["buffer", "torch_prune", "parametrize"])
@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-1),
], ids=["sgd_momentum", "adamw"])
def test_masks_survive_optimizers(style, make_opt):
    model = tiny_cnn()
    ids = [id(p) for p in model.parameters()]
    opt = make_opt(model.parameters())
    train(model, opt, 3)  # momentum / Adam moments exist before pruning
    pruner = GSPPruner(model, 0.6)
    pruner.project()
    pruner.finalize(0.8, style=style)
    pruner.attach(opt)
    pruned_entries_zero(pruner, opt)
    train(model, opt, 5)
    pruned_entries_zero(pruner, opt)
    assert abs(pruner.zero_fraction() - 0.8) < 1e-3
    assert all(any(p is t.param for p in opt.param_groups[0]["params"]) for t in pruner.targets)
    pruner.remove()
    assert sorted(id(p) for p in model.parameters()) == sorted(ids)  # same objects (order may change)
    assert not any(k.endswith("_mask") or k.endswith("_orig") for k in model.state_dict())
    assert all(type(m.weight) is nn.Parameter for m in model if isinstance(m, (nn.Conv2d, nn.Linear)))
    zeros = sum(int((m.weight == 0).sum()) for m in model if isinstance(m, (nn.Conv2d, nn.Linear)))
    total = sum(m.weight.numel() for m in model if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert zeros == round(0.8 * total)


def test_forward_mask_alone_lets_momentum_revive():
    """The failure the post-step hook exists for: without attach, momentum gathered earlier revives weights."""
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, 3)
    pruner = MagnitudePruner(model)
    pruner.prune(0.5)
    train(model, opt, 1)
    assert any(torch.any(t.param[~pruner.mask(t)] != 0) for t in pruner.targets)
    pruner.attach(opt)
    train(model, opt, 2)
    pruned_entries_zero(pruner, opt)


def test_project_keeps_identity_and_runs_without_grad():
    model = tiny_cnn()
    params = [t for t in model.parameters()]
    pruner = GSPPruner(model, 0.7)
    pruner.project()
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert all(p.grad_fn is None and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("frac", [0.5, 0.9, 0.97])
def test_finalize_exact_global(frac):
    model = tiny_cnn()
    pruner = GSPPruner(model, 0.3)
    pruner.project()
    pruner.finalize(frac, scope="global")
    total = sum(t.param.numel() for t in pruner.targets)
    masked = sum(int((~m).sum()) for m in pruner.masks.values())
    zeros = sum(int((t.param == 0).sum()) for t in pruner.targets)
    assert masked == zeros == round(frac * total)


def test_finalize_exact_per_layer():
    model = tiny_cnn()
    pruner = GSPPruner(model, 0.3)
    pruner.project()
    pruner.finalize(0.75, scope="layer")
    for t in pruner.targets:
        assert int((t.param == 0).sum()) == int((~pruner.mask(t)).sum()) == round(0.75 * t.param.numel())


def test_finalize_keeps_projection_zeros():
    model = tiny_cnn()
    pruner = GSPPruner(model, 0.8)
    pruner.project()
    before = {t.name: (t.param == 0).clone() for t in pruner.targets}
    masks = pruner.finalize()  # the projection's own zeros
    for t in pruner.targets:
        assert torch.equal(~masks[t.name], before[t.name])
    p2 = GSPPruner(model, 0.8)  # a second pruner adopts the masks already on the model
    assert set(p2.masks) == set(masks)
    with pytest.warns(UserWarning, match="already zero"):
        p2.finalize(0.01)  # fewer zeros asked than the projection made: all kept
    total = sum(t.param.numel() for t in pruner.targets)
    p3 = GSPPruner(tiny_cnn(), 0.8)
    p3.project()
    p3.finalize(0.01, keep_zeros=False)
    assert sum(int((~m).sum()) for m in p3.masks.values()) == round(0.01 * total)


def test_smallest_k_ties_exact():
    s = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 0.0])
    m = smallest_k(s, 2)
    assert int(m.sum()) == 2 and torch.all(s[m] == 0)
    assert int(smallest_k(s, 0).sum()) == 0 and bool(smallest_k(s, 6).all())
    with pytest.raises(ValueError):
        smallest_k(s, 7)


def test_pruned_state_dict_all_styles_and_torch_prune_interop():
    import torch.nn.utils.prune as tp

    for style in ("buffer", "torch_prune", "parametrize"):
        model = tiny_cnn()
        pruner = MagnitudePruner(model)
        pruner.prune(0.6, style=style)
        sd = pruned_state_dict(model)
        fresh = tiny_cnn()
        fresh.load_state_dict(sd)  # plain keys, loads into the unpruned architecture
        rep = pruner.report()
        assert abs(rep.zero_fraction - 0.6) < 1e-3
        if style == "torch_prune":
            assert tp.is_pruned(model)
    # a model pruned by torch.nn.utils.prune is adopted, enforced and removed
    model = tiny_cnn()
    tp.l1_unstructured(model[0], "weight", amount=0.5)
    pruner = Pruner(model)  # masks already on the model are adopted
    assert pruner.mask("0.weight") is not None and pruner.mask("3.weight") is None
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    pruner.attach(opt)
    train(model, opt, 3)
    pruner.remove()
    assert int((model[0].weight == 0).sum()) == model[0].weight.numel() // 2


def test_set_masks_validation_is_transactional():
    model = tiny_cnn()
    pruner = MagnitudePruner(model)
    good = torch.ones(pruner.targets[0].shape, dtype=torch.bool)
    with pytest.raises(ValueError, match="expected"):
        pruner.set_masks({pruner.targets[0].name: good, pruner.targets[1].name: torch.ones(2, 2)})
    assert not pruner.is_masked and not hasattr(model[0], "weight_mask")
    with pytest.raises(ValueError, match="style"):
        pruner.set_masks({}, style="bogus")
    with pytest.raises(TypeError, match="optimizer"):
        pruner.attach("sgd")


def test_finalize_input_validation():
    pruner = GSPPruner(tiny_cnn(), 0.5)
    with pytest.raises(ValueError, match="zero_fraction"):
        pruner.finalize(1.5)
    with pytest.raises(ValueError, match="scope"):
        pruner.finalize(0.5, scope="network")
    with pytest.raises(TypeError, match="sparsity"):
        GSPPruner(tiny_cnn(), "0.5")


def test_induced_gsp_plain_loop():
    from groupsparse.prune import Schedule

    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = GSPPruner(model, Schedule(0.7, start=2, every=3, ramp="linear", initial=0.4, ramp_steps=6)).attach(opt)
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    done = []
    for _ in range(9):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        done.append(pruner.step())
    assert [i for i, d in enumerate(done) if d] == [2, 5, 8]
    assert [h["target"] for h in pruner.history] == pytest.approx([0.4, 0.55, 0.7])
    rep = pruner.report()
    assert all(abs(layer.hoyer - 0.7) < 1e-3 for layer in rep.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pruner():
    model = tiny_cnn().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pruner = GSPPruner(model, 0.7).attach(opt)
    infos = pruner.project()
    assert infos[0].engine == "torch"
    pruner.finalize(0.9)
    train_x = torch.randn(8, 3, 8, 8, device="cuda")
    model(train_x).sum().backward()
    opt.step()
    for t in pruner.targets:
        assert t.param.device.type == "cuda" and torch.all(t.param[~pruner.mask(t)] == 0)


def test_resume_masks_from_state_dict():
    model = tiny_cnn()
    MagnitudePruner(model).prune(0.7)
    sd = model.state_dict()
    assert "0.weight_mask" in sd
    fresh = tiny_cnn()
    pruner = GSPPruner(fresh, 0.5)
    found = pruner.load_masks(sd)
    assert set(found) == {"0.weight", "3.weight", "5.weight"}
    fresh.load_state_dict(sd)
    assert all(torch.equal(pruner.mask(n), m.bool()) for n, m in found.items())


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.data())
def test_smallest_k_property(values, data):
    """Exactly k entries, and never a kept entry smaller than a pruned one, whatever the ties."""
    s = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(0, len(values)))
    m = smallest_k(s, k)
    assert int(m.sum()) == k
    if 0 < k < len(values):
        assert float(s[m].max()) <= float(s[~m].min())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_smallest_k_is_exact_in_every_dtype(dtype):
    from groupsparse.prune.masks import smallest_k

    g = torch.Generator().manual_seed(0)
    # float64 scores closer together than float32 can tell apart: a float32 threshold used to mark k - 1
    base = 1.0 + torch.arange(512, dtype=torch.float64) * 1e-12
    scores = (base[torch.randperm(512, generator=g)] if dtype == torch.float64
              else (torch.randn(512, generator=g) * 100).to(dtype))
    for k in (1, 255, 256, 511):
        m = smallest_k(scores, k)
        assert int(m.sum()) == k
        assert scores[m].double().max() <= scores[~m].double().min()
