"""Masks against what users do to a model after pruning it: change its dtype, reload it with ``assign=True``,
freeze and unfreeze weights, reuse mask tensors, carry foreign parametrizations (review of 2026-12-05)."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from groupsparse.prune import MagnitudePruner, RandomPruner, pruned_state_dict


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def _train(model, opt, steps=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 8, generator=g).to(dtype)).square().sum().backward()
        opt.step()


def _pruned_alive(pruner):
    """Pruned entries that are not zero (weights) over every masked target."""
    return sum(int((t.param[~pruner.mask(t)] != 0).sum()) for t in pruner.targets)


@pytest.mark.parametrize("style", ["buffer", "parametrize", "torch_prune"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_masks_follow_a_dtype_change_after_pruning(style, dtype):
    """The cached masks kept float32 after ``model.half()``: the gradient hook turned half gradients into
    float32 ones and backward raised."""
    m = _mlp()
    p = MagnitudePruner(m)
    p.prune(0.5, style=style)
    m.to(dtype)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    p.attach(opt)
    _train(m, opt, dtype=dtype)
    assert _pruned_alive(p) == 0
    assert all(t.param.grad is None or t.param.grad.dtype == dtype for t in p.targets)


def test_masks_follow_parameters_replaced_by_load_state_dict_assign():
    """``load_state_dict(sd, assign=True)`` puts new Parameter objects in the modules; the pruner kept masking
    the old ones and every pruned weight of the new ones came back."""
    src = _mlp()
    MagnitudePruner(src).prune(0.5)
    sd = src.state_dict()
    m = _mlp(1)
    p = MagnitudePruner(m)
    m.load_state_dict(sd, assign=True)
    assert all(t.param is t.module.weight for t in p.targets)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    p.attach(opt)
    _train(m, opt)
    assert _pruned_alive(p) == 0 and p.zero_fraction() == 0.5


def test_a_weight_masked_while_frozen_gets_its_gradient_hook_when_unfrozen():
    m = _mlp()
    m[0].weight.requires_grad_(False)
    p = MagnitudePruner(m)
    p.prune(0.5)
    m[0].weight.requires_grad_(True)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    p.attach(opt)
    m(torch.randn(5, 8)).square().sum().backward()
    assert int((m[0].weight.grad[~p.mask("0.weight")] != 0).sum()) == 0  # clipping sees the pruned model


@pytest.mark.parametrize("style", ["buffer", "parametrize", "torch_prune"])
def test_masks_never_share_memory_with_the_callers_tensors(style):
    """The caller's bool masks became the module's buffers, and later prunes wrote into them: a mask returned
    earlier changed, and one dict installed on two models pruned the second when the first was pruned."""
    a, b = _mlp(), _mlp(1)
    pa = MagnitudePruner(a)
    first = pa.prune(0.3, style=style)
    snapshot = {k: v.clone() for k, v in first.items()}
    got = pa.mask("0.weight")
    pb = MagnitudePruner(b)
    pb.set_masks(first, style=style)
    pa.prune(0.6, style=style)
    assert all(torch.equal(first[k], snapshot[k]) for k in first)  # the caller's dict is unchanged
    assert torch.equal(got, snapshot["0.weight"])  # an earlier mask() result too
    assert abs(pb.zero_fraction() - 0.3) < 0.02  # b keeps its own masks
    got[:] = False  # writing a returned mask changes nothing in the pruner
    assert pa.mask("0.weight").any()
    c = _mlp(2)
    MagnitudePruner(c)
    c.load_state_dict(a.state_dict())  # the load hook installs a's masks into c: copies, not a's buffers
    pa.prune(0.9, style=style)
    assert all(t.module._buffers.get("weight_mask") is None or t.module.weight_mask.data_ptr() !=
               a.get_submodule(t.module_name).weight_mask.data_ptr() for t in MagnitudePruner(c).targets)


@pytest.mark.parametrize("wrap", ["spectral_norm", "orthogonal", "weight_norm"])
def test_weights_under_a_foreign_parametrization_are_skipped_and_exported_as_computed(wrap):
    """A mask on ``original`` is no mask on the weight such a parametrization computes (orthogonal: 0 zeros of
    36 for a reported 0.625); weight_norm crashed selection; remove() stripped the user's parametrization; the
    export wrote ``original`` (even unpruned, the model computed something else)."""
    m = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    getattr(parametrizations, wrap)(m[0])
    x = torch.randn(4, 6)
    with pytest.warns(UserWarning, match=r"0\.weight: skipped, it is computed by a parametrization"):
        p = MagnitudePruner(m)
    assert [t.name for t in p.targets] == ["2.weight"]
    p.prune(0.5, style="parametrize")
    want = m(x)
    plain = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    plain.load_state_dict(pruned_state_dict(m))
    torch.testing.assert_close(plain(x), want)
    p.remove()
    assert type(m[0].parametrizations.weight[0]).__name__.lower().lstrip("_").startswith(wrap.split("_")[0][:5])
    torch.testing.assert_close(m(x), want)


def test_random_pruner_follows_torch_manual_seed_and_bad_thresholds_are_refused():
    masks = []
    for seed in (1, 1, 2):
        pruner = RandomPruner(_mlp())
        torch.manual_seed(seed)
        masks.append(pruner.prune(0.5)["0.weight"])
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])  # one fixed mask before
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="threshold: got"):
            MagnitudePruner(_mlp()).prune(threshold=bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MagnitudePruner(_mlp()).prune(threshold=0.1)


def test_finalize_checks_every_reference_before_writing_any_weight():
    from groupsparse.prune import GSPPruner

    m = _mlp()
    p = GSPPruner(m, 0.7)
    p.project()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for ref, match in (({"0.weight": torch.randn(8, 8), "2.weight": torch.randn(4, 7)}, r"reference\['2.weight'\]"),
                       ({"0.weight": torch.ones(1, 8), "2.weight": torch.ones(4, 8)}, r"got shape \(1, 8\)")):
        with pytest.raises(ValueError, match=match):  # (the first target was rewritten; (1, 8) was broadcast)
            p.finalize(values="dense", reference=ref)
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items()) and not p.finalized
    with pytest.raises(ValueError, match="style: got 'nope'"):
        p.finalize(values="dense", reference={t.name: t.param.detach().clone() for t in p.targets}, style="nope")
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_rescaled_values_of_a_float16_layer_stay_finite():
    """The least-squares factor's sums ran in float16: a layer-mode vector of 131k entries overflowed to NaN."""
    from groupsparse.prune import GSPPruner

    torch.manual_seed(0)
    m = nn.Linear(512, 256, bias=False)
    with torch.no_grad():
        m.weight.normal_()  # the vector's sum of squares is ~131k: past float16's 65504
    m.half()
    p = GSPPruner(m, 0.5, vectors="layer", keep_pre_projection=True)
    p.project()
    p.finalize(values="rescaled")
    w, ref = m.weight.detach().float(), p.pre_projection["weight"].float()
    assert torch.isfinite(w).all() and m.weight.dtype == torch.float16
    kept = w != 0
    alpha = (w[kept] * ref[kept]).sum() / (w[kept] * w[kept]).sum()
    assert abs(float(alpha) - 1) < 1e-2  # the kept values are the best single-factor fit to the reference


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hoyer_square_of_half_precision_weights_is_finite(dtype):
    from groupsparse.prune import HoyerSquareRegularizer, hoyer_square

    torch.manual_seed(0)
    w = nn.Linear(512, 512).weight.detach()
    for vectors in (None, "filter"):
        want = hoyer_square(w, vectors=vectors)
        got = hoyer_square(w.to(dtype), vectors=vectors)  # inf before (l1^2 ~ 4e7)
        assert got.dtype == torch.float32 and abs(float(got / want) - 1) < 1e-2
    m = nn.Sequential(nn.Linear(512, 512)).to(dtype)
    loss = HoyerSquareRegularizer(m, 1e-4)()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(m[0].weight.grad.float()).all()


