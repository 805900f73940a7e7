"""Predict on a user's own images with exactly the preprocessing the run was evaluated with.

`classlab.inference` loads the run (model from config.yaml, the weights its test results came from,
preprocessing.json, input_stats.json for the input check) and applies it; `classlab.photo` turns each
file into what a dataset image is (uint8 C×H×W) first. `compare --images` goes through the same
functions, so both commands give one photo the same probabilities.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classlab.data.folder import IMAGE_EXTENSIONS
from classlab.errors import ClasslabError, one_line
from classlab.inference import LoadedRun, load_run, predict_images
from classlab.io import atomic_write_bytes
from classlab.photo import (
    PLAIN,
    STATS_TOLERANCE,
    WORK_SIDE,
    PhotoError,
    PhotoOptions,
    Prepared,
    check_input,
    margin_from_fill,
    prepare,
    read_photo,
)

# Crop margin per dataset when the run has no input_stats.json: MNIST digits are 20 px in a 28 px frame
# ((28 / 20 - 1) / 2 = 0.2); Fashion-MNIST products fill the frame on their long side.
DEFAULT_MARGIN = {"mnist": 0.2, "fashion-mnist": 0.0, "demo": 0.0}
OTHER_MARGIN = 0.1
# Datasets that centre each object by its centre of mass (MNIST); the others centre its bounding box.
MASS_FRAMED = ("mnist",)
CHUNK = 256  # files decoded and predicted together
THUMBNAIL = 512


@dataclass
class Prediction:
    path: Path
    probs: np.ndarray
    prepared: Prepared
    warnings: list[str]

    def top(self, k: int, classes: tuple[str, ...]) -> list[tuple[str, int, float]]:
        order = np.argsort(-self.probs, kind="stable")[:k]
        return [(classes[i], int(i), float(self.probs[i])) for i in order]


@dataclass
class Failure:
    path: Path
    message: str


# ----------------------------------------------------------------------------- photo options


def photo_options(run: LoadedRun, prepare_photo: bool | None = None, grayscale: bool | None = None,
                  invert: str | None = None, background: bool | None = None, crop: bool | None = None,
                  margin: float | None = None) -> PhotoOptions:
    """The run's defaults (photo preparation for MNIST-style runs, the loader's plain path otherwise),
    with any step switched by the caller."""
    on = run.mnist_style if prepare_photo is None else prepare_photo
    base = PhotoOptions(margin=_default_margin(run), frame=_frame(run), dataset_border=_dataset_border(run)) \
        if on else PLAIN
    if not on and run.stored_shape[0] == 1:
        base = dataclasses.replace(base, grayscale=True)
    changes = {k: v for k, v in {"grayscale": grayscale, "invert": invert, "background": background,
                                  "crop": crop, "margin": margin}.items() if v is not None}
    if invert is not None and invert not in ("auto", "yes", "no"):
        raise ClasslabError(f"--invert '{invert}': choose auto, yes or no")
    if margin is not None and not 0 <= margin <= 2:
        raise ClasslabError(f"--margin {margin}: choose a fraction of the object's size between 0 and 2")
    if grayscale is False and run.stored_shape[0] == 1:
        raise ClasslabError("--no-grayscale: this run's model takes one gray channel")
    options = dataclasses.replace(base, **changes)
    if options.crop and options.max_side is None:  # cropping works on floats: bound the working size
        options = dataclasses.replace(options, max_side=WORK_SIDE)
    return options


def _frame(run: LoadedRun) -> str:
    return "mass" if run.config.data.dataset in MASS_FRAMED else "box"


def _dataset_border(run: LoadedRun) -> float | None:
    """The brightest border of the run's training images (plus the input check's tolerance), or None."""
    ring = run.stats.get("border_mean_range")
    if ring is None:
        return None
    return round(float(ring[1]) + float(run.stats.get("tolerance", STATS_TOLERANCE)), 4)


def _default_margin(run: LoadedRun) -> float:
    fitted = margin_from_fill(run.stats.get("object_fill"))
    if fitted is not None:
        return fitted
    return DEFAULT_MARGIN.get(run.config.data.dataset, OTHER_MARGIN)


# ----------------------------------------------------------------------------- predicting


def expand_inputs(paths: Iterable[str | Path]) -> list[Path | Failure]:
    """Files as given (any extension); folders as their image files, sorted, not recursing."""
    items: list[Path | Failure] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir()
                           if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
            items.extend(files or [Failure(path, f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")])
        elif path.exists():
            items.append(path)
        else:
            items.append(Failure(path, "file not found"))
    return items


def predict_paths(run: LoadedRun, items: Iterable[Path | Failure], options: PhotoOptions, normalize: bool = True,
                  keep_original: bool = False, thumbnail: int = THUMBNAIL) -> Iterator[Prediction | Failure]:
    """Prepare and predict file by file (in batches), yielding results in input order; a bad file is a
    Failure. `keep_original` keeps each decoded photo, shrunk to `thumbnail` pixels a side, for showing."""
    chunk: list[Path | Failure] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == CHUNK:
            yield from _predict_chunk(run, chunk, options, normalize, thumbnail if keep_original else 0)
            chunk = []
    yield from _predict_chunk(run, chunk, options, normalize, thumbnail if keep_original else 0)


def _predict_chunk(run: LoadedRun, chunk: list[Path | Failure], options: PhotoOptions, normalize: bool,
                   thumbnail: int) -> list[Prediction | Failure]:
    prepared: dict[int, Prepared] = {}
    results: list[Prediction | Failure | None] = []
    for i, item in enumerate(chunk):
        if isinstance(item, Failure):
            results.append(item)
            continue
        try:
            prepared[i] = prepare_file(item, run.stored_shape, options, thumbnail)
            results.append(None)
        except PhotoError as e:
            results.append(Failure(item, str(e)))
    if prepared:
        probs = predict_images(run, np.stack([p.image for p in prepared.values()]), normalize)
        for (i, prep), p in zip(prepared.items(), probs, strict=True):
            said = check_input(prep.image, run.stats, prep.steps.get("decoded_size"))  # size first, then looks
            results[i] = Prediction(chunk[i], p, prep, said)  # type: ignore[arg-type]
    return results  # type: ignore[return-value]


def prepare_file(path: Path, shape: tuple[int, int, int], options: PhotoOptions, thumbnail: int = 0) -> Prepared:
    """Decode and prepare one file (keeping an RGB copy of at most `thumbnail` pixels a side when it is
    not 0); PhotoError when it cannot be used."""
    img = read_photo(path, options)
    prepared = prepare(img, shape, options)
    if thumbnail:
        thumb = img.convert("RGB")
        thumb.thumbnail((thumbnail, thumbnail))
        prepared.original = thumb
    return prepared


# ----------------------------------------------------------------------------- output


def result_dict(result: Prediction | Failure, classes: tuple[str, ...], top_k: int) -> dict:
    if isinstance(result, Failure):
        return {"file": str(result.path), "error": result.message}
    return {
        "file": str(result.path),
        "top": [{"class": c, "index": i, "probability": round(p, 6)} for c, i, p in result.top(top_k, classes)],
        "preparation": result.prepared.steps,
        "warnings": result.warnings,
    }


def write_csv(path: Path, results: list[Prediction | Failure], classes: tuple[str, ...], top_k: int) -> None:
    """One row per (image, rank); a failed image is one row with its error."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "rank", "class", "index", "probability", "error"])
    for r in results:
        if isinstance(r, Failure):
            writer.writerow([str(r.path), "", "", "", "", r.message])
            continue
        for rank, (c, i, p) in enumerate(r.top(top_k, classes), start=1):
            writer.writerow([str(r.path), rank, c, i, f"{p:.6f}", ""])
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def figure_paths(show: Path, items: list[Path | Failure]) -> list[Path | None]:
    """FILE.png for a single image; FILE-<image name>.png (numbered on a clash) for several."""
    files = [i for i in items if not isinstance(i, Failure)]
    if len(files) == 1:
        return [None if isinstance(i, Failure) else show for i in items]
    suffix = show.suffix or ".png"
    paths: list[Path | None] = []
    seen: set[Path] = set()
    for item in items:
        if isinstance(item, Failure):
            paths.append(None)
            continue
        candidate, n = show.with_name(f"{show.stem}-{item.stem}{suffix}"), 2
        while candidate in seen:
            candidate, n = show.with_name(f"{show.stem}-{item.stem}-{n}{suffix}"), n + 1
        seen.add(candidate)
        paths.append(candidate)
    return paths


