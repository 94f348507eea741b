"""One-shot LM pruning (groupsparse.prune.oneshot): exact counts, N:M, references for Wanda and SparseGPT."""

import pytest
import torch
from torch import nn

from groupsparse.prune.oneshot import (gsp_masks, gsp_masks_bisect, layer_error, linear_layers, nm_mask, owl_sparsities, parse_pattern,
                                       prune_model, row_mask, sparsegpt, wanda_scores, weight_matrix)

ALL = [dict(method="magnitude"), dict(method="wanda"), dict(method="sparsegpt"), dict(method="owl"),
       dict(method="gsp", group="row"), dict(method="gsp", group="layer"), dict(method="gsp", group="model"),
       dict(method="gsp", group="layer", refit=True)]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))


def _inputs(seed=1, n=64):
    g = torch.Generator().manual_seed(seed)
    # columns of very different scales: activation-aware and magnitude scores then disagree
    return torch.randn(n, 16, generator=g) * torch.logspace(-1, 1, 16)


def _check_unstructured(layers, res, p, kw):
    total = sum(weight_matrix(m).numel() for m in layers.values())
    zeros = sum(int((weight_matrix(m) == 0).sum()) for m in layers.values())
    if kw["method"] in ("owl",) or kw.get("group") == "model":
        assert zeros == round(p * total) or kw["method"] == "owl"
    for entry, (name, m) in zip(res.layers, layers.items()):
        w = weight_matrix(m)
        z = int((w == 0).sum())
        assert z == entry["zeros"]
        frac = entry["target"]
        if kw["method"] in ("wanda", "owl") or kw.get("group") == "row":
            assert ((w == 0).sum(1) == round(frac * w.shape[1])).all(), name
        elif kw.get("group") != "model" or kw["method"] != "gsp":
            assert z == round(frac * w.numel()), (name, z)


@pytest.mark.parametrize("kw", ALL, ids=lambda k: "-".join(str(v) for v in k.values()))
@pytest.mark.parametrize("p", [0.5, 0.7])
def test_plain_module_unstructured_exact(kw, p):
    model = _mlp()
    res = prune_model(model, _inputs(), sparsity=p, progress=False, **kw)
    _check_unstructured(linear_layers(model), res, p, kw)
    if kw.get("group") == "model":
        assert abs(res.zero_fraction - p) < 1e-2


@pytest.mark.parametrize("kw", ALL[:3] + [dict(method="gsp", group="layer"), dict(method="gsp", refit=True)],
                         ids=lambda k: "-".join(str(v) for v in k.values()))
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_plain_module_nm(kw, pattern):
    n, m = parse_pattern(pattern)
    model = _mlp()
    prune_model(model, _inputs(), pattern=pattern, progress=False, **kw)
    for w in (weight_matrix(mod) for mod in linear_layers(model).values()):
        nonzero = (w != 0).reshape(w.shape[0], -1, m).sum(2)
        assert (nonzero <= n).all()
        assert (nonzero == n).float().mean() > 0.99  # exactly N kept unless a kept weight was already zero


def _col_norms(x):
    return torch.sqrt((x.double() ** 2).sum(0))


def test_wanda_scores_and_masks_match_reference():
    torch.manual_seed(0)
    lin = nn.Linear(12, 6)
    x = torch.randn(40, 12) * torch.arange(1, 13)
    ref_norm = torch.tensor([sum(float(x[t, j]) ** 2 for t in range(40)) ** 0.5 for j in range(12)], dtype=torch.float64)
    s = wanda_scores(lin.weight.data, ref_norm)
    ref = torch.tensor([[abs(float(lin.weight.data[i, j])) * float(ref_norm[j]) for j in range(12)] for i in range(6)], dtype=torch.float64)
    assert torch.allclose(s, ref)
    mask = row_mask(s, 0.5)
    for i in range(6):
        assert set(torch.nonzero(mask[i]).reshape(-1).tolist()) == set(torch.argsort(ref[i])[:6].tolist())
    # through the walker: the plain module's inputs give the same mask
    model = nn.Sequential(lin)
    w0 = lin.weight.data.clone()
    prune_model(model, x, method="wanda", sparsity=0.5, progress=False)
    assert torch.equal(lin.weight.data == 0, mask | (w0 == 0))


def _obs_reference(w, H, mask):
    """Unblocked OBS in float64: eliminate columns left to right; a pruned column's weight is removed with the
    optimal update of all columns not processed yet (explicit inverse of H restricted to them)."""
    W = w.double().clone()
    n = W.shape[1]
    for j in range(n):
        Hinv = torch.linalg.inv(H[j:, j:])
        for i in range(W.shape[0]):
            if mask[i, j]:
                W[i, j:] -= W[i, j] / Hinv[0, 0] * Hinv[:, 0]
                W[i, j] = 0.0
    return W


