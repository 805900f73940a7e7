"""The run folder: one self-describing directory per run, every file written atomically.

    <out>/<study>/<run>/
        config.yaml          the resolved RunConfig (+ format version)
        preprocessing.json   what evaluation/prediction applies to an image
        input_stats.json     training-image brightness, for predict's input check
        model_summary.txt    torchinfo table; model_summary.json rows for the report
        run.log              data source and sizes, skipped files, processes
        metrics.jsonl        one line per finished epoch
        checkpoints/last.pt  full training state (resume); checkpoints/best.pt the best epoch's
        predictions.npz      test labels, predictions, probabilities, worst mistakes
        gradcam.npz          Grad-CAM maps of the worst mistakes (made when the run finishes; the report reads them)
        oof.npz              data.cv: the fold's held-out images (pool positions), labels and probabilities
        temperature.json     the temperature fitted on the validation logits (eval.temperature_scaling)
        summary.json         written last: its presence is what marks the run complete
        failed.json          written instead when the run failed (non-finite loss, ...)
        tensorboard/         event files, when train.tensorboard is on
        .lock                while a process trains the run: who (host, pid, since when); see locks.py

This module is the only place that spells these names: everything else reads and writes a run through
RunFolder's typed methods, so the layout can change in one place.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import ValidationError

from classlab import RUN_FORMAT_VERSION, __version__
from classlab.errors import ClasslabError, one_line
from classlab.io import (
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    commit,
    safe_torch_load,
    torch_save_into,
    write_temp,
)
from classlab.locks import LOCK_NAME, RunLock, RunLocked, describe_lock, read_lock
from classlab.results import EpochRow, RunSummary, row_from, summary_from

# The atomic writers and the locks live in classlab.io and classlab.locks; re-exported here for the
# code (study.py, tests) that still imports them from classlab.runs.
__all__ = [
    "CHECKPOINT_KEYS", "LOCK_NAME", "RunFolder", "RunLock", "RunLocked", "atomic_torch_save", "atomic_write_bytes",
    "atomic_write_json", "atomic_write_text", "check_checkpoint", "check_format", "describe_lock", "find_failed",
    "find_runs", "read_lock", "safe_torch_load", "weights_of",
]

CONFIG = "config.yaml"
PREPROCESSING = "preprocessing.json"
INPUT_STATS = "input_stats.json"
MODEL_TEXT = "model_summary.txt"
MODEL_TABLE = "model_summary.json"
RUN_LOG = "run.log"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
PREDICTIONS = "predictions.npz"
GRADCAM = "gradcam.npz"
SUMMARY = "summary.json"
FAILED = "failed.json"
TEMPERATURE = "temperature.json"
OOF = "oof.npz"
TENSORBOARD = "tensorboard"
LR_FIND = "lr_find.json"
LR_FIND_PLOT = "lr_find.png"

# The checkpoint schema: what checkpoints/last.pt (and best.pt, a copy of the best epoch's) holds.
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "stopper", "rng", "history")
WEIGHTS = ("best", "last")  # summary.json's "weights": which checkpoint the test numbers were computed with


def check_checkpoint(state: Any, path: Path, hint: str = "") -> dict:
    """`state` as a training checkpoint, or one ClasslabError naming what is wrong with it."""
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ClasslabError(f"{path}: not a classlab training checkpoint (no '{missing[0]}'){hint}")
    if not isinstance(state["epoch"], int) or state["epoch"] < 1:
        raise ClasslabError(f"{path}: bad epoch {state['epoch']!r}{hint}")
    return state


def weights_of(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's "model" weights, with the prefixes of DDP ("module.") and torch.compile removed."""
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ClasslabError(f"{path}: not a classlab checkpoint (no 'model' weights)")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()}


