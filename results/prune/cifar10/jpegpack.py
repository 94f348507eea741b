"""Carry CIFAR-10 JPEGs to a remote GPU machine inside a 64 MiB working-tree limit.

The image zip (61 MiB) is mostly per-entry zip overhead beside 52.7 MiB of JPEG bytes; this packs the bytes into
one uncompressed .npz (blob + offsets + labels) and, on the other side, decodes it into the uint8 .npz that
``groupsparse prune --data`` reads directly.

    python results/prune/cifar10/jpegpack.py pack ../shared/data/cifar10-jpg.zip .gpu/cifar10-jpegs.npz
    python results/prune/cifar10/jpegpack.py unpack .gpu/cifar10-jpegs.npz /tmp/cifar10.npz
"""

import io
import sys
import zipfile
from concurrent.futures import ProcessPoolExecutor

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def pack(zip_path, out):
    blobs, labels, test = [], [], []
    with zipfile.ZipFile(zip_path) as zf:
        for name in sorted(zf.namelist()):
            parts = name.split("/")
            if len(parts) < 3 or not parts[-1].endswith(".jpg"):
                continue
            blobs.append(zf.read(name))
            labels.append(CLASSES.index(parts[-2]))
            test.append(parts[-3] == "test")
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    np.savez(out, blob=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets, labels=np.array(labels),
             is_test=np.array(test))


def _decode(chunk):
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in chunk])


def unpack(pack_path, out):
    z = np.load(pack_path)
    blob, off = z["blob"].tobytes(), z["offsets"]
    blobs = [blob[off[i]:off[i + 1]] for i in range(len(off) - 1)]
    chunks = [blobs[i:i + 2000] for i in range(0, len(blobs), 2000)]
    with ProcessPoolExecutor() as ex:
        x = np.concatenate(list(ex.map(_decode, chunks)))
    y, t = z["labels"], z["is_test"]
    np.savez(out, x_train=x[~t], y_train=y[~t], x_test=x[t], y_test=y[t])


if __name__ == "__main__":
    {"pack": pack, "unpack": unpack}[sys.argv[1]](*sys.argv[2:])
