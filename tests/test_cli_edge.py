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
