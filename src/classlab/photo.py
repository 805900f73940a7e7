"""A user's own photo -> a dataset-style uint8 image, each preparation step switchable.

Why: a model that scores 90% on its test set most often gets a user's own photo wrong because the photo
is prepared differently from the training images: a light background where the dataset's is black, a
small off-centre object where the dataset's fill the frame, another size. For MNIST-style runs (one gray
channel, light objects on black) the preparation is, in this order:

1. decode: first frame (GIF), EXIF orientation, 16-bit scaled to 8 bits, transparency composited on
   white when the opaque content is dark (a drawing on a transparent canvas) and on black otherwise;
   an image over MAX_PIXELS is refused from its header, before any pixel is decoded (a JPEG is first
   asked to decode at 1/2 to 1/8 scale, which usually brings a phone photo under it); large photos are
   then reduced (integer box filter) to at most WORK_SIDE pixels a side;
2. grayscale: ITU-R 601 luma (PIL's "L");
3. invert ("auto"): when the border is lighter than the object, x -> 255 - x. The background is a plane
   (level and slopes, for uneven light) fitted to the border ring (5% of the short side); the object is
   the pixels differing from it by more than OBJECT_THRESHOLD of the largest difference;
4. background: subtract that plane and stretch back so white stays 255: the background becomes black;
5. crop: the object's bounding box (pixels differing from the border median by more than
   OBJECT_THRESHOLD of the largest difference; rows/columns holding less than SPECK_FRACTION of the
   fullest one's count are ignored as specks), grown by `margin` × its long side on every side, widened
   around its centre to the input's aspect (square for 28×28), taken from the image itself (the border
   level outside it), then resized to the input size (area average when shrinking, bilinear when
   enlarging), so the aspect is kept;
6. rounded to uint8. The result is what a dataset image is, so the run's own BatchTransform
   (normalization, pixel permutation, gray->RGB, resize) applies to it unchanged.

Without `crop` the photo is resized straight to the input size (8-bit bilinear, as the image-folder
loader does at training time) before steps 3-4: study E's own-photo recipe (gray, resize, invert).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from classlab.decode import AlphaOn, ImageTooLarge, decode
from classlab.errors import one_line

MAX_PIXELS = 40_000_000  # decoded pixels; above it a photo is refused (a 40 MP RGBA image is 160 MB)
WORK_SIDE = 1024  # photos are reduced to this long side before preparation (the target is ~28 px)
BORDER_FRACTION = 0.05  # width of the border ring, as a fraction of the short side (at least 1 px)
OBJECT_THRESHOLD = 0.25  # object pixels differ from the border by more than this × the largest difference
SPECK_FRACTION = 0.02  # rows/columns with fewer object pixels than this × the fullest one are specks
STATS_SAMPLE = 2000  # training images measured by input_stats (evenly spaced) ...
STATS_PIXELS = 20_000_000  # ... and at most this many pixels of them (80 MB as floats)
STATS_TOLERANCE = 0.05  # brightness outside the training range by more than this is a warning
FLOOR_QUANTILE = 0.05  # an image's "floor": the brightness of its darkest 5% of pixels (0 on a black background)


class PhotoError(Exception):
    """One image cannot be used; the message is one line, and the other images still go on."""


@dataclass(frozen=True)
class PhotoOptions:
    """The preparation steps; `predict` picks the defaults from the run (MNIST-style or not)."""

    grayscale: bool = True
    invert: Literal["auto", "yes", "no"] = "auto"
    background: bool = True
    crop: bool = True
    margin: float = 0.0
    alpha_on: AlphaOn = "auto"
    max_side: int | None = WORK_SIDE
    # how the dataset frames its objects: "box" centres the object's bounding box (Fashion-MNIST: its long
    # side fills the frame when margin is 0); "mass" scales the bounding box's long side to 1 / (1 + 2 margin)
    # of the frame and puts the centre of mass where the dataset's are (MNIST: 20 px in 28, at (14, 14))
    frame: Literal["box", "mass"] = "box"
    # the brightest border (mean of the ring, 0-1) of the dataset's own images: an image at the run's size
    # whose border is this dark is in the dataset's polarity already (no inversion, no background step),
    # and left unchanged when its object is framed as the dataset's are; None: never assumed
    dataset_border: float | None = None


PLAIN = PhotoOptions(grayscale=False, invert="no", background=False, crop=False, alpha_on="black", max_side=None)


@dataclass
class Prepared:
    """A prepared photo: the uint8 C×H×W image the run's BatchTransform takes, and what was done to it."""

    image: np.ndarray
    steps: dict
    original: Image.Image | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------- decoding