@pytest.mark.parametrize("style", ["buffer", "parametrize", "torch_prune"])
def test_no_hooks_are_left_by_a_failed_constructor_or_a_second_pruners_remove(style):
    from groupsparse.prune import GSPPruner, Pruner

    m = _mlp()
    a = MagnitudePruner(m)
    a.prune(0.5, style=style)
    for bad in (dict(vectors="filters"), dict(sparsity=1.5)):
        with pytest.raises(ValueError):
            GSPPruner(m, **{"sparsity": 0.8, **bad})  # raised after its hooks were on the model
    b = Pruner(m)  # adopts a's masks
    b.remove()
    m(torch.randn(2, 8)).square().sum().backward()  # a's gradient hooks pass through (AttributeError before)
    a.remove()  # and a's remove finds nothing left to undo
    assert not any(k.endswith("_mask") or "parametrizations" in k for k in m.state_dict())
    fresh = _mlp(3)
    src = _mlp(4)
    MagnitudePruner(src).prune(0.5)
    with pytest.raises(ValueError):
        GSPPruner(fresh, 1.5)
    fresh.load_state_dict(src.state_dict(), strict=False)  # no load hook of the failed pruner installs masks
    assert not hasattr(fresh[0], "weight_mask")


def test_a_model_with_an_attached_pruner_saves_whole_and_keeps_enforcing(tmp_path):
    import numpy as np

    m = _mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    MagnitudePruner(m).attach(opt).prune(np.float32(0.5))  # (NumPy scalars as fractions: a TypeError before)
    _train(m, opt, steps=1)
    torch.save(m, tmp_path / "m.pt")  # the hooks were lambdas and closures: "Can't pickle local object"
    plain = _mlp()
    torch.save(plain, tmp_path / "plain.pt")
    # the model's load hooks reach the pruner: not its optimizer's state (momentum), nor its float mask cache
    assert (tmp_path / "m.pt").stat().st_size < 1.6 * (tmp_path / "plain.pt").stat().st_size
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    p = MagnitudePruner(back)  # torch does not pickle gradient hooks: a pruner made after loading adopts the masks
    assert torch.equal(p.mask("0.weight"), m[0].weight_mask)
    back(torch.randn(3, 8)).square().sum().backward()
    assert int((back[0].weight.grad[~back[0].weight_mask] != 0).sum()) == 0


