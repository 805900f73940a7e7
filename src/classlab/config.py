"""Study files as frozen pydantic models: every key typed, unknown keys rejected with a suggestion.

A study file has a base (`data`, `model`, `train`), optional `runs:` (named overrides of the base)
and `grid:` (dotted keys crossed with each other), and `seeds:`. `plan.py` expands it into one
`RunConfig` per run; this module only parses, merges and validates.
"""

from __future__ import annotations

import copy
import re
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from classlab import metrics
from classlab.errors import ClasslabError, one_line
from classlab.registry import ACTIVATIONS as ACTIVATION_REGISTRY
from classlab.registry import DATASETS as DATASET_REGISTRY
from classlab.registry import MODEL_ALIASES, PRESETS, ZOO_FAMILIES, suggest
from classlab.registry import MODELS as MODEL_REGISTRY


class Strict(BaseModel):
    """Base for every config section: immutable, and a typo is an error rather than ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- data

DATASETS = DATASET_REGISTRY.names()
MANIFESTS = ("csv", "parquet")  # datasets read from a table of paths and labels (data/manifest.py)


class Normalize(Strict):
    mean: tuple[float, ...] = Field(
        description="per-channel mean of the [0, 1] pixel values (one value for all channels, or one per channel)")
    std: tuple[float, ...] = Field(
        description="per-channel standard deviation, > 0; the input becomes (x - mean) / std")

    @model_validator(mode="after")
    def _check(self) -> Normalize:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError("mean and std need the same, non-zero number of values (one per channel)")
        if any(s <= 0 for s in self.std):
            raise ValueError("every std must be > 0")
        return self


class ColorJitter(Strict):
    """torchvision's ColorJitter ranges: factors drawn per image in [1-x, 1+x]; hue shift in ±hue turns."""

    brightness: float = Field(0.0, ge=0, description="brightness factor drawn per image in [1 - x, 1 + x]")
    contrast: float = Field(0.0, ge=0, description="contrast factor drawn per image in [1 - x, 1 + x]")
    saturation: float = Field(
        0.0, ge=0, description="saturation factor drawn per image in [1 - x, 1 + x] (RGB input only)")
    hue: float = Field(0.0, ge=0, le=0.5, description="hue shift drawn per image in ±hue turns (RGB input only)")


def _increasing_pair(name: str, v: tuple[float, float]) -> tuple[float, float]:
    if not 0 < v[0] <= v[1]:
        raise ValueError(f"{name} needs 0 < low <= high, got {list(v)}")
    return v


class RandomResizedCrop(Strict):
    """torchvision's RandomResizedCrop, per image: a box of `scale` × the image's area and aspect ratio in
    `ratio` (log-uniform), resampled to the image's own size (data.resize, if set, follows)."""

    scale: tuple[float, float] = Field((0.08, 1.0), description="range of the crop's area, a fraction of the image's")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="range of the crop's width / height")

    @model_validator(mode="after")
    def _check(self) -> RandomResizedCrop:
        _increasing_pair("scale", self.scale)
        _increasing_pair("ratio", self.ratio)
        if self.scale[1] > 1:
            raise ValueError(f"scale is a fraction of the image's area: at most 1, got {list(self.scale)}")
        return self


class RandomErasing(Strict):
    """torchvision's RandomErasing, per image, on the normalized model input (where torchvision's recipes put
    it): a rectangle of `scale` × the area, aspect ratio in `ratio`, set to `value`."""

    p: float = Field(0.5, ge=0, le=1, description="probability that an image gets a rectangle erased")
    scale: tuple[float, float] = Field((0.02, 0.33),
                                       description="range of the rectangle's area, a fraction of the image's")
    ratio: tuple[float, float] = Field((0.3, 3.3), description="range of the rectangle's height / width")
    value: float | Literal["random"] = Field(
        0.0, description="fill in normalized units (0 = the normalization's mean), or random: standard normal noise")

    @model_validator(mode="after")
    def _check(self) -> RandomErasing:
        _increasing_pair("scale", self.scale)
        _increasing_pair("ratio", self.ratio)
        if self.scale[1] > 1:
            raise ValueError(f"scale is a fraction of the image's area: at most 1, got {list(self.scale)}")
        return self


class RandAugment(Strict):
    """torchvision's RandAugment (Cubuk et al. 2020), batched: each image draws `num_ops` of the 14 operations
    with a random sign, all at bin `magnitude` of `num_magnitude_bins`."""

    num_ops: int = Field(2, ge=1, description="operations applied to each image, one after another")
    magnitude: int = Field(9, ge=0, description="magnitude bin of every operation, 0 .. num_magnitude_bins - 1")
    num_magnitude_bins: int = Field(31, ge=2, description="how many steps the magnitude ranges are split into")

    @model_validator(mode="after")
    def _check(self) -> RandAugment:
        if self.magnitude >= self.num_magnitude_bins:
            raise ValueError(f"magnitude {self.magnitude} must be below num_magnitude_bins ({self.num_magnitude_bins})")
        return self


class TrivialAugment(Strict):
    """torchvision's TrivialAugmentWide (Müller & Hutter 2021), batched: each image draws one of the 14
    operations and its own magnitude bin and sign."""

    num_magnitude_bins: int = Field(31, ge=2, description="how many steps the magnitude ranges are split into")


def _preset_switch(v: Any) -> Any:
    """`randaugment: true` means the defaults, `false` none."""
    if isinstance(v, bool):
        return {} if v else None
    return v


class Augment(Strict):
    """Train-time augmentation, applied to whole batches on the device, every random number drawn per image
    from the run's own augmentation generator (checkpointed, so a resumed run continues exactly). Order:
    random_resized_crop, hflip, rotate, randaugment / trivialaugment, pixel permutation, to_rgb, resize,
    color_jitter, normalization, random_erasing, then mixup / cutmix (with class-probability targets)."""

    hflip: float = Field(0.0, ge=0, le=1, description="probability of a horizontal flip")
    rotate: float = Field(0.0, ge=0, le=180, description="max rotation in degrees, uniform in ±rotate")
    color_jitter: ColorJitter | None = Field(None, description="per-image brightness / contrast / saturation / hue")
    random_resized_crop: RandomResizedCrop | None = Field(
        None, description="per-image random crop resampled to the image size; true = torchvision's defaults")
    random_erasing: RandomErasing | None = Field(
        None, description="per-image erased rectangle on the normalized input; true = torchvision's defaults")
    randaugment: RandAugment | None = Field(None, description="RandAugment, batched; true = torchvision's defaults")
    trivialaugment: TrivialAugment | None = Field(
        None, description="TrivialAugmentWide, batched; true = torchvision's defaults")
    mixup: float = Field(0.0, ge=0, description="MixUp's Beta(α, α) parameter α (e.g. 0.2); 0 = off. λ per "
                         "image, the partner is the next image of the batch; soft targets")
    cutmix: float = Field(0.0, ge=0, description="CutMix's Beta(α, α) parameter α (e.g. 1.0); 0 = off. With "
                          "mixup also set, each image gets one of the two with probability 1/2")

    @field_validator("hflip", mode="before")
    @classmethod
    def _bool_flip(cls, v: Any) -> Any:
        if isinstance(v, bool):
            return 0.5 if v else 0.0
        return v

    @field_validator("random_resized_crop", "random_erasing", "randaugment", "trivialaugment", mode="before")
    @classmethod
    def _switch(cls, v: Any) -> Any:
        return _preset_switch(v)

    @model_validator(mode="after")
    def _one_policy(self) -> Augment:
        if self.randaugment is not None and self.trivialaugment is not None:
            raise ValueError("randaugment and trivialaugment are two policies for the same step: choose one")
        return self


