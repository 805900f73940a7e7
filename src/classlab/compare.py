"""Two models side by side: per image, both models' class probabilities; and where the two disagree.

On the test set the probabilities are the ones stored with each run (predictions.npz), so nothing is
re-evaluated; the images themselves come from the run's dataset (when it can still be loaded). On the
user's own images each run is loaded and applied by `classlab.inference`, each photo prepared by
`classlab.photo` with the run's own defaults, exactly as `classlab predict` does: the same photo gets
the same probabilities from both commands.

This module makes the comparison's data (it runs models, so it lives outside `report/`, which only reads
run folders); the page is drawn by report.plots and written by report.render, as the study report is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from classlab.errors import ClasslabError, one_line
from classlab.inference import load_run, run_config
from classlab.predict import Failure, Prediction, expand_inputs, photo_options, predict_paths
from classlab.report import plots
from classlab.report.context import slug
from classlab.report.render import write_pages
from classlab.runs import RunFolder

MAX_TABLE_ROWS = 100
THUMBNAIL = 96  # pixels a side of the photo shown beside the bars


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
    skipped: list[str] = field(default_factory=list)  # your images either run could not use, with why


def _run_folder(path: str | Path) -> RunFolder:
    folder = RunFolder(path)
    if not folder.is_complete:
        raise ClasslabError(f"{folder.path}: not a finished classlab run (no {folder.summary_path.name})")
    return folder


def _predictions(folder: RunFolder) -> dict[str, np.ndarray]:
    predictions = folder.read_predictions()
    if predictions is None:
        raise ClasslabError(f"{folder.predictions_path}: missing or unreadable; this run has no stored test "
                            "predictions")
    return predictions


# ----------------------------------------------------------------------------- the test set


def _test_images(folder: RunFolder, y_true: np.ndarray) -> tuple[np.ndarray | None, str]:
    """The run's test images, if its dataset still loads and still matches the stored labels."""
    from classlab.data import load_dataset

    try:
        test = load_dataset(run_config(folder).data).test
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
    """The file itself, or a folder's image files (as predict lists them); an error when there are none."""
    items = expand_inputs([path])
    files = [i for i in items if isinstance(i, Path)]
    failures = [i for i in items if isinstance(i, Failure)]
    if not files:
        raise ClasslabError(f"--images {path}: {failures[0].message if failures else 'no image files'}")
    return files


def photo_predictions(folder: RunFolder, files: list[Path], device: str = "auto", thumbnail: int = 0,
                      **steps) -> tuple[list[str], list[Prediction | Failure]]:
    """One run's classes and its prediction for every file, as `classlab predict` makes them (the run's
    default photo preparation, with any step switched as predict's options do)."""
    run = load_run(folder.path, device)
    options = photo_options(run, **steps)
    results = list(predict_paths(run, files, options, keep_original=thumbnail > 0, thumbnail=thumbnail))
    return list(run.classes), results


def photo_inputs(a: RunFolder, b: RunFolder, path: Path, device: str = "auto", **steps) -> tuple[Inputs, Side, Side]:
    """Both runs on the user's images; a file either run cannot use is skipped and named."""
    files = image_files(path)
    classes_a, results_a = photo_predictions(a, files, device, THUMBNAIL, **steps)
    classes_b, results_b = photo_predictions(b, files, device, **steps)
    kept: list[tuple[Path, Prediction, Prediction]] = []
    skipped: list[str] = []
    for file, ra, rb in zip(files, results_a, results_b, strict=True):
        if isinstance(ra, Prediction) and isinstance(rb, Prediction):
            kept.append((file, ra, rb))
        else:
            failed = ra if not isinstance(ra, Prediction) else rb
            skipped.append(f"{file.name} ({getattr(failed, 'message', 'not read')})")
    if not kept:
        raise ClasslabError(f"--images {path}: no readable image (skipped {', '.join(skipped)})")
    thumbs: list[np.ndarray | None] = [np.asarray(ra.prepared.original).transpose(2, 0, 1) for _, ra, _ in kept]
    inputs = Inputs(None, thumbs, [file.name for file, _, _ in kept], skipped=skipped)
    side_a = Side(a.name, classes_a, np.stack([ra.probs for _, ra, _ in kept]))
    side_b = Side(b.name, classes_b, np.stack([rb.probs for _, _, rb in kept]))
    return inputs, side_a, side_b


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
            out: str | Path | None = None, device: str = "auto", **steps) -> CompareResult:
    """Write compare.html / compare.md for two runs into `out` (default: beside run A). `steps` switch
    photo preparation steps on the user's images as predict's options do (prepare_photo, crop, ...)."""
    a, b = _run_folder(run_a), _run_folder(run_b)
    if n < 1:
        raise ClasslabError("--n must be at least 1")
    if images:
        inputs, side_a, side_b = photo_inputs(a, b, Path(images), device, **steps)
    else:
        inputs, side_a, side_b = test_set_inputs(a, b)
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
    return CompareResult(html_path, md_path, counts["images"], rows, counts, list(inputs.skipped))
