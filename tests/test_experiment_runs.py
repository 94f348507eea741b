"""Run folders are never stale, mixed or silently divergent: manifests, bit-identical resume after a kill at every
write, option combinations, and the report's grouping and paired statistics."""

from __future__ import annotations

import json

import pytest
import torch

from groupsparse.experiments import _files
from groupsparse.experiments.runner import Config, run


class _Killed(BaseException):
    """Stands for SIGKILL: a BaseException, so no handler in the code under test swallows it."""


def _cfg(tmp_path, out, method="gmp", protocol="during", **kw):
    base = dict(epochs=3, finetune_epochs=2, batch_size=128, cache_dir=str(tmp_path / "cache"), progress=False)
    base.update(kw)
    return Config("digits", "mlp", method, 0.9, 0, str(out), protocol=protocol, **base)


def _count_writes(monkeypatch, stop_at=None, mid_write=False):
    real = _files.atomic_write
    n = [0]

    def write(path, writer, **kw):
        n[0] += 1
        if stop_at is not None and n[0] == stop_at:
            if mid_write:  # the temporary file or folder is complete, the rename never happens
                real(path, lambda tmp: (writer(tmp), (_ for _ in ()).throw(_Killed())), **kw)
            real(path, writer, **kw)
            raise _Killed()
        real(path, writer, **kw)

    monkeypatch.setattr(_files, "atomic_write", write)
    return n


@pytest.mark.parametrize("method,protocol", [("gmp", "during"), ("gsp", "after")])
def test_kill_at_every_write_resumes_bit_identical(tmp_path, monkeypatch, method, protocol):
    with monkeypatch.context() as m:
        n = _count_writes(m)
        ref = run(_cfg(tmp_path / "ref", tmp_path / "ref" / "run", method, protocol))
    total = n[0]
    want = (tmp_path / "ref" / "run" / "model.safetensors").read_bytes()
    assert total >= 10  # manifests, epoch folders, state files, pruned model, final model, report
    for k in range(1, total + 1):
        root = tmp_path / f"k{k}"
        cfg = _cfg(root, root / "run", method, protocol)
        with monkeypatch.context() as m:
            _count_writes(m, stop_at=k, mid_write=k % 2 == 0)
            with pytest.raises(_Killed):
                run(cfg)
        got = run(cfg)
        assert (root / "run" / "model.safetensors").read_bytes() == want, f"kill at write {k} of {total}"
        assert got["accuracy"] == ref["accuracy"] and got["accuracy_before_finetune"] == ref["accuracy_before_finetune"]
        leftovers = [p for p in (root / "run").rglob(".*") if "tmp" in p.name]
        assert not leftovers, leftovers


def test_resume_says_so(tmp_path, capsys):
    from groupsparse.experiments import build_model, load_dataset
    from groupsparse.experiments.training import train

    ds = load_dataset("digits")
    torch.manual_seed(0)
    m = build_model("mlp", ds.input_shape)
    train(m, ds, epochs=2, lr=0.05, ckpt_dir=tmp_path, seed=0, batch_size=512, progress=False, stop_after=1)
    train(m, ds, epochs=2, lr=0.05, ckpt_dir=tmp_path, seed=0, batch_size=512, progress=False)
    assert "resuming from epoch 1" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0002", "state.json"]


def test_folder_of_other_settings_is_refused(tmp_path):
    out = tmp_path / "run"
    first = run(_cfg(tmp_path, out, "magnitude", "after"))
    assert json.loads((out / "manifest.json").read_text())["settings"]["method"] == "magnitude"
    assert run(_cfg(tmp_path, out, "magnitude", "after")) == first  # same settings: the finished run
    for other in (_cfg(tmp_path, out, "gsp", "after"), _cfg(tmp_path, out, "magnitude", "after", finetune_epochs=3)):
        with pytest.raises(ValueError, match="holds a run with other settings"):
            run(other)
    again = run(_cfg(tmp_path, out, "magnitude", "after", finetune_epochs=3, overwrite=True))
    assert again["finetune_epochs"] == 3
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no manifest.json"):
        run(_cfg(tmp_path, tmp_path / "junk", "magnitude", "after"))
    with pytest.raises(ValueError, match="not empty and holds no manifest.json"):  # not ours to empty either
        run(_cfg(tmp_path, tmp_path / "junk", "magnitude", "after", overwrite=True))
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"


def test_defaults_given_explicitly_resume_the_same_run(tmp_path):
    """--gsp-every N equal to the default's value (resolved from the data: ~3 projections an epoch) and the
    default GSP target given by value name the same run (the manifest held None and refused them)."""
    out = tmp_path / "run"
    first = run(_cfg(tmp_path, out, "gmp", "after"))
    every = first["gsp_every"]
    assert json.loads((out / "manifest.json").read_text())["settings"]["gsp_every"] == every
    assert run(_cfg(tmp_path, out, "gmp", "after", gsp_every=every)) == first
    out = tmp_path / "gsp"
    first = run(_cfg(tmp_path, out, "gsp", "after"))
    assert run(_cfg(tmp_path, out, "gsp", "after", gsp_sparsity=first["gsp_sparsity"])) == first


