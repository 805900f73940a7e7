"""Datasets as in-memory uint8 tensors: decoded once per process, then split, relabelled, subset."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from classlab.config import DataConfig
from classlab.data.fer_csv import FER_CLASSES, read_fer_csv
from classlab.data.folder import read_image_folder
from classlab.data.idx import IDX_FILES, find_idx_file, read_idx_pair
from classlab.data.locate import locate_idx
from classlab.data.split import keep_fraction, relabel, stratified_split, stratified_subset
from classlab.errors import ClasslabError
from classlab.registry import DATASETS, suggest

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
# Per-dataset normalization defaults (mean, std of the training pixels in [0, 1]).
DEFAULT_STATS = {"fashion-mnist": ((0.2860,), (0.3530,)), "demo": ((0.2860,), (0.3530,)),
                 "mnist": ((0.1307,), (0.3081,))}


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 N×C×H×W
    labels: torch.Tensor  # int64 N
    groups: np.ndarray | None = None  # data.cv.group_by's value per image (manifests), else None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: torch.Tensor | np.ndarray) -> Split:
        """The images at `idx`, with their labels and groups."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Split(self.images[idx], self.labels[idx], None if self.groups is None else self.groups[idx.numpy()])


@dataclass(frozen=True)
class ImageData:
    """What every loader returns; from here on the pipeline only sees tensors."""

    train: Split
    test: Split
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val: Split | None = None
    source: str = ""
    skipped: list[str] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)  # split -> where its images came from (run.log, report)
    held_out: Split | None = None  # data.cv: the fold's held-out part (its out-of-fold predictions)
    held_out_index: np.ndarray | None = None  # ... as positions in the fold pool (train + val before the folds)
    pool_size: int = 0  # data.cv: the images the folds partition

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


@dataclass(frozen=True)
class RawData:
    """A source as decoded from disk, before any config-driven split or relabel."""

    splits: dict[str, Split]
    classes: list[str]
    source: str
    skipped: list[str] = field(default_factory=list)
    origins: dict[str, list[str]] = field(default_factory=dict)  # split -> the folders it was read from


_CACHE: dict[tuple, RawData] = {}


def _fingerprint(paths: list[Path]) -> tuple:
    return tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)


def _read_idx_folder(folder: Path, classes: list[str] | None) -> RawData:
    paths = {stem: find_idx_file(folder, stem) for stem in IDX_FILES}
    missing = [stem for stem, p in paths.items() if p is None]
    if missing:
        raise ClasslabError(f"{folder}: missing IDX files for {', '.join(missing)}")
    key = ("idx", _fingerprint(list(paths.values())))
    if key not in _CACHE:
        train = read_idx_pair(paths["train-images"], paths["train-labels"])
        test = read_idx_pair(paths["t10k-images"], paths["t10k-labels"])
        if min(int(train[1].min()), int(test[1].min())) < 0:
            raise ClasslabError(f"{folder}: negative class labels in the IDX label files")
        n = int(max(train[1].max(), test[1].max())) + 1
        names = classes if classes is not None else [str(i) for i in range(n)]
        if n > len(names):
            raise ClasslabError(f"{folder}: labels go up to {n - 1} but the dataset has {len(names)} classes")
        _CACHE[key] = RawData({"train": Split(*train), "test": Split(*test)}, names, str(folder))
    return _CACHE[key]


@DATASETS.register("fashion-mnist")
def _fashion(cfg: DataConfig) -> RawData:
    return _read_idx_folder(locate_idx("fashion-mnist", cfg.root, cfg.download), FASHION_CLASSES)


@DATASETS.register("mnist")
def _mnist(cfg: DataConfig) -> RawData:
    return _read_idx_folder(locate_idx("mnist", cfg.root, cfg.download), MNIST_CLASSES)


@DATASETS.register("idx")
def _idx(cfg: DataConfig) -> RawData:
    if not cfg.root:
        raise ClasslabError("data.dataset 'idx' needs data.root: a folder holding the four IDX files")
    return _read_idx_folder(locate_idx("idx", cfg.root, download=False), None)


def demo_folder() -> Path:
    return Path(str(resources.files("classlab") / "demo" / "data"))


@DATASETS.register("demo")
def _demo(cfg: DataConfig) -> RawData:
    return _read_idx_folder(demo_folder(), FASHION_CLASSES)


