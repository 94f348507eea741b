"""Pruning experiments: dataset readers on generated files, model shapes, training resume, CLI smoke runs."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import torch

from groupsparse.experiments import build_model, load_dataset
from groupsparse.experiments import _pruning as P
from groupsparse.experiments.datasets import CIFAR10_CLASSES, random_crop_flip
from groupsparse.experiments.models import prunable_parameters


def _cifar_arrays(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), [int(i % 10) for i in range(n)]


def _write_batch(path, n, seed):
    x, y = _cifar_arrays(n, seed)
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"data": x, b"labels": y}, f)
    return x, y


def test_cifar_pickle_dir_and_tarball(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    x1, y1 = _write_batch(d / "data_batch_1", 12, 0)
    x2, _ = _write_batch(d / "data_batch_2", 8, 1)
    xt, yt = _write_batch(d / "test_batch", 10, 2)
    ds = load_dataset("cifar10", tmp_path, cache_dir=tmp_path / "cache")
    # A fixed tenth of the training images is the validation split.
    assert ds.x_train.shape == (18, 32, 32, 3) and ds.x_val.shape == (2, 32, 32, 3) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (10, 32, 32, 3) and ds.y_test.tolist() == yt
    # Rows are R, G, B planes: pixel (row 0, col 1) of image 0 is data[1], data[1025], data[2049].
    assert ds.x_test[0, 0, 1].tolist() == [xt[0, 1], xt[0, 1025], xt[0, 2049]]
    both = torch.cat([ds.x_train, ds.x_val]).reshape(20, -1)
    orig = torch.from_numpy(np.concatenate([x1, x2]).reshape(20, 3, 32, 32).transpose(0, 2, 3, 1).reshape(20, -1))
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, orig.tolist()))
    again = load_dataset("cifar10", tmp_path, cache_dir=tmp_path / "cache")
    assert torch.equal(again.x_val, ds.x_val)  # the split is fixed
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(d, arcname="cifar-10-batches-py")
    ds2 = load_dataset("cifar10", tgz, cache_dir=tmp_path / "cache")
    assert torch.equal(ds2.x_train, ds.x_train) and torch.equal(ds2.y_test, ds.y_test)


def test_cifar_pickle_refuses_code(tmp_path):
    d = tmp_path / "b"
    d.mkdir()
    _write_batch(d / "data_batch_1", 2, 0)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": io.BytesIO}, f)
    with pytest.raises(pickle.UnpicklingError, match="expected only NumPy arrays"):
        load_dataset("cifar10", d, cache_dir=tmp_path / "cache")


def _jpeg(rgb):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), rgb, np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_cifar_image_zip_and_cache(tmp_path):
    z = tmp_path / "c.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i, cls in enumerate(CIFAR10_CLASSES):
            for j in range(2):
                zf.writestr(f"cifar10/train/{cls}/{j:04d}.jpg", _jpeg((20 * i, 100, 200)))
            zf.writestr(f"cifar10/test/{cls}/0000.jpg", _jpeg((20 * i, 100, 200)))
    cache = tmp_path / "cache"
    ds = load_dataset("cifar10", z, cache_dir=cache)
    assert ds.x_train.shape == (18, 32, 32, 3) and ds.x_val.shape == (2, 32, 32, 3) and ds.x_test.shape == (10, 32, 32, 3)
    assert sorted(ds.y_train.tolist() + ds.y_val.tolist()) == [i // 2 for i in range(20)]
    assert ds.y_test.tolist() == list(range(10))
    assert abs(int(ds.x_test[3, 5, 5, 0]) - 60) <= 3  # class 3 was painted red = 60 (JPEG is lossy)
    assert len(list(cache.glob("cifar10-*.npz"))) == 1
    ds2 = load_dataset("cifar10", z, cache_dir=cache)  # from the cache this time
    assert torch.equal(ds2.x_train, ds.x_train)
    x, _ = next(ds.batches("train", 8, shuffle=True, augment=True, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path / "nope")
    with pytest.raises(ValueError, match="expected --data"):
        load_dataset("cifar10", None)
    with pytest.raises(ValueError, match="got 'mnist'"):
        load_dataset("mnist")


def test_a_train_subset_larger_than_the_data_is_refused():
    n = len(load_dataset("digits").y_train)
    assert len(load_dataset("digits", train_subset=n).y_train) == n  # all of them, given as a number
    with pytest.raises(ValueError, match=f"train_subset: got {n + 1}, expected at most {n}"):
        load_dataset("digits", train_subset=n + 1)  # was taken as "all" in silence


def test_random_crop_flip_moves_pixels_only():
    x = torch.arange(2 * 32 * 32 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(2, 32, 32, 3)
    y = random_crop_flip(x, padding=4, generator=torch.Generator().manual_seed(1))
    assert y.shape == x.shape
    vals = set(x[0].flatten().tolist()) | {0}
    assert set(y[0].flatten().tolist()) <= vals
    z = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(3))
    for i in range(2):  # without padding only the flip remains
        assert torch.equal(z[i], x[i]) or torch.equal(z[i], x[i].flip(1))


@pytest.mark.parametrize("name,shape", [("mlp", (64,)), ("lenet5", (64,)), ("resnet20", (64,)),
                                        ("mlp", (3, 32, 32)), ("lenet5", (3, 32, 32)), ("resnet20", (3, 32, 32)),
                                        ("vgg16", (3, 32, 32))])
def test_model_shapes(name, shape):
    torch.manual_seed(0)
    m = build_model(name, shape, 10).eval()
    assert m(torch.randn(2, *shape)).shape == (2, 10)
    params = prunable_parameters(m)
    assert params and all(p.ndim in (2, 4) for p in params.values())


def test_resnet_sizes():
    n20 = sum(p.numel() for p in build_model("resnet20", (3, 32, 32)).parameters())
    n56 = sum(p.numel() for p in build_model("resnet56", (3, 32, 32)).parameters())
    assert 0.26e6 < n20 < 0.28e6 and 0.84e6 < n56 < 0.87e6  # He et al.: 0.27M and 0.85M
    with pytest.raises(ValueError, match="expected one of"):
        build_model("resnet18", (3, 32, 32))


def test_hoyer_target_rule():
    assert P.hoyer_target_for(0.95) == pytest.approx(0.86) and P.hoyer_target_for(0.3) == 0.5
    assert P.hoyer_target_for(0.999) == 0.95


def test_resume_matches_uninterrupted(tmp_path):
    from groupsparse.experiments.training import train

    ds = load_dataset("digits")

    def fresh():
        torch.manual_seed(0)
        return build_model("mlp", ds.input_shape)

    a = fresh()
    train(a, ds, epochs=2, lr=0.05, ckpt_dir=tmp_path / "a", seed=0, batch_size=256, progress=False)
    b = fresh()
    s1 = train(b, ds, epochs=2, lr=0.05, ckpt_dir=tmp_path / "b", seed=0, batch_size=256, progress=False,
               stop_after=1)
    assert s1["epoch"] == 1
    c = fresh()  # a new process would start from a fresh model: the checkpoint must restore everything
    s2 = train(c, ds, epochs=2, lr=0.05, ckpt_dir=tmp_path / "b", seed=0, batch_size=256, progress=False)
    assert s2["epoch"] == 2 and len(s2["history"]) == 2
    for pa, pc in zip(a.parameters(), c.parameters()):
        torch.testing.assert_close(pa, pc)
    with pytest.raises(ValueError, match="3 epochs"):
        train(fresh(), ds, epochs=3, lr=0.05, ckpt_dir=tmp_path / "b", seed=0, progress=False)


def _prune_args(tmp_path, method, out, device="cpu"):
    return ["--dataset", "digits", "--model", "mlp", "--method", method, "--sparsity", "0.9", "--seed", "0",
            "--epochs", "2", "--finetune-epochs", "2", "--out", str(out), "--cache", str(tmp_path / "cache"),
            "--device", device, "--no-progress"]


@pytest.mark.parametrize("method", ["gsp", "magnitude"])
def test_cli_prune_digits_smoke(tmp_path, method):
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from groupsparse.experiments.cli import prune, report

    out = tmp_path / method
    res = CliRunner().invoke(prune, _prune_args(tmp_path, method, out))
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())
    for k in ("method", "target_sparsity", "zero_fraction", "accuracy", "dense_accuracy", "layers", "timings"):
        assert k in r
    assert r["method"] == method and 0 <= r["accuracy"] <= 1 and abs(r["zero_fraction"] - 0.9) < 1e-4
    sd = load_file(str(out / "model.safetensors"))
    names = [layer["name"] for layer in r["layers"]]
    zeros = sum(int((sd[n] == 0).sum()) for n in names) / sum(sd[n].numel() for n in names)
    assert zeros == pytest.approx(r["zero_fraction"], abs=1e-9)
    res = CliRunner().invoke(report, [str(tmp_path), "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "t.csv").exists() and (tmp_path / "t.png").exists()


def test_cli_rejects_bad_sparsity(tmp_path):
    from click.testing import CliRunner

    from groupsparse.experiments.cli import prune

    args = _prune_args(tmp_path, "gsp", tmp_path / "x")
    args[args.index("0.9")] = "1.5"
    res = CliRunner().invoke(prune, args)
    assert res.exit_code != 0 and "got 1.5" in res.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cli_prune_digits_cuda(tmp_path):
    from click.testing import CliRunner

    from groupsparse.experiments.cli import prune

    out = tmp_path / "cuda"
    res = CliRunner().invoke(prune, _prune_args(tmp_path, "gsp", out, device="cuda"))
    assert res.exit_code == 0, res.output
    assert abs(json.loads((out / "report.json").read_text())["zero_fraction"] - 0.9) < 1e-4


def test_prune_run_resumes_from_its_checkpoints(tmp_path):
    from groupsparse.experiments.runner import Config, run

    cfg = Config("digits", "mlp", "gsp", 0.9, 0, str(tmp_path / "r"), epochs=2, finetune_epochs=2,
                 cache_dir=str(tmp_path / "cache"), progress=False)
    first = run(cfg)
    # As if killed after the masks and finetune checkpoints were written but before the report.
    (tmp_path / "r" / "report.json").unlink()
    (tmp_path / "r" / "model.safetensors").unlink()
    again = run(cfg)
    assert again["timings"]["dense_cached"] and again["accuracy"] == first["accuracy"]
    assert again["zero_fraction"] == first["zero_fraction"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path):
    from groupsparse.experiments.runner import Config

    with pytest.raises(ValueError, match="CUDA is not available"):
        Config("digits", "mlp", "gsp", 0.9, 0, str(tmp_path), device="cuda").resolve()
