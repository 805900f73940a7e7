"""Augmentation presets (random resized crop, random erasing, RandAugment, TrivialAugment, MixUp, CutMix):
batched, drawn per image from the run's augmentation generator, deterministic, resumable, and trained end
to end."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torchvision.transforms.v2 import functional as TF

from classlab import transforms as T
from classlab.config import Augment, RandomErasing, RandomResizedCrop, RunConfig, TrainConfig, validate
from classlab.errors import ClasslabError
from classlab.runs import RunFolder
from classlab.study import run_study, train_run
from classlab.train.members import member_losses
from classlab.train.optim import loss_fn
from classlab.transforms import BatchTransform, Preprocess, mix_batch, sample_beta
from tests.conftest import TINY_CNN, stop_fit_after, tiny_study, write_study

CPU = torch.device("cpu")
PRESETS = {
    "crop": {"random_resized_crop": {"scale": [0.3, 1.0]}},
    "erasing": {"random_erasing": {"p": 1.0}},
    "erasing_noise": {"random_erasing": {"p": 1.0, "value": "random"}},
    "randaugment": {"randaugment": True},
    "trivialaugment": {"trivialaugment": True},
    "mixup": {"mixup": 0.4},
    "cutmix": {"cutmix": 1.0},
    "mixup_cutmix": {"mixup": 0.2, "cutmix": 1.0},
}
ALL = {"random_resized_crop": True, "hflip": 0.5, "rotate": 10, "randaugment": {"num_ops": 3},
       "random_erasing": True, "mixup": 0.2, "cutmix": 1.0}


def _pre(c=1, size=28, classes=4, **kw):
    return Preprocess(input_shape=(c, size, size), mean=(0.5,) * c, std=(0.25,) * c,
                      classes=tuple("abcdefgh"[:classes]), **kw)


def _apply(aug: dict, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, pre=None):
    tf = BatchTransform(pre or _pre(x.shape[1], x.shape[-1]), Augment(**aug), CPU, gen)
    out = tf(x)
    return tf.mix(out, y) if tf.mixes else (out, y)


def _batch(n=32, c=1, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g), torch.arange(n) % 4


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_shapes_dtypes_and_determinism(name):
    aug = PRESETS[name]
    for c, size in ((1, 28), (3, 20)):
        x, y = _batch(c=c, size=size)
        out, target = _apply(aug, x, y, torch.Generator().manual_seed(3))
        assert out.shape == (32, c, size, size) and out.dtype == torch.float32 and torch.isfinite(out).all()
        again, target2 = _apply(aug, x, y, torch.Generator().manual_seed(3))
        assert torch.equal(out, again) and torch.equal(target, target2)  # same generator state, same output
        other, _ = _apply(aug, x, y, torch.Generator().manual_seed(4))
        assert not torch.equal(out, other)
        if "mixup" in aug or "cutmix" in aug:
            assert target.shape == (32, 4) and target.dtype == torch.float32
            assert torch.allclose(target.sum(1), torch.ones(32)) and (target >= 0).all()
        else:
            assert torch.equal(target, y)


@pytest.mark.parametrize("name", ["crop", "erasing", "randaugment", "trivialaugment"])
def test_draws_differ_per_image(name):
    x = _batch(n=1)[0].expand(16, -1, -1, -1).contiguous()  # one image, 16 times
    out, _ = _apply(PRESETS[name], x, torch.zeros(16, dtype=torch.long), torch.Generator().manual_seed(0))
    distinct = {tuple(img.flatten().tolist()) for img in out}
    assert len(distinct) >= 8  # trivialaugment's identity / flat-image ops may coincide, never most of them


def test_mix_draws_differ_per_image_and_targets_match_the_pixels():
    n, classes = 64, 8
    y = torch.arange(n) % classes
    x = y.float().view(n, 1, 1, 1).expand(n, 1, 12, 12).contiguous()  # image i is the constant y[i]
    g = torch.Generator().manual_seed(0)
    for alphas in ((0.4, 0.0), (0.0, 1.0), (0.3, 1.0)):
        mixed, target = mix_batch(x, y, classes, *alphas, g)
        own = target[torch.arange(n), y]
        assert len(set(own.tolist())) > n // 4  # λ per image (CutMix: box areas on a 12×12 grid)
        assert torch.allclose(target.sum(1), torch.ones(n))
        partner = y.roll(1)
        # every pixel is λ·own + (1-λ)·partner (MixUp) or one of the two (CutMix): the pixel mean says λ
        expect = own * y + (1 - own) * partner
        assert torch.allclose(mixed.mean(dim=(1, 2, 3)), expect.float(), atol=1e-4)


def test_cutmix_pastes_a_box_and_weights_by_its_area():
    n = 32
    x = torch.zeros(n, 1, 10, 10)
    x[torch.arange(n) % 2 == 1] = 1.0  # odd images white, even black: a partner is always the other colour
    y = torch.arange(n) % 2
    mixed, target = mix_batch(x, y, 2, 0.0, 1.0, torch.Generator().manual_seed(1))
    pasted = (mixed != x).float().mean(dim=(1, 2, 3))
    assert torch.allclose(1 - pasted, target[torch.arange(n), y], atol=1e-6)
    assert ((mixed == 0) | (mixed == 1)).all() and pasted.max() > 0


def test_beta_sampler_moments_and_no_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for alpha in (0.2, 1.0, 3.0):
        lam = sample_beta(alpha, 20_000, CPU, torch.Generator().manual_seed(0))
        assert ((lam >= 0) & (lam <= 1)).all()
        assert abs(lam.mean().item() - 0.5) < 0.015
        assert lam.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.05)
    assert torch.equal(torch.get_rng_state(), before)  # only the generator it was given


def test_resume_continues_the_same_stream():
    """A generator's state saved between two batches continues exactly: what a checkpointed run relies on."""
    x, y = _batch(c=3, size=24)
    pre = _pre(3, 24)
    gen = torch.Generator().manual_seed(7)
    tf = BatchTransform(pre, Augment(**ALL), CPU, gen)
    tf.mix(tf(x), y)
    saved = gen.get_state()
    first = tf.mix(tf(x), y)
    resumed_gen = torch.Generator()
    resumed_gen.set_state(saved)
    resumed = BatchTransform(pre, Augment(**ALL), CPU, resumed_gen)
    second = resumed.mix(resumed(x), y)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_one_hot_targets_give_plain_cross_entropy():
    logits = torch.randn(12, 5)
    y = torch.arange(12) % 5
    hot = F.one_hot(y, 5).float()
    for train in ({}, {"label_smoothing": 0.1}, {"loss": "nll"}, {"softmax_before_loss": True}):
        tc = TrainConfig(**train)
        for reduction in ("mean", "sum", "none"):
            assert torch.allclose(loss_fn(logits, hot, tc, reduction), loss_fn(logits, y, tc, reduction), atol=1e-6)
    assert torch.allclose(loss_fn(logits, hot, TrainConfig()), F.cross_entropy(logits, y))
    stacked = torch.randn(3, 12, 5)  # K = 3 members sharing the batch
    for targets in (y.expand(3, -1), hot.expand(3, -1, -1)):
        loss, logged, _ = member_losses(stacked, targets, TrainConfig(), 12, 1)
        assert torch.allclose(logged, torch.stack([F.cross_entropy(s, y) for s in stacked]), atol=1e-6)


