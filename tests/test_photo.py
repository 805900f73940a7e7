"""photo.prepare's framing (issue 15, item 1): an image already in the dataset's form comes out unchanged, and
a photo is framed as the dataset frames its objects (MNIST: 20 px box, centre of mass at the centre; Fashion-MNIST:
long side filling the frame). Fast: synthetic images, plus real MNIST / Fashion-MNIST test images when
../shared/data holds them; no training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classlab.data.idx import read_idx
from classlab.photo import PhotoOptions, mass_centre, object_bounds, prepare
from tests.conftest import SHARED_DATA

MNIST = PhotoOptions(margin=0.2, frame="mass", dataset_border=0.065)  # what predict picks for an MNIST run
FASHION = PhotoOptions(margin=0.0, frame="box", dataset_border=0.217)  # ... and for a Fashion-MNIST run


def mnist_like_digit(seed: int = 0) -> np.ndarray:
    """A 28×28 uint8 'digit' as MNIST stores one: light strokes on black, its bounding box 20 px on the long
    side, its centre of mass on (14, 14) to the nearest pixel."""
    rng = np.random.default_rng(seed)
    patch = np.zeros((20, 14), np.float32)
    patch[0:3, :] = 255  # a 7: the bar ...
    for row in range(3, 20):  # ... and a slanted stem, anti-aliased
        x = 13 - row * 0.55
        i = int(x)
        patch[row, max(i - 1, 0): i + 2] = 255
        patch[row, max(i - 2, 0)] = 255 * (1 - (x - i))
    patch *= rng.uniform(0.8, 1.0, patch.shape)
    canvas = np.zeros((28, 28), np.float32)
    canvas[4:24, 7:21] = patch
    cy, cx = mass_centre(canvas)
    canvas = np.roll(canvas, (round(14 - cy), round(14 - cx)), axis=(0, 1))
    return canvas.astype(np.uint8)


def as_image(a: np.ndarray) -> Image.Image:
    return Image.fromarray(a)


def real_test_images(dataset: str, n: int) -> np.ndarray:
    path = SHARED_DATA / dataset / "t10k-images-idx3-ubyte.gz"
    if not path.is_file():
        pytest.skip(f"{path} not here")
    return read_idx(Path(path))[:n]


# ----------------------------------------------------------------------------- the dataset's form: unchanged


def test_mnist_style_image_is_unchanged():
    digit = mnist_like_digit()
    prepared = prepare(as_image(digit), (1, 28, 28), MNIST)
    assert np.array_equal(prepared.image[0], digit)
    assert prepared.steps["inverted"] is False and prepared.steps["framed_as_dataset"] is True


def test_dataset_image_inverted_comes_back_exactly():
    """Dark on white at the run's size: inverted (polarity from the border, as the dataset's) and otherwise
    left alone: the original pixels."""
    digit = mnist_like_digit(1)
    prepared = prepare(as_image(255 - digit), (1, 28, 28), MNIST)
    assert prepared.steps["inverted"] is True
    assert np.array_equal(prepared.image[0], digit)


@pytest.mark.parametrize(("dataset", "options"), [("mnist", MNIST), ("fashion-mnist", FASHION)])
def test_real_test_images_are_unchanged(dataset, options):
    """The dataset's own test images: bit-exact for nearly all (a Fashion-MNIST item far off the centre of
    its frame may be reframed)."""
    images = real_test_images(dataset, 300)
    same = sum(np.array_equal(prepare(as_image(x), (1, 28, 28), options).image[0], x) for x in images)
    assert same >= 0.99 * len(images) if dataset == "fashion-mnist" else same == len(images)


def test_frame_filling_object_touching_the_border_is_not_inverted():
    """A Fashion-MNIST-style item filling the frame (a light border): still the dataset's polarity."""
    item = np.zeros((28, 28), np.uint8)
    item[:, 9:19] = 160  # a dress touching top and bottom (border mean 0.12: as bright as Fashion-MNIST's get)
    item[2:26, 1:27] = np.maximum(item[2:26, 1:27], 90)  # sleeves out to the sides
    prepared = prepare(as_image(item), (1, 28, 28), FASHION)
    assert prepared.steps["inverted"] is False
    assert np.array_equal(prepared.image[0], item)


# ----------------------------------------------------------------------------- photos: framed as the dataset


def off_centre_page(digit: np.ndarray, scale: int, size: tuple[int, int], at: tuple[int, int]) -> np.ndarray:
    """The digit dark on white, enlarged `scale` times, pasted at `at` (x, y) on a white page of `size` (w, h)."""
    big = np.asarray(Image.fromarray(255 - digit).resize((28 * scale, 28 * scale), Image.BICUBIC))
    page = np.full(size[::-1], 255, np.uint8)
    page[at[1]: at[1] + big.shape[0], at[0]: at[0] + big.shape[1]] = big
    return page


@pytest.mark.parametrize(("scale", "at"), [(1, (60, 3)), (3, (7, 70)), (6, (150, 20))])
def test_off_centre_inverted_digit_is_framed_like_mnist(scale, at):
    digit = mnist_like_digit(2)
    page = off_centre_page(digit, scale, (320, 240), at)
    prepared = prepare(as_image(page), (1, 28, 28), MNIST)
    out = prepared.image[0].astype(np.float32)
    assert prepared.steps["inverted"] is True
    y0, y1, x0, x1 = object_bounds(out)
    assert max(y1 - y0, x1 - x0) <= 20  # fit in MNIST's 20×20 box ...
    cy, cx = mass_centre(out)
    assert abs(cy - 14) <= 1 and abs(cx - 14) <= 1  # ... centred by its centre of mass
    assert np.corrcoef(out.ravel(), digit.astype(np.float32).ravel())[0, 1] > 0.9


def test_small_digit_in_a_28_frame_is_reframed():
    """At the run's size but not framed as the dataset's (small, in a corner): reframed, not kept."""
    digit = mnist_like_digit(3)
    small = np.zeros((28, 28), np.uint8)
    small[1:11, 1:11] = np.asarray(Image.fromarray(digit[4:24, 4:24]).resize((10, 10), Image.BOX))
    prepared = prepare(as_image(small), (1, 28, 28), MNIST)
    assert "framed_as_dataset" not in prepared.steps
    out = prepared.image[0].astype(np.float32)
    y0, y1, x0, x1 = object_bounds(out)
    assert 18 <= max(y1 - y0, x1 - x0) <= 20
    cy, cx = mass_centre(out)
    assert abs(cy - 14) <= 1 and abs(cx - 14) <= 1


def test_fashion_photo_long_side_fills_the_frame():
    item = np.zeros((28, 28), np.uint8)
    item[4:24, 9:19] = 200  # a 20×10 item, off the dataset's framing
    page = np.full((150, 200), 255, np.uint8)
    page[30:130, 120:170] = np.asarray(Image.fromarray(255 - item[4:24, 9:19]).resize((50, 100), Image.NEAREST))
    prepared = prepare(as_image(page), (1, 28, 28), FASHION)
    y0, y1, x0, x1 = object_bounds(prepared.image[0].astype(np.float32))
    assert (y0, y1) == (0, 28) and abs((x0 + x1) / 2 - 14) <= 1
