import numpy as np
import torch

from classlab.config import Augment
from classlab.transforms import BatchTransform, Preprocess, pixel_permutation, random_hflip, random_rotate


def _pre(perm=None):
    return Preprocess(input_shape=(1, 4, 4), mean=(0.5,), std=(0.25,), classes=("a", "b"), permutation=perm)


def test_normalize_and_permutation_match_numpy():
    x = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
    perm = pixel_permutation(5, 16)
    out = BatchTransform(_pre(tuple(perm.tolist())), None, torch.device("cpu"))(x)
    flat = x.numpy().reshape(3, 16)[:, perm.numpy()].reshape(3, 1, 4, 4)
    np.testing.assert_allclose(out.numpy(), (flat / 255 - 0.5) / 0.25, atol=1e-6)
    assert torch.equal(pixel_permutation(5, 16), perm) and not torch.equal(pixel_permutation(6, 16), perm)


def test_hflip_flips_exactly_the_chosen_images():
    x = torch.rand(64, 1, 5, 5)
    out = random_hflip(x, 0.5, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and 10 < sum(flipped) < 54


def test_rotation_zero_is_identity_and_rotation_moves_pixels():
    x = torch.rand(8, 1, 28, 28)
    assert torch.allclose(random_rotate(x, 0.0, torch.Generator().manual_seed(0)), x, atol=1e-5)
    rotated = random_rotate(x, 30.0, torch.Generator().manual_seed(0))
    assert rotated.shape == x.shape and not torch.allclose(rotated, x, atol=1e-2)


def test_augment_only_with_a_generator_and_is_seeded():
    x = torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8)
    aug = Augment(hflip=0.5, rotate=10)
    a = BatchTransform(_pre(), aug, torch.device("cpu"), torch.Generator().manual_seed(1))(x)
    b = BatchTransform(_pre(), aug, torch.device("cpu"), torch.Generator().manual_seed(1))(x)
    assert torch.equal(a, b)
    plain = BatchTransform(_pre(), aug, torch.device("cpu"))(x)  # eval: no generator, no augmentation
    assert torch.allclose(plain, (x.float() / 255 - 0.5) / 0.25, atol=1e-6)


def test_every_path_normalizes_like_the_textbook_formula():
    """Normalizing first (gathers only) and last (resize, jitter) both equal (x / 255 - mean) / std."""
    x = torch.randint(0, 256, (4, 1, 6, 6), dtype=torch.uint8)
    rgb = Preprocess(input_shape=(3, 12, 12), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), classes=("a", "b"),
                     source_shape=(1, 6, 6), to_rgb=True, resize=(12, 12))
    out = BatchTransform(rgb, None, torch.device("cpu"))(x)
    ref = torch.nn.functional.interpolate(x.float().expand(-1, 3, -1, -1) / 255, size=(12, 12), mode="bilinear",
                                          align_corners=False, antialias=True)
    mean, std = torch.tensor(rgb.mean).view(1, 3, 1, 1), torch.tensor(rgb.std).view(1, 3, 1, 1)
    assert out.shape == (4, 3, 12, 12) and torch.allclose(out, (ref - mean) / std, atol=1e-5)
    no_resize = Preprocess(input_shape=(3, 6, 6), mean=rgb.mean, std=rgb.std, classes=("a", "b"),
                           source_shape=(1, 6, 6), to_rgb=True)
    out = BatchTransform(no_resize, None, torch.device("cpu"))(x)
    assert out.shape == (4, 3, 6, 6) and torch.allclose(out, (x.float().expand(-1, 3, -1, -1) / 255 - mean) / std,
                                                        atol=1e-6)
