"""The report's figures, drawn with matplotlib's Agg backend (no display, no GUI toolkit) into PNG bytes.

Every figure is rendered with `text.parse_math` off, so a class or run name holding `$` is drawn as
written instead of being parsed as TeX (which can fail).
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.ft2font import FT2Font  # noqa: E402

STYLE = {"text.parse_math": False, "font.size": 9, "axes.titlesize": 10, "figure.dpi": 100,
         "axes.grid": True, "grid.alpha": 0.3}


@dataclass(frozen=True)
class Plot:
    """A finished figure: `key` names its file beside report.md, `alt` describes it."""

    key: str
    alt: str
    png: bytes


def _png(fig) -> bytes:
    """The figure as PNG bytes, cropped to what is drawn plus a margin, so no label (a rotated class name, the
    axis title below it) is ever cut off at the edge, whatever the layout managed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return buffer.getvalue()


@functools.cache
def _charmap(path: str) -> frozenset[int]:
    try:
        return frozenset(FT2Font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


@functools.cache
def _font_for(char: str) -> str | None:
    """The family of an installed font that has a glyph for `char`: the default one (DejaVu Sans) first, then
    any other (a CJK font such as Noto Sans CJK, when installed); None when no font has it."""
    code = ord(char)
    if code in _charmap(font_manager.findfont(font_manager.FontProperties(), fallback_to_default=True)):
        return ""
    for entry in sorted(font_manager.fontManager.ttflist, key=lambda f: f.fname):
        if entry.name.startswith("Last Resort"):  # its "glyphs" are the boxes we are avoiding
            continue
        if code in _charmap(entry.fname):
            return entry.name
    return None


def drawable(text: str) -> str:
    """`text` as a figure can draw it, without "glyph missing" warnings or boxes: characters the default font
    lacks are drawn with an installed font that has them (added to this figure's font families), and a
    character no installed font has becomes '?'. Every user string (class, run, study names) goes through it."""
    out = []
    for char in str(text):
        family = _font_for(char) if ord(char) > 0x7F else ""
        if family is None:
            out.append("?")
            continue
        families = list(plt.rcParams["font.family"])
        if family and family not in families:
            plt.rcParams["font.family"] = [*families, family]  # per-glyph fallback; reset when the figure's
        out.append(char)  # rc_context ends
    return "".join(out)


def short(text: str, n: int = 18) -> str:
    text = drawable(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(m["epoch"], m[key]) for m in metrics if m.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def learning_curves(metrics: list[dict], best_epoch: int | None, stopped_early: bool, planned_epochs: int | None,
                    key: str, title: str) -> Plot:
    """Train/validation loss and accuracy per epoch; the best epoch marked, epochs cut by early stopping shaded."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        last = max((m["epoch"] for m in metrics), default=0)
        for ax, metric, scale, label in ((axes[0], "loss", 1, "loss"), (axes[1], "accuracy", 100, "accuracy (%)")):
            for split, style in (("train", "-o"), ("val", "--s")):
                x, y = _series(metrics, f"{split}_{metric}")
                if x:
                    ax.plot(x, [v * scale for v in y], style, markersize=3, label=split)
            ref = "val" if _series(metrics, f"val_{metric}")[0] else "train"
            x, y = _series(metrics, f"{ref}_{metric}")
            if best_epoch in x:
                ax.axvline(best_epoch, color="tab:green", linestyle=":", linewidth=1.2)
                ax.plot([best_epoch], [y[x.index(best_epoch)] * scale], "*", color="tab:green", markersize=12,
                        label=f"best epoch {best_epoch}")
            if stopped_early and planned_epochs and planned_epochs > last:
                ax.axvspan(last, planned_epochs, color="grey", alpha=0.15,
                           label=f"early stop after epoch {last} of {planned_epochs}")
                ax.set_xlim(0.5, planned_epochs + 0.5)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.set_title(f"{label}")
            ax.legend(fontsize=8)
            ax.xaxis.get_major_locator().set_params(integer=True)
        fig.suptitle(drawable(title))
        fig.tight_layout()
        return Plot(key, f"learning curves of {title}", _png(fig))


def confusion(matrix: list[list[int]] | np.ndarray, classes: list[str], key: str, title: str,
              count_format: str = "{:.0f}", counts_label: str = "counts") -> Plot:
    """Counts and row-normalized (recall per true class) side by side, class names on both axes."""
    cm = np.asarray(matrix, dtype=float)
    k = len(classes)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = max(3.8, 0.45 * k + 2.2)
    names = [short(c) for c in classes]
    with plt.rc_context({**STYLE, "axes.grid": False}):
        fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
        for ax, data, label, fmt, top in ((axes[0], cm, counts_label, count_format, max(float(cm.max()), 1.0)),
                                          (axes[1], norm, "row-normalized (recall)", "{:.2f}", 1.0)):
            image = ax.imshow(data, cmap="Blues", vmin=0, vmax=top)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
            ax.set_xticks(range(k), names, rotation=45, ha="right")
            ax.set_yticks(range(k), names)
            ax.set_xlabel("predicted class")
            ax.set_ylabel("true class")
            ax.set_title(label)
            if k <= 20:
                for i in range(k):
                    for j in range(k):
                        ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if data[i, j] > 0.55 * top else "black")
        fig.suptitle(f"{drawable(title)}: confusion matrix (test set)")
        fig.tight_layout()
        return Plot(key, f"confusion matrix of {title}, {counts_label} and row-normalized", _png(fig))


def to_hwc(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """C×H×W uint8 -> what imshow wants, and the colormap for gray images."""
    if image.ndim == 3 and image.shape[0] == 1:
        return image[0], "gray"
    if image.ndim == 3:
        return np.transpose(image, (1, 2, 0)), None
    return image, "gray"


def mistakes_grid(images: np.ndarray, true: list[str], pred: list[str], prob: list[float], key: str,
                  title: str, cols: int = 8, maps: np.ndarray | None = None, layer: str = "") -> Plot:
    """The test images the model got wrong with the highest confidence; with `maps`, each image's Grad-CAM
    map for the predicted class overlaid (jet, translucent; `layer` names the target layer)."""
    n = len(images)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    with plt.rc_context({**STYLE, "axes.grid": False}):
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 2.2 * rows + 0.3), squeeze=False,
                                 layout="constrained")
        for ax in axes.flat:
            ax.axis("off")
        for i in range(n):
            ax = axes.flat[i]
            img, cmap = to_hwc(images[i])
            ax.imshow(img, cmap=cmap, vmin=0, vmax=255)
            if maps is not None:
                ax.imshow(maps[i], cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
            ax.set_title(f"true: {short(true[i], 14)}\npred: {short(pred[i], 14)}\np = {prob[i]:.2f}", fontsize=7)
        if maps is None:
            fig.suptitle(f"{drawable(title)}: most confident mistakes")
            return Plot(key, f"worst test mistakes of {title}", _png(fig))
        fig.suptitle(f"{drawable(title)}: Grad-CAM of the predicted class on the worst mistakes ({drawable(layer)})")
        return Plot(key, f"Grad-CAM maps on the worst test mistakes of {title}", _png(fig))


def overlaid_curves(runs: list[tuple[str, str, list[dict]]], key: str, title: str) -> Plot:
    """Validation (else training) loss and accuracy of every run on shared axes; colour per variant."""
    variants = list(dict.fromkeys(v for _, v, _ in runs))
    colors = plt.get_cmap("tab10")
    styles = ["-", "--", ":", "-."]
    seen: dict[str, int] = {}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for name, variant, metrics in runs:
            index = seen[variant] = seen.get(variant, -1) + 1
            color = colors(variants.index(variant) % 10)
            for ax, metric, scale in ((axes[0], "loss", 1), (axes[1], "accuracy", 100)):
                split = "val" if _series(metrics, f"val_{metric}")[0] else "train"
                x, y = _series(metrics, f"{split}_{metric}")
                ax.plot(x, [v * scale for v in y], styles[index % 4], color=color, marker="o", markersize=3,
                        label=short(name, 30) + ("" if split == "val" else " (train)"))
        has_val = [bool(_series(m, "val_loss")[0]) for _, _, m in runs]
        split = "validation" if all(has_val) else "training" if not any(has_val) else "validation (else training)"
        for ax, label in ((axes[0], f"{split} loss"), (axes[1], f"{split} accuracy (%)")):
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.set_title(label)
            ax.xaxis.get_major_locator().set_params(integer=True)
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.suptitle(drawable(title))
        fig.tight_layout()
        return Plot(key, f"learning curves of all runs of {title}", _png(fig))


def probability_bars(image: np.ndarray | None, label: str, names: tuple[str, str],
                     classes: tuple[list[str], list[str]], probs: tuple[np.ndarray, np.ndarray],
                     key: str, top: int = 10) -> Plot:
    """One image and both models' class probabilities; grouped bars when the two share their classes."""
    same = classes[0] == classes[1]
    panels = 1 if same else 2
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 1 + panels, figsize=(3 + 4.2 * panels, 3.2), squeeze=False,
                                 gridspec_kw={"width_ratios": [1] + [2] * panels})
        axes = axes[0]
        axes[0].axis("off")
        if image is not None:
            img, cmap = to_hwc(image)
            axes[0].imshow(img, cmap=cmap, vmin=0, vmax=255)
        axes[0].set_title(short(label, 30))
        if same:
            order = _top_classes([probs[0], probs[1]], top)
            y = np.arange(len(order))
            for offset, (name, p, color) in enumerate(zip(names, probs, ("tab:blue", "tab:orange"), strict=True)):
                axes[1].barh(y + (0.2 if offset else -0.2), p[order], height=0.4, color=color, label=short(name, 30))
            axes[1].set_yticks(y, [short(classes[0][i]) for i in order])
            axes[1].invert_yaxis()
            axes[1].set_xlim(0, 1)
            axes[1].set_xlabel("probability")
            axes[1].legend(fontsize=7, loc="lower right")
            axes[1].set_title("predicted class probabilities")
        else:
            for ax, name, cls, p in zip(axes[1:], names, classes, probs, strict=True):
                order = _top_classes([p], top)
                ax.barh(np.arange(len(order)), p[order], color="tab:blue")
                ax.set_yticks(np.arange(len(order)), [short(cls[i]) for i in order])
                ax.invert_yaxis()
                ax.set_xlim(0, 1)
                ax.set_xlabel("probability")
                ax.set_title(short(name, 30))
        fig.tight_layout()
        return Plot(key, f"class probabilities of both models for {label}", _png(fig))


def _top_classes(probs: list[np.ndarray], top: int) -> list[int]:
    """Class indices by the highest probability either model gives them, at most `top`."""
    best = np.max(np.stack(probs), axis=0)
    return [int(i) for i in np.argsort(-best, kind="stable")[:top]]


def _epoch_band(runs: list[list[dict]], key: str) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """Per epoch over the runs that reached it (early stopping ends some sooner): mean, min and max."""
    by_epoch: dict[int, list[float]] = {}
    for metrics in runs:
        for epoch, value in zip(*_series(metrics, key), strict=True):
            by_epoch.setdefault(epoch, []).append(value)
    epochs = sorted(by_epoch)
    values = [np.asarray(by_epoch[e]) for e in epochs]
    return (epochs, np.array([v.mean() for v in values]), np.array([v.min() for v in values]),
            np.array([v.max() for v in values]))


def seed_band_curves(variants: list[tuple[str, list[list[dict]]]], key: str, title: str) -> Plot:
    """Validation (else training) loss and accuracy per variant: the mean over its seeds as a line, the
    min–max over seeds as a band, so seed noise is seen beside the gap between variants."""
    colors = plt.get_cmap("tab10")
    has_val = [bool(_series(m, "val_loss")[0]) for _, runs in variants for m in runs]
    split = "val" if all(has_val) else "train"
    word = "validation" if split == "val" else "training"
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for index, (variant, runs) in enumerate(variants):
            color = colors(index % 10)
            for ax, metric, scale in ((axes[0], "loss", 1), (axes[1], "accuracy", 100)):
                epochs, mean, low, high = _epoch_band(runs, f"{split}_{metric}")
                if not epochs:
                    continue
                ax.plot(epochs, mean * scale, "-o", color=color, markersize=3,
                        label=f"{short(variant, 30)} (mean of {len(runs)})" if len(runs) > 1 else short(variant, 30))
                if len(runs) > 1:
                    ax.fill_between(epochs, low * scale, high * scale, color=color, alpha=0.2, linewidth=0)
        for ax, label in ((axes[0], f"{word} loss"), (axes[1], f"{word} accuracy (%)")):
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.set_title(label)
            ax.xaxis.get_major_locator().set_params(integer=True)
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.suptitle(f"{drawable(title)}: mean over seeds per variant, band = min–max over seeds")
        fig.tight_layout()
        return Plot(key, f"learning curves of {title} per variant, mean and min-max band over seeds", _png(fig))


def confusion_difference(diff: np.ndarray, classes: list[str], names: tuple[str, str], key: str) -> Plot:
    """Row-normalized confusion of a minus that of b: red where a puts more of a true class, blue where b does
    (on the diagonal, red = a recalls the class more often)."""
    k = len(classes)
    top = max(float(np.abs(diff).max()), 1e-3)
    side = max(4.2, 0.45 * k + 2.4)
    labels = [short(c) for c in classes]
    with plt.rc_context({**STYLE, "axes.grid": False}):
        fig, ax = plt.subplots(figsize=(side + 1.2, side))
        image = ax.imshow(diff, cmap="RdBu_r", vmin=-top, vmax=top)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(k), labels, rotation=45, ha="right")
        ax.set_yticks(range(k), labels)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        if k <= 20:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, f"{diff[i, j]:+.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(diff[i, j]) > 0.6 * top else "black")
        a, b = (short(n, 24) for n in names)
        ax.set_title(f"confusion of {a} − {b} (row-normalized)")
        fig.tight_layout()
        return Plot(key, f"difference of the row-normalized confusion matrices, {names[0]} minus {names[1]}",
                    _png(fig))


