"""Decoding files into uint8 arrays, one file at a time (numpy and PIL only, so it runs in a forked worker).

A leaf of data/: the image-folder reader (folder.py) and the decoded-image cache (cache.py) both decode
through it, and neither imports the other's internals for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from classlab.decode import decode
from classlab.errors import ClasslabError

# what a broken or odd file raises while decoding: it is skipped and listed, never fatal
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)

def open_image(path: str | Path, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """One image as uint8 H×W×C, decoded as a photo is (classlab.decode: transparency on black, 16-bit
    scaled to 8 bits, EXIF orientation), then converted to `channels` and resized (bilinear) to `size`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as img:
            img = decode(img, alpha_on="black")
    img = img.convert("L" if channels == 1 else "RGB")
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode_arrays(items: Sequence[tuple[str | Path, int]], channels: int, size: tuple[int, int] | None,
                  like: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode every file once (numpy only, so it runs in a forked worker): uint8 N×H×W×C, int64 labels and
    the unreadable files. All must share one size (that of `like`, when given) unless `size` resizes them."""
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    skipped: list[str] = []
    for path, label in items:
        try:
            arr = open_image(path, channels, size)
        except UNREADABLE as e:
            skipped.append(f"{path} ({type(e).__name__})")
            continue
        first = like or (arrays[0].shape if arrays else None)
        if first is not None and arr.shape != first:
            raise size_mismatch(path, arr.shape, first)
        arrays.append(arr)
        labels.append(label)
    if not arrays:
        return np.empty((0, 1, 1, channels), np.uint8), np.empty(0, np.int64), skipped
    return np.stack(arrays), np.asarray(labels, dtype=np.int64), skipped


def size_mismatch(path: str | Path, shape: tuple[int, ...], first: tuple[int, ...]) -> ClasslabError:
    return ClasslabError(f"{path}: size {shape[1]}×{shape[0]} differs from {first[1]}×{first[0]} of the first image; "
                         "set data.image_size: [H, W] to resize all images at load time")
