"""Checkpoint round trips (safetensors, .pt), atomic never-overwrite writes, and the prune-checkpoint CLI."""

import json

import pytest
import torch
from click.testing import CliRunner

from groupsparse import hoyer_sparsity
from groupsparse.cli import main
from groupsparse.prune import load_state_dict, prune_state_dict, save_state_dict


def tiny_state_dict():
    torch.manual_seed(0)
    return {
        "conv1.weight": torch.randn(8, 3, 3, 3), "conv1.bias": torch.randn(8),
        "bn1.weight": torch.rand(8) + 0.5, "bn1.running_var": torch.rand(8), "bn1.num_batches_tracked": torch.tensor(7),
        "embed.weight": torch.randn(10, 6), "fc.weight": torch.randn(5, 72), "fc.bias": torch.randn(5),
        "head.weight": torch.randn(1, 5),  # one output: one-entry vectors in fan_out mode
    }


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip(tmp_path, suffix):
    sd = tiny_state_dict()
    sd["tied.weight"] = sd["fc.weight"]  # shared storage must survive safetensors
    path = tmp_path / f"m{suffix}"
    save_state_dict(sd, path)
    back = load_state_dict(path)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_pt_nested_and_key(tmp_path):
    sd = tiny_state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": sd}, path)
    assert set(load_state_dict(path)) == set(sd)
    assert set(load_state_dict(path, key="state_dict")) == set(sd)
    with pytest.raises(KeyError):
        load_state_dict(path, key="nope")