def test_out_folder_never_is_or_holds_the_data_or_the_cache(tmp_path):
    data = tmp_path / "d" / "cifar.npz"
    data.parent.mkdir()
    data.write_bytes(b"mine")
    for out, kw, match in ((tmp_path / "d", dict(data=str(data)), "holds --data"),
                           (tmp_path, {}, "holds --cache"),
                           (tmp_path / "cache", {}, "same file as --cache"),
                           # a folder inside the cache (a dense model's: --overwrite emptied it, and every
                           # later run with those dense settings was refused)
                           (tmp_path / "cache" / "dense" / "x", {}, "inside the cache")):
        cfg = _cfg(tmp_path, out, "magnitude", "after", overwrite=True, **kw)
        if kw:
            cfg.dataset = "cifar10"
        with pytest.raises(ValueError, match=match):
            run(cfg)
    assert data.read_bytes() == b"mine"


def test_deephoyer_selection_reports_the_settings_of_its_folder(tmp_path):
    out = tmp_path / "run"
    r = run(_cfg(tmp_path, out, "deephoyer", "after"))
    assert r["settings"] == json.loads((out / "manifest.json").read_text())["settings"]
    assert r["settings"]["hoyer_lambda"] is None and len(r["hoyer_lambda_selection"]) == 3
    assert run(_cfg(tmp_path, out, "deephoyer", "after")) == r  # finished: answered from its report.json


def test_demo_out_refuses_another_run(tmp_path):
    from click.testing import CliRunner

    from groupsparse.demo import demo

    out = tmp_path / "d"
    run(_cfg(tmp_path, out, "magnitude", "after"))
    res = CliRunner().invoke(demo, ["--skip", "projection", "--skip", "nmf", "--out", str(out)])
    assert res.exit_code != 0 and "other settings" in str(res.output) + str(res.exception)


@pytest.mark.parametrize("kw,match", [
    (dict(method="gsp", normalize="vector", scope="layer"), "--scope model"),
    (dict(method="gsp", data="x.zip"), "expected no --data"),
    (dict(method="gsp", epochs=0), "epochs: got 0"),
    (dict(method="magnitude", protocol="during"), "prune a trained model once"),
    (dict(method="magnitude", values="dense"), "only with gsp"),
    (dict(method="gsp", protocol="during", induce_epochs=1), "expected --start-epoch"),
    (dict(method="gsp", finetune_epochs=2, induce_epochs=2), "fewer than finetune_epochs"),
    (dict(method="gsp", values="best"), "expected one of"),
])
def test_options_that_make_no_sense_together(tmp_path, kw, match):
    method = kw.pop("method")
    with pytest.raises(ValueError, match=match):
        Config("digits", "mlp", method, 0.9, 0, str(tmp_path), **kw).resolve()


def _report(folder, **kw):
    r = dict(method="gsp", protocol="after", dataset="digits", model="mlp", seed=0, target_sparsity=0.9,
             zero_fraction=0.9, accuracy=0.9, dense_accuracy=0.95, epochs=30, finetune_epochs=20)
    r.update(kw)
    r["settings"] = {k: r[k] for k in ("method", "protocol", "dataset", "model", "seed", "epochs", "finetune_epochs")}
    r["settings"]["sparsity"] = r["target_sparsity"]
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(r))


def test_report_groups_dedupes_pairs_and_prints_plainly(tmp_path, capsys):
    from groupsparse.experiments.report import aggregate, find_reports, print_table

    for s in range(3):
        _report(tmp_path / f"g{s}", seed=s, accuracy=0.90 + 0.01 * s)
        _report(tmp_path / f"m{s}", seed=s, method="gmp", accuracy=0.89 + 0.02 * s)
    _report(tmp_path / "short", seed=0, finetune_epochs=2, accuracy=0.5)
    _report(tmp_path / "g0" / "lambda-1", seed=0, accuracy=0.1)  # a candidate inside a run: not a run
    reps = find_reports([tmp_path, tmp_path / "g0", tmp_path / ".." / tmp_path.name / "g1"])
    assert len(reps) == 7
    rows = aggregate(reps, baseline="gmp")
    gsp = [r for r in rows if r["method"] == "gsp"]
    assert sorted((r["finetune_epochs"], r["n_seeds"]) for r in gsp) == [(2, 1), (20, 3)]
    full = next(r for r in gsp if r["finetune_epochs"] == 20)
    # paired differences +0.01, 0, -0.01
    assert full["paired_diff_mean"] == pytest.approx(0.0, abs=1e-12)
    assert full["paired_diff_se"] == pytest.approx(0.01 / 3 ** 0.5)
    assert (full["wins"], full["losses"], full["ties"]) == (1, 1, 1)
    print_table(rows, "gmp")
    out = capsys.readouterr().out
    assert "30+20" in out and "30+2" in out and "┃" not in out and "+0.00 ± 0.58 (1/1/1)" in out


def test_broken_report_names_the_file(tmp_path):
    from click.testing import CliRunner

    from groupsparse.experiments.cli import report

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.json").write_text('{"method": "gsp", ')
    res = CliRunner().invoke(report, [str(tmp_path)])
    assert res.exit_code != 0 and "report.json: got an unreadable JSON file" in res.output
    assert len(res.output.strip().splitlines()) == 1