@DATASETS.register("image-folder")
def _image_folder(cfg: DataConfig) -> RawData:
    if not cfg.root:
        raise ClasslabError("data.dataset 'image-folder' needs data.root: a folder of <split>/<class>/ images")
    root = Path(cfg.root).expanduser()
    layout = {k: list(v) for k, v in cfg.splits.items()} if cfg.splits else None
    # listed every time (a changed file is seen); decoded once per machine: data.cache, keyed by the files
    decoded, classes, origins = read_image_folder(root, cfg.channels, cfg.image_size, layout)
    skipped = [s for part in decoded.values() for s in part.skipped]
    splits = {name: Split(part.images, part.labels) for name, part in decoded.items() if len(part.labels)}
    return RawData(splits, classes, str(root), skipped, origins)


@DATASETS.register("csv")
@DATASETS.register("parquet")
def _manifest(cfg: DataConfig) -> RawData:
    from classlab.data.manifest import read_manifest

    if not cfg.root:
        raise ClasslabError(f"data.dataset '{cfg.dataset}' needs data.root: the manifest table (columns path, "
                            "label[, split, group columns])")
    table = Path(cfg.root).expanduser()
    group_by = cfg.cv.group_by if cfg.cv is not None else None
    key = ("manifest", _fingerprint([table]) if table.is_file() else str(table), cfg.channels, cfg.image_size,
           group_by, repr(cfg.classes))
    if key not in _CACHE:
        m = read_manifest(table, cfg.channels, cfg.image_size, group_by, cfg.classes)
        splits = {name: Split(part.images, part.labels, m.groups[name]) for name, part in m.splits.items()}
        _CACHE[key] = RawData(splits, m.classes, str(table), [s for p in m.splits.values() for s in p.skipped])
    return _CACHE[key]


@DATASETS.register("fer2013")
def _fer(cfg: DataConfig) -> RawData:
    if not cfg.root:
        raise ClasslabError("data.dataset 'fer2013' needs data.root: fer2013.csv, or a folder of train/ test/ images")
    root = Path(cfg.root).expanduser()
    csv_path = root / "fer2013.csv" if root.is_dir() else root
    if csv_path.is_file() or (not root.is_dir() and root.suffix == ".csv"):
        key = ("fer", _fingerprint([csv_path]) if csv_path.is_file() else str(csv_path))
        if key not in _CACHE:
            parts = read_fer_csv(csv_path)
            _CACHE[key] = RawData({k: Split(*v) for k, v in parts.items()}, list(FER_CLASSES), str(csv_path))
        return _CACHE[key]
    return _image_folder(cfg.model_copy(update={"channels": cfg.channels or 1}))


FILE_ROOTS = ("fer2013", "csv", "parquet")  # data.root may be a file (fer2013.csv, a manifest); others need a folder


def _check_root_is_folder(cfg: DataConfig) -> None:
    """A file given as data.root is said to be a file (every loader would otherwise call it missing); a missing
    relative data.root says where relative paths are taken from (the working directory, not the study file's)."""
    root = Path(cfg.root).expanduser() if cfg.root else None
    downloads = cfg.dataset in ("fashion-mnist", "mnist") and cfg.download
    if root is not None and not root.is_absolute() and not root.exists() and not downloads:
        raise ClasslabError(f"data.root {cfg.root} does not exist: a relative data.root is taken from the working "
                            f"directory ({Path.cwd()}), not from the study file's folder; run classlab from the folder "
                            "it is relative to, or give an absolute path")
    if cfg.root and cfg.dataset not in FILE_ROOTS:
        root = Path(cfg.root).expanduser()
        if root.is_file():
            raise ClasslabError(f"data.root {root} is a file, not a folder; for dataset '{cfg.dataset}' set "
                                f"data.root to the folder holding it (e.g. {root.parent})")


