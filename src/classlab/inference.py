"""A run folder -> its model, its stored preprocessing, classes and input statistics -> probabilities.

One path for every command that applies a trained run to images (predict, compare, export): the model is
rebuilt from config.yaml and given the weights the run's test numbers were computed with
(RunFolder.read_result_weights, loaded with weights_only=True); images (uint8 N×C×H×W, as a dataset
stores them) go through the run's own BatchTransform and `train.forward.predict_logits`, the forward pass its
test evaluation used, so a run scores an image here exactly as it scored its test set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from classlab.config import RunConfig, validate
from classlab.errors import ClasslabError, one_line
from classlab.models import build_model
from classlab.photo import fallback_stats
from classlab.runs import RunFolder
from classlab.train.device import resolve_device
from classlab.train.forward import predict_logits
from classlab.transforms import BatchTransform, Preprocess

# Datasets whose images are light objects on black, centred and filling the frame: photos get prepared.
MNIST_STYLE = ("mnist", "fashion-mnist", "demo", "idx")
BATCH = 256


@dataclass
class LoadedRun:
    """A finished (or interrupted) run, ready to predict: model on its device, preprocessing, stats."""

    path: Path
    config: RunConfig
    pre: Preprocess
    model: nn.Module
    device: torch.device
    stats: dict
    stats_source: str
    checkpoint: str
    finished: bool
    temperature: float | None = None  # temperature.json's (eval.temperature_scaling): logits are divided by it
    tta: tuple[str, ...] = ()  # the run's eval.tta views: probabilities are averaged over them

    @property
    def stored_shape(self) -> tuple[int, int, int]:
        """C×H×W of the run's uint8 images, before any gray->RGB or resize of its BatchTransform."""
        return tuple(self.pre.stored_shape)  # type: ignore[return-value]

    @property
    def mnist_style(self) -> bool:
        return self.config.data.dataset in MNIST_STYLE and self.stored_shape[0] == 1

    @property
    def classes(self) -> tuple[str, ...]:
        return self.pre.classes


def run_config(folder: RunFolder) -> RunConfig:
    """config.yaml, validated as a RunConfig (a bad one is one error naming the file)."""
    return validate(RunConfig, folder.read_config(), where=str(folder.config_path))


def read_preprocess(folder: RunFolder) -> Preprocess:
    try:
        return Preprocess.from_dict(folder.read_preprocessing())
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ClasslabError(f"{folder.preprocessing_path}: not a classlab preprocessing file") from None


def load_run(path: str | Path, device: str = "auto") -> LoadedRun:
    """Read a run folder and rebuild its model with the weights its test results came from."""
    folder = RunFolder(path)
    if not folder.path.is_dir():
        raise ClasslabError(f"{folder.path}: no such run folder")
    cfg = run_config(folder)
    pre = read_preprocess(folder)
    state, checkpoint = folder.read_result_weights()
    model_cfg = cfg.model
    if getattr(model_cfg, "pretrained", "none") != "none":  # the checkpoint holds every weight: fetch nothing
        model_cfg = model_cfg.model_copy(update={"pretrained": "none"})
    model = build_model(model_cfg, len(pre.classes), tuple(pre.input_shape))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ClasslabError(f"{checkpoint}: weights do not fit the run's model ({one_line(e)[:200]})") from None
    dev = resolve_device(device)
    stats, source = _stats(folder, pre, cfg.data.dataset in MNIST_STYLE)
    calibration = folder.read_calibration()
    return LoadedRun(folder.path, cfg, pre, model.to(dev).eval(), dev, stats, source, str(checkpoint),
                     folder.is_complete, float(calibration["temperature"]) if calibration else None,
                     tuple(cfg.eval.tta))


def _stats(folder: RunFolder, pre: Preprocess, dark_background: bool) -> tuple[dict, str]:
    """input_stats.json when the run stored it, else bounds derived from the normalization."""
    stats = folder.read_input_stats()
    if stats is not None and "image_mean_range" in stats:
        return stats, folder.input_stats_path.name
    return fallback_stats(pre.mean, pre.std, dark_background), folder.preprocessing_path.name


def transform(run: LoadedRun, normalize: bool = True) -> BatchTransform:
    """The run's evaluation transform (uint8 images -> the float tensor its model takes)."""
    pre = run.pre
    if not normalize:  # diagnostic: what the model would make of unnormalized input
        pre = dataclasses.replace(pre, mean=(0.0,) * len(pre.mean), std=(1.0,) * len(pre.std))
    return BatchTransform(pre, None, run.device)


def predict_images(run: LoadedRun, images: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Class probabilities (N×K float32) for uint8 N×C×H×W images at the run's stored shape: the logits divided
    by the run's fitted temperature (if any), averaged over its test-time augmentation views (if any), as its
    test evaluation computed them."""
    from classlab.tta import tta_probs

    batch = torch.from_numpy(np.ascontiguousarray(images))
    t = run.temperature or 1.0
    if run.tta:
        probs, _ = tta_probs(run.model, batch, transform(run, normalize), BATCH, run.device, run.tta, t)
        return probs.float().cpu().numpy()
    logits = predict_logits(run.model, batch, transform(run, normalize), BATCH, run.device)
    return (logits.float() / t).softmax(1).cpu().numpy()