def read_photo(path: Path, options: PhotoOptions) -> Image.Image:
    """Decode one file (classlab.decode, the image-folder loader's decoder too) into an 8-bit L or RGB
    image; any problem is a one-line PhotoError."""
    if path.is_file() and path.stat().st_size == 0:
        raise PhotoError("empty file")
    try:
        with warnings.catch_warnings():
            # our own MAX_PIXELS check is stricter than Pillow's warning threshold
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return decode(img, options.alpha_on, options.max_side, MAX_PIXELS)
    except ImageTooLarge as e:
        raise PhotoError(str(e)) from None
    except Image.DecompressionBombError as e:
        raise PhotoError(f"refused by Pillow as a possible decompression bomb ({one_line(e)})") from None
    except UnidentifiedImageError:
        raise PhotoError("not an image file (or a format Pillow cannot read)") from None
    except FileNotFoundError:
        raise PhotoError("file not found") from None
    except IsADirectoryError:
        raise PhotoError("is a folder") from None
    except MemoryError:
        raise PhotoError("out of memory while decoding") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, zlib.error ... on broken files
        raise PhotoError(f"unreadable image ({type(e).__name__}: {one_line(e) or 'corrupt data'})") from None


# ----------------------------------------------------------------------------- preparation steps


def border_ring(a: np.ndarray) -> np.ndarray:
    """The outer ring of an H×W×C array (5% of the short side, at least 1 px), as pixels × C."""
    h, w = a.shape[:2]
    r = max(1, round(BORDER_FRACTION * min(h, w)))
    parts = [a[:r].reshape(-1, a.shape[2]), a[h - r:].reshape(-1, a.shape[2]),
             a[r:h - r, :r].reshape(-1, a.shape[2]), a[r:h - r, w - r:].reshape(-1, a.shape[2])]
    return np.concatenate(parts)


def border_level(a: np.ndarray) -> np.ndarray:
    """Per-channel median of the border ring: the background's level."""
    return np.median(border_ring(a), axis=0)


def ring_mask(h: int, w: int) -> np.ndarray:
    """True on the border ring of an H×W image (the same ring as border_ring)."""
    r = max(1, round(BORDER_FRACTION * min(h, w)))
    mask = np.ones((h, w), dtype=bool)
    mask[r:h - r, r:w - r] = False
    return mask


def border_plane(a: np.ndarray) -> np.ndarray:
    """The background as a plane (level + x slope + y slope per channel) fitted to the border ring, refitted
    once without outliers (an object touching the edge): a photographed page's uneven light is mostly a slope."""
    h, w = a.shape[:2]
    ys, xs = np.nonzero(ring_mask(h, w))
    design = np.stack([np.ones(len(xs)), xs / w, ys / h], axis=1)
    values = a[ys, xs].astype(np.float64)
    coef = np.linalg.lstsq(design, values, rcond=None)[0]
    resid = np.abs(values - design @ coef)
    mad = np.median(resid, axis=0)
    keep = np.all(resid <= 3 * 1.4826 * mad + 1.0, axis=1)
    if keep.sum() >= 3:
        coef = np.linalg.lstsq(design[keep], values[keep], rcond=None)[0]
    yy, xx = np.mgrid[0:h, 0:w]
    return (coef[0] + (xx / w)[..., None] * coef[1] + (yy / h)[..., None] * coef[2]).astype(np.float32)