def _text(s: str) -> str:
    """Matplotlib reads $...$ as math; a file or class name is shown as it is."""
    return s.replace("$", r"\$")


def save_figure(path: Path, result: Prediction, classes: tuple[str, ...], top_k: int) -> None:
    """Original, prepared input and probability bars side by side, like study E's figures."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_orig, ax_prep, ax_bar = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.5]})
    if result.prepared.original is not None:
        ax_orig.imshow(np.asarray(result.prepared.original))
    ax_orig.set_title("original")
    img = result.prepared.image
    shown = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
    ax_prep.imshow(shown, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    steps = result.prepared.steps
    done = [name for name, on in (("gray", steps.get("grayscale")), ("inverted", steps.get("inverted")),
                                  ("cropped", steps.get("box") is not None)) if on]
    ax_prep.set_title(f"prepared {img.shape[1]}×{img.shape[2]}" + (f"\n{', '.join(done)}" if done else ""))
    for ax in (ax_orig, ax_prep):
        ax.set_xticks([])
        ax.set_yticks([])
    n = len(classes) if len(classes) <= 15 else top_k
    order = np.argsort(-result.probs, kind="stable")[:n][::-1]
    colours = ["tab:blue"] * (len(order) - 1) + ["tab:orange"]
    bars = ax_bar.barh([_text(classes[i]) for i in order], result.probs[order], color=colours)
    ax_bar.bar_label(bars, labels=[f"{p:.1%}" for p in result.probs[order]], padding=2, fontsize=8)
    ax_bar.set_xlim(0, 1.15)
    ax_bar.set_xlabel("probability")
    best = int(order[-1])
    fig.suptitle(_text(f"{result.path.name}: {classes[best]} ({result.probs[best]:.1%})"))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


CAM_CLASSES = 3  # --cam: maps for at most this many of the top classes


def save_cam_figure(path: Path, run: LoadedRun, result: Prediction, top_k: int) -> None:
    """`--cam`: the prepared photo and a Grad-CAM overlay for each of its top classes (at most CAM_CLASSES)."""
    from classlab.cam import image_cams, save_photo_cams, target_layer

    found = target_layer(run.model)
    if found is None:
        raise ClasslabError("--cam: this run's model has no convolution, so it has no class-activation map")
    top = result.top(min(top_k, CAM_CLASSES), run.classes)
    image = result.prepared.image
    maps = image_cams(run.model, run.pre, np.stack([image] * len(top)), [i for _, i, _ in top], run.device)
    save_photo_cams(path, result.path.name, image, maps, [f"{c} ({p:.1%})" for c, _, p in top], found[0])


def print_table(console, result: Prediction, classes: tuple[str, ...], top_k: int) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(str(result.path)), title_justify="left")
    for col in ("#", "class", "probability"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for rank, (c, _, p) in enumerate(result.top(top_k, classes), start=1):
        table.add_row(str(rank), escape(c), f"{p:.1%}")
    console.print(table)


def run_predict(run_path: str | Path, inputs: list[str | Path], top_k: int = 3, as_json: bool = False,
                csv_path: Path | None = None, show: Path | None = None, device: str = "auto",
                normalize: bool = True, console=None, err=None, cam: Path | None = None, **steps) -> int:
    """`classlab predict`: a table (or JSON) per image, optional CSV and figures; returns the exit code
    (1 when any image failed, each failure one line on `err`)."""
    import sys

    from rich.console import Console

    console = console or Console()
    err = err or sys.stderr
    if top_k < 1:
        raise ClasslabError(f"--top-k {top_k}: choose 1 or more")
    if not inputs:
        raise ClasslabError("no images given: classlab predict RUN IMAGE_OR_FOLDER...")
    run = load_run(run_path, device)
    options = photo_options(run, **steps)
    items = expand_inputs(inputs)
    figures = figure_paths(show, items) if show is not None else [None] * len(items)
    cams = figure_paths(cam, items) if cam is not None else [None] * len(items)
    if cam is not None:
        from classlab.cam import target_layer

        if target_layer(run.model) is None:
            raise ClasslabError("--cam: this run's model has no convolution, so it has no class-activation map")
    if not run.finished:
        err.write(f"note: {run.path} has not finished training; using {run.checkpoint}\n")
    results: list[Prediction | Failure] = []
    for result, figure, cam_path in zip(predict_paths(run, items, options, normalize, keep_original=show is not None),
                                        figures, cams, strict=True):
        results.append(result)
        if isinstance(result, Failure):
            err.write(f"{result.path}: {one_line(result.message)}\n")
            continue
        for warning in result.warnings:
            err.write(f"{result.path}: warning: {warning}\n")
        if not as_json:
            print_table(console, result, run.classes, top_k)
        if cam_path is not None:
            save_cam_figure(cam_path, run, result, top_k)
        if figure is not None:
            save_figure(figure, result, run.classes, top_k)
            result.prepared.original = None
    if as_json:
        sys.stdout.write(json.dumps([result_dict(r, run.classes, top_k) for r in results], indent=2) + "\n")
    if csv_path is not None:
        write_csv(csv_path, results, run.classes, top_k)
    return 1 if any(isinstance(r, Failure) for r in results) else 0
