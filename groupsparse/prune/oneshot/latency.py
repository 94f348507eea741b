"""2:4 semi-structured latency on CUDA (``torch.sparse.to_sparse_semi_structured``); skipped cleanly elsewhere."""

from __future__ import annotations

import torch
from torch import nn


def semi_structured_latency(linear: nn.Linear, tokens: int = 2048, repeats: int = 50) -> dict:
    """Dense vs 2:4 sparse matmul time of one pruned Linear (fp16) on CUDA, or ``{"skipped": reason}``."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    try:
        from torch.sparse import to_sparse_semi_structured
    except ImportError:
        return {"skipped": "torch lacks to_sparse_semi_structured"}
    w = linear.weight.detach().to("cuda", torch.float16)
    x = torch.randn(tokens, w.shape[1], device="cuda", dtype=torch.float16)
    try:
        ws = to_sparse_semi_structured(w)
    except Exception as e:  # unsupported GPU or shape: report why instead of failing the prune
        return {"skipped": f"{type(e).__name__}: {e}"}

    def timed(f):
        for _ in range(5):
            f()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            f()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats

    dense = timed(lambda: torch.nn.functional.linear(x, w))
    sparse = timed(lambda: torch.nn.functional.linear(x, ws))
    return {"dense_ms": dense, "sparse_ms": sparse, "speedup": dense / sparse, "shape": list(w.shape)}
