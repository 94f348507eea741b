"""Issue 9, "files are never lost": the output-path guard, atomic writes and their temp files, nested and tied
checkpoints, and the inputs `groupsparse project` cannot project."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import groupsparse as gs
from cli_helpers import one_error_line, run
from groupsparse.io import atomic_path, check_paths, clean_stale_temps, load_arrays
from groupsparse.prune import load_state_dict, save_state_dict


@pytest.fixture
def npy(tmp_path):
    p = tmp_path / "in.npy"
    np.save(p, np.random.default_rng(0).normal(size=(20, 30)))
    return p


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------------------------------- output-path guard
def test_project_weights_file_as_out_is_refused(tmp_path, npy):
    w = tmp_path / "w.npy"
    np.save(w, np.ones((20, 30)))
    before = w.read_bytes()
    line = one_error_line(run("project", npy, "-s", "0.8", "--weights", w, "-o", w))
    assert "--weights" in line and "never overwritten" in line
    assert w.read_bytes() == before


def test_project_out_through_symlink_and_hard_link_is_refused(tmp_path, npy):
    before = npy.read_bytes()
    (tmp_path / "link.npy").symlink_to(npy)
    os.link(npy, tmp_path / "hard.npy")
    (tmp_path / "sub").symlink_to(tmp_path, target_is_directory=True)
    for out in ("link.npy", "hard.npy", "sub/in.npy", "./in.npy"):
        assert "IN" in one_error_line(run("project", npy, "-s", "0.8", "-o", tmp_path / out))
    assert npy.read_bytes() == before


def test_out_through_a_missing_folder_and_dotdot_is_refused(tmp_path, npy):
    """``missing/../in.npy`` names IN once the write has made ``missing``: the guard must see that before (it
    compared an unopenable path with the input's inode, and the write replaced the input)."""
    w = tmp_path / "w.npy"
    np.save(w, np.ones((20, 30)))
    ckpt = tmp_path / "m.safetensors"
    save_state_dict({"fc.weight": torch.randn(6, 8)}, ckpt)
    before = {p: p.read_bytes() for p in (npy, w, ckpt)}
    (tmp_path / "real").mkdir()
    (tmp_path / "lnk").symlink_to(tmp_path / "real", target_is_directory=True)
    for out in ("x/../in.npy", "x/y/../../in.npy", "lnk/x/../../in.npy"):
        assert "IN" in one_error_line(run("project", npy, "-s", "0.8", "-o", tmp_path / out))
    line = one_error_line(run("project", npy, "-s", "0.8", "--weights", w, "-o", tmp_path / "y" / ".." / "w.npy"))
    assert "--weights" in line
    line = one_error_line(run("prune-checkpoint", ckpt, "-s", "0.8", "-o", tmp_path / "p.safetensors",
                              "--json", tmp_path / "z" / ".." / "m.safetensors"))
    assert "--json" in line and "IN" in line
    assert {p: p.read_bytes() for p in before} == before
    assert not any((tmp_path / d).exists() for d in ("x", "y", "z", "p.safetensors"))


def test_out_under_a_file_names_the_file(tmp_path, npy):
    line = one_error_line(run("project", npy, "-s", "0.8", "-o", tmp_path / "in.npy" / "x.npy"))
    assert "is a file, not a folder" in line


def test_prune_checkpoint_json_equal_to_input_or_out_is_refused(tmp_path):
    inp = tmp_path / "m.safetensors"
    save_state_dict({"fc.weight": torch.randn(6, 8)}, inp)
    before = inp.read_bytes()
    line = one_error_line(run("prune-checkpoint", inp, "-s", "0.8", "-o", tmp_path / "p.safetensors", "--json", inp))
    assert "--json" in line and "IN" in line
    line = one_error_line(run("prune-checkpoint", inp, "-s", "0.8", "-o", tmp_path / "p.safetensors",
                              "--json", tmp_path / "p.safetensors"))
    assert "--json" in line and "--out" in line
    assert inp.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_prune_checkpoint_json_over_config_json_is_refused(tmp_path):
    inp = tmp_path / "m.safetensors"
    save_state_dict({"fc.weight": torch.randn(6, 8)}, inp)
    (tmp_path / "config.json").write_text('{"tie_word_embeddings": false}')
    line = one_error_line(run("prune-checkpoint", inp, "-s", "0.8", "-o", tmp_path / "p.safetensors",
                              "--json", tmp_path / "config.json"))
    assert "config.json" in line and (tmp_path / "config.json").read_text() == '{"tie_word_embeddings": false}'


def test_check_paths_library_function(tmp_path):
    a = tmp_path / "a"
    a.write_text("x")
    check_paths({"IN": a}, {"--out": tmp_path / "b", "--json": tmp_path / "c", "--none": None})
    with pytest.raises(ValueError, match="--json: got .* same file as --out"):
        check_paths({"IN": a}, {"--out": tmp_path / "b", "--json": tmp_path / "x" / ".." / "b"})
    with pytest.raises(ValueError, match="same file as IN"):
        check_paths({"IN": a}, {"--out": tmp_path / "." / "a"})
    with pytest.raises(ValueError, match="--out: got .* which holds IN"):  # a folder over an input
        check_paths({"IN": a}, {"--out": tmp_path})
    check_paths({"--cache": tmp_path}, {"--out": tmp_path / "run"})  # an output inside a read folder is fine
    with pytest.raises(ValueError, match="same file as IN"):  # a missing folder, then back up
        check_paths({"IN": a}, {"--out": tmp_path / "missing" / ".." / "a"})
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "le").symlink_to(tmp_path / "d" / "e", target_is_directory=True)
    (tmp_path / "d" / "f").write_text("f")
    with pytest.raises(ValueError, match="same file as IN"):  # le/.. is the link target's parent, d
        check_paths({"IN": tmp_path / "d" / "f"}, {"--out": tmp_path / "le" / ".." / "f"})
    check_paths({"IN": a}, {"--out": tmp_path / "le" / ".." / "a"})  # d/a: another file


