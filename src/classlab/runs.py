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
        .lock                while a process trains the run: who (host, pid, since when); see RunLock
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass
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
                _remove_all_but(self.path, LOCK_NAME)  # the lock is this process's claim on the run: keep it
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


def _remove_all_but(folder: Path, keep: str) -> None:
    for child in folder.iterdir():
        if child.name == keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# ----------------------------------------------------------------------------- run locks

LOCK_NAME = ".lock"


class RunLocked(Exception):
    """The run is claimed by another process that is (or may be) alive."""

    def __init__(self, path: Path, owner: dict) -> None:
        self.path, self.owner = path, owner
        super().__init__(describe_lock(path, owner))


def describe_lock(path: Path, owner: dict) -> str:
    if not owner:
        return f"locked by an unreadable {path}; remove it if no job trains this run, or pass --steal-locks"
    who = f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('started')}"
    hint = "" if _alive_here(owner) else "; if that job is gone, pass --steal-locks"
    return f"being trained by {who} (lock {path}){hint}"


def read_lock(path: Path) -> dict | None:
    """The lock's owner; None when there is no lock, {} when it cannot be read (e.g. half written)."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine; a zombie (exited, not yet reaped, e.g. a killed
    torchrun worker whose parent is gone too) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except (OverflowError, ValueError):
        return False
    try:  # Linux: the state letter follows the parenthesised command name
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _alive_here(owner: dict) -> bool:
    return owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) and _pid_alive(owner["pid"])


def _dead_here(owner: dict) -> bool:
    """Provably stale: written on this machine by a process that no longer exists."""
    return owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) \
        and not _pid_alive(owner["pid"])


@dataclass(frozen=True)
class RunLock:
    """One process's claim on a run folder, so two processes (shards, machines, or two accidental
    `classlab run`s) never train the same run: `<run>/.lock`, created atomically with
    O_CREAT | O_EXCL (atomic on local file systems and on NFSv3+), holding host, pid, start time and a
    random token.

    Policy for a lock that is already there: a lock of a process on this machine that no longer
    exists (killed, crashed) is taken over; a live process's lock is respected; a lock from another
    machine cannot be checked from here, so it is respected unless `steal` is set (`--steal-locks`:
    only when you know that job is gone, e.g. a cancelled SLURM job). Taking over moves the old lock
    aside under a name of this process's own and checks it is the one judged stale, so two processes
    taking over the same lock cannot both win."""

    path: Path
    owner: dict

    @classmethod
    def acquire(cls, run_dir: Path, steal: bool = False) -> RunLock:
        """Claim `run_dir` (created if missing); raises RunLocked when another process holds it."""
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ClasslabError(f"cannot create run folder {run_dir}: {e.strerror}; choose another out_dir") from None
        path = run_dir / LOCK_NAME
        for _ in range(5):
            owner = {"host": socket.gethostname(), "pid": os.getpid(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": secrets.token_hex(8)}
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_UMASK)
            except FileExistsError:
                held = read_lock(path)
                if held is None:
                    continue  # released meanwhile: try again
                if not (_dead_here(held) or (steal and not _alive_here(held))):
                    raise RunLocked(path, held) from None
                _move_aside(path, held)
                continue
            except OSError as e:
                raise ClasslabError(f"cannot create lock {path}: {e.strerror}") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(owner, f)
                f.flush()
                os.fsync(f.fileno())
            return cls(path, owner)
        raise RunLocked(path, read_lock(path) or {})

    def release(self) -> None:
        """Remove the lock, if it is still this process's (never one that someone took over)."""
        held = read_lock(self.path)
        if held is not None and held.get("token") == self.owner["token"]:
            self.path.unlink(missing_ok=True)


def _move_aside(path: Path, judged: dict) -> None:
    """Remove the stale lock `judged`; if what was moved is not it (it was taken over in between), put
    that one back."""
    aside = path.with_name(f"{LOCK_NAME}.stale-{socket.gethostname()}-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        if read_lock(aside) != judged:
            with contextlib.suppress(FileExistsError):  # a newer lock appeared meanwhile: that one stands
                os.link(aside, path)
    finally:
        aside.unlink(missing_ok=True)
