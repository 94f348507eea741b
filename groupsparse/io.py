"""Files in and out: the output-path guard, atomic writes, and .npy/.npz/.safetensors array files.

Every command routes its writes through :func:`check_paths` (no output may be an input or another output,
whatever symlinks or hard links say) and :func:`atomic_path` (temp file beside the target, fsync, rename).
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import socket
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

ARRAY_SUFFIXES = (".npy", ".npz", ".safetensors")

# Temp files are named ".<target name>.groupsparse-tmp-<host>-<pid>-<n><suffix>" (the suffix keeps writers that
# pick a format from the name working; "-old" marks an output folder being replaced). A run killed mid-write leaves
# one behind; the next write into that folder removes those of this host whose process is gone. The host: a
# process id means nothing on another machine sharing the folder (NFS), whose live run's temp must stay; the end
# of the name is matched exactly, so a user's ".x.groupsparse-tmp-...-rescued" copy is not ours.
TMP_MARK = ".groupsparse-tmp-"
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"
_TMP_RE = re.compile(r"^\..+\.groupsparse-tmp-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-\d+(?:-old|\.[A-Za-z0-9_]+)?$")
_counter = itertools.count()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else, or cannot tell: keep its file
    return True


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files that killed groupsparse writers left in ``folder``; returns the removed paths."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TMP_RE.match(e.name)
        if m and m["host"] == _HOST and not _pid_alive(int(m["pid"])):
            try:
                if e.is_dir(follow_symlinks=False):  # (a folder of ``atomic_folder``)
                    shutil.rmtree(e.path)
                else:
                    os.unlink(e.path)
                removed.append(Path(e.path))
            except OSError:
                pass  # another run removed it first, or no permission: not ours to fight over
    return removed


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return  # some file systems cannot open folders; the rename is still atomic
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _make_folder(path: Path) -> None:
    """``path.parent`` made if missing; a file where a folder should be is named (mkdir says only "File exists"),
    and any failure names ``path``, as the rest of a write's errors do."""
    for up in (path.parent, *path.parent.parents):
        if os.path.lexists(up):
            if not up.is_dir():
                what = "a broken symbolic link" if up.is_symlink() else "a file"
                raise OSError(errno.ENOTDIR, f"cannot write {str(path)!r}: {str(up)!r} is {what}, not a folder")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {str(path)!r}: {e.strerror or e}") from e


def _temp_name(path: Path, suffix: str = "") -> Path:
    """A fresh temp name beside ``path`` that ``clean_stale_temps`` knows (``TMP_MARK``, this process's id)."""
    tail = f"{TMP_MARK}{_HOST}-{os.getpid()}-{next(_counter)}{suffix}"
    head = path.name
    while len(os.fsencode(f".{head}{tail}")) > 255 and len(head) > 1:  # NAME_MAX: a long target name still fits
        head = head[: max(1, len(head) - 16)]
    return path.parent / f".{head}{tail}"


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it takes the place of ``path`` (a folder there is
    first renamed aside, then removed: the old output is on disk until the new one is in place). On failure,
    or a kill (the next write into that folder removes the leftovers of dead processes), the temp folder goes."""
    path = Path(path)
    if path.is_symlink():  # (the folder it names is the output: replaced where it is, the link kept)
        path = Path(os.path.realpath(path))
    _make_folder(path)
    clean_stale_temps(path.parent)
    tmp = _temp_name(path)
    old = None
    try:
        tmp.mkdir()
        yield tmp
        if os.path.lexists(path):
            old = _temp_name(path, "-old")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.lexists(path):  # the new one never took its place: the old one back
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike, *, writer_errors: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``, so readers
    never see a half file. On failure the temp file is removed; an ``OSError`` names ``path``.

    ``writer_errors=True``: any other exception of the writer in the block (torch's "unexpected pos" or
    safetensors' I/O errors on a full disk) also becomes an ``OSError`` naming ``path``."""
    path = Path(path)
    what = _not_a_file(path)
    if what:  # the rename below would replace a device node or a pipe, or fail on a folder
        raise ValueError(f"cannot write {str(path)!r}: it is {what}; expected a regular file path")
    folder = path.parent
    tmp = _temp_name(path, path.suffix)
    _make_folder(path)
    try:
        clean_stale_temps(folder)
        # O_EXCL: never reuse a file; mode 0o666 lets the umask decide, as a plain open() would
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        try:  # the mode of the file replaced, else the umask's: what a plain open() would leave
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            mode = stat.S_IMODE(os.stat(tmp).st_mode)
        yield tmp
        # some writers replace the file they are given (safetensors leaves it 0600, unreadable to the group)
        os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(folder, directory=True)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno is not None:
            # the temp name means nothing to the user: report the file they asked for
            raise OSError(e.errno, f"cannot write {str(path)!r}: {e.strerror or e}") from e
        if writer_errors and isinstance(e, Exception) and not isinstance(e, (ValueError, TypeError)):
            detail = " ".join(str(e).split()) or type(e).__name__
            raise OSError(errno.EIO, f"cannot write {str(path)!r}: {detail} (is the disk full?)") from e
        raise


