"""Test-time augmentation: the view syntax, the views themselves (on the stored image, before the pixel
permutation), and the averaged probabilities through train.forward.predict_logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from classlab.config import EvalConfig, RunConfig, validate
from classlab.errors import ClasslabError
from classlab.transforms import BatchTransform, Preprocess, pixel_permutation
from classlab.tta import ViewTransform, rotate_uint8, tta_probs, view_names


def test_view_syntax():
    assert EvalConfig(tta=["hflip", "rotate:10"]).tta == ["hflip", "rotate:10"]
    assert EvalConfig(tta=["HFlip", {"rotate": 7.5}, "vflip"]).tta == ["hflip", "rotate:7.5", "vflip"]
    assert view_names(["hflip", "rotate:10"]) == ["identity", "hflip", "rotate:10", "rotate:-10"]
    for bad in (["spin"], ["rotate:0"], ["rotate:x"], ["hflip", "hflip"], ["hflip:3"]):
        with pytest.raises(ClasslabError):
            validate(RunConfig, {"name": "x", "model": {"name": "mlp"}, "eval": {"tta": bad}})


def test_views_act_on_the_stored_image_before_the_permutation():
    x = torch.arange(2 * 16, dtype=torch.uint8).reshape(2, 1, 4, 4)
    assert torch.equal(rotate_uint8(x, 0.0), x)
    assert rotate_uint8(x, 90.0).dtype == torch.uint8
    perm = pixel_permutation(0, 16)
    pre = Preprocess(input_shape=(1, 4, 4), mean=(0.0,), std=(1.0,), classes=("a", "b"),
                     permutation=tuple(perm.tolist()))
    base = BatchTransform(pre, None, torch.device("cpu"))
    flipped = ViewTransform(base, "hflip")(x)
    assert torch.allclose(flipped, base(x.flip(-1)))  # flipped first, then permuted


def test_tta_probs_average_the_views_softmax():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    pre = Preprocess(input_shape=(1, 4, 4), mean=(0.5,), std=(0.5,), classes=("a", "b", "c"))
    transform = BatchTransform(pre, None, torch.device("cpu"))
    images = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    probs, names = tta_probs(model, images, transform, 4, torch.device("cpu"), ["hflip"], temperature=2.0)
    with torch.no_grad():
        x = transform(images)
        expected = ((model(x) / 2).softmax(1) + (model(x.flip(-1)) / 2).softmax(1)) / 2
    assert names == ["identity", "hflip"]
    torch.testing.assert_close(probs, expected)
    assert torch.allclose(probs.sum(1), torch.ones(10))