def test_nmf_data_inside_out_folder_is_refused(tmp_path):
    np.save(tmp_path / "X.npy", np.random.default_rng(0).random((6, 20)))
    line = one_error_line(run("nmf", "cbcl", "--data", tmp_path / "X.npy", "--out", tmp_path, "--iters", "2",
                              "--no-progress"))
    assert "--out" in line and "X.npy" in line


def test_nmf_default_outputs_are_outside_the_source_tree():
    from groupsparse.nmf.cli import cbcl_cmd, synthetic_cmd

    repo = os.path.dirname(os.path.dirname(os.path.abspath(gs.__file__)))
    for cmd in (synthetic_cmd, cbcl_cmd):
        default = next(p.default for p in cmd.params if p.name == "out")
        assert os.path.isabs(default) and not os.path.realpath(default).startswith(os.path.realpath(repo) + os.sep)


def test_output_suffix_is_checked_before_any_work(tmp_path, npy, monkeypatch):
    import groupsparse.io as gio

    monkeypatch.setattr(gio, "load_arrays", lambda *a, **k: pytest.fail("the input was read before the check"))
    assert ".npy, .npz, .safetensors" in one_error_line(run("project", npy, "-s", "0.8", "-o", tmp_path / "o.txt"))
    line = one_error_line(run("prune-checkpoint", npy, "-s", "0.8", "-o", tmp_path / "o.txt"))
    assert "expected a file ending" in line
    assert sorted(os.listdir(tmp_path)) == ["in.npy"]