def should_invert(a: np.ndarray) -> bool:
    """The dataset's objects are light on black: invert when the border is lighter than the object, i.e.
    when the pixels that differ most from the background (plane fitted to the border) are darker than it."""
    lum = a.mean(axis=2, keepdims=True)
    r = (lum - border_plane(lum))[..., 0]
    peak = float(np.abs(r).max())
    if peak <= 0:
        return False
    return float(r[np.abs(r) > OBJECT_THRESHOLD * peak].mean()) < 0


def to_black_background(a: np.ndarray) -> tuple[np.ndarray, float]:
    """Subtract the background plane and stretch back so white stays 255: the background becomes black,
    even under a light gradient. Returns the mean level removed."""
    plane = border_plane(a)
    if float(np.abs(plane).max()) < 0.5:
        return a, 0.0
    plane = np.clip(plane, 0, 254)
    return np.clip(a - plane, 0, None) * (255.0 / (255.0 - plane)), round(float(plane.mean()), 2)


def object_bounds(lum: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of the object in an H×W luminance array, ends exclusive; None when it is blank."""
    diff = np.abs(lum - float(np.median(border_ring(lum[..., None]))))
    peak = float(diff.max())
    if peak <= 0:
        return None
    mask = diff > OBJECT_THRESHOLD * peak
    rows, cols = mask.sum(axis=1), mask.sum(axis=0)
    ys = np.flatnonzero(rows >= SPECK_FRACTION * rows.max())
    xs = np.flatnonzero(cols >= SPECK_FRACTION * cols.max())
    return int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1


def object_box(a: np.ndarray, margin: float, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The crop box (y0, y1, x0, x1): the object's bounds plus margin, widened to the aspect of `size`."""
    bounds = object_bounds(a.mean(axis=2))
    if bounds is None:
        return None
    y0, y1, x0, x1 = bounds
    m = round(margin * max(y1 - y0, x1 - x0))
    return widen((y0 - m, y1 + m, x0 - m, x1 + m), size)


def widen(box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Grow a box around its centre to the aspect of `size` (an odd extra pixel before, as Fashion-MNIST
    pads), so resizing keeps aspect."""
    y0, y1, x0, x1 = box
    bh, bw = y1 - y0, x1 - x0
    th, tw = size
    if bh * tw >= bw * th:  # taller than the target: widen
        nw = -(-bh * tw // th)
        x0 -= (nw - bw + 1) // 2
        return y0, y1, x0, x0 + nw
    nh = -(-bw * th // tw)
    y0 -= (nh - bh + 1) // 2
    return y0, y0 + nh, x0, x1


def take_box(a: np.ndarray, box: tuple[int, int, int, int], fill: np.ndarray) -> np.ndarray:
    """a[y0:y1, x0:x1], with `fill` where the box reaches outside the image."""
    y0, y1, x0, x1 = box
    out = np.empty((y1 - y0, x1 - x0, a.shape[2]), dtype=np.float32)
    out[...] = fill
    h, w = a.shape[:2]
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if sy0 < sy1 and sx0 < sx1:
        out[sy0 - y0: sy1 - y0, sx0 - x0: sx1 - x0] = a[sy0:sy1, sx0:sx1]
    return out


def resize_float(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize H×W×C floats: area average when shrinking (exact for integer factors), bilinear when enlarging."""
    h, w = size
    if a.shape[:2] == (h, w):
        return a
    resample = Image.BOX if a.shape[0] >= h and a.shape[1] >= w else Image.BILINEAR
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(a[..., k])).resize((w, h), resample))
              for k in range(a.shape[2])]
    return np.stack(planes, axis=2)


