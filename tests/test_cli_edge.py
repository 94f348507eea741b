"""Adversarial cases found after issue 9: special files as outputs, errors that must name the file and the
array, odd checkpoint contents (non-str keys, sparse/meta/float8 tensors, deep nesting), nmf data files."""

import os

import numpy as np
import pytest
import torch

from cli_helpers import one_error_line, run
from groupsparse.io import atomic_path, check_paths
from groupsparse.prune import save_state_dict


@pytest.fixture
def npy(tmp_path):
    p = tmp_path / "in.npy"
    np.save(p, np.random.default_rng(0).normal(size=(20, 30)))
    return p


# ------------------------------------------------------------- outputs that are devices or pipes are never replaced
def test_pipe_as_output_is_refused_and_left_alone(tmp_path, npy):
    # a rename over /dev/full (run as root) replaced the device node by a JSON file; a fifo stands in for it here
    fifo = tmp_path / "r.json"
    os.mkfifo(fifo)
    ck = tmp_path / "m.pt"
    save_state_dict({"fc.weight": torch.randn(6, 8)}, ck)
    line = one_error_line(run("prune-checkpoint", ck, "-s", "0.8", "-o", tmp_path / "p.pt", "--json", fifo))
    assert "--json" in line and "named pipe" in line
    os.rename(fifo, tmp_path / "o.npy")
    line = one_error_line(run("project", npy, "-s", "0.8", "-o", tmp_path / "o.npy"))
    assert "--out" in line and "named pipe" in line
    assert (tmp_path / "o.npy").is_fifo() and not (tmp_path / "p.pt").exists()
    with pytest.raises(ValueError, match="named pipe"):
        with atomic_path(tmp_path / "o.npy"):
            pass
    check_paths({}, {"--out": tmp_path})  # a folder output (nmf --out) is fine


# ------------------------------------------------------------------------ project: which file, which array
def test_project_errors_name_the_file_and_the_array(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 30))
    bad = x.copy()
    bad[3, 4] = np.nan
    np.savez(tmp_path / "in.npz", good=x, bad=bad)
    for group in ("each-array", "all"):
        line = one_error_line(run("project", tmp_path / "in.npz", "-s", "0.8", "-o", tmp_path / "o.npz",
                                  "--group", group))
        assert "in.npz" in line and "'bad'" in line and "NaN" in line
    np.savez(tmp_path / "w.npz", good=np.ones((20, 30)), bad=-np.ones((20, 30)))
    line = one_error_line(run("project", tmp_path / "in.npz", "-s", "0.8", "-o", tmp_path / "o.npz",
                              "--key", "good", "--key", "bad", "--weights", tmp_path / "w.npz"))
    assert "--weights" in line and "w.npz" in line and "'bad'" in line and "positive" in line
    np.save(tmp_path / "w.npy", np.ones((20, 30), dtype=np.int32))
    np.save(tmp_path / "x.npy", x)
    line = one_error_line(run("project", tmp_path / "x.npy", "-s", "0.8", "-o", tmp_path / "o.npy",
                              "--weights", tmp_path / "w.npy"))
    assert "--weights" in line and "w.npy" in line and "int32" in line
    np.save(tmp_path / "w.npy", np.array([None] * 600).reshape(20, 30), allow_pickle=True)
    line = one_error_line(run("project", tmp_path / "x.npy", "-s", "0.8", "-o", tmp_path / "o.npy",
                              "--weights", tmp_path / "w.npy"))
    assert line.startswith("groupsparse: error: --weights: cannot read") and "w.npy" in line
    line = one_error_line(run("project", tmp_path / "in.npz", "-s", "0.8", "-o", tmp_path / "o.npz", "--key", "x"))
    assert "in.npz" in line and "'x'" in line
    assert not [n for n in os.listdir(tmp_path) if n.startswith("o.")]


