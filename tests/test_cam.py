"""Grad-CAM through pytorch_grad_cam: the target layer per architecture, maps that find what decides the
class, maps brought back through the run's pixel permutation, and the noise measure of the sanity note."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from classlab.cam import grad_cam, image_cams, mass_fraction, spatial_autocorrelation, target_layer, to_stored
from classlab.transforms import Preprocess, pixel_permutation

SIZE = 16


def corner_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images whose class is 1 exactly when the top-left 4×4 corner is bright."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, SIZE, SIZE, generator=g) * 0.5
    y = torch.arange(n) % 2
    x[y == 1, :, :4, :4] += 0.5
    return x, y


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def test_grad_cam_puts_the_mass_in_the_corner_that_decides_the_class():
    model = tiny_cnn()
    x, y = corner_images(512, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for step in range(150):  # a few steps: the corner is easy to learn
        batch = torch.arange(step * 64, step * 64 + 64) % len(x)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    test_x, test_y = corner_images(64, seed=1)
    with torch.no_grad():
        assert (model(test_x).argmax(1) == test_y).float().mean() > 0.95
    assert target_layer(model)[0] == "2"  # the last conv
    positive = test_x[test_y == 1]
    maps = grad_cam(model, positive, [1] * len(positive))
    assert maps.shape == (len(positive), SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    corner = (slice(0, SIZE // 2), slice(0, SIZE // 2))  # a quarter of the image
    fractions = [mass_fraction(m, corner) for m in maps]
    print(f"Grad-CAM mass in the deciding corner quadrant: mean {np.mean(fractions):.3f}, min {np.min(fractions):.3f}")
    assert np.mean(fractions) > 0.6 and np.min(fractions) > 0.5
    assert model.training  # the mode is restored, no hooks left behind
    assert not any(m._forward_hooks for m in model.modules())


def test_target_layer_per_architecture():
    import torchvision

    from classlab.config import RunConfig, validate
    from classlab.models import build_model

    resnet = torchvision.models.resnet18(num_classes=3)
    assert target_layer(resnet)[0] == "layer4"
    cfg = validate(RunConfig, {"name": "x", "model": {"name": "study_a_cnn"}})
    preset = build_model(cfg.model, 3, (1, 28, 28))
    name, layer = target_layer(preset)
    last_conv = [m for m in preset.modules() if isinstance(m, nn.Conv2d)][-1]
    assert layer is last_conv, name
    mlp = validate(RunConfig, {"name": "x", "model": {"name": "mlp", "hidden": [8]}})
    assert target_layer(build_model(mlp.model, 3, (1, 28, 28))) is None


def test_maps_come_back_through_the_permutation_and_resize():
    perm = pixel_permutation(3, 8 * 8)
    pre = Preprocess(input_shape=(1, 8, 8), mean=(0.5,), std=(0.5,), classes=("a", "b"),
                     permutation=tuple(perm.tolist()), source_shape=(1, 8, 8))
    stored = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    seen_by_model = stored.reshape(2, 64)[:, perm.numpy()].reshape(2, 8, 8)  # as BatchTransform permutes
    np.testing.assert_allclose(to_stored(seen_by_model, pre), stored)
    resized = Preprocess(input_shape=(1, 16, 16), mean=(0.5,), std=(0.5,), classes=("a", "b"),
                         source_shape=(1, 8, 8), resize=(16, 16))
    assert to_stored(np.ones((1, 16, 16), np.float32), resized).shape == (1, 8, 8)


def test_image_cams_through_the_run_transform():
    model = tiny_cnn()
    pre = Preprocess(input_shape=(1, SIZE, SIZE), mean=(0.5,), std=(0.5,), classes=("a", "b"))
    images = (corner_images(4, 2)[0] * 255).to(torch.uint8).numpy()
    maps = image_cams(model, pre, images, [0, 1, 0, 1], torch.device("cpu"))
    assert maps.shape == (4, SIZE, SIZE) and np.isfinite(maps).all()


def test_spatial_autocorrelation_tells_smooth_maps_from_noise():
    yy, xx = np.mgrid[0:28, 0:28]
    smooth = np.exp(-((yy - 8) ** 2 + (xx - 20) ** 2) / 40.0)[None]
    noise = np.random.default_rng(0).random((4, 28, 28))
    assert spatial_autocorrelation(smooth) > 0.9
    assert abs(spatial_autocorrelation(noise)) < 0.1
    perm = np.random.default_rng(1).permutation(28 * 28)
    scattered = smooth.reshape(1, -1)[:, perm].reshape(1, 28, 28)
    assert spatial_autocorrelation(scattered) < 0.3
    assert spatial_autocorrelation(np.zeros((1, 4, 4))) is None


@pytest.mark.parametrize("bad", [[], None])
def test_grad_cam_needs_a_convolution(bad):
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    assert target_layer(mlp) is None
    with pytest.raises(ValueError, match="no convolution"):
        grad_cam(mlp, torch.zeros(1, 1, 2, 2), [0])