# ------------------------------------------------------------------------------------- atomic writes, temp files
def test_stale_temp_of_a_killed_run_is_removed_by_the_next_run(tmp_path, npy):
    from groupsparse.io import _HOST

    stale = tmp_path / f".out.npy.groupsparse-tmp-{_HOST}-{dead_pid()}-0.npy"
    stale.write_bytes(b"half a file")
    live = tmp_path / f".out.npy.groupsparse-tmp-{_HOST}-{os.getpid()}-99.npy"  # a writer still at work: kept
    # another host's (a shared folder: its process id says nothing here) and a user's copy named like a temp: kept
    remote = tmp_path / f".out.npy.groupsparse-tmp-otherhost-{dead_pid()}-0.npy"
    rescued = tmp_path / f".out.npy.groupsparse-tmp-{_HOST}-{dead_pid()}-0-rescued"
    for p in (remote, rescued):
        p.write_bytes(b"keep")
    live.write_bytes(b"in progress")
    r = run("project", npy, "-s", "0.8", "-o", tmp_path / "out.npy")
    assert r.exit_code == 0, r.output
    assert not stale.exists() and live.exists() and remote.exists() and rescued.exists()
    assert clean_stale_temps(tmp_path) == []


def test_atomic_folder_keeps_the_old_output_until_the_new_one_is_in(tmp_path, monkeypatch):
    """A failed final rename puts the old folder back (it was left under a temp name the next write deletes); a
    symlinked output is replaced where the link points, the link kept."""
    import groupsparse.io as gio

    out = tmp_path / "out"
    out.mkdir()
    (out / "r.json").write_text("OLD")
    real, n = os.replace, [0]

    def flaky(a, b):
        n[0] += 1
        if n[0] == 2:  # the new folder into place
            raise OSError(5, "simulated")
        return real(a, b)

    monkeypatch.setattr(gio.os, "replace", flaky)
    with pytest.raises(OSError):
        with gio.atomic_folder(out) as t:
            (t / "r.json").write_text("NEW")
    monkeypatch.setattr(gio.os, "replace", real)
    assert (out / "r.json").read_text() == "OLD"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    target = tmp_path / "bigdisk"
    target.mkdir()
    (target / "r.json").write_text("OLD")
    (tmp_path / "link").symlink_to(target, target_is_directory=True)
    with gio.atomic_folder(tmp_path / "link") as t:
        (t / "r.json").write_text("NEW")
    assert (tmp_path / "link").is_symlink() and (target / "r.json").read_text() == "NEW"


def test_killed_writer_leaves_a_temp_the_next_run_finds(tmp_path):
    code = ("import os, signal\nfrom groupsparse.io import atomic_path\n"
            f"with atomic_path({str(tmp_path / 'big.bin')!r}) as t:\n"
            "    t.write_bytes(b'x' * 1000)\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", code], check=False)
    left = [n for n in os.listdir(tmp_path) if ".groupsparse-tmp-" in n]
    assert len(left) == 1 and left[0].startswith(".big.bin.")
    with atomic_path(tmp_path / "other.bin") as t:
        t.write_bytes(b"ok")
    assert sorted(os.listdir(tmp_path)) == ["other.bin"]


def test_failed_write_removes_its_temp_and_names_the_file(tmp_path, npy, monkeypatch):
    def no_rename(a, b):
        raise PermissionError(13, "Permission denied", str(b))

    monkeypatch.setattr(os, "replace", no_rename)
    line = one_error_line(run("project", npy, "-s", "0.8", "-o", tmp_path / "o.npy"))
    assert "Permission denied" in line and "o.npy" in line
    assert sorted(os.listdir(tmp_path)) == ["in.npy"]


# -------------------------------------------------------------------------------------- nested and tied checkpoints
def llama_like():
    torch.manual_seed(0)
    emb = torch.randn(40, 12)
    return {"model.embed_tokens.weight": emb, "model.layers.0.mlp.up_proj.weight": torch.randn(24, 12),
            "model.norm.weight": torch.ones(12), "lm_head.weight": emb}