def test_selection_edges_multihead_attention_bad_regex_and_a_prefix_mismatch():
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    names = [t.name for t in MagnitudePruner(layer, module_types=nn.Module).targets]
    assert "self_attn.in_proj_weight" in names  # dropped before when module_types was given
    for where in ("include", "exclude"):
        with pytest.raises(ValueError, match=f"{where}: got 're:\\[', expected a valid regular expression"):
            MagnitudePruner(_mlp(), **{where: "re:["})
    src = _mlp()
    MagnitudePruner(src).prune(0.5)
    prefixed = {"model." + k: v for k, v in src.state_dict().items()}
    with pytest.raises(ValueError, match=r"none for this pruner's targets, expected names like '0.weight_mask'"):
        MagnitudePruner(_mlp(1)).load_masks(prefixed)


def test_any_tensor_rule_never_projects_the_masks_of_a_pruned_checkpoint():
    from groupsparse.prune import prune_state_dict

    for style in ("buffer", "torch_prune", "parametrize"):
        m = _mlp()
        MagnitudePruner(m).prune(0.5, style=style)
        sd = m.state_dict()
        out, names, _ = prune_state_dict(sd, 0.7, rule=lambda n, t: True)  # the CLI's --any-tensor
        assert not any(n.endswith("mask") for n in names), (style, names)
        for k, v in sd.items():
            if k.endswith("mask"):
                assert torch.equal(out[k], v), (style, k)  # float 0/1 masks were projected to other values


@pytest.mark.parametrize("saved", ["buffer", "torch_prune", "parametrize"])
@pytest.mark.parametrize("held", ["buffer", "torch_prune", "parametrize"])
def test_a_masked_state_dict_loads_into_a_model_masked_in_another_layout(saved, held):
    src = _mlp()
    MagnitudePruner(src).prune(0.5, style=saved)
    dst = _mlp(1)
    p = MagnitudePruner(dst)
    p.prune(0.3, style=held)
    dst.load_state_dict(src.state_dict())  # missing/unexpected keys before, for every pair of layouts
    x = torch.randn(4, 8)
    torch.testing.assert_close(dst(x), src(x))
    assert torch.equal(p.mask("0.weight"), MagnitudePruner(src).mask("0.weight"))


def test_load_masks_without_masks_for_these_targets_is_quiet_and_ao_sparsity_composes():
    """load_masks raised its prefix advice for an unrelated *_mask buffer and for another pruner's masks; a
    model under torch.ao.pruning (FakeSparsity, an elementwise mask) lost every target to the foreign skip."""
    m = _mlp()
    m.register_buffer("causal_mask", torch.ones(3, 3))
    assert MagnitudePruner(m).load_masks(m.state_dict()) == {}
    src = _mlp()
    MagnitudePruner(src, include="0.*").prune(0.5)
    assert MagnitudePruner(_mlp(1), include="2.*").load_masks(src.state_dict()) == {}
    from torch.ao.pruning import WeightNormSparsifier

    ao = _mlp()
    sp = WeightNormSparsifier(sparsity_level=0.25, sparse_block_shape=(1, 4), zeros_per_block=4)
    sp.prepare(ao, config=[{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sp.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = MagnitudePruner(ao)
    assert [t.name for t in p.targets] == ["0.weight", "2.weight"]
    p.prune(0.5)
    assert all(float((lin.weight == 0).float().mean()) >= 0.5 for lin in (ao[0], ao[2]))


def test_numpy_scalars_are_taken_wherever_numbers_are():
    import numpy as np

    from groupsparse.prune import GSPPruner, Schedule

    s = Schedule(np.float32(0.5), initial=np.float64(0.1))
    assert type(s.target) is float and s.target == 0.5
    p = GSPPruner(_mlp(), s)
    assert p.step(np.int64(3)) in (True, False) and p.step_count == 4
    MagnitudePruner(_mlp()).prune(threshold=np.float32(0.1))


def test_a_parametrization_added_after_masking_is_refused_at_attach():
    """The mask then acted on ``original`` (orthogonal: the weight the module uses stayed dense, in silence;
    weight_norm: a broadcast error inside the optimizer hook)."""
    for wrap in ("orthogonal", "weight_norm"):
        m = _mlp()
        p = MagnitudePruner(m)
        p.prune(0.5)
        getattr(parametrizations, wrap)(m[0])
        with pytest.raises(ValueError, match=r"0\.weight: got a masked weight now computed by a parametrization"):
            p.attach(torch.optim.SGD(m.parameters(), lr=0.1))
        p.remove()  # and the masks can still be removed
        assert not hasattr(m[0], "weight_mask")
