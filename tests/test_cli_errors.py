"""Issue 9, "every failure is one line": the error boundary of `groupsparse`, the loaders' errors, lazy
subcommands, and the README's command-line and Python sections."""

import os
import re
import resource
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import groupsparse.cli as cli
from cli_helpers import one_error_line, run
from groupsparse.cli import main
from groupsparse.io import load_arrays
from groupsparse.prune import load_state_dict, save_state_dict

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def files(tmp_path):
    """Good and broken inputs of every kind the commands read."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "good.npy", rng.normal(size=(8, 6)))
    np.savez(tmp_path / "good.npz", w=rng.normal(size=(8, 6)))
    save_state_dict({"fc.weight": torch.randn(8, 6)}, tmp_path / "good.safetensors")
    save_state_dict({"fc.weight": torch.randn(8, 6)}, tmp_path / "good.pt")
    for name in ("good.npy", "good.npz", "good.safetensors", "good.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name.replace("good", "trunc")).write_bytes(data[: len(data) // 2])
        (tmp_path / name.replace("good", "garbage")).write_bytes(b"\x93NUMPY garbage \x00\xff" * 7)
        (tmp_path / name.replace("good", "empty")).write_bytes(b"")
    torch.save(torch.nn.Linear(3, 3), tmp_path / "module.pt")
    torch.save({"step": torch.arange(4)}, tmp_path / "int.pt")
    with open(tmp_path / "huge.npy", "wb") as f:  # a header declaring 800 GB, then 64 bytes
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (10**11,)})
        f.write(b"\0" * 64)
    return tmp_path


# -------------------------------------------------------------------------------------------------- bad files
@pytest.mark.parametrize("kind", ["trunc", "garbage", "empty"])
@pytest.mark.parametrize("suffix", [".npy", ".npz", ".safetensors"])
def test_project_bad_input_is_one_line_naming_the_file(files, kind, suffix):
    line = one_error_line(run("project", files / f"{kind}{suffix}", "-s", "0.5", "-o", files / "o.npz"))
    assert f"{kind}{suffix}" in line
    with pytest.raises(ValueError, match=f"{kind}{re.escape(suffix)}"):
        load_arrays(files / f"{kind}{suffix}")


@pytest.mark.parametrize("name", ["trunc.pt", "garbage.pt", "empty.pt", "trunc.safetensors", "garbage.safetensors",
                                  "module.pt"])
def test_prune_checkpoint_bad_input_is_one_line_naming_the_file(files, name):
    line = one_error_line(run("prune-checkpoint", files / name, "-s", "0.5", "-o", files / "o.pt"))
    assert name in line
    with pytest.raises(ValueError, match=re.escape(name)):
        load_state_dict(files / name)
    if name == "module.pt":
        assert "Linear" in line and "state_dict" in line


def test_npy_declaring_more_than_memory(files):
    line = one_error_line(run("project", files / "huge.npy", "-s", "0.5", "-o", files / "o.npy"))
    assert "huge.npy" in line


def test_missing_input_and_directory_input(files):
    assert "nope.npy" in one_error_line(run("project", files / "nope.npy", "-s", "0.5", "-o", files / "o.npy"))
    assert "nope.pt" in one_error_line(run("prune-checkpoint", files / "nope.pt", "-s", "0.5", "-o", files / "o.pt"))
    one_error_line(run("project", files, "-s", "0.5", "-o", files / "o.npy"))


def test_unwritable_output_folder(files):
    # root ignores permission bits, so use a path whose "folder" is a file
    line = one_error_line(run("project", files / "good.npy", "-s", "0.5", "-o", files / "good.npz" / "o.npy"))
    assert "good.npz" in line
    line = one_error_line(run("prune-checkpoint", files / "good.pt", "-s", "0.5", "-o", files / "good.npz" / "o.pt"))
    assert "good.npz" in line


@pytest.mark.parametrize("args", [["project", "good.npy", "-s", "0.5", "-o", "full.npy"],
                                  ["project", "good.npy", "-s", "0.5", "-o", "full.npz"],
                                  ["project", "good.npy", "-s", "0.5", "-o", "full.safetensors"],
                                  ["prune-checkpoint", "good.pt", "-s", "0.5", "-o", "full.pt"],
                                  ["prune-checkpoint", "good.pt", "-s", "0.5", "-o", "full.safetensors"]],
                         ids=lambda a: a[-1])
def test_full_disk_is_one_line_naming_the_output(files, args):
    """A file-size limit makes every write past 1 kB fail as on a full disk."""
    big = {"fc.weight": torch.randn(64, 64)}
    save_state_dict(big, files / "good.pt")
    np.save(files / "good.npy", np.random.default_rng(0).normal(size=(64, 64)))

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    code = "import sys; from groupsparse.cli import main; main(sys.argv[1:], prog_name='groupsparse')"
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=files, capture_output=True, text=True,
                       preexec_fn=limit, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("groupsparse: error: ") and args[-1] in lines[0], r.stderr
    assert not [n for n in os.listdir(files) if n.startswith(".full")]  # no temp file left behind


def test_bad_regex_in_include(files):
    line = one_error_line(run("prune-checkpoint", files / "good.pt", "-s", "0.5", "-o", files / "o.pt",
                              "--include", "re:(["))
    assert "re:([" in line and "regular expression" in line


def test_broken_report_json(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text('{"method": "gsp", ')
    assert "report.json" in one_error_line(run("report", tmp_path / "run"))


def test_usage_errors_are_one_line(files):
    assert "--sparsity" in one_error_line(run("project", files / "good.npy", "-o", files / "o.npy"))
    assert "No such command" in one_error_line(run("nope"))
    assert "sparsity: got 1.5" in one_error_line(run("prune-checkpoint", files / "good.pt", "-s", "1.5", "-o",
                                                     files / "o.pt"))


# ------------------------------------------------------------------------------------------ misleading messages
def test_nmf_key_messages(tmp_path):
    from scipy.io import savemat

    savemat(tmp_path / "two.mat", {"A": np.ones((4, 5)), "B": np.ones((4, 5))})
    line = one_error_line(run("nmf", "cbcl", "--data", tmp_path / "two.mat", "--key", "C", "--out", tmp_path / "o",
                              "--iters", "2", "--no-progress"))
    assert "--key: got 'C'" in line and "'A', 'B'" in line
    np.save(tmp_path / "x.npy", np.ones((4, 5)))
    line = one_error_line(run("nmf", "cbcl", "--data", tmp_path / "x.npy", "--key", "nope", "--out", tmp_path / "o",
                              "--iters", "2", "--no-progress"))
    assert line.startswith("groupsparse: error: --key: got 'nope'") and not line.endswith("'")


def test_any_tensor_is_not_suggested_to_whoever_passed_it(files):
    line = one_error_line(run("prune-checkpoint", files / "int.pt", "-s", "0.5", "-o", files / "o.pt", "--any-tensor"))
    assert "no tensor to prune" in line and "--any-tensor" not in line
    line = one_error_line(run("prune-checkpoint", files / "int.pt", "-s", "0.5", "-o", files / "o.pt"))
    assert "--any-tensor" in line


# ------------------------------------------------------------------------------------- boundary, lazy registry
def test_unexpected_exceptions_and_debug_switch(files, monkeypatch):
    import groupsparse.io as gio

    def boom(path, what="input"):
        raise MemoryError()

    monkeypatch.setattr(gio, "load_arrays", boom)
    assert "out of memory" in one_error_line(run("project", files / "good.npy", "-s", "0.5", "-o", files / "o.npy"))
    monkeypatch.setenv("GROUPSPARSE_DEBUG", "1")
    r = run("project", files / "good.npy", "-s", "0.5", "-o", files / "o.npy")
    assert isinstance(r.exception, MemoryError)  # raised through: the traceback is shown


def fake_module(monkeypatch, name, body):
    mod = types.ModuleType(name)
    exec(body, mod.__dict__)
    monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(cli, "_SUBCOMMANDS", cli._SUBCOMMANDS + [(name, "commands")])


def test_ctrl_c_while_a_subcommand_loads(monkeypatch):
    monkeypatch.setitem(cli._LISTING, "slow", ("fake_slow_cli", "Takes long to import."))
    monkeypatch.setattr(cli, "_SUBCOMMANDS", cli._SUBCOMMANDS + [("fake_slow_cli", "commands")])
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: (_ for _ in ()).throw(KeyboardInterrupt()))
    r = CliRunner().invoke(main, ["slow"], standalone_mode=True)
    assert r.exit_code == 130 and one_error_line(r) == "groupsparse: error: interrupted"


def test_unlisted_registry_entry_still_works(monkeypatch):
    """How another part adds a command: one (module, "commands") entry, no listing needed."""
    fake_module(monkeypatch, "fake_lm_cli", "import click\n@click.command('prune-fake')\ndef c():\n"
                "    '''A fake command.'''\n    click.echo('ran')\ncommands = [c]\n")
    cli.main._loaded.discard("fake_lm_cli")
    r = run("--help")
    assert r.exit_code == 0 and "prune-fake" in r.output and "A fake command." in r.output
    r = run("prune-fake")
    assert r.exit_code == 0 and r.output == "ran\n"
    cli.main.commands.pop("prune-fake", None)


def test_listing_matches_the_commands():
    for name, (module, short) in cli._LISTING.items():
        cli.main._load(module)
        real = cli.main.commands[name]
        assert real.get_short_help_str(10_000) == short, f"update cli._LISTING[{name!r}]"
    listed = {m for m, _ in cli._LISTING.values()}
    assert listed <= {m for m, _ in cli._SUBCOMMANDS}


def test_help_imports_no_subcommand_module():
    code = ("import sys; from groupsparse.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print([m for m in ('groupsparse.nmf.cli', 'groupsparse.prune.cli', 'groupsparse.experiments.cli', "
            "'groupsparse.demo') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("[]"), r.stdout + r.stderr
    assert "prune-checkpoint" in r.stdout and "project" in r.stdout


# ---------------------------------------------------------------------------------------------------- README
def readme_section(title):
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def test_readme_python_example_runs_on_cpu():
    block = re.search(r"```python\n(.*?)```", readme_section("Python"), re.S).group(1)
    assert "W1, W2, W3 =" in block and 'device="cuda"' not in block  # every name defined, any machine
    exec(compile(block, "README.md", "exec"), {})


def test_readme_command_line_matches_help():
    block = re.search(r"```\n(.*?)```", readme_section("Command line"), re.S).group(1)
    for line in block.splitlines():
        for usage in line.split(" | "):
            words = usage.split()
            assert words[0] == "groupsparse"
            path = [w for w in words[1:3] if re.fullmatch(r"[a-z][a-z-]*", w)]
            cmd = main
            for w in path:
                cmd = cmd.commands[w] if w in cmd.commands else cli.main.get_command(None, w)
                assert cmd is not None, usage
            opts = {o for p in cmd.params for o in p.opts + p.secondary_opts}
            for w in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", usage):
                assert w in opts, f"{usage}: {w} is not an option of {' '.join(['groupsparse', *path])}"


def test_options_that_make_no_sense_together(files):
    line = one_error_line(run("prune-checkpoint", files / "good.pt", "-s", "0.5", "-o", files / "o.pt",
                              "--normalize", "layer"))
    assert "--normalize" in line and "--scope model" in line and not (files / "o.pt").exists()
    # "vector" has a meaning in layer scope (as project_tensors and the pruners take it): accepted
    assert run("prune-checkpoint", files / "good.pt", "-s", "0.5", "-o", files / "o.pt",
               "--normalize", "vector").exit_code == 0 and (files / "o.pt").exists()


@pytest.mark.parametrize("content", [b"", b"MATLAB 5.0 garbage", "half"], ids=["empty", "garbage", "truncated"])
def test_nmf_bad_mat_file_is_one_line_naming_it(tmp_path, content):
    from scipy.io import savemat

    if content == "half":
        savemat(tmp_path / "full.mat", {"X": np.ones((20, 30))})
        content = (tmp_path / "full.mat").read_bytes()[:200]
    (tmp_path / "bad.mat").write_bytes(content)
    line = one_error_line(run("nmf", "cbcl", "--data", tmp_path / "bad.mat", "--out", tmp_path / "o", "--iters", "2",
                              "--no-progress"))
    assert "bad.mat" in line


def test_numpy_projection_does_not_import_torch():
    # the CLI on a .npy file and NumPy callers skip torch's ~1 s import; tensors still work once torch is imported
    code = ("import sys, numpy as np, groupsparse as gs; gs.project(np.random.rand(6, 5), .5); "
            "gs.hoyer_sparsity(np.random.rand(6, 5), axis=0); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr
