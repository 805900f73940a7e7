"""IDX files (the MNIST family's format), gzip or raw, decoded straight into uint8 tensors."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from classlab.errors import ClasslabError
from classlab.runs import atomic_write_bytes

# file stem -> (split, kind); both the usual '-idx3-ubyte' and the '.idx3-ubyte' spellings are found.
IDX_FILES = {
    "train-images": ("train", "images"),
    "train-labels": ("train", "labels"),
    "t10k-images": ("test", "images"),
    "t10k-labels": ("test", "labels"),
}
_SUFFIX = {"images": "idx3-ubyte", "labels": "idx1-ubyte"}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def expected_names(stem: str) -> list[str]:
    """Every file name an IDX file may carry in a folder, preferred first."""
    kind = IDX_FILES[stem][1]
    base = [f"{stem}-{_SUFFIX[kind]}", f"{stem}.{_SUFFIX[kind]}"]
    return [n + ".gz" for n in base] + base


def find_idx_file(folder: Path, stem: str) -> Path | None:
    for name in expected_names(stem):
        if (folder / name).is_file():
            return folder / name
    return None


def read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (not trusting the extension)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ClasslabError(f"{path}: cannot read ({e.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ClasslabError(f"{path}: broken gzip data ({e}); download the file again") from None
    return raw


def read_idx(path: Path) -> np.ndarray:
    """Decode one IDX file to a numpy array, checking the magic number and the byte count."""
    data = read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ClasslabError(
            f"{path}: not an IDX file (wrong magic number {data[:4].hex() or 'empty'}); "
            "expected the MNIST-format files train-images-idx3-ubyte.gz etc."
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ClasslabError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_DTYPES[data[2]])
    need = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header < need:
        raise ClasslabError(
            f"{path}: truncated IDX file: header says {dims} ({need} bytes) but only "
            f"{len(data) - header} bytes follow; download the file again"
        )
    return np.frombuffer(data, dtype=dtype, count=int(np.prod(dims)), offset=header).reshape(dims)


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 N×1×H×W and labels as int64 N, checked against each other."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise ClasslabError(f"{images_path}: expected an N×H×W image file, found shape {images.shape}")
    if labels.ndim != 1:
        raise ClasslabError(f"{labels_path}: expected a 1-D label file, found shape {labels.shape}")
    if len(images) != len(labels):
        raise ClasslabError(
            f"{images_path.parent}: {len(images)} images but {len(labels)} labels "
            f"({images_path.name} vs {labels_path.name})"
        )
    x = torch.from_numpy(images.astype(np.uint8, copy=True)).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64, copy=True))
    return x, y


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """Write a uint8 array as IDX (used to build the bundled demo and test fixtures)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    atomic_write_bytes(Path(path), gzip.compress(payload, compresslevel=9, mtime=0) if compress else payload)