def test_pointwise_operations_equal_torchvision():
    """The policies' colour operations, per image, against torchvision.transforms.v2.functional."""
    x = torch.randint(0, 256, (6, 3, 9, 11), dtype=torch.uint8).float() / 255
    cases = [(T._brightness, 0.4, lambda im: TF.adjust_brightness(im, 1.4)),
             (T._color, -0.5, lambda im: TF.adjust_saturation(im, 0.5)),
             (T._contrast, 0.7, lambda im: TF.adjust_contrast(im, 1.7)),
             (T._sharpness, 0.9, lambda im: TF.adjust_sharpness(im, 1.9)),
             (T._posterize, 3.0, lambda im: TF.posterize((im * 255).round().to(torch.uint8), 3).float() / 255),
             (T._solarize, 0.6, lambda im: TF.solarize(im, 0.6)),
             (T._autocontrast, 0.0, TF.autocontrast),
             (T._equalize, 0.0, TF.equalize)]
    for fn, m, ref in cases:
        got = fn(x.clone(), torch.full((6,), m))
        want = torch.stack([ref(im) for im in x])
        assert torch.allclose(got, want, atol=5e-4), fn.__name__  # torchvision's gray weighs red 0.2989, ours 0.299


def test_geometric_operations_equal_torchvision():
    """Shear (about the top-left corner), translate and rotate, nearest neighbour, as torchvision's policies."""
    x = torch.rand(1, 1, 20, 24)
    shear = math.degrees(math.atan(0.3))
    cases = [(1, 0.3, {"angle": 0.0, "translate": [0, 0], "shear": [shear, 0.0], "center": [0, 0]}),
             (2, -0.3, {"angle": 0.0, "translate": [0, 0], "shear": [0.0, -shear], "center": [0, 0]}),
             (3, 3.0, {"angle": 0.0, "translate": [3, 0], "shear": [0.0, 0.0]}),
             (4, -2.0, {"angle": 0.0, "translate": [0, -2], "shear": [0.0, 0.0]}),
             (5, 20.0, None)]  # the policies' Rotate is F.rotate (counter-clockwise), not affine's angle
    for op, m, kw in cases:
        got = T._geometric(x, torch.tensor([op]), torch.tensor([m]))
        want = (TF.affine(x[0], scale=1.0, **kw) if kw else TF.rotate(x[0], m))[None]
        assert (got == want).float().mean() > 0.98, op  # a pixel may round to its neighbour at a boundary


