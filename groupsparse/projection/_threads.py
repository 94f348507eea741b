"""Threads for compiled passes: Python threads running a serial, GIL-free, disk-cached kernel on ranges of parts.

Why not Numba's ``parallel=True``: Numba compiles a ``prange`` body as a function of its own and links a copy into
the kernel, optimized again there; under the reductions' ``reassoc`` flags the copy a process compiled and the
copy it loaded from the disk cache sum in different orders (``_kernels``), so such kernels had to be compiled in
every process: 20-45 s before the first threaded projection of each process. A serial kernel called from Python is
its own code whether compiled or loaded, so it is cached like every other kernel, and Python threads run it in
parallel (``nogil=True``). Each part writes its own row of sums and the caller reduces the rows in a fixed order,
so the result's bits never depend on the thread count. No OpenMP/TBB pool is started either: nothing here can fight
torch's threads (docs/projection.md §5).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba as nb

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = 0  # a forked child (a DataLoader worker) inherits the pool object but not its threads


def threads() -> int:
    """Threads a threaded pass uses: ``GROUPSPARSE_NUM_THREADS``, else ``NUMBA_NUM_THREADS`` (default: the CPU
    count). Read without starting Numba's own thread pool, which nothing here uses."""
    return max(1, int(os.environ.get("GROUPSPARSE_NUM_THREADS", nb.config.NUMBA_NUM_THREADS)))


def _executor(k: int) -> ThreadPoolExecutor:
    global _pool, _pool_size, _pool_pid
    with _lock:
        if _pool is None or _pool_size < k or _pool_pid != os.getpid():
            _pool, _pool_size = ThreadPoolExecutor(k, thread_name_prefix="groupsparse"), k
            _pool_pid = os.getpid()
        return _pool


def _ranges(call, n: int) -> None:
    """call(b0, b1) over contiguous ranges of range(n), one per thread; the calling thread takes the first."""
    k = max(1, min(threads(), n))
    bounds = [n * i // k for i in range(k + 1)]
    futures = [_executor(k - 1).submit(call, b0, b1) for b0, b1 in zip(bounds[1:-1], bounds[2:])] if k > 1 else []
    call(0, bounds[1])
    for f in futures:
        f.result()


def run_parts(kernel, args, part) -> None:
    """``kernel(*args, part[p0:p1], p0)`` over ranges of the rows of ``part``: ``kernel`` is a ``nogil`` Numba
    function writing row p of its slice for global part ``p0 + p``."""
    _ranges(lambda b0, b1: kernel(*args, part[b0:b1], b0), part.shape[0])


def run_chunks(kernel, args, per_chunk) -> None:
    """``kernel(*args)`` over ranges of chunks: the arguments at positions ``per_chunk`` (one entry or row per
    chunk) are sliced to the range, the others (the data, per-vector arrays, the output) passed whole."""
    def call(b0, b1):
        kernel(*(a[b0:b1] if i in per_chunk else a for i, a in enumerate(args)))
    _ranges(call, args[per_chunk[0]].shape[0])
