"""Results must not depend on Numba's on-disk cache state (NMF's compiled kernels, groupsparse/nmf/_fastproj.py).

Before the fix, a compiled callee existed twice: as its own library and as a copy inside its caller's library,
optimized again there; under fastmath ``reassoc`` the two summed in different orders. A process that compiled the
caller ran the callee's own library (compiled first, so the loader bound the calls to it), a process that loaded the
caller from the cache ran the caller's copy: ``gsp_rows_warm`` (and the whole NMF loop) gave different bits with a
fresh and with a warm cache. Here the first process compiles into an empty cache folder, the second loads from it;
the hashes of the results must match.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_CODE = r"""
import hashlib, sys
sys.path.insert(0, {root!r})
import numpy as np
from groupsparse.nmf._fastproj import gsp_rows_warm

h = hashlib.sha256()
rng = np.random.default_rng(0)
for _ in range(200):
    X = rng.random((10, int(rng.integers(20, 200)))) ** 3
    out = np.empty_like(X)
    st, mu = gsp_rows_warm(X, 0.6, 0.0, 1e-12, 100, out)
    out2 = np.empty_like(X)
    st2, mu2 = gsp_rows_warm(X * 1.01, 0.6, mu, 1e-12, 100, out2)  # the warm-started solve
    h.update(out.tobytes() + out2.tobytes() + np.array([mu, mu2, st, st2]).tobytes())
stats = gsp_rows_warm.stats
print(h.hexdigest(), sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
"""


def _compile_then_load(template: str, tmp_path, threaded: bool = False, **env_extra):
    """Run ``template`` in two fresh processes sharing one numba cache folder (empty at first): the first compiles,
    the second loads. ``threaded`` lowers the threading thresholds so every group takes the threaded passes.
    Returns each run's (digest, cache hits, cache misses)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba_cache"))
    for k in ("NUMBA_DISABLE_JIT", "GROUPSPARSE_PARALLEL_MIN_ENTRIES", "GROUPSPARSE_PARALLEL_MIN_THREADS"):
        env.pop(k, None)
    if threaded:
        env.update(GROUPSPARSE_PARALLEL_MIN_ENTRIES="1", GROUPSPARSE_PARALLEL_MIN_THREADS="1", NUMBA_NUM_THREADS="2")
    env.update(env_extra)
    code = template.format(root=str(ROOT))
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr
        digest, hits, misses = out.stdout.split()
        runs.append((digest, int(hits), int(misses)))
    return runs


@pytest.mark.slow
def test_fresh_compile_and_cache_load_agree(tmp_path):
    (fresh, hits0, misses0), (cached, hits1, misses1) = _compile_then_load(_CODE, tmp_path)
    assert (hits0, misses0) == (0, 1), "the first process should compile"
    assert (hits1, misses1) == (1, 0), "the second process should load from the cache"
    assert fresh == cached


_PROJECTION_CODE = r"""
import hashlib, sys
sys.path.insert(0, {root!r})
import numpy as np
import groupsparse as gs
from groupsparse.projection import _small, _uniform

h = hashlib.sha256()
rng = np.random.default_rng(1)
for dt in (np.float64, np.float32):
    cases = [
        dict(vectors=rng.standard_normal((300, 64)).astype(dt), axis=1),  # equal length: _uniform
        dict(vectors=rng.standard_normal((2000, 9)).astype(dt), axis=1),  # short equal length
        dict(vectors=[rng.standard_normal(int(m)).astype(dt) for m in rng.integers(2, 200, 300)]),  # ragged: _small
        dict(vectors=[rng.standard_normal(int(m)).astype(dt) for m in rng.integers(2, 9, 5)]),  # a small group
    ]
    w = [rng.random(int(m)) + 0.1 for m in rng.integers(2, 100, 200)]
    cases.append(dict(vectors=[rng.standard_normal(len(v)).astype(dt) for v in w], weights=w))  # weighted: engine
    for kw in cases:
        for s in (0.5, 0.8):
            z, info = gs.project(kw["vectors"], s, return_info=True,
                                 **{{k: v for k, v in kw.items() if k != "vectors"}})
            parts = z if isinstance(z, list) else [z]
            h.update(b"".join(np.ascontiguousarray(p).tobytes() for p in parts) + np.float64(info.mu).tobytes())
fns = (_uniform._solve_ser, _small.solve_plain_small, _uniform._pass_range, _uniform._first_range)
hits = sum(sum(f.stats.cache_hits.values()) for f in fns)
misses = sum(sum(f.stats.cache_misses.values()) for f in fns)
print(h.hexdigest(), hits, misses)
"""


@pytest.mark.slow
def test_projection_fresh_compile_and_cache_load_agree(tmp_path):
    """``groupsparse.project`` (equal-length, ragged, small and weighted groups, float64 and float32): the same
    bits from a process that compiles the kernels and one that loads them from the cache. Before the fix the
    float64 equal-length path differed (``_uniform``'s compiled solve called the separately compiled reassociating
    pass; now every such kernel is inlined, see ``groupsparse/projection/_kernels.py``)."""
    (fresh, hits0, misses0), (cached, hits1, misses1) = _compile_then_load(_PROJECTION_CODE, tmp_path)
    assert hits0 == 0 and misses0 >= 2, "the first process should compile"
    assert hits1 >= 2 and misses1 == 0, "the second process should load from the cache"
    assert fresh == cached


@pytest.mark.slow
def test_threaded_projection_is_cached_and_gives_the_serial_bits(tmp_path):
    """Threaded equal-length passes are cached kernels run by Python threads (``_threads``), not ``parallel=True``
    kernels compiled in every process: a second process loads them, and every result has the serial bits."""
    (serial, _, _), _ = _compile_then_load(_PROJECTION_CODE, tmp_path / "serial")
    (fresh, hits0, misses0), (cached, hits1, misses1) = _compile_then_load(_PROJECTION_CODE, tmp_path / "t", True)
    assert misses0 >= 4 and hits1 >= 4 and misses1 == 0, (hits0, misses0, hits1, misses1)
    assert fresh == cached == serial

_NMF_FIT_CODE = r"""
import hashlib, sys
sys.path.insert(0, {root!r})
import numpy as np
from groupsparse.nmf import sparse_nmf
from groupsparse.nmf._fastproj import run_dense

rng = np.random.default_rng(0)
Wp = np.maximum(0.0, rng.standard_normal((100, 10)))
X = (Wp @ rng.random((10, 100))).T
W0, H0 = rng.random((100, 10)), rng.random((10, 100))
W, H, info = sparse_nmf(X, 10, W=W0, H=H0, sparsity_H=0.5, max_iter=100, tol=0)
h = hashlib.sha256(W.tobytes() + H.tobytes() + np.asarray(info.history).tobytes())
print(h.hexdigest(), sum(run_dense.stats.cache_hits.values()), sum(run_dense.stats.cache_misses.values()))
"""


@pytest.mark.slow
def test_compiled_nmf_loop_fresh_compile_and_cache_load_agree(tmp_path):
    """The whole compiled NMF loop (run_dense: fast gradient, pass-free solve, HALS) gives the same bits whether
    this process compiled it or loaded it from Numba's disk cache (every helper is inlined; see _fastproj's
    docstring)."""
    (fresh, hits0, misses0), (cached, hits1, misses1) = _compile_then_load(_NMF_FIT_CODE, tmp_path,
                                                                           OPENBLAS_NUM_THREADS="1")
    assert (hits0, misses0) == (0, 1), "the first process should compile"
    assert (hits1, misses1) == (1, 0), "the second process should load from the cache"
    assert fresh == cached
