"""Vector modes, group scopes and model-scope normalization."""

import numpy as np
import pytest
import torch

from groupsparse import hoyer_sparsity
from groupsparse.prune import as_vectors, from_vectors, project_tensors, vector_shape

CONV = (8, 3, 3, 3)
LIN = (10, 12)


@pytest.mark.parametrize("mode,conv,lin", [
    ("filter", (8, 27), (10, 12)),
    ("fan_out", (27, 8), (12, 10)),
    ("kernel_position", (27, 8), (12, 10)),
    ("kernel", (24, 9), None),
    ("layer", (1, 216), (1, 120)),
])
def test_documented_shapes_and_inverse(mode, conv, lin):
    w = torch.randn(CONV)
    m = as_vectors(w, mode)
    assert tuple(m.shape) == conv == vector_shape(CONV, mode)
    assert torch.equal(from_vectors(m, CONV, mode), w)
    if mode == "filter":
        assert torch.equal(m[2], w[2].reshape(-1))
    if mode in ("fan_out", "kernel_position"):
        assert torch.equal(m[5], w.reshape(8, -1)[:, 5])
    if mode == "kernel":
        assert torch.equal(m[3 * 1 + 2], w[1, 2].reshape(-1))
    wl = torch.randn(LIN)
    if lin is None:
        with pytest.raises(ValueError, match="convolution"):
            as_vectors(wl, mode)
    else:
        assert tuple(as_vectors(wl, mode).shape) == lin
        assert torch.equal(from_vectors(as_vectors(wl, mode), LIN, mode), wl)


def test_bad_mode():
    with pytest.raises(ValueError, match="expected one of"):
        as_vectors(torch.randn(3, 3), "rows")


@pytest.mark.parametrize("mode", ["filter", "fan_out", "layer"])
def test_layer_scope_hits_target_per_tensor(mode):
    torch.manual_seed(0)
    ts = [torch.randn(CONV), torch.randn(LIN)]
    out, infos = project_tensors(ts, 0.6, vectors=mode, scope="layer")
    assert len(infos) == 2
    for t, o in zip(ts, out):
        assert o.shape == t.shape and o.dtype == t.dtype
        sp = hoyer_sparsity(as_vectors(o, mode), axis=1)
        assert float(sp.mean()) == pytest.approx(0.6, abs=1e-5)


def _all_vectors_mean(tensors, mode):
    return float(np.mean(np.concatenate([np.asarray(hoyer_sparsity(as_vectors(t, mode), axis=1).cpu())
                                         for t in tensors])))


@pytest.mark.parametrize("normalize", [None, "vector", "layer"])
def test_model_scope_hits_target_over_all_vectors(normalize):
    torch.manual_seed(0)
    ts = [torch.randn(CONV), 0.01 * torch.randn(LIN), 5 * torch.randn(16, 8, 3, 3)]
    out, infos = project_tensors(ts, 0.7, vectors="filter", scope="model", normalize=normalize)
    assert len(infos) == 1
    assert _all_vectors_mean(out, "filter") == pytest.approx(0.7, abs=1e-5)


def test_model_scope_without_normalization_starves_small_layers():
    torch.manual_seed(0)
    ts = [torch.randn(32, 64), 0.05 * torch.randn(32, 64)]
    raw, _ = project_tensors(ts, 0.5, scope="model")
    per_layer_raw = [float(hoyer_sparsity(o, axis=1).mean()) for o in raw]
    assert per_layer_raw[1] - per_layer_raw[0] > 0.4  # one shared mu sparsifies the low-scale layer far more
    for normalize in ("vector", "layer"):
        fair, _ = project_tensors(ts, 0.5, scope="model", normalize=normalize)
        per_layer = [float(hoyer_sparsity(o, axis=1).mean()) for o in fair]
        assert abs(per_layer[0] - per_layer[1]) < 0.05, (normalize, per_layer)


@pytest.mark.parametrize("normalize", ["vector", "layer"])
def test_normalized_model_scope_is_scale_equivariant_per_layer(normalize):
    torch.manual_seed(0)
    ts = [torch.randn(CONV), torch.randn(LIN)]
    a, _ = project_tensors(ts, 0.6, scope="model", normalize=normalize)
    b, _ = project_tensors([ts[0], 1000 * ts[1]], 0.6, scope="model", normalize=normalize)
    assert torch.allclose(a[0], b[0], atol=1e-5)
    assert torch.allclose(1000 * a[1], b[1], rtol=1e-4, atol=1e-3)


def test_normalize_in_layer_scope_and_validation():
    ts = [torch.randn(LIN)]
    out, _ = project_tensors(ts, 0.5, scope="layer", normalize="vector")
    assert out[0].shape == ts[0].shape
    with pytest.raises(ValueError, match="normalize"):
        project_tensors(ts, 0.5, normalize="l2")
    with pytest.raises(ValueError, match="scope"):
        project_tensors(ts, 0.5, scope="net")


def test_pruner_skips_one_entry_vectors_with_warning():
    from torch import nn

    from groupsparse.prune import GSPPruner

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="one entry"):
        pruner = GSPPruner(model, 0.5, vectors="kernel")
    assert [t.name for t in pruner.skipped] == ["1.weight", "3.weight"]
    before = model[1].weight.detach().clone()
    pruner.project()
    assert torch.equal(model[1].weight, before)