def test_nested_checkpoint_keeps_everything_else(tmp_path):
    sd = llama_like()
    ema = {k: v.clone() for k, v in sd.items()}
    inp = tmp_path / "ckpt.pt"
    torch.save({"model": sd, "epoch": 3, "optimizer": {"state": {0: {"m": torch.ones(2)}}, "lr": 0.1}, "ema": ema}, inp)
    r = run("prune-checkpoint", inp, "-s", "0.8", "-o", tmp_path / "p.pt")
    assert r.exit_code == 0, r.output
    out = torch.load(tmp_path / "p.pt", weights_only=True)
    assert set(out) == {"model", "epoch", "optimizer", "ema"} and out["epoch"] == 3 and out["optimizer"]["lr"] == 0.1
    assert torch.equal(out["optimizer"]["state"][0]["m"], torch.ones(2))
    assert all(torch.equal(out["ema"][k], ema[k]) for k in ema)  # copied, not pruned
    w = out["model"]["model.layers.0.mlp.up_proj.weight"]
    assert (w == 0).any() and gs.hoyer_sparsity(w.numpy(), axis=1).mean() == pytest.approx(0.8, abs=1e-5)
    assert "'epoch', 'optimizer', 'ema' copied unchanged" in " ".join(r.output.split())


def test_tied_head_and_embedding_stay_tied(tmp_path):
    inp = tmp_path / "llama.pt"
    torch.save(llama_like(), inp)
    r = run("prune-checkpoint", inp, "-s", "0.8", "-o", tmp_path / "p.pt")
    assert r.exit_code == 0 and "tied" in r.output, r.output
    out = torch.load(tmp_path / "p.pt", weights_only=True)
    assert out["lm_head.weight"].data_ptr() == out["model.embed_tokens.weight"].data_ptr()
    assert torch.equal(out["lm_head.weight"], llama_like()["lm_head.weight"])  # embedding not selected: both dense
    r = run("prune-checkpoint", inp, "-s", "0.8", "-o", tmp_path / "both.pt", "--any-tensor",
            "--include", "lm_head*", "--include", "*embed*")
    assert r.exit_code == 0, r.output
    out = torch.load(tmp_path / "both.pt", weights_only=True)
    assert out["lm_head.weight"].data_ptr() == out["model.embed_tokens.weight"].data_ptr()
    assert (out["lm_head.weight"] == 0).any()


@pytest.mark.parametrize("config", [None, '{"tie_word_embeddings": true}', '{"tie_word_embeddings": false}'])
def test_ties_by_name_in_safetensors(tmp_path, config):
    sd = {k: v.clone() for k, v in llama_like().items()}  # safetensors holds copies: equal values, no sharing
    if config == '{"tie_word_embeddings": true}':
        sd["lm_head.weight"] = sd["lm_head.weight"] * 2  # the config alone says tied
    inp = tmp_path / "model.safetensors"
    save_state_dict(sd, inp)
    if config:
        (tmp_path / "config.json").write_text(config)
    r = run("prune-checkpoint", inp, "-s", "0.8", "-o", tmp_path / "p.safetensors")
    assert r.exit_code == 0, r.output
    head = load_state_dict(tmp_path / "p.safetensors")["lm_head.weight"]
    tied = config != '{"tie_word_embeddings": false}'
    assert torch.equal(head, sd["lm_head.weight"]) == tied


def test_gpt2_names_tied(tmp_path):
    wte = torch.randn(30, 8)
    inp = tmp_path / "gpt2.pt"
    torch.save({"transformer.wte.weight": wte, "transformer.h.0.mlp.c_fc.weight": torch.randn(8, 16),
                "lm_head.weight": wte.clone()}, inp)
    r = run("prune-checkpoint", inp, "-s", "0.8", "-o", tmp_path / "p.pt")
    assert r.exit_code == 0 and "lm_head.weight is tied to transformer.wte.weight" in " ".join(r.output.split())


