"""Datasets for the pruning experiments, held as tensors and batched with tensor ops (no DataLoader).

``digits``: scikit-learn's bundled 8x8 digits (1797 images), a fixed stratified split of 1437 train / 360 test;
of the 1437, a fixed stratified 287 are the validation split (1150 train).
``cifar10``: read from a path the user gives (a fixed 5,000 of the 50,000 training images are the validation
split, 45,000 train), in any of these forms:

- the standard ``cifar-10-batches-py`` directory (``data_batch_1..5``, ``test_batch``) or its tarball
  ``cifar-10-python.tar.gz``;
- an image-folder tree ``[cifar10/]{train,test}/<class>/<image>`` (any format Pillow reads), or a zip of it;
- a decoded cache ``.npz`` with uint8 ``x_train``/``x_test`` (N, 32, 32, 3) and ``y_train``/``y_test``.

Image trees are decoded once into a uint8 cache under ``cache_dir`` (never the repository) keyed by the source's
path, size and modification time.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

DATASETS = ("digits", "cifar10")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
# Per-channel statistics of the CIFAR-10 training set (the values every CIFAR recipe uses); fixed rather than
# recomputed so subsets and the JPEG copy normalize the same way.
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)


def default_cache_dir() -> Path:
    """``$GROUPSPARSE_CACHE``, else ``$XDG_CACHE_HOME/groupsparse``, else ``~/.cache/groupsparse``."""
    env = os.environ.get("GROUPSPARSE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "groupsparse"


@dataclass
class Dataset:
    """Train/validation/test tensors plus what a model needs to know (input shape, classes) and how to batch them.

    The validation split is a fixed part of the training data, for choosing hyperparameters (never the test set).

    Images are kept as uint8 NHWC (4x smaller than float, and NHWC permuted to NCHW is exactly the
    channels_last layout); flat data (digits) as normalized float32.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split: got {name!r}, expected 'train', 'val' or 'test'")
        x, y = getattr(self, f"x_{name}"), getattr(self, f"y_{name}")
        if x is None:
            raise ValueError(f"split: got 'val', but {self.name} has no validation split")
        return x, y

    def fingerprint(self) -> str:
        """sha256 of every split's bytes (the data identity stored in run manifests)."""
        h = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test):
            if t is not None:
                h.update(str((t.dtype, tuple(t.shape))).encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def is_image(self) -> bool:
        return self.x_train.dtype == torch.uint8

    def to(self, device) -> "Dataset":
        d = torch.device(device)
        mv = lambda t: None if t is None else t.to(d)  # noqa: E731
        return Dataset(self.name, mv(self.x_train), mv(self.y_train), mv(self.x_test), mv(self.y_test),
                       self.num_classes, self.input_shape, mv(self.mean), mv(self.std), mv(self.x_val), mv(self.y_val))

    def _prepare(self, x: torch.Tensor, augment: bool, generator: torch.Generator | None) -> torch.Tensor:
        if not self.is_image:
            return x
        if augment:
            x = random_crop_flip(x, padding=4, generator=generator)
        x = (x.float().div_(255) - self.mean) / self.std
        return x.permute(0, 3, 1, 2)  # NCHW view with channels_last strides

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size!r}, expected a positive int")
        x, y = self.split(split)
        n = len(y)
        if shuffle:
            # The permutation is drawn on the CPU so a seeded generator gives the same order on every device.
            order = torch.randperm(n, generator=generator).to(x.device)
        else:
            order = None
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size] if order is not None else slice(i, i + batch_size)
            yield self._prepare(x[idx], augment, generator), y[idx]

    def num_batches(self, split: str, batch_size: int) -> int:
        return -(-len(self.split(split)[1]) // batch_size)


def random_crop_flip(x: torch.Tensor, *, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard CIFAR augmentation on a uint8 NHWC batch: zero-pad, random crop back to size, random h-flip.

    Done with one gather for the whole batch; the random draws come from ``generator`` on the CPU so that runs
    are reproducible across devices.
    """
    b, h, w, c = x.shape
    xp = torch.nn.functional.pad(x, (0, 0, padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    cols = ox[:, None] + ar_w[None, :]
    cols = torch.where(flip[:, None], ox[:, None] + (w - 1 - ar_w)[None, :], cols)
    rows = oy[:, None] + ar_h[None, :]
    bi = torch.arange(b, device=x.device)[:, None, None]
    return xp[bi, rows[:, :, None], cols[:, None, :]]


def load_dataset(name: str, path: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
                 train_subset: int | None = None) -> Dataset:
    """Load ``digits`` or ``cifar10`` (``path`` required for cifar10; see the module docstring for the forms)."""
    if name not in DATASETS:
        raise ValueError(f"dataset: got {name!r}, expected one of {DATASETS}")
    if train_subset is not None and (isinstance(train_subset, bool) or not isinstance(train_subset, int)
                                     or train_subset < 1):
        raise ValueError(f"train_subset: got {train_subset!r}, expected a positive int or None")
    if name == "digits":
        ds = _digits()
    else:
        if path is None:
            raise ValueError("cifar10: got no data path, expected --data pointing at the cifar-10-batches-py "
                             "directory, cifar-10-python.tar.gz, an image-folder tree or zip with "
                             "{train,test}/<class>/*.jpg, or a decoded .npz (nothing is downloaded)")
        ds = _cifar10(Path(path), Path(cache_dir) if cache_dir else default_cache_dir())
        _hold_out(ds, 5000)
    if train_subset is not None and train_subset > len(ds.y_train):
        # (taking all of them in silence would cache the same model under a second run key)
        raise ValueError(f"train_subset: got {train_subset}, expected at most {len(ds.y_train)} (the training "
                         f"images of {name} after the validation hold-out)")
    if train_subset is not None and train_subset < len(ds.y_train):
        # A fixed permutation (independent of the run's seed) so every run of a sweep sees the same subset.
        keep = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(1234))[:train_subset]
        keep = keep.sort().values
        ds.x_train, ds.y_train = ds.x_train[keep], ds.y_train[keep]
    return ds


def _hold_out(ds: Dataset, n: int) -> None:
    """Move a fixed (seed-independent) ``n`` training examples into the validation split."""
    n = min(n, max(1, len(ds.y_train) // 10))  # tiny test files keep most of their images for training
    order = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(4321))
    val, train = order[:n].sort().values, order[n:].sort().values
    ds.x_val, ds.y_val = ds.x_train[val], ds.y_train[val]
    ds.x_train, ds.y_train = ds.x_train[train], ds.y_train[train]


def _digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=360, stratify=y, random_state=0)
    # The validation part is cut from the same train split as before, so the test set is unchanged.
    xtr, xva, ytr, yva = train_test_split(xtr, ytr, test_size=287, stratify=ytr, random_state=0)
    mean = xtr.mean(0)
    std = xtr.std(0)
    std[std < 1e-6] = 1.0  # constant border pixels: leave them at 0 instead of dividing by 0
    f = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))  # noqa: E731
    return Dataset("digits", f(xtr), torch.from_numpy(ytr).long(), f(xte), torch.from_numpy(yte).long(), 10, (64,),
                   x_val=f(xva), y_val=torch.from_numpy(yva).long())


def _cifar_dataset(arrays: dict[str, np.ndarray]) -> Dataset:
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    return Dataset("cifar10", t["x_train"], t["y_train"].long(), t["x_test"], t["y_test"].long(), 10, (3, 32, 32),
                   torch.tensor(_CIFAR_MEAN), torch.tensor(_CIFAR_STD))


def _check_arrays(arrays: dict[str, np.ndarray], source: Path) -> dict[str, np.ndarray]:
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(y) != len(x):
            raise ValueError(f"{source}: got x_{split} {x.dtype} {x.shape} with {len(y)} labels, expected uint8 "
                             "(N, 32, 32, 3) and N labels")
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"{source}: got labels in [{y.min()}, {y.max()}], expected 0..9")
    return arrays


def _cifar10(path: Path, cache_dir: Path) -> Dataset:
    if not path.exists():
        raise FileNotFoundError(
            f"cifar10: got --data {str(path)!r}, which does not exist; expected the cifar-10-batches-py directory "
            "(data_batch_1..5 + test_batch), cifar-10-python.tar.gz, an image-folder tree or zip with "
            "[cifar10/]{train,test}/<class>/*.jpg, or a decoded .npz. Nothing is downloaded: put one of these there.")
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as z:
            return _cifar_dataset(_check_arrays({k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}, path))
    if path.is_dir() and _pickle_dir(path) is not None:
        return _cifar_dataset(_check_arrays(_read_pickle_dir(_pickle_dir(path)), path))
    if path.is_file() and tarfile.is_tarfile(path):
        return _cifar_dataset(_check_arrays(_read_pickle_tar(path), path))
    # Image trees are slow to decode (60k JPEGs): decode once into the cache.
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = cache_dir / f"cifar10-{key}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return _cifar_dataset({k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")})
    if path.is_file() and zipfile.is_zipfile(path):
        arrays = _read_image_zip(path)
    elif path.is_dir():
        arrays = _read_image_dir(path)
    else:
        raise ValueError(f"cifar10: got {str(path)!r}, expected a cifar-10-batches-py directory or tarball, an "
                         "image-folder tree or zip, or a .npz")
    _check_arrays(arrays, path)
    from ..io import atomic_path

    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return _cifar_dataset(arrays)


class _SafeUnpickler(pickle.Unpickler):
    """The CIFAR pickles only need dicts, lists and NumPy arrays: refuse any other global, so a hostile file
    cannot run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR pickle: got global {module}.{name}, expected only NumPy arrays")


def _unpickle_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    d = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    if not isinstance(d, dict) or b"data" not in d or not (b"labels" in d or b"fine_labels" in d):
        raise ValueError(f"{where}: got {type(d).__name__} without b'data'/b'labels', expected a CIFAR-10 batch dict")
    x = np.asarray(d[b"data"], dtype=np.uint8)
    if x.ndim != 2 or x.shape[1] != 3072:
        raise ValueError(f"{where}: got data of shape {x.shape}, expected (N, 3072)")
    y = np.asarray(d[b"labels"], dtype=np.int64)
    # Rows hold the R, G and B planes one after another (CHW): reorder to NHWC like the image readers.
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y


def _pickle_dir(path: Path) -> Path | None:
    for cand in (path, path / "cifar-10-batches-py"):
        if (cand / "data_batch_1").is_file() and (cand / "test_batch").is_file():
            return cand
    return None


def _concat(parts, where) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        raise ValueError(f"{where}: got no batches, expected data_batch_* files")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read_pickle_dir(d: Path) -> dict[str, np.ndarray]:
    train = [_unpickle_batch(f.read_bytes(), str(f)) for f in sorted(d.glob("data_batch_*"))]
    xtr, ytr = _concat(train, d)
    xte, yte = _unpickle_batch((d / "test_batch").read_bytes(), str(d / "test_batch"))
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


def _read_pickle_tar(path: Path) -> dict[str, np.ndarray]:
    train, test = [], None
    with tarfile.open(path) as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            base = m.name.rsplit("/", 1)[-1]
            if not m.isfile() or not (base.startswith("data_batch_") or base == "test_batch"):
                continue
            batch = _unpickle_batch(tf.extractfile(m).read(), f"{path}:{m.name}")
            if base == "test_batch":
                test = batch
            else:
                train.append(batch)
    if test is None:
        raise ValueError(f"{path}: got a tarball without test_batch, expected cifar-10-python.tar.gz")
    xtr, ytr = _concat(train, path)
    return {"x_train": xtr, "y_train": ytr, "x_test": test[0], "y_test": test[1]}


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _split_entries(names: list[str], where) -> dict[str, list[tuple[str, int]]]:
    """Map ``[prefix/]{train,test}/<class>/<file>`` names to (name, label) per split, classes sorted."""
    out: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for n in names:
        parts = n.replace("\\", "/").split("/")
        if len(parts) < 3 or not parts[-1].lower().endswith(_IMAGE_EXT):
            continue
        split, cls = parts[-3], parts[-2]
        if split in out:
            out[split].append((n, cls))
    classes = sorted({c for _, c in out["train"]})
    if not out["train"] or not out["test"]:
        raise ValueError(f"{where}: got no images under train/<class>/ and test/<class>/, expected an image-folder "
                         "layout [cifar10/]{train,test}/<class>/<image>")
    if len(classes) != 10:
        raise ValueError(f"{where}: got {len(classes)} classes {classes[:12]}, expected the 10 CIFAR-10 classes")
    label = {c: i for i, c in enumerate(classes)}
    bad = sorted({c for _, c in out["test"]} - set(classes))
    if bad:
        raise ValueError(f"{where}: got test classes {bad} absent from train, expected the same classes")
    return {s: sorted((n, label[c]) for n, c in v) for s, v in out.items()}


def _read_image_zip(path: Path) -> dict[str, np.ndarray]:
    arrays = {}
    with zipfile.ZipFile(path) as zf:
        entries = _split_entries(zf.namelist(), path)
        for split, items in entries.items():
            arrays[f"x_{split}"] = np.stack([_decode(zf.read(n)) for n, _ in items])
            arrays[f"y_{split}"] = np.array([lab for _, lab in items], dtype=np.int64)
    return arrays


def _read_image_dir(path: Path) -> dict[str, np.ndarray]:
    names = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
    entries = _split_entries(names, path)
    arrays = {}
    for split, items in entries.items():
        arrays[f"x_{split}"] = np.stack([_decode((path / n).read_bytes()) for n, _ in items])
        arrays[f"y_{split}"] = np.array([lab for _, lab in items], dtype=np.int64)
    return arrays