def test_never_overwrites_input_and_rejects_suffix(tmp_path):
    path = tmp_path / "m.safetensors"
    save_state_dict(tiny_state_dict(), path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="never overwritten"):
        save_state_dict({"a": torch.zeros(2)}, path, input_path=path)
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="expected a file ending"):
        save_state_dict({"a": torch.zeros(2)}, tmp_path / "m.npz")
    with pytest.raises(TypeError, match="non-tensor"):
        save_state_dict({"a": 3}, tmp_path / "x.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_prune_state_dict_selects_layer_weights_only():
    sd = tiny_state_dict()
    new, names, infos = prune_state_dict(sd, 0.7, vectors="filter")
    assert names == ["conv1.weight", "fc.weight", "head.weight"]
    assert "bn1.weight" not in names and "embed.weight" not in names
    for k in sd:
        if k not in names:
            assert torch.equal(new[k], sd[k])
    assert float(hoyer_sparsity(new["conv1.weight"].reshape(8, -1), axis=1).mean()) == pytest.approx(0.7, abs=1e-5)
    assert not torch.equal(new["conv1.weight"], sd["conv1.weight"]) and torch.equal(sd["conv1.weight"],
                                                                                  tiny_state_dict()["conv1.weight"])
    _, names_fo, _ = prune_state_dict(sd, 0.7, vectors="fan_out")
    assert "head.weight" not in names_fo  # one-entry vectors are left alone


def test_cli_prune_checkpoint(tmp_path):
    inp, out, js = tmp_path / "in.safetensors", tmp_path / "out.safetensors", tmp_path / "r.json"
    save_state_dict(tiny_state_dict(), inp)
    before = inp.read_bytes()
    r = CliRunner().invoke(main, ["prune-checkpoint", str(inp), "--sparsity", "0.8", "--out", str(out),
                                  "--scope", "model", "--normalize", "vector", "--exclude", "head.*", "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert "projected" in r.output and "conv1.weight" in r.output
    assert inp.read_bytes() == before
    res = load_state_dict(out)
    assert set(res) == set(tiny_state_dict())
    assert torch.equal(res["bn1.weight"], tiny_state_dict()["bn1.weight"])
    assert torch.equal(res["head.weight"], tiny_state_dict()["head.weight"])
    assert (res["fc.weight"] == 0).any()
    doc = json.loads(js.read_text())
    assert doc["target"] == 0.8 and {layer["name"] for layer in doc["layers"]} == {"conv1.weight", "fc.weight"}

    pt = tmp_path / "out.pt"
    r = CliRunner().invoke(main, ["prune-checkpoint", str(inp), "-s", "0.5", "-o", str(pt), "--vectors", "layer",
                                  "--include", "fc.*"])
    assert r.exit_code == 0, r.output
    assert torch.equal(load_state_dict(pt)["conv1.weight"], tiny_state_dict()["conv1.weight"])


def test_cli_prune_checkpoint_errors(tmp_path):
    inp = tmp_path / "in.pt"
    save_state_dict(tiny_state_dict(), inp)
    before = inp.read_bytes()
    r = CliRunner().invoke(main, ["prune-checkpoint", str(inp), "-s", "0.5", "-o", str(inp)])
    assert r.exit_code != 0 and "never overwritten" in r.output
    assert inp.read_bytes() == before
    r = CliRunner().invoke(main, ["prune-checkpoint", str(inp), "-s", "1.5", "-o", str(tmp_path / "o.pt")])
    assert r.exit_code != 0 and "sparsity" in r.output
    r = CliRunner().invoke(main, ["prune-checkpoint", str(inp), "-s", "0.5", "-o", str(tmp_path / "o.pt"),
                                  "--include", "nothing*"])
    assert r.exit_code != 0 and "no tensor" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt"]


def test_cli_report_is_one_pass_timed_and_matches_sparsity_report(tmp_path, monkeypatch):
    """The report no longer goes through the float64 sparsity_report (16.7 s of 24 s on a 126M checkpoint)."""
    import groupsparse.prune.report as rep
    from groupsparse.prune import sparsity_report

    inp, out, js = tmp_path / "in.safetensors", tmp_path / "out.safetensors", tmp_path / "r.json"
    save_state_dict(tiny_state_dict(), inp)
    monkeypatch.setattr(rep, "sparsity_report", lambda *a, **k: pytest.fail("slow report path used"))
    r = CliRunner().invoke(main, ["prune-checkpoint", str(inp), "-s", "0.7", "-o", str(out), "--json", str(js),
                                  "--progress"])
    assert r.exit_code == 0, r.output
    assert "seconds: load" in r.output and "project" in r.output and "save" in r.output
    doc = json.loads(js.read_text())
    assert set(doc["seconds"]) == {"load", "project", "report", "save", "total"}
    monkeypatch.undo()
    ref = sparsity_report(load_state_dict(out), names=[layer["name"] for layer in doc["layers"]])
    for mine, theirs in zip(doc["layers"], ref.layers):
        assert mine["zeros"] == theirs.zeros and mine["hoyer"] == pytest.approx(theirs.hoyer, abs=1e-6)


def test_prune_state_dict_progress_and_ties():
    from groupsparse.prune.checkpoint import find_ties

    sd = tiny_state_dict()
    sd["fc2.weight"] = sd["fc.weight"]  # shared storage
    assert find_ties(sd) == [["fc.weight", "fc2.weight"]]
    calls = []
    new, names, infos = prune_state_dict(sd, 0.6, progress=lambda n, done, total: calls.append((n, done, total)))
    assert [c[1] for c in calls] == sorted(c[1] for c in calls) and calls[-1][1] == calls[-1][2]
    assert new["fc.weight"] is new["fc2.weight"] and {"fc.weight", "fc2.weight"} <= set(names)
    assert len(infos) == len(names)
    with pytest.warns(UserWarning, match="tied"):
        new, names, _ = prune_state_dict(sd, 0.6, exclude=["fc2.*"])
    assert "fc.weight" not in names and new["fc.weight"] is sd["fc.weight"]


def test_safetensors_metadata_is_kept(tmp_path):
    from safetensors import safe_open

    inp = tmp_path / "m.safetensors"
    save_state_dict(tiny_state_dict(), inp, metadata={"format": "pt", "note": "keep me"})
    r = CliRunner().invoke(main, ["prune-checkpoint", str(inp), "-s", "0.5", "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 0, r.output
    with safe_open(str(tmp_path / "o.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "keep me"}