class RunFolder:
    """Reads and writes one run's folder; knows nothing about training."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    config_path = property(lambda self: self.path / CONFIG)
    preprocessing_path = property(lambda self: self.path / PREPROCESSING)
    input_stats_path = property(lambda self: self.path / INPUT_STATS)
    model_text_path = property(lambda self: self.path / MODEL_TEXT)
    model_table_path = property(lambda self: self.path / MODEL_TABLE)
    run_log_path = property(lambda self: self.path / RUN_LOG)
    metrics_path = property(lambda self: self.path / METRICS)
    last_path = property(lambda self: self.path / CHECKPOINTS / LAST)
    best_path = property(lambda self: self.path / CHECKPOINTS / BEST)
    predictions_path = property(lambda self: self.path / PREDICTIONS)
    gradcam_path = property(lambda self: self.path / GRADCAM)
    summary_path = property(lambda self: self.path / SUMMARY)
    failed_path = property(lambda self: self.path / FAILED)
    calibration_path = property(lambda self: self.path / TEMPERATURE)
    oof_path = property(lambda self: self.path / OOF)
    tensorboard_dir = property(lambda self: self.path / TENSORBOARD)
    lr_find_plot_path = property(lambda self: self.path / LR_FIND_PLOT)
    lock_path = property(lambda self: self.path / LOCK_NAME)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def is_complete(self) -> bool:
        return self.summary_path.is_file()

    @property
    def is_failed(self) -> bool:
        """Marked failed and not finished since (a later successful run removes failed.json first)."""
        return self.failed_path.is_file() and not self.is_complete

    @property
    def has_checkpoint(self) -> bool:
        return self.last_path.is_file() or self.best_path.is_file()

    # ------------------------------------------------------------------------- lifecycle

    def prepare(self, restart: bool = False) -> None:
        if restart and self.path.exists():
            try:
                # the lock is this process's claim on the run; the LR sweep is about the config, not the training
                _remove_all_but(self.path, {LOCK_NAME, LR_FIND, LR_FIND_PLOT})
            except OSError as e:
                raise ClasslabError(f"--restart: cannot remove {self.path}: {e.strerror or e}") from None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ClasslabError(f"cannot create run folder {self.path}: {e.strerror}; choose another out_dir") from None
        if not os.access(self.path, os.W_OK):
            raise ClasslabError(f"run folder {self.path} is not writable; choose another out_dir")
        if not restart:  # never overwrite a folder a newer classlab wrote, even an unfinished one
            self.check_format()
        self.failed_path.unlink(missing_ok=True)
        for folder in (self.path, self.path / CHECKPOINTS):  # temp files of writes a kill cut short
            for stale in folder.glob(".*.tmp"):
                stale.unlink(missing_ok=True)

    def check_format(self) -> None:
        """Refuse a folder whose config.yaml or summary.json comes from a newer run format."""
        for path in (self.config_path, self.summary_path):
            try:
                doc = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                continue  # absent or unreadable: it is rewritten before anything trusts it
            if isinstance(doc, dict):
                check_format(doc, path)

    def mark_failed(self, reason: str) -> None:
        atomic_write_json(self.failed_path, {"reason": reason})

    def read_failed(self) -> str:
        """Why the run failed, as failed.json says (a placeholder when it cannot be read)."""
        try:
            return str(json.loads(self.failed_path.read_text(encoding="utf-8")).get("reason", ""))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return f"{FAILED} unreadable"

    # ------------------------------------------------------------------------- what the run is

    def write_config(self, config: dict) -> None:
        doc = {"classlab_version": __version__, "format": RUN_FORMAT_VERSION, **config}
        atomic_write_text(self.config_path, yaml.safe_dump(doc, sort_keys=False))

    def read_config(self) -> dict:
        try:
            doc = yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ClasslabError(f"{self.path}: not a classlab run folder (no {CONFIG})") from None
        except (yaml.YAMLError, UnicodeDecodeError):
            raise ClasslabError(f"{self.config_path}: unreadable YAML") from None
        check_format(doc, self.config_path)
        doc.pop("classlab_version", None)
        doc.pop("format", None)
        return doc

    def write_preprocessing(self, preprocessing: dict) -> None:
        atomic_write_json(self.preprocessing_path, preprocessing)

    def read_preprocessing(self) -> dict:
        """preprocessing.json as written (transforms.Preprocess.from_dict turns it into a Preprocess)."""
        doc = self._read_json(PREPROCESSING)
        if not isinstance(doc, dict):
            raise ClasslabError(f"{self.preprocessing_path}: not a classlab preprocessing file")
        return doc

    def write_input_stats(self, stats: dict) -> None:
        atomic_write_json(self.input_stats_path, stats)

    def read_input_stats(self) -> dict | None:
        """The training images' statistics, or None when the run has none (older runs) or they are unreadable."""
        return self._optional_json(self.input_stats_path)

    def write_model_summary(self, text: str, table: dict) -> None:
        """The layer table as text (model_summary.txt) and as data for the report (model_summary.json)."""
        atomic_write_text(self.model_text_path, text if text.endswith("\n") else text + "\n")
        atomic_write_json(self.model_table_path, table)

    def write_lr_find(self, result: dict, png: bytes) -> None:
        """`classlab lr-find`'s sweep and its plot (before or beside a run's training; never the config)."""
        atomic_write_json(self.path / LR_FIND, result)
        atomic_write_bytes(self.lr_find_plot_path, png)

    def read_lr_find(self) -> tuple[dict | None, bytes | None]:
        """The LR finder's sweep and plot, when `classlab lr-find` wrote them for this run."""
        plot = self.lr_find_plot_path
        return self._optional_json(self.path / LR_FIND), plot.read_bytes() if plot.is_file() else None

    def read_model_summary(self) -> tuple[str | None, dict | None]:
        try:
            text = self.model_text_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = None
        return text, self._optional_json(self.model_table_path)

    def write_run_log(self, lines: list[str]) -> None:
        atomic_write_text(self.run_log_path, "".join(line + "\n" for line in lines))

    def read_run_log(self) -> list[str]:
        try:
            return self.run_log_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return []

    # ------------------------------------------------------------------------- training

    def write_metrics(self, rows: list[dict] | list[EpochRow]) -> None:
        docs = [r.to_json() if isinstance(r, EpochRow) else r for r in rows]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in docs))

    def read_metrics(self) -> list[EpochRow]:
        """metrics.jsonl's rows, typed (and brought up to this format: results.migrate_row)."""
        if not self.metrics_path.is_file():
            return []
        rows = []
        for number, line in enumerate(self.metrics_path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(row_from(json.loads(line)))
                except (json.JSONDecodeError, ValidationError, AttributeError):
                    raise ClasslabError(f"{self.metrics_path}: line {number} is not an epoch row") from None
        return rows

    def save_epoch(self, state: dict, is_best: bool) -> None:
        """Write an epoch's training state to last.pt, and to best.pt when it is the best epoch so far.

        torch.save streams into last.pt's temp file (no whole-file copy in memory). A best epoch is not
        written twice: its temp file is hard-linked to a second temp name (copied where the file system
        has no hard links), and the renames go best.pt first, then last.pt. So best.pt never lags the
        best epoch last.pt's early-stopping state records: a kill between the two renames leaves
        best.pt one epoch ahead of last.pt, and the resumed run redoes that epoch bit for bit and
        rewrites both. best.pt then holds the full state; readers use only its "model" and "epoch"."""
        check_checkpoint(state, self.last_path)
        tmp = write_temp(self.last_path, torch_save_into(state))
        try:
            if is_best:
                commit(_twin(tmp, self.best_path), self.best_path)
            commit(tmp, self.last_path)
        finally:
            tmp.unlink(missing_ok=True)  # only still there when a step above failed

    def save_best(self, model: dict, epoch: int) -> None:
        """best.pt alone, for a best epoch between two checkpoints (`train.checkpoint_every` > 1): a kill
        before the next last.pt leaves best.pt ahead of it, and the resume redoes those epochs and
        rewrites it, as after a kill between save_epoch's two renames."""
        commit(write_temp(self.best_path, torch_save_into({"model": model, "epoch": epoch})), self.best_path)

    def read_last(self) -> dict:
        """checkpoints/last.pt, the full training state to resume from (loaded with weights_only=True)."""
        hint = f"; start this run over with: classlab run STUDY --restart-run {shlex.quote(self.path.name)}"
        try:
            state = safe_torch_load(self.last_path)
        except ClasslabError as e:
            raise ClasslabError(f"{e}{hint}") from None
        return check_checkpoint(state, self.last_path, hint)

    def result_weights_path(self) -> Path:
        """The checkpoint the run's test numbers were computed with: summary.json's "weights" (best.pt
        for a finished run whose summary predates that key); for an unfinished run best.pt, else last.pt."""
        if self.is_complete:
            which = self.read_summary().weights
            if which not in WEIGHTS:
                raise ClasslabError(f"{self.summary_path}: 'weights' is {which!r}; expected best or last")
            path = self.best_path if which == "best" else self.last_path
            if not path.is_file():
                raise ClasslabError(f"{path}: missing; the run's test results were computed with its weights")
            return path
        for path in (self.best_path, self.last_path):
            if path.is_file():
                return path
        raise ClasslabError(f"{self.path}: no {CHECKPOINTS}/{BEST} or {LAST}; has the run trained an epoch yet?")

    def read_result_weights(self) -> tuple[dict[str, torch.Tensor], Path]:
        """The weights behind the run's test numbers (see result_weights_path), and the file they came from."""
        path = self.result_weights_path()
        return weights_of(safe_torch_load(path), path), path

    # ------------------------------------------------------------------------- results

    def write_predictions(self, y_true: Any, probs: Any, worst_index: Any, worst_images: Any) -> None:
        """Test labels and probabilities (float32; predictions are their argmax) and the worst mistakes'
        indices and uint8 images. Tensors or arrays."""
        p = _array(probs).astype(np.float32)
        arrays = {"y_true": _array(y_true), "y_pred": p.argmax(1), "probs": p,
                  "worst_index": _array(worst_index), "worst_images": _array(worst_images)}
        atomic_write(self.predictions_path, lambda f: np.savez_compressed(f, **arrays))

    def read_predictions(self) -> dict[str, np.ndarray] | None:
        """predictions.npz's arrays; None when missing or unreadable. Plain arrays only: allow_pickle stays
        off so the file can never run code."""
        try:
            with np.load(self.predictions_path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return None

    def write_gradcam(self, maps: Any | None, layer: str | None, autocorrelation: float | None,
                      reason: str | None = None) -> None:
        """The Grad-CAM maps [N, H, W] of the worst mistakes (float16, in [0, 1], on the image as stored), the
        layer they were read at and their neighbouring-pixel correlation; or, when there are none, why."""
        arrays = {"maps": _array(maps).astype(np.float16) if maps is not None else np.zeros((0, 0, 0), np.float16),
                  "layer": np.array(layer or ""), "reason": np.array(reason or ""),
                  "autocorrelation": np.array(np.nan if autocorrelation is None else autocorrelation)}
        atomic_write(self.gradcam_path, lambda f: np.savez_compressed(f, **arrays))

    def read_gradcam(self) -> dict[str, Any] | None:
        """{"maps" (float32 or None), "layer", "autocorrelation", "reason"} as write_gradcam stored them; None when
        the run has none (trained by an older classlab) or the file is unreadable."""
        try:
            with np.load(self.gradcam_path, allow_pickle=False) as npz:
                maps, layer, reason = npz["maps"], str(npz["layer"]), str(npz["reason"])
                autocorrelation = float(npz["autocorrelation"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        return {"maps": maps.astype(np.float32) if maps.size else None, "layer": layer or None,
                "autocorrelation": None if np.isnan(autocorrelation) else autocorrelation, "reason": reason or None}

    def write_calibration(self, calibration: dict) -> None:
        """temperature.json: {"temperature": T, ...how it was fitted}; written before summary.json."""
        temperature = calibration.get("temperature")
        if not isinstance(temperature, float | int) or not temperature > 0:
            raise ClasslabError(f"{self.calibration_path}: a temperature must be a number > 0, not {temperature!r}")
        atomic_write_json(self.calibration_path, calibration)

    def read_calibration(self) -> dict | None:
        """temperature.json, or None when the run fitted no temperature; an unreadable one is an error (a run
        that was calibrated must not silently predict uncalibrated)."""
        if not self.calibration_path.is_file():
            return None
        doc = self._read_json(TEMPERATURE)
        t = doc.get("temperature") if isinstance(doc, dict) else None
        if not isinstance(t, float | int) or isinstance(t, bool) or not t > 0:
            raise ClasslabError(f"{self.calibration_path}: no positive 'temperature'")
        return doc

    def write_oof(self, index: Any, y_true: Any, probs: Any, fold: tuple[int, int], pool_size: int) -> None:
        """A cross-validation fold's out-of-fold predictions: its held-out images' positions in the fold pool,
        labels and probabilities (float32), with the fold (repeat, fold) and the pool's size, so a variant's
        folds together give one prediction for every training image."""
        arrays = {"index": _array(index).astype(np.int64), "y_true": _array(y_true), "probs": _array(probs).astype(
            np.float32), "fold": np.array(fold, dtype=np.int64), "pool_size": np.array(pool_size, dtype=np.int64)}
        atomic_write(self.oof_path, lambda f: np.savez_compressed(f, **arrays))

    def read_oof(self) -> dict[str, np.ndarray] | None:
        """oof.npz's arrays; None when the run is not a fold (or the file is unreadable)."""
        try:
            with np.load(self.oof_path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return None

    def write_summary(self, summary: RunSummary | dict) -> None:
        doc = summary.to_json() if isinstance(summary, RunSummary) else summary
        doc = {k: v for k, v in doc.items() if k not in ("classlab_version", "format")}
        atomic_write_json(self.summary_path, {"classlab_version": __version__, "format": RUN_FORMAT_VERSION, **doc})

    def read_summary(self) -> RunSummary:
        """summary.json, typed (and brought up to this format from an older release's: results.migrate_summary)."""
        summary = self._read_json(SUMMARY)
        check_format(summary, self.summary_path)
        try:  # the first runs' summaries may lack their name: the folder's
            return summary_from({"name": self.name, **summary} if isinstance(summary, dict) else summary)
        except ValidationError as e:
            raise ClasslabError(f"{self.summary_path}: not a classlab summary ({one_line(str(e))[:200]})") from None

    # ------------------------------------------------------------------------- JSON files

    def _read_json(self, name: str) -> Any:
        path = self.path / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ClasslabError(f"{path}: missing; is {self.path} a finished classlab run?") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ClasslabError(f"{path}: not valid JSON") from None

    @staticmethod
    def _optional_json(path: Path) -> dict | None:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return doc if isinstance(doc, dict) else None


def check_format(doc: dict, path: Path) -> None:
    version = doc.get("format", 1) if isinstance(doc, dict) else None
    if not isinstance(version, int):
        raise ClasslabError(f"{path}: not a classlab run file")
    if version > RUN_FORMAT_VERSION:
        raise ClasslabError(
            f"{path}: written by a newer classlab (run format {version}, this one reads up to "
            f"{RUN_FORMAT_VERSION}); upgrade classlab"
        )


def find_runs(root: str | Path) -> list[RunFolder]:
    """Every finished run folder under `root` (the study folder itself may be a run)."""
    root = Path(root)
    if RunFolder(root).is_complete:
        return [RunFolder(root)]
    return [RunFolder(p.parent) for p in sorted(root.glob(f"*/{SUMMARY}"))]


def find_failed(root: str | Path) -> list[RunFolder]:
    """Every run folder under `root` that is marked failed and has not finished since."""
    return [f for f in (RunFolder(p.parent) for p in sorted(Path(root).glob(f"*/{FAILED}"))) if f.is_failed]


def _twin(tmp: Path, target: Path) -> Path:
    """A second temp name for the finished temp file `tmp`, beside `target`: a hard link (no second
    write), or a copy where the file system refuses links."""
    for _ in range(5):
        twin = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.link(tmp, twin)
            return twin
        except FileExistsError:
            continue
        except OSError:  # EPERM, EXDEV, ENOTSUP, EMLINK: no hard links here
            break

    def copy(f) -> None:
        with open(tmp, "rb") as source:
            shutil.copyfileobj(source, f, 1 << 20)

    return write_temp(target, copy)


def _array(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _remove_all_but(folder: Path, keep: set[str]) -> None:
    for child in folder.iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()