def _as_written(path: str | os.PathLike) -> str:
    """The name a write will use: its folder resolved (symlinks, ``..``), its last component kept. A write first
    makes missing folders, so ``missing/../a`` is ``a``; the OS alone cannot open it yet (``missing`` does not
    exist), and comparing it unresolved let an output through a missing folder replace an input."""
    full = os.path.join(os.getcwd(), os.fspath(path))  # (not abspath: ``link/..`` is the link target's parent)
    head, tail = os.path.split(full)
    if tail in ("", ".", ".."):
        return os.path.realpath(full)
    return os.path.join(os.path.realpath(head), tail)


def _identity(path: str | os.PathLike) -> tuple:
    """Same value for two names of one file: (device, inode) when it exists, else the resolved path."""
    path = _as_written(path)
    try:
        st = os.stat(path)  # follows symlinks; hard links share the inode
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.normcase(os.path.realpath(path)))


def _not_a_file(path: str | os.PathLike, folder_ok: bool = False) -> str | None:
    """What ``path`` is when it exists as something other than a regular file or a symlink (which an atomic
    write replaces, leaving its target alone), or a folder when ``folder_ok``; else None."""
    try:
        mode = os.lstat(_as_written(path)).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode) or (folder_ok and stat.S_ISDIR(mode)):
        return None
    return {stat.S_IFDIR: "a folder", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
            stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket"}.get(stat.S_IFMT(mode), "not a regular file")


def check_paths(reads: Mapping[str, Any], writes: Mapping[str, Any]) -> None:
    """Refuse a write path that names an input or another output, a folder that holds an input (``--out`` of
    ``nmf``/``prune`` over the folder of ``--data``), or that exists as a device, pipe or socket (a rename over
    /dev/full would replace the device node itself); ``None`` entries are ignored. Outputs may be folders
    (``nmf --out``): a folder given for a file is refused by click or by :func:`atomic_path`.

    ``reads``/``writes`` map what the user calls the path (``"IN"``, ``"--weights"``, ``"--out"``) to the path;
    symlinks and hard links are resolved, so ``-o`` through a link to IN is caught too. Raises ``ValueError``.
    """
    seen_reads = [(label, p, _identity(p)) for label, p in reads.items() if p is not None]
    seen_writes: list[tuple[str, Any, tuple]] = []
    for label, p in writes.items():
        if p is None:
            continue
        what = _not_a_file(p, folder_ok=True)
        if what:
            raise ValueError(f"{label}: got {str(p)!r}, which is {what}; expected a path of a regular file or folder")
        ident = _identity(p)
        for rlabel, rp, rid in seen_reads:
            if ident == rid:
                raise ValueError(f"{label}: got {str(p)!r}, the same file as {rlabel} {str(rp)!r}; expected a "
                                 "different path (inputs are never overwritten)")
            if Path(os.path.realpath(p)) in Path(os.path.realpath(rp)).parents:
                raise ValueError(f"{label}: got {str(p)!r}, which holds {rlabel} {str(rp)!r}; expected a folder "
                                 "that does not")
        for wlabel, wp, wid in seen_writes:
            if ident == wid:
                raise ValueError(f"{label}: got {str(p)!r}, the same file as {wlabel} {str(wp)!r}; expected a "
                                 "different path for each output")
        seen_writes.append((label, p, ident))


def check_distinct(inp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Refuse to write over the input file (see :func:`check_paths`)."""
    check_paths({"the input": inp}, {"--out": out})


def check_suffix(path: str | os.PathLike, suffixes: tuple[str, ...], what: str = "--out") -> str:
    """The lower-case suffix of ``path``; ``ValueError`` unless it is one of ``suffixes``."""
    s = Path(path).suffix.lower()
    if s not in suffixes:
        raise ValueError(f"{what}: got {str(path)!r}, expected a file ending in {', '.join(suffixes)}")
    return s


def _read_safetensors(path: Path) -> dict[str, Any]:
    # the torch API reads every dtype (bfloat16, float8 too) and copies each tensor once out of a mapped file
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            try:
                out[k] = t.numpy()  # shares memory; NumPy has no bfloat16, those stay tensors
            except TypeError:
                out[k] = t
    return out


def load_arrays(path: str | os.PathLike, what: str = "input") -> dict[str, Any]:
    """Read every array of a .npy (key ``"array"``), .npz or .safetensors file.

    Arrays come back as NumPy arrays, except dtypes NumPy lacks (``bfloat16``...), which stay torch tensors.
    A file that cannot be parsed is a ``ValueError`` naming it (and ``what`` the user calls it: ``"--weights"``);
    a missing or unreadable one an ``OSError``.
    """
    path = Path(path)
    suffix = check_suffix(path, ARRAY_SUFFIXES, what)
    if not path.is_file():
        if path.exists():  # a pipe or device: reading it could block or never end
            raise ValueError(f"{what}: got {str(path)!r}, which is {_not_a_file(path) or 'not a regular file'}; "
                             "expected a regular file")
        raise FileNotFoundError(2, f"{what}: no such file, expected a {'/'.join(ARRAY_SUFFIXES)} file", str(path))
    try:
        if suffix == ".safetensors":
            return _read_safetensors(path)
        import numpy as np

        if suffix == ".npy":
            return {"array": np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except OSError as e:
        if e.errno is not None:
            raise  # permission, I/O error: the OSError already names the file
        raise ValueError(f"{what}: cannot read {str(path)!r} as {suffix} ({e})") from e
    except Exception as e:  # noqa: BLE001 - parsers raise anything from ValueError to SafetensorError
        detail = "it declares an array larger than memory" if isinstance(e, MemoryError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{what}: cannot read {str(path)!r} as {suffix} (truncated or not a {suffix} file? "
                         f"{detail})") from e
    for k, v in out.items():
        if not isinstance(v, np.ndarray):  # np.load gives the raw bytes of a member that is not a .npy
            raise ValueError(f"{what}: {str(path)!r} holds the member {k!r}, which is not a .npy array; expected "
                             "an .npz of arrays only")
    return out


def _c_contiguous(v):
    # np.ascontiguousarray would turn a 0-d array into shape (1,); safetensors is little-endian only
    if not v.dtype.isnative:
        v = v.astype(v.dtype.newbyteorder("="))
    return v if v.flags.c_contiguous else v.copy(order="C")


# NumPy dtypes a .safetensors file holds (safetensors.numpy's table); bfloat16/float8 arrive as torch tensors
_SAFETENSORS_NUMPY = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16",
                      "float32", "float64", "complex64")


def check_safetensors_names(arrays, path: str | os.PathLike, source: str = "IN") -> None:
    """``ValueError`` for an entry a .safetensors ``path`` cannot hold, checked before long work: the name
    ``__metadata__``, reserved in its JSON header (a tensor of that name made an unreadable file), or a NumPy
    dtype it lacks (strings, dates, records, complex128)."""
    if Path(path).suffix.lower() != ".safetensors":
        return
    if "__metadata__" in arrays:
        raise ValueError(f"--out: got {str(path)!r}, but {source} has an entry named '__metadata__', a name that "
                         ".safetensors reserves; expected a .pt/.npz output or another name")
    torch_types = None
    for k, v in arrays.items() if isinstance(arrays, Mapping) else ():
        if type(v).__module__ == "numpy":
            ok, other = v.dtype.newbyteorder("=").name in _SAFETENSORS_NUMPY, ".npz"
        elif type(v).__module__.startswith("torch") and hasattr(v, "dtype"):
            if torch_types is None:
                from safetensors.torch import _TYPES  # the dtypes its torch writer knows

                torch_types = set(_TYPES.values())
            ok, other = v.dtype in torch_types and not v.is_quantized, ".pt"
        else:
            continue  # not an array: the writer's own check names it
        if not ok:
            raise ValueError(f"--out: got {str(path)!r}, but {k!r} of {source} has dtype "
                             f"{str(v.dtype).replace('torch.', '')}, which .safetensors cannot hold; expected a "
                             f"{other} output")


def _write_npz(path: Path, arrays: Mapping[str, Any]) -> None:
    """np.savez's format, written by hand: np.savez(f, **arrays) fails on arrays named 'file' or 'allow_pickle'."""
    import zipfile

    import numpy as np

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for k, v in arrays.items():
            with z.open(k + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(v), allow_pickle=False)


def check_arrays_fit(path: str | os.PathLike, arrays: Mapping[str, Any], source: str = "the data") -> list[str]:
    """``ValueError`` unless the format named by ``path`` holds ``arrays``: its suffix, one array for .npy,
    :func:`check_safetensors_names`, and dtypes NumPy lacks (torch tensors) for .safetensors only. Called by
    :func:`save_arrays`; call it before long work. Returns the keys of the entries that are not NumPy arrays."""
    import numpy as np

    suffix = check_suffix(path, ARRAY_SUFFIXES)
    if suffix == ".npy" and len(arrays) != 1:
        raise ValueError(f"--out: got a .npy path for the {len(arrays)} arrays of {source}, expected .npz or "
                         ".safetensors")
    check_safetensors_names(arrays, path, source)
    tensors = [k for k, v in arrays.items() if not isinstance(v, np.ndarray)]
    if tensors and suffix != ".safetensors":
        raise ValueError(f"--out: got {str(path)!r}, but {tensors[0]!r} of {source} has dtype "
                         f"{arrays[tensors[0]].dtype}, which {suffix} cannot hold; expected a .safetensors output")
    return tensors


def save_arrays(path: str | os.PathLike, arrays: Mapping[str, Any]) -> None:
    """Write arrays (NumPy, or torch tensors for dtypes NumPy lacks) in the format named by ``path``'s suffix,
    atomically. Check them with :func:`check_arrays_fit` before long work: this raises the same errors."""
    import numpy as np

    path = Path(path)
    suffix = path.suffix.lower()
    tensors = check_arrays_fit(path, arrays)
    with atomic_path(path, writer_errors=True) as tmp:
        if suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, next(iter(arrays.values())))
        elif suffix == ".npz":
            _write_npz(tmp, arrays)
        elif tensors:
            import torch
            from safetensors.torch import save_file

            save_file({k: v.contiguous() if isinstance(v, torch.Tensor) else torch.from_numpy(_c_contiguous(v))
                       for k, v in arrays.items()}, str(tmp))
        else:
            from safetensors.numpy import save_file

            save_file({k: _c_contiguous(v) for k, v in arrays.items()}, str(tmp))