def load_dataset(cfg: DataConfig) -> ImageData:
    """Decode (or reuse) the source, then apply subset, relabel and the validation split."""
    _check_root_is_folder(cfg)
    raw = DATASETS.create(cfg.dataset, cfg)
    splits = dict(raw.splits)
    origins = {name: _origin(raw, name) for name in splits}
    if "val" in splits and cfg.val_fraction is None and getattr(cfg, "cv", None) is None:
        splits.pop("val")  # no validation asked for: the folder's own split is not used (nor subset)
        origins["val"] = f"none (data.val_fraction: null; {origins['val']} not used)"
    own_val = "val" in splits and getattr(cfg, "cv", None) is None  # the folder's own split wins, and says so
    if "test" not in splits:
        pool = "all" if "all" in splits else "train"
        origins["test"] = (f"carved from {origins[pool]} by data.test_fraction {cfg.test_fraction} "
                           f"(split_seed {cfg.split_seed} + 1)")
        origins["train"] = f"{origins.pop(pool)} less the test share"
        source = splits.pop("all", None) or splits.pop("train")
        if source.groups is not None:  # folds by group: the test split is whole groups too
            from classlab.data.folds import group_test_split

            train_idx, test_idx = group_test_split(source.labels.numpy(), source.groups, cfg.test_fraction,
                                                   cfg.split_seed + 1)
        else:
            train_idx, test_idx = stratified_split(source.labels, cfg.test_fraction, cfg.split_seed + 1)
        splits["train"], splits["test"] = source.take(train_idx), source.take(test_idx)
    elif "all" in splits:
        splits["train"] = splits.pop("all")
        origins["train"] = origins.pop("all")
    classes = list(raw.classes)
    if cfg.subset is not None:
        for name, limit in _subset_sizes(cfg, splits):  # exactly `limit` images, or an error saying why not
            idx = stratified_subset(splits[name].labels, limit, cfg.split_seed, f"data.subset.{_SUBSET_KEY[name]}")
            origins[name] += f", a stratified {limit} of its {len(splits[name])} (data.subset.{_SUBSET_KEY[name]})"
            splits[name] = splits[name].take(idx)
    if cfg.subset is not None and cfg.subset.keep:
        unknown = [name for name in cfg.subset.keep if name not in classes]
        if unknown:
            raise ClasslabError(f"data.subset.keep: no class '{unknown[0]}'{suggest(unknown[0], classes)}; "
                                f"classes: {', '.join(classes)}")
        idx = keep_fraction(splits["train"].labels, {classes.index(k): v for k, v in cfg.subset.keep.items()},
                            cfg.split_seed)
        splits["train"] = splits["train"].take(idx)
        origins["train"] += f", data.subset.keep {dict(cfg.subset.keep)}"
    if cfg.relabel is not None:
        mapping, classes = relabel(classes, cfg.relabel)
        splits = {k: replace(v, labels=mapping[v.labels]) for k, v in splits.items()}
    val = splits.get("val")
    train = splits["train"]
    held_out: dict = {}
    if cfg.cv is not None:
        train, val, held_out = _fold(cfg, train, val)
        origins["val"] = "the fold's held-out part (data.cv)"
    elif val is None and cfg.val_fraction is not None:
        train_idx, val_idx = stratified_split(train.labels, cfg.val_fraction, cfg.split_seed)
        train, val = Split(train.images[train_idx], train.labels[train_idx]), Split(
            train.images[val_idx], train.labels[val_idx]
        )
        origins["val"] = f"carved from train by data.val_fraction {cfg.val_fraction} (split_seed {cfg.split_seed})"
        origins["train"] += " less the validation share"
    elif own_val:
        origins["val"] += _own_val_note(cfg, raw)
    elif "val" not in origins:
        origins["val"] = "none (data.val_fraction: null)"
    if len(train) == 0:
        raise ClasslabError(f"{raw.source}: the training split is empty")
    _check_classes(cfg, raw.source, classes, train, splits["test"])
    mean, std = _stats(cfg, raw, train)
    return ImageData(train=train, val=val, test=splits["test"], classes=classes, mean=mean, std=std,
                     source=raw.source, skipped=list(raw.skipped),
                     origins={k: origins[k] for k in ("train", "val", "test") if k in origins}, **held_out)


_SUBSET_KEY = {"train": "train", "val": "train", "test": "test"}


def _origin(raw: RawData, name: str) -> str:
    """Where a split of the source came from: its folders (data.splits or the conventional names), else the
    source's own split (IDX files, fer2013.csv's Usage column)."""
    folders = raw.origins.get(name)
    if folders:
        return " + ".join("the whole folder" if f == "." else f"{f}/" for f in folders)
    return f"the source's {name} split"


def _own_val_note(cfg: DataConfig, raw: RawData) -> str:
    train, test = (", ".join(raw.origins.get(name, [name])) for name in ("train", "test"))
    return (f"; the folder's own validation split, so data.val_fraction {cfg.val_fraction} is not used (to carve "
            f"validation from train instead: data.splits: {{train: [{train}], test: [{test}]}})")