def prepare(img: Image.Image, shape: tuple[int, int, int], options: PhotoOptions) -> Prepared:
    """Run the steps of the module docstring; `shape` is the C×H×W the run's images were stored at.

    An image already in the dataset's form (the run's size, a border as dark as the dataset's, its object
    framed as the dataset frames objects) comes out unchanged: every step is the identity on it."""
    c, h, w = shape
    gray = c == 1 or options.grayscale
    steps: dict = {"decoded_size": list(img.size), "grayscale": gray}
    img8 = img.convert("L" if gray else "RGB")
    if not options.crop and img8.size != (w, h):
        img8 = img8.resize((w, h), Image.BILINEAR)
    a = np.asarray(img8, dtype=np.float32)
    a = a[..., None] if a.ndim == 2 else a
    at_size = a.shape[:2] == (h, w)
    as_dataset = at_size and _dark_border(a, options)
    if options.invert == "auto" and at_size and not as_dataset and _dark_border(255.0 - a, options):
        inverted = True  # the dataset's form, inverted: polarity from the border, as for the dataset's images
    else:
        inverted = options.invert == "yes" or (options.invert == "auto" and not as_dataset and should_invert(a))
    if inverted:
        a = 255.0 - a
        as_dataset = at_size and _dark_border(a, options)
    steps["inverted"] = inverted
    if options.background and not as_dataset:
        a, steps["background_level"] = to_black_background(a)
    if options.crop:
        if as_dataset and is_framed(a, options):
            steps["object_found"], steps["framed_as_dataset"] = True, True
        elif options.frame == "mass":
            a = frame_by_mass(a, options.margin, (h, w), steps)
        else:
            box = object_box(a, options.margin, (h, w))
            steps["object_found"] = box is not None
            box = box or widen((0, a.shape[0], 0, a.shape[1]), (h, w))  # blank: the whole frame, aspect kept
            steps["box"] = [box[2], box[0], box[3], box[1]]  # x0, y0, x1, y1 in the decoded photo
            a = resize_float(take_box(a, box, border_level(a)), (h, w))
    if c == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    image = np.clip(np.rint(a), 0, 255).astype(np.uint8).transpose(2, 0, 1).copy()
    return Prepared(image=image, steps=steps)


def _dark_border(a: np.ndarray, options: PhotoOptions) -> bool:
    return options.dataset_border is not None and float(border_ring(a).mean()) / 255.0 <= options.dataset_border


def object_fill(margin: float) -> float:
    """The object's long side as a fraction of the frame that a crop margin gives (margin 0.2: 20 px in 28)."""
    return 1.0 / (1.0 + 2.0 * margin)


def mass_centre(lum: np.ndarray) -> tuple[float, float]:
    """(y, x) centre of mass of an H×W luminance array, in pixel indices."""
    total = float(lum.sum())
    if total <= 0:
        return (lum.shape[0] - 1) / 2, (lum.shape[1] - 1) / 2
    return (float(lum.sum(axis=1) @ np.arange(lum.shape[0])) / total,
            float(lum.sum(axis=0) @ np.arange(lum.shape[1])) / total)