def test_gpu_path_equals_subset_path():
    """On a GPU each operation runs on the whole batch and `where` keeps it (no host sync); on the CPU on the
    images that drew it. Same draws, same result."""
    x = torch.rand(40, 3, 16, 16)
    for kw in ({"rounds": 2, "bins": 31, "magnitude": 9, "wide": False}, {"rounds": 1, "bins": 31, "magnitude": None,
                                                                           "wide": True}):
        subsets = T.auto_augment(x, torch.Generator().manual_seed(0), **kw)
        whole = T.auto_augment(x, torch.Generator().manual_seed(0), subsets=False, **kw)
        assert torch.allclose(subsets, whole, atol=1e-6)


def test_crop_and_erasing_limits():
    x = torch.rand(8, 1, 12, 16)
    g = torch.Generator().manual_seed(0)
    full = T.random_resized_crop(x, RandomResizedCrop(scale=(1.0, 1.0), ratio=(16 / 12, 16 / 12)), g)
    assert torch.allclose(full, x, atol=1e-5)  # the whole image is the only box: identity
    mask = T.erasing_mask(2000, 20, 20, RandomErasing(p=0.5, scale=(0.1, 0.2), ratio=(0.5, 2.0)), CPU, g)
    area = mask.float().mean(dim=(1, 2, 3))
    assert 0.4 < (area > 0).float().mean() < 0.6
    assert area[area > 0].min() > 0.05 and area.max() < 0.3
    erased = T.random_erasing(x, RandomErasing(p=0.0), g)
    assert torch.equal(erased, x)


def test_erasing_follows_the_pixel_permutation():
    """With permute_pixels, the rectangle is drawn on the image and moves with its pixels."""
    perm = tuple(T.pixel_permutation(0, 100).tolist())
    x = torch.randint(0, 256, (4, 1, 10, 10), dtype=torch.uint8)
    aug = Augment(random_erasing={"p": 1.0, "value": 100.0})
    out = BatchTransform(_pre(1, 10, permutation=perm), aug, CPU, torch.Generator().manual_seed(0))(x)
    plain = BatchTransform(_pre(1, 10), aug, CPU, torch.Generator().manual_seed(0))(x)
    inverse = torch.argsort(torch.tensor(perm))
    unpermuted = out.reshape(4, 1, 100)[:, :, inverse].reshape(4, 1, 10, 10)
    assert torch.equal(unpermuted, plain) and (plain == 100).any()


def test_config_shorthands_and_errors():
    assert Augment(randaugment=True).randaugment.num_ops == 2
    assert Augment(trivialaugment=False).trivialaugment is None
    assert Augment(random_erasing=True).random_erasing == RandomErasing()
    with pytest.raises(ValueError, match="choose one"):
        Augment(randaugment=True, trivialaugment=True)
    with pytest.raises(ValueError, match="magnitude"):
        Augment(randaugment={"magnitude": 31})
    with pytest.raises(ValueError, match="scale"):
        Augment(random_resized_crop={"scale": [0.5, 0.2]})


def test_every_preset_trains_end_to_end(idx_folder, tmp_path):
    runs = [{"name": name, "data": {"augment": aug}} for name, aug in PRESETS.items()]
    runs.append({"name": "nll_all", "data": {"augment": ALL}, "train": {"loss": "nll"}})
    study = tiny_study(tmp_path, idx_folder, runs=runs)
    study["train"]["epochs"] = 1
    result = run_study(write_study(tmp_path / "s.yaml", study), console=Console(quiet=True), device="cpu")
    assert not result.failed
    for run in runs:
        folder = tmp_path / "runs" / "toy" / run["name"]
        summary = json.loads((folder / "summary.json").read_text())
        rows = RunFolder(folder).read_metrics()
        assert 0 <= summary["test"]["accuracy"] <= 1 and 0 <= rows[0]["train_accuracy"] <= 1
        assert rows[0]["train_loss"] > 0


