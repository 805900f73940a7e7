"""One image decoder (classlab.decode) behind the image-folder loader and the photo path."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classlab.data.folder import open_image
from classlab.photo import PLAIN, read_photo


def old_open_image(path: Path, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """data/folder.py's decoder before it shared the photo path's, kept to show dataset tensors did not change."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as img:
            img.seek(0)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                hi = 65535.0 if arr.max() > 255 else 255.0
                img = Image.fromarray((arr / hi * 255).round().astype(np.uint8))
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                img = Image.alpha_composite(background, rgba)
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _files(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (21, 17, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (21, 17), dtype=np.uint8)
    alpha = rng.integers(0, 256, (21, 17), dtype=np.uint8)
    images = {
        "gray.png": Image.fromarray(gray),
        "rgb.png": Image.fromarray(rgb),
        "rgba.png": Image.fromarray(np.dstack([rgb, alpha]), "RGBA"),
        "la.png": Image.fromarray(np.dstack([gray, alpha]), "LA"),
        "palette.png": Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=32),
        "bilevel.png": Image.fromarray(gray).convert("1"),
        "sixteen.png": Image.fromarray(rng.integers(0, 65536, (21, 17), dtype=np.uint16)),
        "sixteen-low.png": Image.fromarray(rng.integers(0, 256, (21, 17), dtype=np.uint16)),
        "photo.jpg": Image.fromarray(rgb),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
    }
    transparent = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)
    transparent.info["transparency"] = 3
    images["palette-transparent.png"] = transparent
    paths = []
    for name, img in images.items():
        paths.append(folder / name)
        img.save(paths[-1], **({"transparency": 3} if name == "palette-transparent.png" else {}))
    return paths


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [None, (10, 12)])
def test_folder_images_decode_as_before(tmp_path, channels, size):
    for path in _files(tmp_path):
        assert np.array_equal(open_image(path, channels, size), old_open_image(path, channels, size)), path.name


def test_a_training_image_and_a_photo_decode_to_the_same_pixels(tmp_path):
    for path in _files(tmp_path):
        photo = read_photo(path, PLAIN)
        for channels in (1, 3):
            want = np.asarray(photo.convert("L" if channels == 1 else "RGB"))
            got = open_image(path, channels, None)
            assert np.array_equal(got[..., 0] if channels == 1 else got, want), path.name


def test_exif_orientation_is_applied_to_training_images(tmp_path):
    """A phone photo stored sideways with an EXIF orientation tag loads upright, as predict shows it."""
    img = Image.new("RGB", (30, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    img.save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    arr = open_image(tmp_path / "sideways.jpg", 1, None)
    assert arr.shape == (30, 20, 1)  # upright: 20 wide, 30 high
    assert arr[:10, :, 0].mean() > 200 and arr[20:, :, 0].mean() < 50  # the white part is now on top