def framing(lum: np.ndarray, frame: str) -> tuple[int, float, float] | None:
    """(long side of the object's bounds, centre y, centre x) as `frame` measures them; None when blank."""
    bounds = object_bounds(lum)
    if bounds is None:
        return None
    y0, y1, x0, x1 = bounds
    if frame == "mass":
        cy, cx = mass_centre(lum)
    else:
        cy, cx = (y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2
    return max(y1 - y0, x1 - x0), cy, cx


FRAMED_SIZE = 0.25  # an object this fraction of the frame below the dataset's size (or 1.5 px above) ...
FRAMED_SHIFT = {"mass": 1.5, "box": 2.5}  # ... or its centre this many pixels off the dataset's: reframed


def is_framed(a: np.ndarray, options: PhotoOptions) -> bool:
    """Whether an image at the run's size has its object framed as the dataset's: its size and centre
    within the spread of the dataset's own images (MNIST: 20 px, centre of mass within 1 px of (14, 14);
    Fashion-MNIST: long side 21-28 px, box within 2.5 px of the centre)."""
    h, w = a.shape[:2]
    measured = framing(a.mean(axis=2), options.frame)
    if measured is None:
        return True  # blank: nothing to frame
    long, cy, cx = measured
    target = object_fill(options.margin) * max(h, w)
    centre = (h / 2, w / 2) if options.frame == "mass" else ((h - 1) / 2, (w - 1) / 2)
    shift = FRAMED_SHIFT[options.frame]
    return (target - FRAMED_SIZE * max(h, w) <= long <= target + 1.5
            and abs(cy - centre[0]) <= shift and abs(cx - centre[1]) <= shift)


def frame_by_mass(a: np.ndarray, margin: float, size: tuple[int, int], steps: dict) -> np.ndarray:
    """MNIST's framing: scale so the object's bounds' long side is object_fill(margin) of the frame (20 px in
    28), and place its centre of mass at (H/2, W/2) in pixel indices, as MNIST's digits sit; one resampling
    (area average when shrinking, bilinear when enlarging) of a sub-pixel box, so the centre is exact."""
    h, w = size
    lum = a.mean(axis=2)
    measured = framing(lum, "mass")
    steps["object_found"] = measured is not None
    if measured is None:  # blank: the whole frame, aspect kept
        box = widen((0, a.shape[0], 0, a.shape[1]), size)
        steps["box"] = [box[2], box[0], box[3], box[1]]
        return resize_float(take_box(a, box, border_level(a)), size)
    long, cy, cx = measured
    scale = object_fill(margin) * max(h, w) / long  # output pixels per photo pixel
    # continuous coordinates (pixel i spans [i, i+1]): the centre of mass, at cy + 0.5, goes to h / 2 + 0.5
    y0, x0 = cy + 0.5 - (h / 2 + 0.5) / scale, cx + 0.5 - (w / 2 + 0.5) / scale
    y1, x1 = y0 + h / scale, x0 + w / scale
    steps["box"] = [round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2)]
    pad = int(np.ceil(max(0.0, -y0, -x0, y1 - a.shape[0], x1 - a.shape[1]))) + 1
    fill = border_level(a)
    padded = np.empty((a.shape[0] + 2 * pad, a.shape[1] + 2 * pad, a.shape[2]), dtype=np.float32)
    padded[...] = fill
    padded[pad: pad + a.shape[0], pad: pad + a.shape[1]] = a
    resample = Image.BOX if scale <= 1 else Image.BILINEAR
    box = (x0 + pad, y0 + pad, x1 + pad, y1 + pad)
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(padded[..., k])).resize((w, h), resample, box=box))
              for k in range(a.shape[2])]
    return np.stack(planes, axis=2)


# ----------------------------------------------------------------------------- input check


