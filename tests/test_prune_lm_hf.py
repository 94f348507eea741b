"""One-shot pruning on tiny Hugging Face models: block walk vs reference, save_pretrained, prune-lm, calibration files."""

import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from click.testing import CliRunner  # noqa: E402

from groupsparse.prune.oneshot import (find_blocks, linear_layers, prune_model, read_texts, row_mask,  # noqa: E402
                                       wanda_scores, weight_matrix)


def _llama(layers=2, vocab=300, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _ids(n=4, length=16, vocab=300):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(3))


def _manual_wanda(model, ids, p):
    """Reference: block by block through *full-model* forwards with hooks, pruning each block after the previous."""
    blocks, _ = find_blocks(model)
    for block in blocks:
        norms, handles = {}, []
        for name, mod in linear_layers(block).items():
            def hook(_m, args, _o, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                norms[name] = norms.get(name, 0) + (x * x).sum(0)
            handles.append(mod.register_forward_hook(hook))
        with torch.no_grad():
            model(input_ids=ids)
        for h in handles:
            h.remove()
        for name, mod in linear_layers(block).items():
            w = weight_matrix(mod)
            w.masked_fill_(row_mask(wanda_scores(w, norms[name].sqrt()), p), 0.0)


def test_llama_block_walk_equals_full_forward_reference():
    ids = _ids()
    a, b = _llama(), _llama()
    prune_model(a, ids, method="wanda", sparsity=0.5, batch_size=2, progress=False)
    _manual_wanda(b, ids, 0.5)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb), k
    with torch.no_grad():
        assert torch.allclose(a(input_ids=ids).logits, b(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(method="sparsegpt", sparsity=0.6), dict(method="gsp", sparsity=0.5, group="model"),
                                dict(method="owl", sparsity=0.7), dict(method="gsp", pattern="2:4", refit=True),
                                dict(method="magnitude", pattern="4:8")], ids=str)
def test_llama_methods_and_roundtrip(tmp_path, kw):
    model = _llama()
    res = prune_model(model, _ids(), progress=False, **kw)
    blocks, path = find_blocks(model)
    assert path == "model.layers" and len(res.layers) == 2 * 7
    for entry in res.layers:
        w = weight_matrix(linear_layers(blocks[entry["block"]])[entry["name"]])
        if "pattern" in kw:
            n, m = map(int, kw["pattern"].split(":"))
            assert ((w != 0).reshape(w.shape[0], -1, m).sum(2) <= n).all()
    if kw["method"] == "sparsegpt":
        assert all(e["zeros"] == round(0.6 * e["numel"]) for e in res.layers)
    if kw.get("group") == "model":
        assert sum(e["zeros"] for e in res.layers) == round(0.5 * sum(e["numel"] for e in res.layers))
    assert not torch.equal(model.lm_head.weight, torch.zeros_like(model.lm_head.weight))
    assert int((model.model.embed_tokens.weight == 0).sum()) == 0  # embeddings/lm_head stay dense
    model.save_pretrained(tmp_path / "m")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True).eval()
    for (k, va), vb in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(va, vb), k
    with torch.no_grad():
        assert torch.allclose(model(input_ids=_ids()).logits, back(input_ids=_ids()).logits)


def test_gpt2_conv1d_orientation():
    cfg = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    prune_model(model, _ids(), method="wanda", pattern="2:4", progress=False)
    blocks, path = find_blocks(model)
    assert path == "transformer.h"
    for mod in linear_layers(blocks[0]).values():
        w = weight_matrix(mod)  # (out, in): groups of 4 consecutive *inputs*
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(2) == 2).all()


def test_read_texts_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_texts(tmp_path / "nope.txt")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="expected one of"):
        read_texts(tmp_path / "a.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="line 2: not JSON"):
        read_texts(tmp_path / "bad.jsonl")
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="'text' field"):
        read_texts(tmp_path / "nofield.jsonl")
    with lzma.open(tmp_path / "d.jsonl.xz", "wt") as f:
        f.write('{"text": "alpha", "split": "train"}\n{"text": "beta", "split": "test"}\n')
    assert read_texts(tmp_path / "d.jsonl.xz", split="test") == ["beta"]
    with pytest.raises(ValueError, match="no text with split 'validation'"):
        read_texts(tmp_path / "d.jsonl.xz", split="validation")
    (tmp_path / "corrupt.jsonl.xz").write_bytes(b"not xz at all")
    with pytest.raises(ValueError, match="cannot decode"):
        read_texts(tmp_path / "corrupt.jsonl.xz")
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(ValueError, match="no splits"):
        read_texts(tmp_path / "t.txt", split="train")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from groupsparse.experiments.lm_train import train_tokenizer

    root = tmp_path_factory.mktemp("lm")
    text = "def f(x):\n    return x + 1\n\nThe quick brown fox jumps over the lazy dog. " * 40
    tok = train_tokenizer([text], 300, root / "model")
    _llama(vocab=len(tok)).save_pretrained(root / "model")
    (root / "calib.txt").write_text(text)
    return root


def _cli(*args):
    from groupsparse.cli import main

    return CliRunner().invoke(main, list(map(str, args)))


