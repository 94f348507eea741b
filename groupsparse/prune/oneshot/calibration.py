"""Calibration text: read documents from .txt/.jsonl/.jsonl.xz files and cut them into token sequences.

Readers fail with one clear line (``ValueError``) on a missing file, an unknown suffix, a bad JSON line or a file
with no text, because these are the errors a user of ``prune-lm`` actually makes.
"""

from __future__ import annotations

import json
import lzma
import os
from pathlib import Path

import torch

SUFFIXES = (".txt", ".jsonl", ".jsonl.xz")


def read_texts(path, *, split: str | None = None, field: str = "text") -> list[str]:
    """Documents of a ``.txt`` file (one document) or a ``.jsonl``/``.jsonl.xz`` file (one object per line).

    ``split`` keeps only the JSON objects whose ``"split"`` equals it (the shared python-docs corpus has fixed
    train/validation/test splits); it is a ``ValueError`` for ``.txt`` files, which have none.
    """
    p = Path(os.fspath(path))
    name = p.name.lower()
    if not any(name.endswith(s) for s in SUFFIXES):
        raise ValueError(f"calibration file {str(p)!r}: got suffix {''.join(p.suffixes) or 'none'!r}, expected one of {SUFFIXES}")
    if not p.is_file():
        raise ValueError(f"calibration file {str(p)!r} does not exist or is not a file")
    if name.endswith(".txt"):
        if split is not None:
            raise ValueError(f"got split={split!r} for a .txt calibration file, expected None (plain text has no splits)")
        text = p.read_text(encoding="utf-8", errors="replace")
        docs = [text] if text.strip() else []
    else:
        opener = lzma.open if name.endswith(".xz") else open
        docs = []
        try:
            with opener(p, "rt", encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"calibration file {str(p)!r} line {lineno}: not JSON ({e.msg})") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                        raise ValueError(f"calibration file {str(p)!r} line {lineno}: got {type(obj).__name__} "
                                         f"without a string {field!r}, expected a JSON object with a {field!r} field")
                    if split is None or obj.get("split") == split:
                        docs.append(obj[field])
        except (lzma.LZMAError, EOFError, UnicodeDecodeError) as e:
            raise ValueError(f"calibration file {str(p)!r}: cannot decode ({e})") from None
    if not docs:
        what = f" with split {split!r}" if split is not None else ""
        raise ValueError(f"calibration file {str(p)!r}: got no text{what}, expected at least one non-empty document")
    return docs


def token_stream(docs, encode, eos_id: int | None) -> torch.Tensor:
    """Concatenate the token ids of ``docs`` (``encode(str) -> list[int]``), an ``eos_id`` after each document."""
    ids: list[int] = []
    for d in docs:
        ids.extend(encode(d))
        if eos_id is not None:
            ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(stream: torch.Tensor, n: int, length: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``length`` tokens at random offsets of ``stream`` (a fixed seed makes them reproducible)."""
    if stream.numel() <= length:
        raise ValueError(f"got {stream.numel()} calibration tokens, expected more than the sequence length {length}")
    if n < 1:
        raise ValueError(f"got n={n} calibration sequences, expected >= 1")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - length, (n,), generator=g)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def chunk_windows(stream: torch.Tensor, length: int) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``length`` tokens (the tail shorter than ``length`` is dropped)."""
    n = stream.numel() // length
    if n == 0:
        raise ValueError(f"got {stream.numel()} tokens, expected at least one window of {length}")
    return stream[: n * length].view(n, length)
