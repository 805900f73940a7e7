"""The learning-rate range test (Smith, 2015; fastai's lr_find): train a fresh model for a few hundred
steps while the learning rate grows exponentially, through the one training step of train/fit.py, and
read a good learning rate off the loss curve. It never changes the study file.

Suggestion rule (documented in the plot and printed): the loss is smoothed with a bias-corrected
exponential moving average (β = 0.98) run forward and then backward, so the smoothed curve has no lag
(a forward average alone trails the raw loss by ~1 / (1 - β) = 50 steps, two decades of a 200-step sweep
from 1e-7 to 10, and would suggest rates ~100× too high); the suggested learning rate is where that
curve falls fastest against log(lr) (the steepest descent), before its minimum; the value one decade
below the minimum's learning rate is given beside it (the other common rule). The sweep stops once the
forward average exceeds 4× its minimum (diverged) or the loss turns non-finite.

A suggestion needs a descent to read it from: when the smoothed loss falls less than 10% of its level from
the sweep's start to its minimum, or less than twice the raw loss's step-to-step noise (robust: the MAD of
successive differences up to the minimum), the curve is flat
(the model does not learn in the range swept, or the noise hides it) and the result says "no clear
descent" instead of a confident rate (`clear_descent`, `descent`, `noise`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from classlab.config import RunConfig
from classlab.data import ImageData
from classlab.models import build_model
from classlab.train.fit import fit
from classlab.transforms import preprocess_for

SMOOTHING = 0.98
DIVERGED = 4.0


@dataclass
class LrFindResult:
    run: str
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested: float  # steepest descent of the smoothed loss
    min_over_10: float  # one decade below the smoothed minimum's learning rate
    configured: float  # train.lr in the study, for comparison
    clear_descent: bool = True  # False: the curve is flat or noise; `suggested` is no suggestion then
    descent: float = 0.0  # the smoothed loss's fall from the sweep's start to its minimum, a fraction of the start
    noise: float = 0.0  # the raw loss's step-to-step noise, a robust std (same units as the loss)

    def to_dict(self) -> dict:
        return asdict(self)


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    avg, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out


def smooth_both_ways(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """The forward average, averaged again backward: a zero-lag smoothing of the sweep's losses."""
    return smooth(smooth(losses, beta)[::-1], beta)[::-1]


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, float]:
    """(steepest descent of the smoothed loss before its minimum, the minimum's lr / 10)."""
    low = int(np.argmin(smoothed))
    slope = np.gradient(np.asarray(smoothed), np.log10(np.asarray(lrs)))
    skip = max(1, len(lrs) // 10)  # the first steps' average is mostly its warm-up
    window = slope[skip : max(low, skip + 1)]
    steepest = skip + int(np.argmin(window)) if len(window) else low
    return float(lrs[steepest]), float(lrs[low] / 10)


MIN_DESCENT = 0.10  # the smoothed loss must fall at least this fraction of its starting level ...
NOISE_MULTIPLE = 2.0  # ... and more than this many times the raw loss's noise


def descent(losses: list[float], smoothed: list[float]) -> tuple[bool, float, float]:
    """(a clear descent?, the smoothed fall from the start to the minimum as a fraction of the start, the raw
    loss's noise around the smoothed curve)."""
    skip = max(1, len(smoothed) // 10)  # as suggest(): the first steps' average is mostly warm-up
    start = smoothed[min(skip, len(smoothed) - 1)]
    low = skip + int(np.argmin(smoothed[skip:])) if len(smoothed) > skip else len(smoothed) - 1
    fall = start - smoothed[low]
    # the raw loss's step-to-step noise up to the minimum (past it the loss diverges), robust to the few steps
    # of a real descent and to wild ones: the MAD of successive differences, / sqrt(2) for one step's
    steps = np.diff(np.asarray(losses[: low + 1]))
    noise = float(1.4826 * np.median(np.abs(steps - np.median(steps))) / math.sqrt(2)) if len(steps) > 1 else 0.0
    relative = fall / abs(start) if start else 0.0
    return bool(relative >= MIN_DESCENT and fall > NOISE_MULTIPLE * noise), float(relative), noise


def lr_find(cfg: RunConfig, data: ImageData, device: torch.device, steps: int = 200, start: float = 1e-7,
            end: float = 10.0) -> LrFindResult:
    """Sweep the learning rate from `start` to `end` over `steps` training steps of `cfg`'s model."""
    n = len(data.train)
    epochs = math.ceil(steps * cfg.train.batch_size / n) + 1
    raw = cfg.model_dump(mode="json")
    raw["train"].update(lr=start, epochs=epochs, early_stopping=None, scheduler={"name": "none"})
    sweep = RunConfig.model_validate(raw)
    no_val = ImageData(train=data.train, val=None, test=data.test, classes=data.classes, mean=data.mean,
                       std=data.std, source=data.source, skipped=data.skipped)
    pre = preprocess_for(sweep, data)
    torch.manual_seed(sweep.seed)
    model = build_model(sweep.model, len(data.classes), pre.input_shape).to(device)
    factor = (end / start) ** (1 / max(steps - 1, 1))
    lrs: list[float] = [start]
    losses: list[float] = []

    def hook(loss: float) -> float | None:
        losses.append(loss)
        smoothed = smooth(losses)
        if len(losses) >= steps or not math.isfinite(loss) or smoothed[-1] > DIVERGED * min(smoothed):
            return None
        lrs.append(lrs[-1] * factor)
        return lrs[-1]

    fit([model], no_val, [sweep], pre, device, step_hook=hook)
    count = len(losses) if math.isfinite(losses[-1]) else len(losses) - 1
    lrs, losses = lrs[:count], losses[:count]
    smoothed = smooth_both_ways(losses)
    suggested, min_over_10 = suggest(lrs, smoothed)
    clear, fall, noise = descent(losses, smoothed)
    return LrFindResult(cfg.name, lrs, losses, smoothed, suggested, min_over_10, cfg.train.lr, clear, fall, noise)


def verdict(result: LrFindResult) -> str:
    """The line a user reads: the suggestion, or why there is none."""
    if not result.clear_descent:
        return (f"no clear descent: the smoothed loss falls {result.descent:.1%} from the sweep's start to its minimum "
                f"(raw noise ±{result.noise:.3g}), so no learning rate is suggested (the steepest point, "
                f"{result.suggested:.3g}, is noise); widen --start / --end, give more --steps, or check that the "
                "model learns at all")
    return (f"suggested lr: {result.suggested:.3g} (steepest descent of the smoothed loss; the minimum / 10 is "
            f"{result.min_over_10:.3g}; the study has {result.configured:g})")


def plot_png(result: LrFindResult) -> bytes:
    """Loss against learning rate (log scale), raw and smoothed, with both suggestions marked."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.plot(result.lrs, result.losses, color="#bbbbbb", linewidth=0.8, label="loss per step")
    ax.plot(result.lrs, result.smoothed, color="#1f77b4", linewidth=1.6,
            label=f"smoothed (EMA β={SMOOTHING}, forward + backward)")
    ax.axvline(result.suggested, color="#d62728", linestyle="--",
               label=f"steepest descent: {result.suggested:.2g}" if result.clear_descent else
               f"no clear descent (falls {result.descent:.0%}): {result.suggested:.2g} is noise")
    ax.axvline(result.min_over_10, color="#2ca02c", linestyle=":", label=f"minimum / 10: {result.min_over_10:.2g}")
    ax.axvline(result.configured, color="#7f7f7f", linestyle="-.", linewidth=0.8,
               label=f"train.lr in the study: {result.configured:.2g}")
    ax.set_xscale("log")
    top = min(max(result.smoothed[: max(len(result.smoothed) // 10, 1)]) * 1.5, max(result.losses))
    ax.set_ylim(min(min(result.losses), min(result.smoothed)) * 0.95, top)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR finder: {result.run}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
