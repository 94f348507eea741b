"""Array files in and out: .npy, .npz, .safetensors (and torch .pt state_dicts), always written atomically."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

ARRAY_SUFFIXES = (".npy", ".npz", ".safetensors")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` (readers never see a half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file owner-only; give it the permissions a plain open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_distinct(inp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Refuse to write over the input file."""
    a, b = Path(inp), Path(out)
    if a.resolve() == b.resolve():
        raise ValueError(f"--out: got the input file {str(a)!r}, expected a different path (inputs are never overwritten)")


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every array of a .npy (key ``"array"``), .npz or .safetensors file as NumPy arrays."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input: got {str(path)!r}, which does not exist; expected a {'/'.join(ARRAY_SUFFIXES)} file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return {"array": np.load(path, allow_pickle=False)}
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    raise ValueError(f"input: got {str(path)!r}, expected a file ending in {', '.join(ARRAY_SUFFIXES)}")


def save_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays in the format named by ``path``'s suffix, atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in ARRAY_SUFFIXES:
        raise ValueError(f"--out: got {str(path)!r}, expected a file ending in {', '.join(ARRAY_SUFFIXES)}")
    if suffix == ".npy" and len(arrays) != 1:
        raise ValueError(f"--out: got a .npy path for {len(arrays)} arrays, expected .npz or .safetensors")
    with atomic_path(path) as tmp:
        if suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, next(iter(arrays.values())))
        elif suffix == ".npz":
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        else:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