def test_sparsegpt_matches_unblocked_obs_reference():
    torch.manual_seed(0)
    out_f, in_f = 5, 16
    w = torch.randn(out_f, in_f, dtype=torch.float64)
    x = torch.randn(100, in_f, dtype=torch.float64) @ torch.randn(in_f, in_f, dtype=torch.float64)  # correlated inputs
    gram = x.t() @ x
    mask = torch.rand(out_f, in_f) < 0.5
    new, m = sparsegpt(w, gram, mask=mask, blocksize=4, damp=0.01)
    H = gram + 0.01 * torch.diag(gram).mean() * torch.eye(in_f, dtype=torch.float64)
    assert torch.equal(m, mask)
    assert torch.allclose(new, _obs_reference(w, H, mask), atol=1e-9)
    # blocks of any size give the same sweep (lazy batch updates change the order of additions only)
    assert torch.allclose(new, sparsegpt(w, gram, mask=mask, blocksize=16)[0], atol=1e-9)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_error_not_worse_than_wanda(pattern):
    torch.manual_seed(0)
    w = torch.randn(32, 64, dtype=torch.float64)
    x = torch.randn(512, 64, dtype=torch.float64) @ torch.randn(64, 64, dtype=torch.float64) * 0.3
    gram = x.t() @ x
    nm = parse_pattern(pattern)
    new, m = sparsegpt(w, gram, fraction=0.5, nm=nm)
    s = wanda_scores(w, _col_norms(x))
    wm = row_mask(s, 0.5) if nm is None else nm_mask(s, *nm)
    assert int(m.sum()) == 32 * 32
    assert layer_error(w, new, gram) < layer_error(w, w.masked_fill(wm, 0), gram)
    refit, _ = sparsegpt(w, gram, mask=wm)
    assert layer_error(w, refit, gram) < layer_error(w, w.masked_fill(wm, 0), gram)


def test_gsp_row_group_and_nm_equal_wanda():
    torch.manual_seed(0)
    s = torch.rand(6, 16, dtype=torch.float64)
    for i in range(6):  # one row as its own group: the projection is monotone in |C|, so the mask is Wanda's
        m = gsp_masks([s[i : i + 1]], 0.5, scope="layer")
        assert torch.equal(m[0], row_mask(s[i : i + 1], 0.5))
    masks = gsp_masks([s], 0.6, scope="layer")
    assert int(masks[0].sum()) == round(0.6 * s.numel())
    model_a, model_b = _mlp(), _mlp()
    prune_model(model_a, _inputs(), method="gsp", pattern="2:4", progress=False)
    prune_model(model_b, _inputs(), method="wanda", pattern="2:4", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()))


def test_gsp_model_group_exact_total():
    torch.manual_seed(0)
    scores = [torch.rand(8, 16, dtype=torch.float64) * 3, torch.rand(4, 40, dtype=torch.float64) ** 3]
    masks = gsp_masks(scores, 0.55, scope="model")
    assert sum(int(m.sum()) for m in masks) == round(0.55 * (128 + 160))


@pytest.mark.parametrize("scope,p", [("layer", 0.5), ("layer", 0.8), ("model", 0.6), ("model", 0.3)])
def test_gsp_ranking_equals_projection_zero_set(scope, p):
    """The one-sort mask is the zero set of the projection itself at the target where it zeros k entries."""
    g = torch.Generator().manual_seed(5)
    scores = [torch.rand(6, 10, generator=g, dtype=torch.float64) ** 2,
              torch.rand(3, 25, generator=g, dtype=torch.float64) * 4][: 1 if scope == "layer" else 2]
    fast = gsp_masks(scores, p, scope=scope)
    ref = gsp_masks_bisect(scores, p, scope=scope)
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))


def test_owl_sparsities():
    sp = owl_sparsities([0.01, 0.03, 0.02, 0.05], 0.6, lam=0.08)
    assert abs(sum(sp) / 4 - 0.6) < 1e-12
    assert max(sp) - min(sp) == pytest.approx(0.16)
    assert sp[3] == min(sp) and sp[0] == max(sp)  # more outliers, fewer zeros
    assert owl_sparsities([0.02, 0.02], 0.5) == [0.5, 0.5]


def test_bad_arguments():
    model = _mlp()
    with pytest.raises(ValueError, match="expected exactly one"):
        prune_model(model, _inputs(), method="wanda", sparsity=0.5, pattern="2:4")
    with pytest.raises(ValueError, match="method"):
        prune_model(model, _inputs(), method="snip", sparsity=0.5)
    with pytest.raises(ValueError, match="pattern"):
        prune_model(model, _inputs(), method="wanda", pattern="4:2")
    with pytest.raises(ValueError, match="calibration"):
        prune_model(model, None, method="wanda", sparsity=0.5)
    with pytest.raises(ValueError, match="group"):
        prune_model(model, _inputs(), method="wanda", sparsity=0.5, group="model")
    with pytest.raises(ValueError, match=r"got 1\.5"):
        prune_model(model, _inputs(), method="wanda", sparsity=1.5)