def input_stats(images: np.ndarray) -> dict:
    """Brightness statistics of training images (uint8 N×C×H×W), stored with a run as input_stats.json.

    `predict` warns when a prepared photo falls outside them (the usual sign of a polarity or framing
    mistake) and takes the object's typical fill of the frame as the default crop margin.
    """
    x = np.asarray(images)
    n = min(STATS_SAMPLE, max(100, STATS_PIXELS // max(1, int(np.prod(x.shape[1:])))))
    step = max(1, len(x) // n)
    x = x[::step][:n].astype(np.float32) / 255.0
    if not len(x):
        return {}
    per_image = x.mean(axis=(1, 2, 3))
    floors = np.quantile(x.reshape(len(x), -1), FLOOR_QUANTILE, axis=1)
    rings = np.stack([border_ring(img.transpose(1, 2, 0)).mean() for img in x])
    fills = []
    for img in x:
        bounds = object_bounds(img.mean(axis=0))
        if bounds is not None:
            fills.append(max(bounds[1] - bounds[0], bounds[3] - bounds[2]) / max(img.shape[1:]))
    return {
        "n": len(x),
        "pixel_mean": [round(float(v), 4) for v in x.mean(axis=(0, 2, 3))],
        "pixel_std": [round(float(v), 4) for v in x.std(axis=(0, 2, 3))],
        "image_mean_range": _range(per_image),
        "border_mean_range": _range(rings),
        "floor_range": _range(floors),
        "object_fill": round(float(np.median(fills)), 4) if fills else None,
    }


def _range(values: np.ndarray) -> list[float]:
    """The 0.5% and 99.5% quantiles: the range nearly every training image lies in."""
    return [round(float(np.quantile(values, 0.005)), 4), round(float(np.quantile(values, 0.995)), 4)]


def fallback_stats(mean: tuple[float, ...], std: tuple[float, ...], dark_background: bool) -> dict:
    """Without input_stats.json: the normalization's mean ± std bounds per-image mean brightness (the
    spread of image means is at most the pixel spread), a looser but still valid check; for datasets of
    light objects on black, a border brighter than the average pixel or a background that is not black
    is flagged too."""
    mu, sigma = float(np.mean(mean)), float(np.mean(std))
    bounds = [round(max(mu - sigma, 0.0), 4), round(min(mu + sigma, 1.0), 4)]
    stats: dict = {"image_mean_range": bounds, "tolerance": 0.0}
    if dark_background:
        stats["border_mean_range"] = [0.0, round(mu, 4)]
        stats["floor_range"] = [0.0, 0.05]
    return stats


def margin_from_fill(fill: float | None) -> float | None:
    """The crop margin that makes an object fill the frame as the training images' objects do."""
    if not fill or fill <= 0:
        return None
    return round(min(max((1.0 / min(fill, 1.0) - 1.0) / 2.0, 0.0), 0.5), 2)


def check_input(image: np.ndarray, stats: dict, decoded_size: tuple[int, int] | list[int] | None = None
                ) -> list[str]:
    """Warnings when a prepared uint8 C×H×W image looks unlike the training images. `decoded_size` (W, H of the
    photo as decoded): a photo under half the run's size is said first; one under a quarter of it is only that
    (its brightness and background are what upscaling a few pixels made, not the photo's)."""
    warnings_: list[str] = []
    if decoded_size is not None:
        (w, h), (rh, rw) = decoded_size, image.shape[1:]
        if w < rw / 2 or h < rh / 2:
            warnings_.append(f"the photo is {w}x{h} pixels, under half the run's {rw}x{rh}: upscaled "
                             f"{max(rw / w, rh / h):.0f}x, it holds little of what the model was trained on "
                             "(use a larger photo)")
            if w < rw / 4 or h < rh / 4:
                return warnings_
    x = image.astype(np.float32) / 255.0
    tol = stats.get("tolerance", STATS_TOLERANCE)
    lo, hi = stats.get("image_mean_range", (0.0, 1.0))
    mean = float(x.mean())
    if mean > hi + tol:
        warnings_.append(f"mean brightness {mean:.2f} is above the training images' ({lo:.2f} to {hi:.2f}): "
                         "a light background? (the dataset's objects are light on black; try --invert yes)")
    elif mean < lo - tol:
        warnings_.append(f"mean brightness {mean:.2f} is below the training images' ({lo:.2f} to {hi:.2f}): "
                         "an object too small or too faint? (check --crop and --margin)")
    floor_range = stats.get("floor_range")
    if floor_range is not None:
        floor = float(np.quantile(x, FLOOR_QUANTILE))
        if floor > floor_range[1] + tol:
            warnings_.append(f"no black background: the darkest 5% of pixels are at {floor:.2f}, the training "
                             f"images' at most {floor_range[1]:.2f} (a gray or light background? try --background)")
    ring = stats.get("border_mean_range")
    if ring is not None:
        border = float(border_ring(x.transpose(1, 2, 0)).mean())
        if border > ring[1] + tol:
            warnings_.append(f"the border's brightness {border:.2f} is above the training images' (up to "
                             f"{ring[1]:.2f}): a light background, or the object cut off at the edge?")
    return warnings_
