"""Two models side by side: per image, both models' class probabilities; and where the two disagree.

On the test set the probabilities are the ones stored with each run (predictions.npz), so nothing is
re-evaluated; the images themselves come from the run's dataset (when it can still be loaded). On the
user's own images each model sees them through its own run's preprocessing (channels, size, mean/std,
pixel permutation) and its checkpoints/best.pt weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from classlab.config import RunConfig, validate
from classlab.errors import ClasslabError, one_line
from classlab.report import plots
from classlab.report.context import slug
from classlab.report.render import write_pages
from classlab.runs import RunFolder, safe_torch_load

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_TABLE_ROWS = 100


@dataclass
class Side:
    """One model's view of the compared images."""

    name: str
    classes: list[str]
    probs: np.ndarray  # N×K

    @property
    def pred(self) -> list[str]:
        return [self.classes[int(i)] for i in self.probs.argmax(1)]

    def top(self, i: int) -> tuple[str, float]:
        k = int(self.probs[i].argmax())
        return self.classes[k], float(self.probs[i, k])


@dataclass
class Inputs:
    """What both models are compared on: labels (None for the user's images), images to show, names."""

    labels: list[str] | None
    images: list[np.ndarray | None]
    names: list[str]
    note: str = ""
    skipped: list[str] = field(default_factory=list)


@dataclass
class CompareResult:
    html: Path
    md: Path
    total: int
    disagreements: list[dict[str, Any]]
    counts: dict[str, int]


def _run_folder(path: str | Path) -> RunFolder:
    folder = RunFolder(path)
    if not folder.is_complete:
        raise ClasslabError(f"{folder.path}: not a finished classlab run (no summary.json)")
    return folder


def _run_config(folder: RunFolder) -> RunConfig:
    return validate(RunConfig, folder.read_config(), where=str(folder.config_path))


def _predictions(folder: RunFolder) -> dict[str, np.ndarray]:
    path = folder.path / "predictions.npz"
    if not path.is_file():
        raise ClasslabError(f"{path}: missing; this run has no stored test predictions")
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


# ----------------------------------------------------------------------------- the test set


def _test_images(folder: RunFolder, y_true: np.ndarray) -> tuple[np.ndarray | None, str]:
    """The run's test images, if its dataset still loads and still matches the stored labels."""
    from classlab.data import load_dataset

    try:
        test = load_dataset(_run_config(folder).data).test
    except ClasslabError as e:
        return None, f"test images not shown: {one_line(e)}"
    if len(test) != len(y_true) or not np.array_equal(test.labels.numpy(), y_true):
        return None, "test images not shown: the dataset on disk no longer matches the run's stored predictions"
    return test.images.numpy(), ""


def test_set_inputs(a: RunFolder, b: RunFolder) -> tuple[Inputs, Side, Side]:
    pa, pb = _predictions(a), _predictions(b)
    if len(pa["y_true"]) != len(pb["y_true"]) or not np.array_equal(pa["y_true"], pb["y_true"]):
        raise ClasslabError(f"{a.path} and {b.path} were tested on different test sets; compare them on "
                            "your own images with --images DIR")
    side_a = Side(a.name, [str(c) for c in a.read_summary()["classes"]], pa["probs"])
    side_b = Side(b.name, [str(c) for c in b.read_summary()["classes"]], pb["probs"])
    images, note = _test_images(a, pa["y_true"])
    labels = [side_a.classes[int(t)] for t in pa["y_true"]]
    shown: list[np.ndarray | None] = list(images) if images is not None else [None] * len(labels)
    return Inputs(labels, shown, [f"test image {i}" for i in range(len(labels))], note), side_a, side_b


# ----------------------------------------------------------------------------- the user's own images