# ------------------------------------------------------------------------------------ odd checkpoint contents
def test_checkpoint_nested_deeper_and_at_several_depths(tmp_path):
    from collections import OrderedDict

    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    sd = m.state_dict()  # an OrderedDict with _metadata (module versions that load_state_dict reads)
    inp = tmp_path / "deep.pt"
    torch.save({"model": {"net": sd}, "epoch": 3}, inp)
    r = run("prune-checkpoint", inp, "-s", "0.8", "-o", tmp_path / "p.pt")
    assert r.exit_code == 0 and "'model.net'" in r.output, r.output
    out = torch.load(tmp_path / "p.pt", weights_only=True)
    assert out["epoch"] == 3 and isinstance(out["model"]["net"], OrderedDict)
    assert out["model"]["net"]._metadata == sd._metadata and (out["model"]["net"]["0.weight"] == 0).any()
    # tensors at several depths inside the weights: pruned under dotted names, written back in place
    inp2 = tmp_path / "two.pt"
    torch.save({"state_dict": {"enc": {"fc.weight": torch.randn(6, 8)}, "dec": {"fc.weight": torch.randn(6, 8)},
                               "head.weight": torch.randn(4, 8), "step": 7}}, inp2)
    r = run("prune-checkpoint", inp2, "-s", "0.8", "-o", tmp_path / "p2.pt")
    assert r.exit_code == 0 and "3 tensors projected" in r.output, r.output
    out = torch.load(tmp_path / "p2.pt", weights_only=True)["state_dict"]
    assert out["step"] == 7 and all((t == 0).any() for t in (out["enc"]["fc.weight"], out["dec"]["fc.weight"]))
    r = run("prune-checkpoint", inp2, "-s", "0.8", "-o", tmp_path / "p2.safetensors")
    assert r.exit_code == 0 and "'step'" in r.output, r.output  # said to be dropped, before any work
    # int keys are named "0"; an optimizer beside the weights is never pruned, even by --any-tensor
    opt = {"state": {0: {"exp_avg": torch.randn(6, 8)}}, "param_groups": [{"lr": 0.1}]}
    torch.save({"layers": {0: {"weight": torch.randn(6, 8)}}, "optimizer": opt}, tmp_path / "int.pt")
    r = run("prune-checkpoint", tmp_path / "int.pt", "-s", "0.8", "-o", tmp_path / "i.pt", "--any-tensor")
    assert r.exit_code == 0, r.output
    out = torch.load(tmp_path / "i.pt", weights_only=True)
    assert (out["layers"][0]["weight"] == 0).any()
    assert torch.equal(out["optimizer"]["state"][0]["exp_avg"], opt["state"][0]["exp_avg"])
    torch.save({"a": {"fc.weight": torch.randn(6, 8)}, "a.fc.weight": torch.randn(6, 8)}, tmp_path / "clash.pt")
    assert "two entries named 'a.fc.weight'" in one_error_line(
        run("prune-checkpoint", tmp_path / "clash.pt", "-s", "0.8", "-o", tmp_path / "c.pt"))


def test_checkpoint_odd_entries_are_one_line_naming_file_and_tensor(tmp_path):
    cases = {"tuple.pt": ({("a", "b"): torch.randn(4, 4)}, "named by a tuple"),
             "bool.pt": ({True: torch.randn(4, 4)}, "named by a bool"),
             "sparse.pt": ({"w.weight": torch.randn(4, 4).to_sparse()}, "sparse_coo"),
             "meta.pt": ({"w.weight": torch.empty(4, 4, device="meta")}, "meta"),
             "f8.pt": ({"w.weight": torch.randn(4, 4).to(torch.float8_e4m3fn)}, "float8_e4m3fn"),
             "nan.pt": ({"w.weight": torch.tensor([[1.0, float("nan")], [1.0, 2.0]])}, "tensor 'w.weight'"),
             "none.pt": ({"epoch": 3}, "no tensor to prune")}
    for name, (obj, expected) in cases.items():
        torch.save(obj, tmp_path / name)
        line = one_error_line(run("prune-checkpoint", tmp_path / name, "-s", "0.8", "-o", tmp_path / "o.pt"))
        assert name in line and expected in line, line
    line = one_error_line(run("prune-checkpoint", tmp_path / "sparse.pt", "-s", "0.8", "-o", tmp_path / "o.safetensors"))
    assert "sparse or meta" in line and ".pt output" in line
    torch.save({"a.weight": torch.randn(8, 8), "b.weight": torch.randn(8, 8).to(torch.float8_e5m2)}, tmp_path / "m.pt")
    r = run("prune-checkpoint", tmp_path / "m.pt", "-s", "0.8", "-o", tmp_path / "o.pt")
    assert r.exit_code == 0 and "left dense: b.weight (float8_e5m2" in r.output, r.output
    assert not (tmp_path / "o.safetensors").exists()


