"""Threads: threaded passes are Python threads running the cached serial kernels (``projection/_threads.py``).

They must give the serial bits whatever the thread count, leave torch's thread count alone, and never start a
Numba thread pool (whose OpenMP layer used to bind to torch's libgomp and fight it for the cores).
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")

CODE = textwrap.dedent("""
    import numpy as np
    import torch  # imported first: numba's OpenMP layer would have bound to torch's libgomp
    import groupsparse as gs
    from numba.np.ufunc import parallel
    from groupsparse.projection import _numba, _small, _threads

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 2000)).astype(np.float32)  # 1.2M entries: threaded
    ragged = [rng.normal(size=int(n)) for n in rng.integers(100, 5000, 500)]
    w = [rng.random(len(v)) + 0.1 for v in ragged]
    torch.get_num_threads()
    torch.set_num_threads(1)
    def run():
        return [gs.project(x, 0.8, axis=1), *gs.project(ragged, 0.7), *gs.project(ragged, 0.7, weights=w)]
    threaded = run()
    assert torch.get_num_threads() == 1, torch.get_num_threads()
    assert not parallel._is_initialized, "a Numba thread pool was started"
    for k in ("1", "3", "7"):  # the thread count changes no bit
        os.environ["GROUPSPARSE_NUM_THREADS"] = k
        assert all(np.array_equal(a, b) for a, b in zip(run(), threaded)), k
    _numba.PARALLEL_MIN_ENTRIES = 1 << 40  # serial kernels, the same compiled code
    assert np.array_equal(gs.project(x, 0.8, axis=1), threaded[0])  # the equal-length path, serial
    _small.SMALL_MAX_ENTRIES = -1  # ragged groups: the general engine, serial (threaded, they took it too)
    assert all(np.array_equal(a, b) for a, b in zip(run()[1:], threaded[1:]))
    print("ok", _threads.threads())
""")


def test_threaded_projection_gives_serial_bits_and_keeps_torch_threads():
    # (every thread count on the same paths: ragged groups leave the compiled serial solve from 1 thread too)
    env = dict(os.environ, GROUPSPARSE_PARALLEL_MIN_ENTRIES="1000", GROUPSPARSE_PARALLEL_MIN_THREADS="1",
               GROUPSPARSE_RAGGED_MIN_THREADS="1", NUMBA_NUM_THREADS="2")
    env.pop("GROUPSPARSE_NUM_THREADS", None)
    res = subprocess.run([sys.executable, "-c", "import os\n" + CODE], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-2:] == ["ok", "7"], res.stdout


FORK = textwrap.dedent("""
    import os, sys
    import numpy as np
    import groupsparse as gs

    x = np.random.default_rng(0).normal(size=(600, 2000)).astype(np.float32)
    want = gs.project(x, 0.8, axis=1)  # the parent starts its thread pool
    pid = os.fork()
    if pid == 0:  # the child inherits the pool object, not its threads: it must start its own, not wait forever
        ok = np.array_equal(gs.project(x, 0.8, axis=1), want)
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    print("child", os.waitstatus_to_exitcode(status))
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_threaded_projection_in_a_forked_child():
    """A DataLoader-style fork after a threaded projection: the child projects with threads of its own."""
    env = dict(os.environ, GROUPSPARSE_PARALLEL_MIN_ENTRIES="1000", GROUPSPARSE_PARALLEL_MIN_THREADS="1",
               GROUPSPARSE_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", FORK], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-2:] == ["child", "0"], res.stdout


def test_a_stalled_pool_thread_does_not_hold_up_a_pass(monkeypatch):
    """Every pool thread busy (as when another process holds the other cores): the calling thread claims every
    block itself, finishes, and gets the serial bits. With one static range per thread this call waited for the
    pool thread's range: forever here, a time slice per pass on a loaded machine."""
    import threading

    import numpy as np

    import groupsparse as gs
    from groupsparse.projection import _numba, _small, _threads

    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 2000)).astype(np.float32)
    ragged = [rng.normal(size=int(n)) for n in rng.integers(100, 5000, 300)]
    monkeypatch.setattr(_small, "SMALL_MAX_ENTRIES", -1)  # ragged groups through the threaded general engine
    want = [gs.project(x, 0.8, axis=1), *gs.project(ragged, 0.7)]  # serial: below the thresholds
    monkeypatch.setenv("GROUPSPARSE_NUM_THREADS", "2")
    monkeypatch.setattr(_numba, "PARALLEL_MIN_ENTRIES", 1000)
    monkeypatch.setattr(_numba, "PARALLEL_MIN_THREADS", 1)
    gate = threading.Event()
    pool = _threads._executor(1)
    blockers = [pool.submit(gate.wait) for _ in range(_threads._pool_size)]
    got = []
    worker = threading.Thread(target=lambda: got.extend([gs.project(x, 0.8, axis=1), *gs.project(ragged, 0.7)]))
    worker.start()
    worker.join(60)
    stalled = worker.is_alive()
    gate.set()
    worker.join()
    for b in blockers:
        b.result()
    assert not stalled, "the pass waited for a pool thread that never started"
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