# ------------------------------------------------------------------------------------- what `project` can project
def test_project_skips_arrays_the_axis_does_not_fit_and_names_them(tmp_path):
    src = tmp_path / "ck.npz"
    rng = np.random.default_rng(0)
    np.savez(src, w=rng.normal(size=(4, 6)), b=rng.normal(size=4), ids=np.arange(3), s=np.float64(2.5),
             c=np.ones(3, complex), flag=np.ones(2, bool))
    r = run("project", src, "-s", "0.8", "--axis", "1", "-o", tmp_path / "o.npz")
    assert r.exit_code == 0, r.output
    skipped = next(ln for ln in r.output.splitlines() if ln.startswith("skipped"))
    for name in ("b (1-D, no axis 1)", "ids (int64", "s (0-d)", "c (complex128", "flag (bool"):
        assert name in skipped
    with np.load(tmp_path / "o.npz") as z:
        assert z["s"].shape == () and z["s"] == 2.5  # 0-d written back as 0-d
        np.testing.assert_array_equal(z["b"], np.load(src)["b"])
        assert gs.hoyer_sparsity(z["w"], axis=1).mean() == pytest.approx(0.8, abs=1e-9)


@pytest.mark.parametrize("array", [np.arange(10), np.ones(4, bool), np.ones((3, 3), complex), np.float64(3.0),
                                   np.ones((1, 5))], ids=["int", "bool", "complex", "0-d", "length-1"])
def test_project_fails_when_nothing_can_be_projected(tmp_path, array):
    np.save(tmp_path / "x.npy", array)
    line = one_error_line(run("project", tmp_path / "x.npy", "-s", "0.8", "-o", tmp_path / "o.npy"))
    assert "no array to project" in line and "x.npy" in line
    assert not (tmp_path / "o.npy").exists()


def test_project_named_key_that_cannot_be_projected(tmp_path):
    np.savez(tmp_path / "a.npz", w=np.ones((3, 4)), b=np.ones(3))
    assert "'b' (1-D, no axis 1)" in one_error_line(run("project", tmp_path / "a.npz", "-s", "0.5", "--axis", "1",
                                                        "--key", "b", "-o", tmp_path / "o.npz"))
    assert "expected one of ['b', 'w']" in one_error_line(run("project", tmp_path / "a.npz", "-s", "0.5",
                                                              "--key", "nope", "-o", tmp_path / "o.npz"))


def test_project_bf16_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file as save_pt

    w = torch.randn(16, 32).to(torch.bfloat16)
    save_pt({"w": w, "b": torch.randn(16).to(torch.bfloat16), "step": torch.tensor(3)}, str(tmp_path / "m.safetensors"))
    r = run("project", tmp_path / "m.safetensors", "-s", "0.8", "--axis", "1", "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 0, r.output
    out = load_file(str(tmp_path / "o.safetensors"))
    assert out["w"].dtype == torch.bfloat16 and out["step"].shape == () and int(out["step"]) == 3
    assert gs.hoyer_sparsity(out["w"].float(), axis=1).mean() >= 0.8 - 1e-3
    assert ".safetensors" in one_error_line(run("project", tmp_path / "m.safetensors", "-s", "0.8", "--axis", "1",
                                                "-o", tmp_path / "o.npz"))


def test_load_arrays_keeps_0d_and_safetensors_scalars(tmp_path):
    save_file({"s": np.array(1.5), "v": np.arange(3.0)}, str(tmp_path / "a.safetensors"))
    r = run("project", tmp_path / "a.safetensors", "-s", "0.5", "-o", tmp_path / "b.safetensors")
    assert r.exit_code == 0, r.output
    back = load_arrays(tmp_path / "b.safetensors")
    assert back["s"].shape == () and float(back["s"]) == 1.5


def test_project_summary_does_not_allocate_full_size_temporaries(tmp_path, monkeypatch):
    """The printed sparsity is computed a block of vectors at a time (a 1 GB file peaked at 6.3 GB RSS)."""
    import groupsparse.cli as cli

    seen = []
    real = gs.hoyer_sparsity

    def spy(x, **kw):
        seen.append(np.size(x))
        return real(x, **kw)

    monkeypatch.setattr(gs, "hoyer_sparsity", spy)
    monkeypatch.setattr(cli, "_CHUNK", 1000)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(300, 200)))
    r = run("project", tmp_path / "x.npy", "-s", "0.7", "-o", tmp_path / "o.npy")
    assert r.exit_code == 0, r.output
    assert seen and max(seen) <= 1000 and sum(seen) == 300 * 200
    assert "0.700000" in r.output