def image_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ClasslabError(f"--images {path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ClasslabError(f"--images {path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def read_photos(files: list[Path]) -> tuple[list[Path], list[Any], list[str]]:
    """Open every file with PIL; unreadable ones are skipped and named."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    good, images, skipped = [], [], []
    for path in files:
        try:
            with Image.open(path) as img:
                img.load()
                images.append(ImageOps.exif_transpose(img).copy())
            good.append(path)
        except (OSError, UnidentifiedImageError, ValueError):
            skipped.append(path.name)
    return good, images, skipped


def photo_batch(images: list[Any], shape: tuple[int, int, int]) -> torch.Tensor:
    """PIL images -> uint8 N×C×H×W at the run's stored image shape (channels, then size)."""
    from PIL import Image

    c, h, w = shape
    arrays = []
    for img in images:
        img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
        arrays.append(arr[None] if c == 1 else arr.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays))


def load_model(folder: RunFolder) -> tuple[torch.nn.Module, Any]:
    """The run's network with its best weights, and its evaluation preprocessing."""
    from classlab.models import build_model
    from classlab.transforms import Preprocess

    cfg = _run_config(folder)
    pre = Preprocess.from_dict(folder.read_json("preprocessing.json"))
    spec = cfg.model
    if "pretrained" in type(spec).model_fields:  # the checkpoint replaces every weight: fetch nothing
        spec = spec.model_copy(update={"pretrained": "none"})
    model = build_model(spec, len(pre.classes), pre.input_shape)
    path = folder.best_path if folder.best_path.is_file() else folder.last_path
    state = safe_torch_load(path)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise ClasslabError(f"{path}: weights do not fit the run's model ({one_line(e)[:200]})") from None
    return model.eval(), pre


@torch.no_grad()
def photo_probs(folder: RunFolder, images: list[Any]) -> Side:
    from classlab.transforms import BatchTransform

    model, pre = load_model(folder)
    batch = photo_batch(images, tuple(getattr(pre, "stored_shape", pre.input_shape)))
    x = BatchTransform(pre, None, torch.device("cpu"))(batch)
    probs = model(x).float().softmax(1).numpy()
    return Side(folder.name, list(pre.classes), probs)


def photo_inputs(a: RunFolder, b: RunFolder, path: Path) -> tuple[Inputs, Side, Side]:
    files, images, skipped = read_photos(image_files(path))
    if not images:
        raise ClasslabError(f"--images {path}: no readable image (skipped {', '.join(skipped)})")
    thumbs = [np.asarray(img.convert("RGB").resize((96, 96))).transpose(2, 0, 1) for img in images]
    inputs = Inputs(None, thumbs, [p.name for p in files], skipped=skipped)
    return inputs, photo_probs(a, images), photo_probs(b, images)


# ----------------------------------------------------------------------------- the page


def _order(a: Side, b: Side, n: int) -> list[int]:
    """Which images get a figure: disagreements first (most different probabilities first), then the rest."""
    pred_a, pred_b = a.pred, b.pred
    same = a.classes == b.classes
    distance = 0.5 * np.abs(a.probs - b.probs).sum(1) if same else np.zeros(len(pred_a))
    disagree = [i for i in range(len(pred_a)) if pred_a[i] != pred_b[i]]
    disagree.sort(key=lambda i: -distance[i])
    rest = [i for i in range(len(pred_a)) if pred_a[i] == pred_b[i]]
    return (disagree + rest)[:n]


def disagreement_rows(inputs: Inputs, a: Side, b: Side) -> list[dict[str, Any]]:
    rows = []
    for i, (pa, pb) in enumerate(zip(a.pred, b.pred, strict=True)):
        if pa == pb:
            continue
        (ca, qa), (cb, qb) = a.top(i), b.top(i)
        row = {"image": inputs.names[i], "a": ca, "pa": f"{qa:.3f}", "b": cb, "pb": f"{qb:.3f}"}
        if inputs.labels is not None:
            truth = inputs.labels[i]
            row["true"] = truth
            row["right"] = "A" if ca == truth else "B" if cb == truth else "neither"
        rows.append(row)
    return rows


def agreement_counts(inputs: Inputs, a: Side, b: Side) -> dict[str, int]:
    pred_a, pred_b = a.pred, b.pred
    counts = {"images": len(pred_a), "agree": sum(x == y for x, y in zip(pred_a, pred_b, strict=True))}
    counts["disagree"] = counts["images"] - counts["agree"]
    if inputs.labels is not None:
        ra = [p == t for p, t in zip(pred_a, inputs.labels, strict=True)]
        rb = [p == t for p, t in zip(pred_b, inputs.labels, strict=True)]
        counts |= {"both_right": sum(x and y for x, y in zip(ra, rb, strict=True)),
                   "only_a": sum(x and not y for x, y in zip(ra, rb, strict=True)),
                   "only_b": sum(y and not x for x, y in zip(ra, rb, strict=True)),
                   "both_wrong": sum(not x and not y for x, y in zip(ra, rb, strict=True))}
    return counts


def compare(run_a: str | Path, run_b: str | Path, images: str | Path | None = None, n: int = 8,
            out: str | Path | None = None) -> CompareResult:
    """Write compare.html / compare.md for two runs into `out` (default: beside run A)."""
    a, b = _run_folder(run_a), _run_folder(run_b)
    if n < 1:
        raise ClasslabError("--n must be at least 1")
    inputs, side_a, side_b = photo_inputs(a, b, Path(images)) if images else test_set_inputs(a, b)
    figures = []
    for rank, i in enumerate(_order(side_a, side_b, n), start=1):
        label = inputs.names[i] + (f" (true: {inputs.labels[i]})" if inputs.labels is not None else "")
        figures.append(plots.probability_bars(inputs.images[i], label, (f"A: {side_a.name}", f"B: {side_b.name}"),
                                              (side_a.classes, side_b.classes), (side_a.probs[i], side_b.probs[i]),
                                              f"{rank:02d}-{slug(inputs.names[i])}"))
    rows = disagreement_rows(inputs, side_a, side_b)
    counts = agreement_counts(inputs, side_a, side_b)
    context = {
        "a": side_a.name, "b": side_b.name, "a_path": str(a.path), "b_path": str(b.path),
        "source": f"your images in {images}" if images else "the test set",
        "labelled": inputs.labels is not None, "counts": counts, "figures": figures,
        "rows": rows[:MAX_TABLE_ROWS], "more": max(0, len(rows) - MAX_TABLE_ROWS),
        "note": inputs.note, "skipped": inputs.skipped,
    }
    folder = Path(out) if out else a.path.parent / f"compare-{slug(a.name)}-vs-{slug(b.name)}"
    html_path, md_path = write_pages(folder, "compare", context, figures)
    return CompareResult(html_path, md_path, counts["images"], rows, counts)