def _subset_sizes(cfg: DataConfig, splits: dict[str, Split]) -> list[tuple[str, int]]:
    """data.subset as (split, images) pairs. subset.train covers the validation split too (as documented):
    a folder's own validation split gets its share of subset.train (by its size), train the rest; a
    validation split carved by val_fraction comes out of the subset later, by itself."""
    assert cfg.subset is not None
    sizes: list[tuple[str, int]] = []
    limit = cfg.subset.train
    if limit is not None and "val" in splits:
        n_train, n_val = len(splits["train"]), len(splits["val"])
        if limit > n_train + n_val:
            raise ClasslabError(f"data.subset.train {limit}: the training and validation splits have only "
                                f"{n_train + n_val} images together; ask for at most {n_train + n_val}")
        k_train, k_val = (len(torch.unique(splits[name].labels)) for name in ("train", "val"))
        val_share = max(k_val, round(limit * n_val / (n_train + n_val)))
        if limit - val_share < k_train:
            raise ClasslabError(f"data.subset.train {limit}: it covers the folder's validation split too, and keeping "
                                f"every class in both needs at least {k_train + k_val} images; ask for more")
        sizes += [("train", limit - val_share), ("val", val_share)]
    elif limit is not None:
        sizes.append(("train", limit))
    if cfg.subset.test is not None:
        sizes.append(("test", cfg.subset.test))
    return sizes


def _fold(cfg: DataConfig, train: Split, val: Split | None) -> tuple[Split, Split, dict]:
    """data.cv: the fold's (train, validation, held-out fields) from the pool of train + any given val split;
    validation is the held-out part, or with cv.inner_val a stratified share of the fold's training part."""
    from classlab.data.folds import fold_indices

    pool = train if val is None else Split(torch.cat([train.images, val.images]), torch.cat([train.labels, val.labels]),
                                           None if train.groups is None else np.concatenate([train.groups, val.groups]))
    cv = cfg.cv
    train_idx, held_idx = fold_indices(pool.labels.numpy(), pool.groups, cv, cfg.split_seed)
    fold_train, held = pool.take(train_idx), pool.take(held_idx)
    extra = {"held_out": held, "held_out_index": held_idx, "pool_size": len(pool)}
    if cv.inner_val is None:
        return fold_train, held, extra
    keep, inner = stratified_split(fold_train.labels, cv.inner_val, cfg.split_seed)
    return fold_train.take(keep), fold_train.take(inner), extra


def _check_classes(cfg: DataConfig, source: str, classes: list[str], train: Split, test: Split) -> None:
    """The one rule on classes, whatever the source: at least two, and every class with training and test
    images (a class missing from either split is an error unless data.allow_missing_classes says otherwise;
    the report then lists the classes with no test images)."""
    where = "data.relabel" if cfg.relabel is not None else source
    if len(classes) < 2:
        raise ClasslabError(f"{where}: only one class ({', '.join(map(repr, classes))}); a classifier needs at "
                            "least two")
    n_train = torch.bincount(train.labels, minlength=len(classes)).tolist()
    n_test = torch.bincount(test.labels, minlength=len(classes)).tolist()
    trained = [c for c, n in zip(classes, n_train, strict=True) if n]
    if len(trained) < 2:
        raise ClasslabError(f"{where}: only the class {', '.join(map(repr, trained))} has training images; a "
                            "classifier needs at least two")
    no_train = [c for c, n in zip(classes, n_train, strict=True) if not n]
    no_test = [c for c, n in zip(classes, n_test, strict=True) if not n]
    if (no_train or no_test) and not cfg.allow_missing_classes:
        parts = ([f"no training images for {', '.join(map(repr, no_train))}"] if no_train else []) + (
            [f"no test images for {', '.join(map(repr, no_test))}"] if no_test else [])
        raise ClasslabError(f"{source}: {'; '.join(parts)}; every class needs images in both splits (check the "
                            "class folders, data.subset and data.relabel), or set data.allow_missing_classes: true "
                            "to train anyway (the report then lists the classes with no test images)")


def _stats(cfg: DataConfig, raw: RawData, train: Split) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalization as the config writes it, else the dataset's known defaults, else measured on train
    (per stored channel; transforms.preprocess_for fits it to the model input's channels)."""
    if cfg.normalize is not None:
        return tuple(cfg.normalize.mean), tuple(cfg.normalize.std)
    if cfg.dataset in DEFAULT_STATS:
        return DEFAULT_STATS[cfg.dataset]
    x = train.images[: min(len(train), 20000)].float().div_(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


def clear_cache() -> None:
    """Forget what this process decoded (the on-disk cache stays; data.cache keys it by the files)."""
    from classlab.data.cache import clear_memo

    _CACHE.clear()
    clear_memo()


__all__ = ["ImageData", "Split", "load_dataset", "clear_cache", "FASHION_CLASSES", "demo_folder"]