# ------------------------------------------------------------------------------------------- nmf --data files
@pytest.mark.parametrize("name,content,expected", [
    ("bad.csv", "1,2\n3,x\n", "could not convert"), ("empty.csv", "", "no data"), ("m.pt", "x", ".mat, .npy"),
    ("one.npy", None, "2-D")], ids=["csv-text", "csv-empty", "suffix", "1-d"])
def test_nmf_data_errors_name_the_file(tmp_path, name, content, expected):
    if content is None:
        np.save(tmp_path / name, np.ones(40))
    else:
        (tmp_path / name).write_text(content)
    line = one_error_line(run("nmf", "cbcl", "--data", tmp_path / name, "--out", tmp_path / "o", "-r", "2",
                              "--iters", "2", "--no-progress"))
    assert name in line and expected in line, line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------- stdout gone before the files are written
def test_closed_stdout_costs_no_output(tmp_path, monkeypatch):
    """`groupsparse ... | head -1`: the reader may leave before the first note; every file is still written."""
    import errno

    import click

    def gone(*a, **k):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    torch.save({"fc.weight": torch.randn(6, 8), "x.weight": torch.randn(6, 8).to(torch.float8_e5m2)},
               tmp_path / "m.pt")  # the float8 tensor makes a note, printed first
    monkeypatch.setattr(click, "echo", gone)
    r = run("prune-checkpoint", tmp_path / "m.pt", "-s", "0.8", "-o", tmp_path / "p.pt", "--json", tmp_path / "r.json")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert (tmp_path / "p.pt").is_file() and (tmp_path / "r.json").is_file()


def test_project_group_all_over_bfloat16_and_numpy_dtypes(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    save_file({"a": torch.randn(8, 6, dtype=torch.bfloat16), "b": torch.randn(8, 6, dtype=torch.float16),
               "c": torch.randn(8, 6, dtype=torch.float64), "i": torch.arange(6)}, tmp_path / "in.safetensors")
    np.savez(tmp_path / "w.npz", a=np.ones((8, 6)), b=np.ones((8, 6), dtype=np.float16), c=np.ones((8, 6)))
    r = run("project", tmp_path / "in.safetensors", "-s", "0.8", "-o", tmp_path / "o.safetensors", "--group", "all",
            "--weights", tmp_path / "w.npz")
    assert r.exit_code == 0, r.output  # was "a mix of NumPy arrays and tensors": bfloat16 stays a tensor
    out = load_file(tmp_path / "o.safetensors")
    assert {k: v.dtype for k, v in out.items()} == {"a": torch.bfloat16, "b": torch.float16, "c": torch.float64,
                                                    "i": torch.int64}
    assert all((out[k] == 0).any() for k in "abc") and torch.equal(out["i"], torch.arange(6))


def test_outputs_get_the_mode_a_plain_write_gives(tmp_path):
    # safetensors' writer left pruned models 0600, unreadable to the group that shares them
    from groupsparse.io import save_arrays

    umask = os.umask(0o022)
    try:
        save_arrays(tmp_path / "a.safetensors", {"x": np.ones(3)})
        save_state_dict({"w": torch.ones(2)}, tmp_path / "b.safetensors")
        assert all((tmp_path / n).stat().st_mode & 0o777 == 0o644 for n in ("a.safetensors", "b.safetensors"))
        os.chmod(tmp_path / "a.safetensors", 0o640)
        save_arrays(tmp_path / "a.safetensors", {"x": np.zeros(3)})  # replacing a file keeps its mode
        assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)


def test_key_with_a_safetensors_checkpoint_is_refused(tmp_path):
    save_state_dict({"fc.weight": torch.randn(6, 8)}, tmp_path / "m.safetensors")
    line = one_error_line(run("prune-checkpoint", tmp_path / "m.safetensors", "-s", "0.8", "-o", tmp_path / "o.pt",
                              "--key", "model"))  # was silently ignored
    assert "--key: got 'model'" in line and "m.safetensors" in line and not (tmp_path / "o.pt").exists()