def test_prune_lm_cli(model_dir):
    out = model_dir / "out"
    r = _cli("prune-lm", model_dir / "model", "--method", "gsp", "--group", "model", "-s", "0.5", "--calibration",
             model_dir / "calib.txt", "--n-samples", 4, "--seq-len", 16, "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "sparsity_report.json").read_text())
    assert rep["method"] == "gsp" and abs(rep["zero_fraction"] - 0.5) < 1e-3 and len(rep["layers"]) == 14
    back = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert float((back.model.layers[0].mlp.down_proj.weight == 0).float().mean()) > 0.2
    r = _cli("prune-lm", model_dir / "model", "--method", "wanda", "--pattern", "2:4", "--calibration",
             model_dir / "calib.txt", "--n-samples", 2, "--seq-len", 16, "--quiet", "--out", model_dir / "out24")
    assert r.exit_code == 0, r.output
    rep = json.loads((model_dir / "out24" / "sparsity_report.json").read_text())
    assert rep["pattern"] == "2:4" and "skipped" in rep["semi_structured_latency"]  # CPU: latency skipped


def test_prune_lm_cli_errors(model_dir):
    m, cal = model_dir / "model", model_dir / "calib.txt"
    r = _cli("prune-lm", m, "--method", "wanda", "-s", "0.5", "--calibration", cal, "--out", m)
    assert r.exit_code != 0 and "overlaps MODEL_DIR" in r.output
    (model_dir / "bad.jsonl").write_text("oops\n")
    r = _cli("prune-lm", m, "--method", "wanda", "-s", "0.5", "--calibration", model_dir / "bad.jsonl", "--out", model_dir / "x")
    assert r.exit_code != 0 and "line 1: not JSON" in r.output and not (model_dir / "x").exists()
    r = _cli("prune-lm", m, "--method", "wanda", "-s", "0.5", "--out", model_dir / "y")
    assert r.exit_code != 0 and "--calibration is required" in r.output
    r = _cli("prune-lm", m, "--method", "wanda", "-s", "0.5", "--pattern", "2:4", "--calibration", cal, "--out", model_dir / "z")
    assert r.exit_code != 0 and "exactly one" in r.output


def test_prune_lm_force_replaces_only_a_previous_output(model_dir):
    m, cal = model_dir / "model", model_dir / "calib.txt"
    keep = model_dir / "not-an-output"
    keep.mkdir()
    (keep / "precious.txt").write_text("mine")
    r = _cli("prune-lm", m, "--method", "magnitude", "-s", "0.5", "--calibration", cal, "--n-samples", 2,
             "--seq-len", 16, "--quiet", "--force", "--out", keep)
    assert r.exit_code != 0 and "not a prune-lm output" in r.output
    assert (keep / "precious.txt").read_text() == "mine"


def test_prune_lm_checks_options_before_loading_the_model(model_dir, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    m, cal = model_dir / "model", model_dir / "calib.txt"
    for args, msg in ((["-s", "1.5"], "sparsity"), (["-s", "0.5", "--threads", "-3"], "--threads: got -3"),
                      (["-s", "0.5", "--group", "row"], "only with method='gsp'"),
                      (["-s", "0.5", "--owl-lambda", "-1"], "owl_lambda: got -1.0")):
        r = _cli("prune-lm", m, "--method", "wanda", *args, "--calibration", cal, "--out", model_dir / "o")
        assert r.exit_code != 0 and msg in r.output, r.output
    assert not (model_dir / "o").exists()


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_prune_lm_output_is_swapped_in_whole(model_dir, monkeypatch):
    """The new folder is written under a temp name and renamed into place; a --force run keeps the old output
    until then; a killed run's temp folder is removed by the next write there."""
    import groupsparse.io as gio

    m, cal = model_dir / "model", model_dir / "calib.txt"
    out = model_dir / "swap"
    args = ("prune-lm", m, "--method", "magnitude", "-s", "0.5", "--calibration", cal, "--n-samples", 2,
            "--seq-len", 16, "--quiet", "--out", out)
    assert _cli(*args).exit_code == 0
    first = (out / "sparsity_report.json").read_text()
    stale = model_dir / f".swap{gio.TMP_MARK}{gio._HOST}-{dead_pid()}-0"
    (stale / "sub").mkdir(parents=True)  # what a killed run leaves: a half-written model folder
    real_replace = os.replace

    def replace(src, dst):  # the old output must still be whole when the new one is renamed in
        if str(dst) == str(out):
            assert json.loads((Path(src) / "sparsity_report.json").read_text())["method"] == "magnitude"
            assert not out.exists() or (out / "sparsity_report.json").read_text() == first
        return real_replace(src, dst)

    monkeypatch.setattr(gio.os, "replace", replace)
    r = _cli(*args, "--force")
    assert r.exit_code == 0, r.output
    assert not stale.exists()
    assert sorted(p.name for p in model_dir.iterdir() if gio.TMP_MARK in p.name) == []
    monkeypatch.setattr(gio.os, "replace", real_replace)
    second = (out / "sparsity_report.json").read_text()

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", killed)
    r = _cli(*args, "--force")
    assert r.exit_code != 0
    assert (out / "sparsity_report.json").read_text() == second  # an interrupted run leaves OUT as it was
    assert sorted(p.name for p in model_dir.iterdir() if gio.TMP_MARK in p.name) == []


def test_prune_lm_quiet_restores_hugging_face_logging(model_dir):
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    r = _cli("prune-lm", model_dir / "model", "--method", "magnitude", "-s", "0.5", "--quiet", "--out",
             model_dir / "q")
    assert r.exit_code == 0, r.output
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before