def test_resume_with_every_preset_equals_uninterrupted(idx_folder, tmp_path):

    model = {"name": "cnn", "layers": TINY_CNN}
    cfg = validate(RunConfig, {"name": "r", "data": {"dataset": "idx", "root": str(idx_folder), "augment": ALL},
                               "model": model, "train": {"epochs": 2, "batch_size": 32, "lr": 0.01}})
    quiet = Console(quiet=True)
    full = train_run(cfg, RunFolder(tmp_path / "full"), CPU, quiet)
    with pytest.MonkeyPatch.context() as m:
        stop_fit_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            train_run(cfg, RunFolder(tmp_path / "resumed"), CPU, quiet)
    resumed = train_run(cfg, RunFolder(tmp_path / "resumed"), CPU, quiet)
    assert resumed["test"] == full["test"]
    keys = ("train_loss", "train_accuracy", "val_loss")
    assert [{k: r[k] for k in keys} for r in RunFolder(tmp_path / "resumed").read_metrics()] == [
        {k: r[k] for k in keys} for r in RunFolder(tmp_path / "full").read_metrics()]


def test_bad_preset_key_is_one_line(idx_folder, tmp_path):
    study = tiny_study(tmp_path, idx_folder)
    study["data"]["augment"] = {"randaugment": {"num_opps": 2}}
    with pytest.raises(ClasslabError, match="num_opps.*num_ops"):
        run_study(write_study(tmp_path / "s.yaml", study), console=Console(quiet=True), device="cpu")


def test_stacked_members_mix_as_they_would_alone(idx_folder, monkeypatch):
    """A stacked grid group with MixUp + CutMix: every member gets its seed's mixed batch and soft targets,
    so in float64 it trains exactly as each run alone."""
    from tests.test_stacked import SMALL_MLP, _assert_same, _both

    def cfg(name, seed, **train):
        data = {"dataset": "idx", "root": str(idx_folder), "val_fraction": 0.2,
                "augment": {"mixup": 0.4, "cutmix": 1.0, "hflip": 0.5}}
        return validate(RunConfig, {"name": name, "seed": seed, "data": data, "model": SMALL_MLP,
                                    "train": {"epochs": 2, "batch_size": 32, "lr": 0.01, **train}})

    cfgs = [cfg("a", 0), cfg("b", 0, optimizer="rmsprop", lr=0.003), cfg("c", 1)]
    stacked, sm, alone, am = _both(cfgs, torch.float64, monkeypatch)
    assert all(r.stacked == 3 for r in stacked)
    _assert_same(stacked, sm, alone, am)


def test_one_op_table_gives_the_pipeline_its_fast_path_and_the_tta_views():
    from classlab.config import EvalConfig
    from classlab.transforms import AUGMENT_OPS, VIEWS
    from classlab.tta import view_fn

    assert [op.name for op in AUGMENT_OPS] == ["random_resized_crop", "hflip", "vflip", "rotate", "policy",
                                               "color_jitter", "random_erasing", "mix"]
    pre, gen = _pre(1, 16), torch.Generator()
    full = BatchTransform(pre, Augment(**ALL, color_jitter={"brightness": 0.2}), CPU, gen)
    assert [op.name for op, _ in full.steps["stored"]] == ["random_resized_crop", "hflip", "rotate", "policy"]
    assert [op.name for op, _ in full.steps["model"]] == ["color_jitter"] and full.mixes
    # the fast path (normalize while converting from uint8) exactly when every op commutes with normalization
    commuting = Augment(random_resized_crop=True, hflip=0.5, random_erasing=True)
    assert BatchTransform(pre, commuting, CPU, gen).normalize_first
    for slow in ({"rotate": 10}, {"color_jitter": {"brightness": 0.2}}, {"trivialaugment": True}):
        assert not BatchTransform(pre, Augment(**slow), CPU, gen).normalize_first, slow
    assert not BatchTransform(pre, Augment(hflip=0.5), CPU).steps["stored"]  # no generator (eval): no augmentation
    # a TTA view is its op at one setting: the rotated view is the training rotation at that angle
    x = _batch(8, 1, 16)[0]
    angles = torch.full((8,), math.radians(10), dtype=torch.float64)
    assert torch.equal(view_fn("rotate:10")(x), T.rotate(x.float(), angles).round().clamp(0, 255).to(torch.uint8))
    assert torch.equal(view_fn("hflip")(x), x.flip(-1)) and torch.equal(view_fn("vflip")(x), x.flip(-2))
    assert sorted(VIEWS) == ["hflip", "rotate", "vflip"] and EvalConfig(tta=["hflip", "vflip", "rotate:5"]).tta