def test_tensors_sharing_memory_in_other_shapes_are_left_dense(tmp_path):
    big, t = torch.randn(16, 8), torch.randn(8, 8)
    sd = {"a.weight": big[0:8], "b.weight": big[4:12], "c.weight": big[12:16], "e.weight": t, "f.weight": t.t(),
          "g.weight": t}  # g is e: a tie, pruned once for both... unless f (a transpose of it) is selected too
    torch.save(sd, tmp_path / "m.pt")
    r = run("prune-checkpoint", tmp_path / "m.pt", "-s", "0.8", "-o", tmp_path / "o.pt")
    assert r.exit_code == 0 and "left dense: a.weight, b.weight, e.weight, f.weight, g.weight" in r.output, r.output
    out = torch.load(tmp_path / "o.pt", weights_only=True)
    assert all(torch.equal(out[k], sd[k]) for k in "abefg" for k in [k + ".weight"])
    assert (out["c.weight"] == 0).any()  # a slice that overlaps nothing is pruned


def test_npz_arrays_named_like_savez_parameters(tmp_path):
    import zipfile

    x = np.random.default_rng(0).normal(size=(8, 6))
    with zipfile.ZipFile(tmp_path / "in.npz", "w") as z:  # np.savez itself cannot write these names
        for k in ("file", "allow_pickle", "a/b"):
            with z.open(k + ".npy", "w") as f:
                np.lib.format.write_array(f, x)
    r = run("project", tmp_path / "in.npz", "-s", "0.8", "-o", tmp_path / "o.npz")
    assert r.exit_code == 0, r.output  # was "savez() got multiple values for argument 'file'"
    with np.load(tmp_path / "o.npz") as z:
        assert sorted(z.files) == ["a/b", "allow_pickle", "file"] and all((z[k] == 0).any() for k in z.files)


