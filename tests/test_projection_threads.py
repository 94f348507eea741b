"""Threads: a threaded projection leaves torch's thread count alone and matches the serial path bit for bit."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")

CODE = textwrap.dedent("""
    import sys
    import numpy as np
    import torch  # imported first: numba's OpenMP layer would bind to torch's libgomp
    import numba
    import groupsparse as gs
    from groupsparse.projection import _numba, _small

    x = np.random.default_rng(0).normal(size=(600, 2000)).astype(np.float32)  # 1.2M entries: the threaded engine
    torch.get_num_threads()  # torch sets up its OpenMP state (the order in which the count changed)
    torch.set_num_threads(1)
    y = gs.project(x, 0.8, axis=1)
    y = gs.project(x, 0.8, axis=1)
    assert torch.get_num_threads() == 1, torch.get_num_threads()
    torch.set_num_threads(2)
    assert np.array_equal(gs.project(x, 0.8, axis=1), y)
    assert torch.get_num_threads() == 2, torch.get_num_threads()
    _numba.PARALLEL_MIN_ENTRIES = 1 << 40  # the serial kernels of the same engine
    _small.SMALL_MAX_ENTRIES = -1
    assert np.array_equal(gs.project(x, 0.8, axis=1), y)
    print("layer", numba.threading_layer())
""")


@pytest.mark.parametrize("layer", [None, "omp"])
def test_threaded_projection_keeps_torch_threads(layer):
    env = dict(os.environ, GROUPSPARSE_PARALLEL_MIN_ENTRIES="1000", GROUPSPARSE_PARALLEL_MIN_THREADS="1",
               NUMBA_NUM_THREADS="2")
    env.pop("NUMBA_THREADING_LAYER", None)
    env.pop("NUMBA_THREADING_LAYER_PRIORITY", None)
    if layer:
        env["NUMBA_THREADING_LAYER"] = layer  # the user's choice is kept; torch's count is still restored
    res = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=300)
    if layer and res.returncode != 0 and "threading layer" in res.stderr.lower():
        pytest.skip(f"numba has no {layer} threading layer here")
    assert res.returncode == 0, res.stderr[-2000:]
    want = layer or ("tbb", "workqueue")
    assert res.stdout.split()[-1] in want, res.stdout