def disagreement_gallery(blocks: list[tuple[str, np.ndarray | list, list[str]]], key: str, title: str,
                         cols: int = 8) -> Plot:
    """Rows of test images, one block per direction ('a right, b wrong', then the reverse), each image
    titled with the true class and both predictions."""
    shown = [(label, images, captions) for label, images, captions in blocks if len(images)]
    cols = max(1, min(cols, max((len(images) for _, images, _ in shown), default=1)))
    rows = sum(math.ceil(len(images) / cols) for _, images, _ in shown)
    with plt.rc_context({**STYLE, "axes.grid": False}):
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 2.3 * rows + 0.3), squeeze=False,
                                 layout="constrained")
        for ax in axes.flat:
            ax.axis("off")
        row = 0
        for label, images, captions in shown:
            for i, image in enumerate(images):
                ax = axes[row + i // cols, i % cols]
                img, cmap = to_hwc(np.asarray(image))
                ax.imshow(img, cmap=cmap, vmin=0, vmax=255)
                ax.set_title(captions[i], fontsize=7)
            axes[row, 0].text(-0.1, 0.5, short(label, 40), transform=axes[row, 0].transAxes, rotation=90,
                              ha="right", va="center", fontsize=8)
            row += math.ceil(len(images) / cols)
        fig.suptitle(drawable(title))
        return Plot(key, f"test images one variant gets right and the other wrong: {title}", _png(fig))


def reliability_diagram(panels: list[tuple[str, dict, float]], key: str, title: str) -> Plot:
    """One panel per (label, reliability bins, ECE): accuracy per equal-width confidence bin against the
    diagonal (perfect calibration), the gap shaded, and the share of predictions per bin below."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 4.8), squeeze=False,
                                 gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
        for col, (label, rel, ece) in enumerate(panels):
            bins = rel["bins"]
            centres = (np.arange(bins) + 0.5) / bins
            count = np.asarray(rel["count"], dtype=float)
            have = count > 0
            acc = np.array([a if a is not None else np.nan for a in rel["accuracy"]], dtype=float)
            conf = np.array([c if c is not None else np.nan for c in rel["confidence"]], dtype=float)
            ax = axes[0, col]
            ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
            ax.bar(centres[have], acc[have], width=1 / bins, edgecolor="tab:blue", color="tab:blue", alpha=0.6,
                   label="accuracy")
            ax.bar(centres[have], (conf - acc)[have], bottom=acc[have], width=1 / bins, color="tab:red",
                   alpha=0.25, edgecolor="tab:red", hatch="//", label="gap to mean confidence")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_ylabel("accuracy")
            ax.set_title(f"{drawable(label)}: ECE {ece:.4f}")
            ax.legend(fontsize=7, loc="upper left")
            share = axes[1, col]
            share.bar(centres, count / max(count.sum(), 1), width=1 / bins, color="grey")
            share.set_xlabel("confidence (top-class probability)")
            share.set_ylabel("share")
        fig.suptitle(f"{drawable(title)}: reliability on the test set ({panels[0][1]['bins']} bins)")
        fig.tight_layout()
        return Plot(key, f"reliability diagram of {title}", _png(fig))


def cam_grid(images: np.ndarray, maps: np.ndarray, true: list[str], pred: list[str], prob: list[float],
             key: str, title: str, layer: str, cols: int = 8) -> Plot:
    """The worst mistakes, each with its Grad-CAM map for the predicted class overlaid."""
    return mistakes_grid(images, true, pred, prob, key, title, cols, maps=maps, layer=layer)