def test_safetensors_output_refuses_the_reserved_metadata_name(tmp_path):
    # a tensor named __metadata__ was written (rc 0) into a header no reader can parse
    x = np.random.default_rng(0).normal(size=(8, 6))
    np.savez(tmp_path / "in.npz", __metadata__=x, y=x)
    line = one_error_line(run("project", tmp_path / "in.npz", "-s", "0.8", "-o", tmp_path / "o.safetensors"))
    assert "'__metadata__'" in line and "in.npz" in line
    torch.save({"__metadata__": torch.randn(6, 8), "fc.weight": torch.randn(6, 8)}, tmp_path / "m.pt")
    line = one_error_line(run("prune-checkpoint", tmp_path / "m.pt", "-s", "0.8", "-o", tmp_path / "o.safetensors"))
    assert "'__metadata__'" in line and "m.pt" in line
    with pytest.raises(ValueError, match="__metadata__"):
        save_state_dict({"__metadata__": torch.ones(2)}, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
    assert run("prune-checkpoint", tmp_path / "m.pt", "-s", "0.8", "-o", tmp_path / "o.pt").exit_code == 0


def test_long_output_names_that_the_file_system_allows(tmp_path, npy):
    # the temp name (".NAME.groupsparse-tmp-HOST-PID-N.npy") passed NAME_MAX where NAME itself did not
    for name in ("x" * 250 + ".npy", "é" * 125 + ".npy"):
        r = run("project", npy, "-s", "0.8", "-o", tmp_path / name)
        assert r.exit_code == 0 and (tmp_path / name).is_file(), r.output
    assert sorted(os.listdir(tmp_path)) == sorted(["in.npy", "x" * 250 + ".npy", "é" * 125 + ".npy"])


def test_safetensors_output_does_not_claim_to_copy_what_it_drops(tmp_path):
    import json

    torch.save({"model": {"fc.weight": torch.randn(6, 8)}, "epoch": 3}, tmp_path / "m.pt")
    r = run("prune-checkpoint", tmp_path / "m.pt", "-s", "0.8", "-o", tmp_path / "o.safetensors",
            "--json", tmp_path / "r.json")
    assert r.exit_code == 0 and "copied unchanged" not in r.output and "'epoch' not written" in r.output, r.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["copied_unchanged"] == [] and doc["not_written"] == ["epoch"]


def test_config_tie_never_joins_tensors_of_different_shapes(tmp_path):
    # tie_word_embeddings with a padded head: the head was overwritten by the embedding's shape and values
    sd = {"model.embed_tokens.weight": torch.randn(10, 8), "lm_head.weight": torch.randn(12, 8)}
    torch.save(sd, tmp_path / "m.pt")
    (tmp_path / "config.json").write_text('{"tie_word_embeddings": true}')
    r = run("prune-checkpoint", tmp_path / "m.pt", "-s", "0.8", "-o", tmp_path / "o.pt", "--any-tensor")
    assert r.exit_code == 0, r.output
    out = torch.load(tmp_path / "o.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_pipe_as_input_is_refused_without_blocking(tmp_path):
    for name, cmd in (("in.npy", "project"), ("in.pt", "prune-checkpoint")):
        os.mkfifo(tmp_path / name)  # opening it would block until a writer comes: must be refused, not read
        line = one_error_line(run(cmd, tmp_path / name, "-s", "0.8", "-o", tmp_path / ("o" + name[2:])))
        assert name in line and "regular file" in line
    os.mkfifo(tmp_path / "x.csv")
    line = one_error_line(run("nmf", "cbcl", "--data", tmp_path / "x.csv", "--out", tmp_path / "o", "--no-progress"))
    assert "x.csv" in line and "regular file" in line


@pytest.mark.parametrize("cmd", ["project", "prune-checkpoint"])
def test_ctrl_c_mid_write_leaves_no_output_and_no_temp(tmp_path, npy, cmd, monkeypatch):
    # the writer has written part of its file when Ctrl-C arrives (Python turns SIGINT into KeyboardInterrupt)
    def half(f):
        (open(f, "wb") if isinstance(f, (str, os.PathLike)) else f).write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", lambda f, a, **k: half(f))
    monkeypatch.setattr(torch, "save", lambda obj, f, **k: half(f))
    save_state_dict({"fc.weight": torch.randn(6, 8)}, tmp_path / "m.safetensors")
    args = ["project", npy, "-o", tmp_path / "o.npy"] if cmd == "project" else \
        ["prune-checkpoint", tmp_path / "m.safetensors", "-o", tmp_path / "o.pt"]
    r = run(*args, "-s", "0.8")
    assert r.exit_code == 130 and one_error_line(r) == "groupsparse: error: interrupted"
    assert sorted(os.listdir(tmp_path)) == ["in.npy", "m.safetensors"]


def test_npz_with_a_member_that_is_not_an_array(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "in.npz", "w") as z:
        with z.open("x.npy", "w") as f:
            np.lib.format.write_array(f, np.ones((4, 4)))
        z.writestr("notes.txt", "hello")  # np.load hands this back as bytes
    line = one_error_line(run("project", tmp_path / "in.npz", "-s", "0.8", "-o", tmp_path / "o.npz"))
    assert "in.npz" in line and "'notes.txt'" in line  # was AttributeError: 'bytes' object has no attribute 'dtype'


def test_safetensors_output_dtypes_checked_before_the_work(tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    import groupsparse

    x = np.random.default_rng(0).normal(size=(8, 6))
    np.savez(tmp_path / "in.npz", x=x, names=np.array(["a", "b"]))
    monkeypatch.setattr(groupsparse, "project", lambda *a, **k: pytest.fail("projected before the dtype check"))
    line = one_error_line(run("project", tmp_path / "in.npz", "-s", "0.8", "-o", tmp_path / "o.safetensors"))
    assert "'names'" in line and "<U1" in line and "disk full" not in line  # was "(is the disk full?)" at the end
    monkeypatch.undo()
    np.save(tmp_path / "be.npy", x.astype(">f8"))  # big-endian: written little-endian, not refused
    assert run("project", tmp_path / "be.npy", "-s", "0.8", "-o", tmp_path / "be.safetensors").exit_code == 0
    assert load_file(tmp_path / "be.safetensors")["array"].dtype == np.float64


def test_library_warnings_are_one_line_and_complex128_refused_early(tmp_path, monkeypatch):
    import warnings

    import groupsparse.io as gio

    real = gio.load_arrays

    def noisy(path, what="input"):
        warnings.warn("a library\n  warning\n\n  over several lines", UserWarning)
        return real(path, what)

    monkeypatch.setattr(gio, "load_arrays", noisy)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(8, 6)))
    r = run("project", tmp_path / "x.npy", "-s", "0.8", "-o", tmp_path / "o.npy")
    assert r.exit_code == 0 and "groupsparse: warning: a library warning over several lines (UserWarning)\n" in r.output
    torch.save({"fc.weight": torch.randn(6, 8), "c": torch.ones(3, dtype=torch.complex128)}, tmp_path / "m.pt")
    line = one_error_line(run("prune-checkpoint", tmp_path / "m.pt", "-s", "0.8", "-o", tmp_path / "o.safetensors"))
    assert "'c'" in line and "complex128" in line and "disk full" not in line