FIXED_GRAY = ("fashion-mnist", "mnist", "idx", "demo")  # IDX files: fixed train / test splits, gray, one size
GRAY_SOURCES = ("fashion-mnist", "mnist", "demo", "fer2013")  # gray whatever channels they are given

IMAGENET_STATS = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


class PermutePixels(Strict):
    seed: int = Field(description="seed of the one fixed permutation of pixel positions applied to every image")


class Subset(Strict):
    """A stratified, seeded sample of a split, for quick experiments and the demo."""

    train: int | None = Field(
        None, gt=0, description="exactly this many training images, the validation split included (stratified: "
        "every class, in its share; seeded by data.split_seed)")
    test: int | None = Field(
        None, gt=0, description="exactly this many test images (stratified: every class, in its share; seeded by "
        "data.split_seed)")
    keep: dict[str, Annotated[float, Field(gt=0, le=1)]] | None = Field(
        None, description="keep only this fraction of the listed classes' training images, e.g. {disgust: 0.1}: "
        "a class imbalance made on purpose (seeded by data.split_seed; the test split is untouched)")


class CrossValidation(Strict):
    """k-fold cross-validation of the training data with scikit-learn's splitters (StratifiedKFold,
    RepeatedStratifiedKFold, StratifiedGroupKFold): every (repeat, fold) is a run folder `<run>-fold<f>`
    (`<run>-r<r>-fold<f>` with repeats > 1); the test split stays untouched."""

    folds: int = Field(5, ge=2, description="folds per repeat (k); each run trains on k-1 of them")
    repeats: int = Field(1, ge=1, description="repeats of the k-fold split, each with its own shuffle (seeded by "
                         "data.split_seed)")
    stratify: bool = Field(True, description="every fold keeps the class proportions of the training data")
    group_by: str | None = Field(
        None, description="a manifest column (dataset csv / parquet, e.g. patient or writer): the images of one "
        "group never sit on both sides of a fold")
    inner_val: float | None = Field(
        None, gt=0, lt=1, description="validate on a stratified share of the fold's training part instead of on "
        "its held-out part (which then only gives the out-of-fold predictions); null = the held-out part")
    fold: tuple[int, int] | None = Field(
        None, description="set by the plan for each run: (repeat, fold), 1-based, the part this run holds out")

    @model_validator(mode="after")
    def _fold_in_range(self) -> CrossValidation:
        if self.fold is not None and not (1 <= self.fold[0] <= self.repeats and 1 <= self.fold[1] <= self.folds):
            raise ValueError(f"fold {list(self.fold)} is outside {self.repeats} repeat(s) × {self.folds} folds")
        return self


