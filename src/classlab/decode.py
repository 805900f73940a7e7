"""One image decoder, shared by the image-folder loader and the photo path, so a file becomes the same
pixels whether it is a training image or a user's photo: first frame (GIF), EXIF orientation, 16- and
32-bit gray scaled to 8 bits, palette and other modes to L or RGB, transparency composited.

Callers convert the result to their own channels and size (data/folder.py at load time, photo.py in
its preparation); the decoder itself never resizes except for the optional `max_side` reduction.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
GRAY_MODES = ("L", "LA", "1", *SIXTEEN_BIT, "F")  # modes that hold one gray channel (plus alpha)
AlphaOn = Literal["auto", "black", "white"]


class ImageTooLarge(ValueError):
    """Refused from its header, before any pixel is decoded."""


def decode(img: Image.Image, alpha_on: AlphaOn = "black", max_side: int | None = None,
           max_pixels: int | None = None) -> Image.Image:
    """An opened image -> a loaded 8-bit L or RGB image.

    `max_pixels` refuses a larger image before decoding (ImageTooLarge); `max_side` lets a JPEG decode at
    1/2 to 1/8 scale and then reduces (integer box filter) to at most that long side; transparent pixels
    go on black, on white, or ("auto") on white under dark content (a drawing on a transparent canvas)."""
    img.seek(0)
    if max_side and img.format == "JPEG":
        img.draft(img.mode, (max_side, max_side))  # DCT scaling: decodes at 1/2, 1/4 or 1/8
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(
            f"{width}×{height} pixels ({width * height / 1e6:.0f} MP) is above classlab's limit of "
            f"{max_pixels / 1e6:.0f} MP for photos; downscale it first"
        )
    img.load()
    img = _plain_mode(to_8bit(_upright(img)))
    if max_side and max(img.size) > max_side:  # before any float copy of the pixels
        img = img.reduce(math.ceil(max(img.size) / max_side))
    return _composite(img, alpha_on)


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; an unreadable EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # Pillow raises KeyError, struct.error, SyntaxError, ... on broken EXIF data
        return img


def _plain_mode(img: Image.Image) -> Image.Image:
    """L, RGB or RGBA: palette and other modes converted, transparency kept for compositing."""
    if img.mode in ("L", "RGB", "RGBA"):
        return img
    if img.mode in ("LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        return img.convert("RGBA")
    return img.convert("L" if img.mode == "1" else "RGB")


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit gray scaled to 0..255 (by 65535 when any value exceeds 255, else by 255; floats
    in 0..1 by 1); other modes unchanged."""
    if img.mode not in (*SIXTEEN_BIT, "F"):
        return img
    arr = np.array(img, dtype=np.float32)
    top = float(arr.max()) if arr.size else 0.0
    scale = 65535.0 if top > 255 else 255.0
    if img.mode == "F" and top <= 1.0:  # float images in 0..1
        scale = 1.0
    arr *= 255.0 / scale  # in place: a 40 MP 16-bit image costs one float copy, not four
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(np.rint(arr, out=arr).astype(np.uint8))


def _composite(img: Image.Image, alpha_on: AlphaOn) -> Image.Image:
    """Transparent pixels get a background: white under dark drawings, black under light ones ("auto")."""
    if img.mode != "RGBA":
        return img
    white = alpha_on == "white" or (alpha_on == "auto" and _dark_content(img))
    colour = (255, 255, 255, 255) if white else (0, 0, 0, 255)
    return Image.alpha_composite(Image.new("RGBA", img.size, colour), img).convert("RGB")


def _dark_content(img: Image.Image) -> bool:
    """Whether the opaque part of an RGBA image is dark on average (measured on a ≤256 px copy)."""
    factor = math.ceil(max(img.size) / 256)
    rgba = np.asarray(img.reduce(factor) if factor > 1 else img, dtype=np.float32)
    weight = rgba[..., 3] / 255.0
    luma = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return bool(weight.sum() > 0 and float((luma * weight).sum() / weight.sum()) < 128)
