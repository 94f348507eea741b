"""Every file the experiment runner writes goes through :func:`atomic_write`, and every run folder carries a
manifest of the settings that produced it.

One write function makes the crash guarantees testable: the kill-at-every-write test patches it to stop after
the n-th write and checks that a resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..io import atomic_path, clean_stale_temps

MANIFEST = "manifest.json"


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None], *, folder: bool = False) -> None:
    """Run ``writer(tmp)`` on a temporary path beside ``path``, then rename it into place.

    A file goes through :func:`groupsparse.io.atomic_path` (fsync, rename, a named ``OSError`` on failure).
    ``folder=True``: ``writer`` creates a directory at ``tmp``, which replaces an older one of the same name (the
    old one is removed first, so a reader sees either the old or the new complete directory, never a mix).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not folder:
        with atomic_path(path, writer_errors=True) as tmp:
            writer(tmp)
        return
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmpdir", dir=path.parent))
    tmp = tmpdir / path.name
    try:
        writer(tmp)
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)  # same folder, same file system: atomic
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; a broken file is a one-line ValueError naming it."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: got an unreadable JSON file ({type(e).__name__}: {e}), expected a file written "
                         "by groupsparse; delete it or the folder to start over") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: got a JSON {type(obj).__name__}, expected an object")
    return obj


def clean_temporaries(folder: Path) -> None:
    """Remove what a killed writer left behind (``.<name>.*.tmpdir`` folders and ``.<name>.*.tmp*`` files)."""
    if not folder.is_dir():
        return
    clean_stale_temps(folder)
    for p in folder.iterdir():
        if p.name.startswith(".") and (p.name.endswith(".tmpdir") or ".tmp" in p.name):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def claim_folder(folder: Path, settings: dict, *, overwrite: bool = False, what: str = "--out") -> bool:
    """Make ``folder`` the home of a run with ``settings``; returns whether it already held this run.

    A folder holding another run (different settings) is refused with a one-line error naming the differences,
    or emptied first with ``overwrite=True``. A non-empty folder without a manifest is refused too, whatever
    ``overwrite`` says: it is not ours to fill or to empty.
    """
    folder = Path(folder)
    mf = folder / MANIFEST
    if mf.exists():
        old = read_json(mf).get("settings")
        if old == settings and not overwrite:
            clean_temporaries(folder)
            return True
        if not overwrite:
            diff = _diff(old if isinstance(old, dict) else {}, settings)
            raise ValueError(f"{what}: {folder} holds a run with other settings ({diff}); expected the same "
                             "settings to resume; use another folder or --overwrite to replace it")
    elif folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{what}: {folder} is not empty and holds no {MANIFEST}, expected a new folder or a run "
                         "folder of this command; use another folder (--overwrite only replaces run folders)")
    if overwrite and folder.exists():
        for p in folder.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    write_json(mf, {"settings": settings})
    return False


def _diff(old: dict, new: dict, limit: int = 4) -> str:
    keys = sorted(set(old) | set(new))
    parts = [f"{k}: {old.get(k, '-')!r} there, {new.get(k, '-')!r} now" for k in keys if old.get(k) != new.get(k)]
    more = f", and {len(parts) - limit} more" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more
