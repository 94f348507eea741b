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

import itertools
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


_BLOCKS_PER_THREAD = 8  # claims per thread and pass: a claim costs ~1-2 us (a part: ~20 us of work)


class _Claims:
    """Blocks 0 .. m - 1 handed out one at a time (``next`` on a count is atomic under the GIL), and how many are
    done. The caller waits only for blocks some thread has claimed: a pool thread that starts after the caller
    took the last block (its core busy with another process) finds none and never holds the pass up."""

    def __init__(self, m: int):
        self.m, self.next, self.done, self.error = m, itertools.count().__next__, 0, None
        self.cond = threading.Condition()

    def work(self, call, bounds) -> None:
        while (i := self.next()) < self.m:
            try:
                call(bounds[i], bounds[i + 1])
            except BaseException as e:  # (re-raised by the caller)
                self.error = e
            finally:
                with self.cond:
                    self.done += 1
                    if self.done == self.m:
                        self.cond.notify_all()

    def wait(self) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.done == self.m)
        if self.error is not None:
            raise self.error


def _ranges(call, n: int) -> None:
    """call(b0, b1) over blocks of range(n), claimed by the calling thread and the pool's threads as each is free.
    Static ranges (one per thread) made every pass wait for its slowest thread: on a 2-core machine with another
    process busy, the pool thread's range waited for a time slice and a threaded ResNet-50 took 2.5x the serial
    time. Each block writes only its own rows, so the result's bits never depend on which thread ran it."""
    k = max(1, min(threads(), n))
    if k == 1:
        call(0, n)
        return
    m = min(n, _BLOCKS_PER_THREAD * k)
    bounds = [n * i // m for i in range(m + 1)]
    claims = _Claims(m)
    pool = _executor(k - 1)
    for _ in range(k - 1):
        pool.submit(claims.work, call, bounds)
    claims.work(call, bounds)
    claims.wait()


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