class DataConfig(Strict):
    dataset: Literal[DATASETS] = Field(  # type: ignore[valid-type]
        "fashion-mnist", description="the image source: fashion-mnist, mnist, idx (a folder of four IDX files), "
        "image-folder, fer2013, demo, csv / parquet (a manifest table: path, label, optional split and group columns)")
    root: str | None = Field(None, description="data folder or file; null = $CLASSLAB_DATA, else ~/.cache/classlab")
    download: bool = Field(True, description="download fashion-mnist / mnist when missing and online "
                           "(never with CLASSLAB_OFFLINE=1)")
    val_fraction: float | None = Field(
        0.1, gt=0, lt=1, description="stratified, seeded share of the training split held out for validation; "
        "null = none")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="only for folders without a test split")
    splits: dict[Literal["train", "val", "test"], list[str]] | None = Field(
        None, description="image folders: which subfolders of data.root make each split, e.g. the FER studies' "
        "{train: [train], test: [validation, test]}; null = train/, val|validation/, test/ as found")
    split_seed: int = Field(0, description="seed of the validation / test splits and of data.subset")
    channels: Literal[1, 3] | None = Field(None, description="image folders: 1 gray, 3 RGB, None = guess")
    image_size: tuple[int, int] | None = Field(None, description="image folders: resize to [H, W] at load")
    classes: list[str] | None = Field(
        None, min_length=2, description="manifests (csv / parquet): the class names in order; a label outside them "
        "is an error; null = the labels found, sorted")
    relabel: dict[str, list[str | int]] | None = Field(
        None, description="new classes by name (or index), e.g. {shoes: [Sandal, Sneaker, Ankle boot]}")
    permute_pixels: PermutePixels | None = Field(
        None, description="scramble pixel positions with one fixed permutation (train, validation, test, predict)")
    normalize: Normalize | None = Field(
        None, description="{mean, std}, or imagenet; null = the dataset's known statistics (fashion-mnist, mnist), "
        "else measured on the training images")
    augment: Augment = Field(Augment(), description="train-time augmentation, batched on the device")
    subset: Subset | None = Field(None, description="a stratified sample of the splits, for quick experiments")
    allow_missing_classes: bool = Field(
        False, description="accept a class with no training or no test images (else an error); the report lists "
        "the classes with no test images")
    sampler: Literal["shuffle", "balanced"] = Field(
        "shuffle", description="training order per epoch: shuffle (each image once), or balanced (a class-balanced "
        "draw with replacement, as many images as the training split, from the run's seeded order generator)")
    to_rgb: bool = Field(False, description="copy a gray channel to 3 (ImageNet models), per batch")
    resize: tuple[int, int] | None = Field(None, description="resize each batch on the device to [H, W]")
    cv: CrossValidation | None = Field(
        None, description="k-fold cross-validation of the training data: {folds: 5, repeats: 1, stratify: true, "
        "group_by: null}; the held-out fold validates (data.val_fraction is not used), null = one split")

    @model_validator(mode="after")
    def _splits_need_folders(self) -> DataConfig:
        if self.dataset in FIXED_GRAY:  # keys that these sources would read and ignore: refused, with why
            unused = [k for k in ("channels", "image_size") if getattr(self, k) is not None]
            if self.test_fraction != type(self).model_fields["test_fraction"].default:
                unused.append("test_fraction")
            if unused:
                raise ValueError(f"dataset '{self.dataset}' has its own test split and gray images "
                                 f"of one size; "
                                 f"{' and '.join(unused)} act on image folders only: remove them (data.resize / "
                                 "to_rgb change the images per batch)")
        jitter = self.augment.color_jitter
        if jitter is not None and (jitter.saturation or jitter.hue) and self.dataset in GRAY_SOURCES:
            raise ValueError(f"augment.color_jitter saturation / hue change colours; '{self.dataset}' images are "
                             "gray (to_rgb copies the gray channel, so they stay gray): remove them")
        if self.splits and self.dataset not in ("image-folder", "fer2013"):
            raise ValueError(f"data.splits names subfolders of an image folder; dataset '{self.dataset}' has fixed "
                             "splits: remove data.splits")
        if self.classes is not None and self.dataset not in MANIFESTS:
            raise ValueError(f"data.classes lists a manifest's classes; dataset '{self.dataset}' names its own: "
                             "remove data.classes")
        if self.cv is not None and self.cv.group_by is not None and self.dataset not in MANIFESTS:
            raise ValueError(f"data.cv.group_by names a manifest column; dataset '{self.dataset}' has none: use "
                             "dataset: csv (or parquet) with a column for the groups, or remove group_by")
        return self

    @field_validator("normalize", mode="before")
    @classmethod
    def _named_stats(cls, v: Any) -> Any:
        if v == "imagenet":
            return IMAGENET_STATS
        return v

    @field_validator("resize", "image_size", mode="before")
    @classmethod
    def _square(cls, v: Any) -> Any:
        return (v, v) if isinstance(v, int) else v

    @field_validator("resize", "image_size")
    @classmethod
    def _positive_size(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and min(v) < 1:
            raise ValueError(f"[{v[0]}, {v[1]}]: height and width must be at least 1 pixel")
        return v


# ----------------------------------------------------------------------------- models

ACTIVATIONS = ACTIVATION_REGISTRY.names()


class Empty(Strict):
    pass


class ConvSpec(Strict):
    out: int = Field(gt=0, description="output channels")
    kernel: int = Field(3, gt=0, description="kernel size")
    stride: int = Field(1, gt=0, description="stride")
    padding: int | Literal["same"] = Field(0, description="zero padding in pixels, or same")


class PoolSpec(Strict):
    kernel: int = Field(2, gt=0, description="window size")
    stride: int | None = Field(None, gt=0, description="stride; null = the window size")


class LinearSpec(Strict):
    out: int = Field(gt=0, description="output features")


class DropoutSpec(Strict):
    p: float = Field(ge=0, lt=1, description="probability of zeroing an activation in training")


class LeakySpec(Strict):
    slope: float = Field(0.01, description="negative slope")


_SHORTHAND = {"conv": "out", "maxpool": "kernel", "avgpool": "kernel", "linear": "out", "dropout": "p",
              "leaky_relu": "slope"}


class LayerSpec(Strict):
    """One layer of a `cnn` model. In YAML: `relu`, `flatten`, `{conv: {out: 32, kernel: 5}}`,
    `{maxpool: 2}`, `{linear: 200}`, `{dropout: 0.25}`; the final Linear to the class count is added."""

    conv: ConvSpec | None = Field(
        None, description="Conv2d, e.g. {conv: {out: 32, kernel: 5, padding: 2}} or {conv: 32}")
    maxpool: PoolSpec | None = Field(None, description="MaxPool2d, e.g. {maxpool: 2}")
    avgpool: PoolSpec | None = Field(None, description="AvgPool2d, e.g. {avgpool: 2}")
    linear: LinearSpec | None = Field(None, description="Linear (flattens first if needed), e.g. {linear: 200}")
    dropout: DropoutSpec | None = Field(None, description="Dropout, e.g. {dropout: 0.25}")
    leaky_relu: LeakySpec | None = Field(None, description="LeakyReLU, e.g. leaky_relu or {leaky_relu: 0.1}")
    bn: Empty | None = Field(None, description="BatchNorm (2d after a conv, 1d after a linear)")
    relu: Empty | None = Field(None, description="ReLU")
    tanh: Empty | None = Field(None, description="Tanh")
    gelu: Empty | None = Field(None, description="GELU")
    sigmoid: Empty | None = Field(None, description="Sigmoid")
    elu: Empty | None = Field(None, description="ELU")
    silu: Empty | None = Field(None, description="SiLU")
    flatten: Empty | None = Field(None, description="Flatten")
    gap: Empty | None = Field(None, description="global average pooling to one value per channel")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {v: {}}
        if isinstance(v, dict):
            out = {}
            some_set = any(val is not None for val in v.values())
            for key, val in v.items():
                if val is None and some_set:
                    continue  # a dumped spec lists the unset kinds as None
                if val is None:
                    val = {}
                elif not isinstance(val, dict) and key in _SHORTHAND:
                    val = {_SHORTHAND[key]: val}
                out[key] = val
            return out
        return v

    @model_serializer(mode="wrap")
    def _only_the_kind(self, handler: Any) -> Any:
        """Dump `{conv: {...}}`, not every kind with None: config.yaml stays readable."""
        return {k: v for k, v in handler(self).items() if v is not None}

    @model_validator(mode="after")
    def _exactly_one(self) -> LayerSpec:
        set_keys = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(set_keys) != 1:
            raise ValueError(f"a layer needs exactly one kind, got {set_keys or 'none'}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)

    @property
    def params(self) -> BaseModel:
        return getattr(self, self.kind)


class MLPConfig(Strict):
    name: Literal["mlp"] = Field(description="a fully connected network on the flattened image")
    hidden: list[Annotated[int, Field(gt=0)]] = Field([256, 128, 64], description="hidden layer widths")
    activation: Literal[ACTIVATIONS] = Field(  # type: ignore[valid-type]
        "relu", description="activation after each hidden layer")
    batchnorm: bool = Field(False, description="BatchNorm1d after each hidden layer")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout after the hidden layers")
    dropout_after: list[int] | None = Field(None, description="1-based hidden layers; None = all")

    @model_validator(mode="after")
    def _dropout_places(self) -> MLPConfig:
        if self.dropout_after is not None and self.dropout == 0:
            raise ValueError("dropout_after places dropout, but dropout is 0: set dropout (e.g. 0.2) or remove "
                             "dropout_after")
        outside = [i for i in self.dropout_after or () if not 1 <= i <= len(self.hidden)]
        if outside:
            raise ValueError(f"dropout_after {outside}: the hidden layers are 1..{len(self.hidden)}")
        return self


class CNNConfig(Strict):
    name: Literal["cnn"] = Field(description="a network written as its list of layers")
    layers: list[LayerSpec] = Field(
        min_length=1, description="the layers in order; the final Linear to the class count is added")


class PresetConfig(Strict):
    """The reference studies' networks by name; the switches mirror choices the studies left open."""

    tag: ClassVar[str] = "preset"
    name: Literal[PRESETS] = Field(  # type: ignore[valid-type]
        description="a reference study's network (study_a_cnn … study_e_cnn)")
    batchnorm: bool | None = Field(
        None, description="add BatchNorm where the study left it open; null = the study's choice")
    dropout: float | None = Field(None, ge=0, lt=1, description="dropout probability; null = the study's choice")

    @model_validator(mode="after")
    def _switch_acts(self) -> PresetConfig:
        if self.name == "study_a_cnn" and self.dropout is not None:
            raise ValueError("study_a_cnn has no dropout layer (its study has none) and would ignore dropout: "
                             "remove it, or write the layers as a cnn model")
        return self


class FreezeSpec(Strict):
    """Freeze every parameter group except these: group names (layer4, fc, blocks.6), or the model's own
    stages by role: stem, stage1..stageN, last_stage, stages, head (the classifier)."""

    all_but: list[str] = Field(
        min_length=1, description="what stays trainable, e.g. [layer4, fc] or [last_stage, head]; the rest is frozen")


class ZooConfig(Strict):
    """Any timm or torchvision classification architecture: `timm/<arch>` or `torchvision/<arch>`."""

    tag: ClassVar[str] = "zoo"
    name: str = Field(pattern=r"^(timm|torchvision)/[A-Za-z0-9_.\-]+$", description="timm/<arch> or torchvision/<arch>")
    pretrained: str = Field("none", description="none | imagenet | a .pth/.safetensors file | a classlab run folder")
    head: list[LayerSpec] | None = Field(None, description="layers before the final Linear, e.g. [{linear: 256}, relu]")
    freeze: FreezeSpec | Literal["none"] = Field(
        "none", description="none, or {all_but: [...]}: train only the named blocks")

    @property
    def family(self) -> str:
        return MODEL_ALIASES.get(self.name, self.name).split("/", 1)[0]

    @property
    def arch(self) -> str:
        return MODEL_ALIASES.get(self.name, self.name).split("/", 1)[1]


class ZooAliasConfig(ZooConfig):
    """A zoo model by a short name (registry.MODEL_ALIASES): `resnet18` is torchvision/resnet18 on the images as
    they are (their size and statistics, a first convolution on their channels), the transfer study's model."""

    tag: ClassVar[str] = "alias"
    name: Literal[tuple(MODEL_ALIASES)] = Field(  # type: ignore[valid-type]
        description="resnet18: torchvision's ResNet-18 (torchvision/resnet18 on the images as they are)")


def _model_tag(v: Any) -> str | None:
    """The union member a model config is: its name, `preset` for the studies' networks, `zoo` for
    timm/... and torchvision/...; an unknown name is returned as is (pydantic reports it)."""
    name = v.get("name") if isinstance(v, dict) else getattr(v, "name", None)
    if not isinstance(name, str):
        return None
    if name.split("/", 1)[0] in ZOO_FAMILIES and "/" in name:
        return "zoo"
    if name in MODEL_ALIASES:
        return "alias"
    return "preset" if name in PRESETS else name


ModelConfig = Annotated[
    Annotated[MLPConfig, Tag("mlp")] | Annotated[CNNConfig, Tag("cnn")] | Annotated[PresetConfig, Tag("preset")]
    | Annotated[ZooAliasConfig, Tag("alias")] | Annotated[ZooConfig, Tag("zoo")],
    Discriminator(_model_tag),
]
MODEL_NAMES = MODEL_REGISTRY.names()
VALIDATION_METRICS = metrics.VALIDATION  # early stopping and select.by: the registry's validation metrics


# ----------------------------------------------------------------------------- training


class Scheduler(Strict):
    name: Literal["none", "step", "cosine"] = Field(
        "none", description="none, step (× gamma every step_size epochs) or cosine (annealed to 0 over the epochs)")
    step_size: int = Field(5, gt=0, description="step: epochs between decays")
    gamma: float = Field(0.1, gt=0, le=1, description="step: the factor applied at each decay")

    @model_validator(mode="after")
    def _fields_of_its_schedule(self) -> Scheduler:
        """step_size / gamma act in the step schedule only: elsewhere they would be read and ignored. (A value
        equal to the default passes: a run's config.yaml lists every field.)"""
        unused = [k for k in ("step_size", "gamma") if getattr(self, k) != type(self).model_fields[k].default]
        if self.name != "step" and unused:
            raise ValueError(f"{' and '.join(unused)} set the step schedule's decays; the '{self.name}' schedule "
                             "does not use them: remove them, or use name: step")
        return self


class EarlyStopping(Strict):
    patience: int = Field(
        3, gt=0, description="stop after this many epochs without improvement; the best epoch's weights are kept")
    monitor: Literal[VALIDATION_METRICS] = Field(  # type: ignore[valid-type]
        "loss", description="the validation metric watched (classlab.metrics): loss (lower is better), accuracy, "
        "balanced_accuracy, macro_f1; val_<name> is read as the older spelling")
    min_delta: float = Field(
        0.0, ge=0, description="an epoch counts as an improvement only when it beats the best by more than this")

    @field_validator("monitor", mode="before")
    @classmethod
    def _metric_name(cls, value: Any) -> Any:
        return metrics.canonical(value, "train.early_stopping.monitor") if isinstance(value, str) else value


class TrainConfig(Strict):
    epochs: int = Field(10, gt=0, description="passes over the training split")
    batch_size: int = Field(64, gt=0, description="training batch size (the global batch under DDP)")
    eval_batch_size: int = Field(
        1024, gt=0, description="batch size for validation, test and prediction (no gradients)")
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = Field(
        "adam", description="torch optimizer (fused / foreach kernels where torch has them)")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    momentum: float = Field(0.0, ge=0, lt=1, description="momentum (sgd, rmsprop)")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd with momentum > 0 only)")
    weight_decay: float = Field(0.0, ge=0, description="the optimizer's weight decay (decoupled for adamw)")
    l1: float = Field(0.0, ge=0, description="L1 penalty on all weights (not biases)")
    loss: Literal["cross_entropy", "nll"] = Field(
        "cross_entropy", description="cross_entropy on the logits, or nll on their log-softmax (the same maths)")
    softmax_before_loss: bool = Field(
        False, description="apply softmax before cross-entropy (reproduces study D's double softmax on purpose)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing, e.g. 0.1")
    scheduler: Scheduler = Field(
        Scheduler(), description="learning-rate schedule; a name alone (step, cosine) takes the defaults")
    early_stopping: EarlyStopping | None = Field(
        None, description="stop when the validation metric stops improving (needs data.val_fraction)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto (CUDA when available), cpu or cuda")
    threads: int | None = Field(
        None, gt=0, description="CPU threads for torch; null = one for small models, torch's default for larger ones")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="mixed precision on CUDA: auto = bf16 on compute capability >= 8.0, fp16 with loss "
        "scaling below; off = fp32. The CPU always trains in fp32 (bf16 is slower there without AMX)")
    compile: bool = Field(False, description="torch.compile the model (CUDA: fewer kernel launches; the first "
                          "epoch pays the compile time; on CPU it was measured slower)")
    deterministic: bool = Field(False, description="deterministic CUDA kernels (cuDNN, cuBLAS workspace): "
                                "bit-for-bit repeatable GPU runs, at some speed; CPU runs are deterministic anyway")
    checkpoint_every: int = Field(1, gt=0, description="write checkpoints/last.pt every N epochs (and at the "
                                  "end); a resume redoes at most N-1 epochs")
    sync_batchnorm: bool = Field(False, description="under DDP on CUDA: BatchNorm statistics over all GPUs' "
                                 "shares of the batch (SyncBatchNorm) instead of each GPU's own")
    tensorboard: bool = Field(
        False, description="also write TensorBoard event files to <run>/tensorboard (pip install tensorboard)")
    class_weights: Literal["auto"] | dict[str, Annotated[float, Field(gt=0)]] | None = Field(
        None, description="weight of each class in the training loss: auto = inverse frequency in the training "
        "split, normalized so the mean image weight is 1 (n / (classes × count)); or {class name: weight}, 1 for "
        "classes not listed. Validation and test losses stay unweighted")
    lr_groups: dict[str, Annotated[float, Field(gt=0)] | list[Annotated[float, Field(gt=0)]]] | None = Field(
        None, description="learning rate per parameter group or stage role, e.g. {layer4: 5e-4, fc: 1e-3} or "
        "{stem: 1e-5, stages: [1e-5, 5e-5, 1e-4, 5e-4], head: 1e-3}; `decay: 0.7` gives each group without "
        "one the next group's rate times 0.7 (layer-wise decay from the head, whose rate is train.lr by default)")

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_bool(cls, v: Any) -> Any:
        """`amp: true / false` (the older form) means auto / off."""
        return {True: "auto", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("lr_groups")
    @classmethod
    def _lr_lists(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        for key, value in (v or {}).items():
            if isinstance(value, list) and (key != "stages" or not value):
                raise ValueError(f"lr_groups.{key}: only 'stages' takes a list (one rate per stage)")
        if v and "decay" in v and not (isinstance(v["decay"], float | int) and 0 < v["decay"] <= 1):
            raise ValueError("lr_groups.decay must be one number in (0, 1]")
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise ValueError("nesterov needs optimizer: sgd and momentum > 0")
        # settings that the chosen optimizer / loss / device would read and ignore: refused, with why
        if self.momentum > 0 and self.optimizer in ("adam", "adamw"):
            raise ValueError(f"momentum acts in sgd and rmsprop; {self.optimizer} has none (its beta1 = 0.9 plays "
                             "that part): remove momentum, or choose optimizer: sgd")
        if self.label_smoothing > 0 and self.loss == "nll":
            raise ValueError("label_smoothing acts in loss: cross_entropy; nll (log-softmax + NLL, as the studies "
                             "wrote it) has no smoothing: use loss: cross_entropy (the same maths) to smooth")
        if self.device == "cpu" and self.amp in ("bf16", "fp16"):
            raise ValueError(f"amp: {self.amp} acts on CUDA only; with device: cpu every run trains in fp32: remove "
                             "amp, or set device: auto")
        if self.device == "cpu" and self.sync_batchnorm:
            raise ValueError("sync_batchnorm acts under DDP on CUDA only; with device: cpu remove it")
        return self


# ----------------------------------------------------------------------------- runs and studies


class EvalConfig(Strict):
    """What the test evaluation adds after training (evaluate.evaluate_run): a temperature fitted on the
    validation logits, and test-time augmentation reported beside the plain test metrics."""

    temperature_scaling: bool = Field(
        False, description="fit one temperature on the validation logits after training (LBFGS, fp64), store it "
        "in the run folder (temperature.json) and apply it to the test metrics, predict and compare; the report "
        "shows the expected calibration error before and after (needs data.val_fraction)")
    tta: list[str] = Field(
        [], description="test-time augmentation views, averaged (probabilities) with the plain image: hflip, vflip, "
        "rotate:K (two views, +K and -K degrees); reported as test_tta beside the plain test metrics, and used "
        "by predict and compare --images")

    @field_validator("tta", mode="before")
    @classmethod
    def _tta_views(cls, v: Any) -> Any:
        """Canonical view names; `rotate: 10` (a one-key mapping, as YAML reads `[hflip, rotate: 10]`) too."""
        if not isinstance(v, list):
            return v
        out = []
        for item in v:
            if isinstance(item, dict) and len(item) == 1:
                item = "{}:{}".format(*next(iter(item.items())))
            text = str(item).strip().lower().replace(" ", "")
            name, _, arg = text.partition(":")
            if name in ("hflip", "vflip") and not arg:
                out.append(name)
                continue
            if name == "rotate":
                try:
                    degrees = float(arg)
                except ValueError:
                    degrees = 0.0
                if 0 < degrees <= 180:
                    out.append(f"rotate:{degrees:g}")
                    continue
            raise ValueError(f"'{item}' is not a view; write hflip, vflip or rotate:K (0 < K <= 180 degrees)")
        if len(set(out)) != len(out):
            raise ValueError("a view is listed twice")
        return out


class RunConfig(Strict):
    """One fully resolved run: what `runs.py` writes as config.yaml and `fit` trains."""

    name: str = Field(description="the run's name: <run>[-<grid cell>][-seed<k>], its folder's name")
    seed: int = Field(0, description="the run's seed (weights, batch order, dropout, augmentation), from seeds")
    data: DataConfig = Field(DataConfig(), description="the resolved data section")
    model: ModelConfig = Field(description="the resolved model section")
    train: TrainConfig = Field(TrainConfig(), description="the resolved train section")
    eval: EvalConfig = Field(EvalConfig(), description="the resolved eval section")

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        validated = self.data.val_fraction is not None or self.data.cv is not None  # a fold validates on its own
        if self.train.early_stopping is not None and not validated:
            raise ValueError("train.early_stopping needs a validation split: set data.val_fraction")
        if self.eval.temperature_scaling and not validated:
            raise ValueError("eval.temperature_scaling needs a validation split to fit on: set data.val_fraction")
        return self


class Select(Strict):
    """Pick the best variant by a validation metric over its seeds (`rule: mean`, or `lower_bound`: the
    variant whose lower 95% confidence bound is best), or pin one by name (to retrain what a paper chose;
    the metric's pick is still printed beside it). `metric:` is accepted as the older name of `by:`."""

    by: Literal[VALIDATION_METRICS] = Field(  # type: ignore[valid-type]
        "accuracy", validation_alias=AliasChoices("by", "metric"),
        description="the validation metric that picks the variant (classlab.metrics: accuracy, loss, "
        "balanced_accuracy, macro_f1; val_<name> and metric: are read as older spellings)")
    rule: Literal["mean", "lower_bound"] = Field(
        "mean", description="mean over seeds, or lower_bound: the best lower 95% confidence bound")
    variant: str | None = Field(
        None, description="pin this variant by name instead (the metric's pick is still printed)")
    confirm_seeds: int | list[int] | Literal["auto"] | None = Field(
        "auto", description="train the selected variant again with fresh seeds (disjoint from seeds), the "
        "comparisons' test reference, so the selection's lucky seeds are not: auto = as many as seeds, numbered "
        "after the largest, when there are >= 2 seeds; a count; a list of seeds; 0 or none = off")
    confirm_top: int = Field(
        3, ge=0, description="after a search: retrain the best N trials' settings with fresh seeds and compare them "
        "with the paired tests before selecting (0 = select the best trial as scored by the search)")

    @field_validator("by", mode="before")
    @classmethod
    def _metric_name(cls, value: Any) -> Any:
        return metrics.canonical(value, "select.by") if isinstance(value, str) else value


class Evidence(Strict):
    """What the verdicts' power note measures against (classlab.evidence)."""

    min_effect: float | None = Field(
        None, gt=0, lt=1, description="the smallest difference worth detecting, as a fraction (0.005 = half a "
        "point of accuracy): the power note says how many seeds (or test images) would detect it")


class MLflowTrack(Strict):
    """Log every run of the study to MLflow (classlab.tracking; needs `pip install 'classlab[mlflow]'`)."""

    uri: str | None = Field(None, description="tracking URI, e.g. sqlite:///mlflow.db, a folder, http://host:5000; "
                                              "None = MLflow's default ($MLFLOW_TRACKING_URI)")
    experiment: str | None = Field(None, description="experiment name; None = the study's name")
    artifact_location: str | None = Field(None, description="where a new experiment keeps its artifacts; "
                                                            "None = the tracking server's default")
    log_model: bool | Literal["onnx", "torchscript"] = Field(
        False, description="also log each run's exported model (true = onnx), as `classlab export` writes it")


class Track(Strict):
    """Experiment trackers a study logs to, beside its run folders."""

    mlflow: MLflowTrack | None = Field(None, description="log the study's runs to MLflow")


SPACE_KINDS = ("loguniform", "uniform", "int", "choice")


def parse_duration(value: Any) -> float:
    """'2h', '30m', '90s', '1h30m' or a number of seconds -> seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        number = r"(\d+(?:\.\d+)?)"
        match = re.fullmatch(rf"\s*(?:{number}h)?\s*(?:{number}m)?\s*(?:{number}s?)?\s*", str(value))
        if not match or not any(match.groups()):
            raise ValueError(f"timeout '{value}': write a duration such as 2h, 30m, 90s or 1h30m")
        h, m, sec = (float(g) if g else 0.0 for g in match.groups())
        seconds = h * 3600 + m * 60 + sec
    if seconds <= 0:
        raise ValueError(f"timeout '{value}' must be positive")
    return seconds


class Search(Strict):
    """A hyperparameter search on Optuna: each trial is a run folder `trial-NNNN`; the search's state lives in
    Optuna storage (default: search.db, SQLite, in the study folder; `--storage URL` for an RDB or a journal
    file), so the same command again continues it and several workers can share it."""

    space: dict[str, dict[str, Any]] = Field(
        {}, description="dotted key -> {loguniform: [low, high]} | {uniform: [low, high]} | {int: [low, high]} | "
        "{choice: [values]}; a study's grid: keys join as choices")
    trials: int | None = Field(None, ge=1, description="finished trials (complete or pruned) the search stops at")
    timeout: float | None = Field(None, description="stop asking for new trials after this long (2h, 30m, 90s or "
                                  "seconds), counted per command")
    sampler: Literal["tpe", "random", "grid"] = Field(
        "tpe", description="tpe (Optuna's default), random, or grid (every combination of choices, once each)")
    pruner: Literal["median", "hyperband", "none"] = Field(
        "median", description="stop hopeless trials from their per-epoch validation select.by metric")
    startup_trials: int = Field(5, ge=0, description="the median pruner prunes only after this many trials finished")
    seed: int = Field(0, description="the sampler's seed")

    @field_validator("timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float | None:
        return None if v is None else parse_duration(v)

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for key, spec in v.items():
            if key.split(".")[0] not in ("data", "model", "train"):
                raise ValueError(f"search.space key '{key}' must start with data., model. or train.")
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
                raise ValueError(f"search.space.{key}: write one of {{loguniform: [low, high]}}, {{uniform: [low, "
                                 "high]}}, {int: [low, high]}, {choice: [values]}")
            kind, values = next(iter(spec.items()))
            if kind == "choice":
                if not isinstance(values, list) or not values:
                    raise ValueError(f"search.space.{key}: choice needs a non-empty list of values")
                continue
            if not (isinstance(values, list) and len(values) == 2
                    and all(isinstance(x, int | float) and not isinstance(x, bool) for x in values)):
                raise ValueError(f"search.space.{key}: {kind} needs [low, high], two numbers")
            low, high = values
            if not low < high or (kind == "loguniform" and low <= 0):
                raise ValueError(f"search.space.{key}: {kind} needs low < high" + (" and low > 0" if kind ==
                                 "loguniform" else ""))
            if kind == "int" and not all(isinstance(x, int) for x in values):
                raise ValueError(f"search.space.{key}: int needs whole numbers [low, high]")
        return v


class Resources(Strict):
    """What one run needs from a machine when runs are Ray tasks (`classlab run --ray`)."""

    num_cpus: float = Field(1, gt=0, description="CPU cores per run")
    num_gpus: float = Field(0, ge=0, description="GPUs per run (a fraction shares one GPU)")


class StudyConfig(Strict):
    """The study file as written; `runs` and `grid` hold raw overrides validated per run."""

    name: str | None = Field(None, description="the study's name and folder under out_dir; default: the file's name")
    out_dir: str = Field("runs", description="where the study folder goes (relative to the working directory)")
    seeds: list[int] = Field(
        [0], min_length=1, description="one run per seed for every variant; several give mean ± std and intervals")
    data: dict[str, Any] = Field({}, description="the data section every run starts from")
    model: dict[str, Any] = Field(description="the model section every run starts from")
    train: dict[str, Any] = Field({}, description="the train section every run starts from")
    eval: dict[str, Any] = Field({}, description="the eval section every run starts from (calibration, "
                                 "test-time augmentation)")
    runs: list[dict[str, Any]] | None = Field(
        None, description="named variants, each a name and overrides of data / model / train; none = one run, base")
    grid: dict[str, list[Any]] | None = Field(
        None, description="dotted keys with lists of values, crossed with each other and with runs and seeds")
    search: Search | None = Field(
        None, description="a hyperparameter search (Optuna) over dotted keys instead of a fixed list of runs")
    resources: Resources = Field(Resources(), description="per-run resources when runs are Ray tasks (--ray)")
    select: Select | None = Field(None, description="after training, pick the best variant by a validation metric")
    retrain_on: Literal["train+val"] | None = Field(
        None, description="after select: train the chosen variant again on train + validation, report test")
    track: Track = Field(Track(), description="experiment trackers to log every run to")
    evidence: Evidence = Field(Evidence(), description="the verdicts' power note: the difference worth detecting")

    @model_validator(mode="after")
    def _confirm_seeds_are_fresh(self) -> StudyConfig:
        chosen = self.select.confirm_seeds if self.select is not None else None
        if isinstance(chosen, int) and chosen < 0:
            raise ValueError("select.confirm_seeds: a count must be >= 0")
        if isinstance(chosen, list) and (set(chosen) & set(self.seeds) or len(set(chosen)) != len(chosen)):
            raise ValueError("select.confirm_seeds must be distinct and differ from seeds (fresh seeds confirm the "
                             "selected variant)")
        return self

    @model_validator(mode="after")
    def _retrain_needs_select(self) -> StudyConfig:
        if self.retrain_on is not None and self.select is None:
            raise ValueError("retrain_on needs select: {metric: val_accuracy} to choose what to retrain")
        if self.search is not None:
            if self.runs:
                raise ValueError("search: and runs: cannot be combined; put the runs' differences in search.space "
                                 "as a choice")
            space = {**{k: {"choice": list(v)} for k, v in (self.grid or {}).items()}, **self.search.space}
            if not space:
                raise ValueError("search.space is empty; give at least one key (or a grid:)")
            if self.search.sampler == "grid":
                ranged = [k for k, spec in space.items() if "choice" not in spec]
                if ranged:
                    raise ValueError(f"search.sampler grid needs choices only; {ranged[0]} is a range")
            elif self.search.trials is None and self.search.timeout is None:
                raise ValueError("search needs trials: N and/or timeout: (e.g. 2h), or sampler: grid")
        return self

    @field_validator("name")
    @classmethod
    def _folder_safe_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or not all(c.isalnum() or c in "-_." for c in v) or v.startswith(".")):
            raise ValueError(f"study name '{v}' may only hold letters, digits, '-', '_' and '.' (it names a folder)")
        return v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct")
        return v

    @field_validator("runs")
    @classmethod
    def _runs(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("is empty; list at least one run, or remove the key")
        names = []
        for i, run in enumerate(v):
            name = run.get("name")
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"run {i} needs a name")
            if not all(c.isalnum() or c in "-_." for c in name):
                raise ValueError(f"run name '{name}' may only hold letters, digits, '-', '_' and '.'")
            names.append(name)
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate run names: {', '.join(dupes)}")
        return v

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("is empty; give each grid key a list of values, or remove grid")
        for key, values in v.items():
            if key.split(".")[0] not in ("data", "model", "train"):
                raise ValueError(f"grid key '{key}' must start with data., model. or train.")
            if not values:
                raise ValueError(f"grid key '{key}' has no values")
        return v


# ----------------------------------------------------------------------------- loading


class DuplicateKey(yaml.constructor.ConstructorError):
    """A key written twice in one mapping (YAML would silently keep the last)."""


class _Loader(yaml.SafeLoader):
    """Safe loading, plus YAML 1.2 floats: `lr: 1e-3` is a number, not the string '1e-3'; and a key written
    twice in one mapping is an error naming both lines, not the last one silently winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):  # only the keys written here: one overriding a merged (<<) key is fine
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class says so
                    break
                if first is not None:
                    raise DuplicateKey(
                        None, None, f"duplicate key '{key}' (first on line {first.start_mark.line + 1}, again on "
                        f"line {key_node.start_mark.line + 1}); keep one", key_node.start_mark)
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def read_yaml(path: Path) -> dict[str, Any]:
    """Safe-load a YAML mapping; a Python tag or a syntax error is one clear line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClasslabError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ClasslabError(f"{path}: cannot read ({e})") from None
    try:
        raw = yaml_load(text)
    except DuplicateKey as e:
        raise ClasslabError(f"{path}: line {e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.constructor.ConstructorError as e:
        line = f" line {e.problem_mark.line + 1}:" if e.problem_mark else ""
        raise ClasslabError(
            f"{path}:{line} {one_line(e.problem or e)}; classlab reads plain YAML only (no Python tags)"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark else ""
        raise ClasslabError(f"{path}:{line} invalid YAML ({one_line(getattr(e, 'problem', e))})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ClasslabError(f"{path}: a study file must be a mapping of keys (data, model, train, ...)")
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """'train.epochs=3' -> ('train.epochs', 3); the value is read as YAML so types come out right."""
    if "=" not in text:
        raise ClasslabError(f"override '{text}' must look like key.path=value, e.g. train.epochs=3")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ClasslabError(f"override '{text}' has an empty key")
    try:
        parsed = yaml_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set tree['a']['b'] for key 'a.b', creating mappings on the way."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge `update` into a copy of `base`. A model override naming another model replaces it whole."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if "." in key:
            set_dotted(out, key, copy.deepcopy(value))
            continue
        current = out.get(key)
        switches_model = (
            key == "model" and isinstance(value, dict) and isinstance(current, dict)
            and "name" in value and value["name"] != current.get("name")
        )
        if isinstance(value, dict) and isinstance(current, dict) and not switches_model:
            out[key] = deep_merge(current, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ----------------------------------------------------------------------------- error messages


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Every BaseModel class inside an annotation (Optional, list, Annotated, unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _walk(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, list[str]]:
    """Render a pydantic error location as a dotted path, dropping union tags; also return the field
    names allowed where the location ends (for did-you-mean)."""
    path = ""
    candidates: list[type[BaseModel]] = [root]
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        if len(candidates) > 1:  # a discriminated union: this part is the tag
            tagged = [c for c in candidates if part in typing.get_args(c.model_fields["name"].annotation)
                      or part == getattr(c, "tag", None)]
            if tagged:
                candidates = tagged
                continue
        fields = candidates[0].model_fields if len(candidates) == 1 else {}
        path = f"{path}.{part}" if path else str(part)
        candidates = _models_in(fields[part].annotation) if part in fields else []
    allowed = list(candidates[0].model_fields) if len(candidates) == 1 else []
    return path, allowed


def format_validation_error(err: ValidationError, root: type[BaseModel], where: str = "") -> str:
    """The first error of a ValidationError as one line: where, what was wrong, what to do."""
    e = err.errors()[0]
    loc = tuple(e["loc"])
    kind = e["type"]
    prefix = f"{where}: " if where else ""
    if kind == "extra_forbidden":
        path, _ = _walk(root, loc)
        parent, key = (path.rsplit(".", 1) if "." in path else ("", path))
        _, allowed = _walk(root, loc[:-1])
        hint = suggest(key.split("[")[0], allowed)
        at = f" in '{parent}'" if parent else ""
        options = f"; allowed: {', '.join(allowed)}" if allowed else ""
        return f"{prefix}unknown key '{key}'{at}{hint}{options}"
    path, _ = _walk(root, loc)
    name = path or "(top level)"
    if kind == "union_tag_invalid":
        return f"{prefix}{name}.name: {MODEL_REGISTRY.unknown(e.get('ctx', {}).get('tag', '?'))}"
    if kind == "union_tag_not_found":
        return f"{prefix}{name}: needs a 'name' (one of: {', '.join(MODEL_NAMES)})"
    if kind == "literal_error":
        expected = str(e.get("ctx", {}).get("expected", ""))
        choices = [c.strip(" '") for c in expected.replace(" or ", ", ").split(",")]
        got = e.get("input")
        for registry in (DATASET_REGISTRY, ACTIVATION_REGISTRY):  # a registry's own did-you-mean
            if tuple(choices) == registry.names():
                return f"{prefix}{name}: {registry.unknown(got)}"
        return f"{prefix}{name}: '{got}' is not allowed{suggest(str(got), choices)}; choose one of: " + ", ".join(
            choices
        )
    if kind == "missing":
        return f"{prefix}{name}: required key is missing"
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
    return f"{prefix}{name}: {msg}{shown}"


def validate(cls: type[Strict], raw: dict[str, Any], where: str = "") -> Any:
    """Build `cls` from raw data, turning a ValidationError into one ClasslabError line."""
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise ClasslabError(format_validation_error(err, cls, where)) from None


RUN_SECTIONS = ("data", "model", "train", "eval")


def _own_value(tree: Any, key: str) -> tuple[bool, Any]:
    """Whether a run's (or a grid cell's) own overrides set `key` themselves (nested or dotted), and to what."""
    if not isinstance(tree, dict):
        return False, None
    if key in tree:
        return True, tree[key]
    for part_key, value in tree.items():
        if isinstance(part_key, str) and key.startswith(part_key + "."):
            found, own = _own_value(value, key[len(part_key) + 1 :])
            if found:
                return True, own
    return False, None


def _short(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
    return text if len(text) <= 60 else text[:57] + "..."


def _address_run(raw: dict[str, Any], key: str, value: Any, text: str) -> None:
    """`-o runs.<name>.<key>=value`: set one run's own value (a run's name may hold dots: the longest match)."""
    runs = [r for r in raw.get("runs") or [] if isinstance(r, dict) and isinstance(r.get("name"), str)]
    rest = key[len("runs.") :]
    matches = [r for r in runs if rest.startswith(r["name"] + ".")]
    if not matches:
        name = rest.split(".", 1)[0]
        names = [r["name"] for r in runs]
        listed = f"; runs: {', '.join(names)}" if names else "; the study has no runs: entries"
        raise ClasslabError(f"override '{text}': no run named '{name}'{suggest(name, names)}{listed}")
    run = max(matches, key=lambda r: len(r["name"]))
    inner = rest[len(run["name"]) + 1 :]
    if inner.split(".")[0] not in RUN_SECTIONS:
        raise ClasslabError(f"override '{text}': a run's key starts with {', '.join(RUN_SECTIONS)}, e.g. "
                            f"runs.{run['name']}.train.lr=0.01")
    set_dotted(run, inner, value)


def _address_grid(raw: dict[str, Any], key: str, value: Any, text: str) -> None:
    """`-o grid.<dotted key>=[v1, v2]`: the values of one grid axis (a new axis if the grid has none on it)."""
    axis = key[len("grid.") :]
    if axis.split(".")[0] not in RUN_SECTIONS or "." not in axis:
        raise ClasslabError(f"override '{text}': a grid axis is a dotted key of data, model, train or eval, "
                            "e.g. -o 'grid.train.lr=[0.01, 0.001]'")
    if not isinstance(value, list) or not value:
        raise ClasslabError(f"override '{text}': a grid axis takes a list of values, e.g. -o '{key}=[{_short(value)}]'")
    grid = raw.get("grid")
    if not isinstance(grid, dict):
        grid = raw["grid"] = {}
    grid[axis] = value


def apply_override(raw: dict[str, Any], key: str, value: Any, text: str | None = None) -> list[str]:
    """Apply one `-o key=value` to a raw study and return what it did beyond the base, one line each.

    The rule (docs/decisions.md): the override sets the study's base, and every run that does not set the key
    itself; a `runs:` entry (or a grid cell's mapping) that sets the key itself keeps its own value, since that
    value is what makes the variant (a `scratch` run's `pretrained: none`), and the returned line names those
    runs and how to address one (`-o runs.<name>.<key>=...`). A grid axis on exactly the key is pinned to the
    one value (one cell instead of several); axes inside the key are dropped; `-o grid.<key>=[...]` sets an
    axis's values instead. Nothing changes silently: each of these is a line."""
    text = text or f"{key}={_short(value)}"
    if key.startswith("runs."):
        _address_run(raw, key, value, text)
        return []
    if key.startswith("grid."):
        _address_grid(raw, key, value, text)
        return []
    set_dotted(raw, key, value)
    if key.split(".")[0] not in RUN_SECTIONS:
        return []
    notes: list[str] = []
    kept: list[str] = []
    for run in raw.get("runs") or []:
        if not isinstance(run, dict):
            continue
        found, own = _own_value(run, key)
        if found:
            if own != value:
                kept.append(f"{run.get('name')} ({_short(own)})")
        else:  # set it in the run too, so that it survives a run's switch of model (which replaces the section)
            set_dotted(run, key, copy.deepcopy(value))
    grid = raw.get("grid")
    if isinstance(grid, dict):
        for axis in list(grid):
            values = grid[axis]
            if axis == key:
                if isinstance(values, list) and values != [value]:
                    notes.append(f"-o {text}: grid axis {axis} pinned to this one value (the study lists "
                                 f"{_short(values)}); -o 'grid.{axis}=[...]' sets its values instead")
                grid[axis] = [copy.deepcopy(value)]
            elif axis.startswith(key + "."):
                notes.append(f"-o {text}: grid axis {axis} dropped (it lies inside the overridden key)")
                del grid[axis]
            elif key.startswith(axis + ".") and isinstance(values, list):
                inner = key[len(axis) + 1 :]
                for cell in values:
                    found, own = _own_value(cell, inner)
                    if found and own != value:
                        kept.append(f"grid {axis}={_short(cell)} ({_short(own)})")
                    elif isinstance(cell, dict) and not found:
                        set_dotted(cell, inner, copy.deepcopy(value))
    if kept:
        first = kept[0].split(" (")[0]
        how = (f"-o runs.{first}.{key}=..." if not first.startswith("grid ") else "-o 'grid.<axis>=[...]'")
        notes.append(f"-o {text}: set for the base; kept the own value of {', '.join(kept)}, which set "
                     f"{key} themselves; to change one, {how}")
    return notes


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
               notes: list[str] | None = None) -> StudyConfig:
    """Read and validate a study file with the CLI overrides applied (here, and only here). What an override
    did beyond the base (runs that kept their own value, a pinned grid axis) goes to `notes`, or, without a
    list, to stderr: an override never changes a comparison silently."""
    path = Path(path)
    raw = read_yaml(path)
    said: list[str] = []
    for text in overrides:
        key, value = parse_override(text)
        said += apply_override(raw, key, value, text.split("=", 1)[0].strip() + "=" + text.split("=", 1)[1].strip())
    if notes is not None:
        notes.extend(said)
    else:
        for line in said:
            print(f"note: {line}", file=sys.stderr)
    if "name" not in raw or raw.get("name") is None:
        raw["name"] = "".join(c if c.isalnum() or c in "-_." else "-" for c in path.stem).lstrip(".") or "study"
    return validate(StudyConfig, raw, where=str(path))
