"""The run folder: one self-describing directory per run, every file written atomically.

    <out>/<study>/<run>/
        config.yaml          the resolved RunConfig (+ format version)
        preprocessing.json   what evaluation/prediction applies to an image
        model_summary.txt    torchinfo table; model_summary.json rows for the report
        metrics.jsonl        one line per finished epoch
        checkpoints/last.pt  full training state (resume); checkpoints/best.pt best weights
        predictions.npz      test labels, predictions, probabilities, worst mistakes
        summary.json         written last: its presence is what marks the run complete
        failed.json          written instead when the run failed (non-finite loss, ...)
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from classlab import RUN_FORMAT_VERSION, __version__
from classlab.errors import ClasslabError

# What checkpoints/last.pt holds (see train/checkpoint.py and train/loop.py).
LAST_KEYS = ("epoch", "model", "optimizer", "scheduler", "stopper", "rng", "history")


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename: a reader sees the old file or the new, never half.
    Any OSError (disk full, no permission, a file where a folder should be) is one ClasslabError naming
    `path`; whatever stops the write, the temp file is removed."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a report or run file should read like any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # disk full, permissions, Ctrl-C mid-write: never leave the temp file behind
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ClasslabError(
                f"cannot write {path}: {e.strerror or e}; free space or choose another out_dir"
            ) from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def safe_torch_load(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only=True: tensors and plain containers only, never code."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notices; a refusal still raises
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ClasslabError(f"{path}: file not found") from None
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        text = str(e)
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise ClasslabError(
                f"{path}: refused to load: the file carries Python objects or code, not just tensors "
                "(classlab loads checkpoints with weights_only=True)"
            ) from None
        raise ClasslabError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") from None


class RunFolder:
    """Reads and writes one run's folder; knows nothing about training."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.yaml")
    summary_path = property(lambda self: self.path / "summary.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    failed_path = property(lambda self: self.path / "failed.json")
    last_path = property(lambda self: self.path / "checkpoints" / "last.pt")
    best_path = property(lambda self: self.path / "checkpoints" / "best.pt")

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def is_complete(self) -> bool:
        return self.summary_path.is_file()

    def prepare(self, restart: bool = False) -> None:
        if restart and self.path.exists():
            try:
                shutil.rmtree(self.path)
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
        for folder in (self.path, self.path / "checkpoints"):  # temp files of writes a kill cut short
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

    def write_config(self, config: dict) -> None:
        doc = {"classlab_version": __version__, "format": RUN_FORMAT_VERSION, **config}
        atomic_write_text(self.config_path, yaml.safe_dump(doc, sort_keys=False))

    def read_config(self) -> dict:
        try:
            doc = yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ClasslabError(f"{self.path}: not a classlab run folder (no config.yaml)") from None
        except yaml.YAMLError:
            raise ClasslabError(f"{self.config_path}: unreadable YAML") from None
        check_format(doc, self.config_path)
        doc.pop("classlab_version", None)
        doc.pop("format", None)
        return doc

    def write_metrics(self, rows: list[dict]) -> None:
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.is_file():
            return []
        rows = []
        for number, line in enumerate(self.metrics_path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ClasslabError(f"{self.metrics_path}: line {number} is not valid JSON") from None
        return rows

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / name, obj)

    def read_json(self, name: str) -> Any:
        path = self.path / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ClasslabError(f"{path}: missing; is {self.path} a finished classlab run?") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ClasslabError(f"{path}: not valid JSON") from None

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.summary_path, {"classlab_version": __version__, "format": RUN_FORMAT_VERSION,
                                              **summary})

    def read_summary(self) -> dict:
        summary = self.read_json("summary.json")
        check_format(summary, self.summary_path)
        return summary

    def read_last(self) -> dict:
        """checkpoints/last.pt, the full training state to resume from (loaded with weights_only=True)."""
        hint = "; run with --restart to start this run over"
        try:
            state = safe_torch_load(self.last_path)
        except ClasslabError as e:
            raise ClasslabError(f"{e}{hint}") from None
        missing = [k for k in LAST_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise ClasslabError(f"{self.last_path}: not a classlab training checkpoint (no '{missing[0]}'){hint}")
        if not isinstance(state["epoch"], int) or state["epoch"] < 1:
            raise ClasslabError(f"{self.last_path}: bad epoch {state['epoch']!r}{hint}")
        return state

    def mark_failed(self, reason: str) -> None:
        atomic_write_json(self.failed_path, {"reason": reason})


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
    if (root / "summary.json").is_file():
        return [RunFolder(root)]
    return [RunFolder(p.parent) for p in sorted(root.glob("*/summary.json"))]
