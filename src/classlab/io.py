"""Atomic file writes and safe checkpoint loads: a reader sees the old file or the new, never half of one.

Every write goes to a temp file in the target's folder (named `.<name>.<random>.tmp`, so a run folder's
stale temps are easy to find and remove), is fsynced, then renamed over the target. Any OSError (disk
full, no permission, a file where a folder should be) is one ClasslabError naming the target.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from classlab.errors import ClasslabError, one_line

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # mkstemp makes 0600; a report or run file should read like any other


def write_error(path: Path, e: OSError) -> ClasslabError:
    return ClasslabError(f"cannot write {path}: {e.strerror or e}; free space or choose another out_dir")


def write_temp(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write a fsynced temp file beside `path` through `write(file)` and return its name; the caller
    renames it (see `commit`). Whatever stops the write, the temp file is removed."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        return Path(tmp)
    except BaseException as e:  # disk full, permissions, Ctrl-C mid-write: never leave the temp file behind
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def commit(tmp: Path, path: Path) -> None:
    """Rename `tmp` over `path` and make the rename durable (fsync of the folder)."""
    try:
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, e) from None
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """`write(file)` streams the content; the target is replaced only once all of it is on disk."""
    path = Path(path)
    commit(write_temp(path, write), path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def torch_save_into(obj: Any) -> Callable[[IO[bytes]], None]:
    """A writer for `write_temp`: torch.save straight into the open temp file (no copy in memory)."""

    def save(f: IO[bytes]) -> None:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch's zip writer reports a failed write (disk full) as RuntimeError
            if "writ" not in str(e).lower():
                raise
            raise OSError(f"torch.save failed ({one_line(e)[:160]})") from None

    return save


def atomic_torch_save(path: Path, obj: Any) -> None:
    atomic_write(path, torch_save_into(obj))


def safe_torch_load(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only=True: tensors and plain containers only, never code."""
    _check_checkpoint_magic(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notices; a refusal still raises
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ClasslabError(f"{path}: file not found") from None
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        text = str(e)
        if "Unsupported global" in text or "GLOBAL" in text or (
                "eights only" in text and _pickle_refers_to_globals(path)):  # a pickled class or function: code
            raise ClasslabError(
                f"{path}: refused to load: the file carries Python objects or code, not just tensors "
                "(classlab loads checkpoints with weights_only=True)"
            ) from None
        raise ClasslabError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") from None


CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save: a zip archive (since 1.6), else a pickle (protocol 2+)


def _check_checkpoint_magic(path: Path) -> None:
    """A file that is neither a zip archive nor a pickle is no PyTorch checkpoint at all (text, an image, an
    empty file): say so, not that it carries code (torch's weights_only error says that for any bad pickle)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        raise ClasslabError(f"{path}: file not found") from None
    except OSError as e:
        raise ClasslabError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not head.startswith(CHECKPOINT_MAGIC):
        shown = "it is empty" if not head else f"it starts with {head[:12]!r}"
        raise ClasslabError(f"{path}: not a readable PyTorch checkpoint (neither a zip archive nor a pickle: {shown})")


def _pickle_refers_to_globals(path: Path) -> bool:
    """Whether a plain pickle file names Python globals (classes, functions: code when unpickled). Read with
    pickletools, which only lists the opcodes and runs nothing; a torch zip archive or a broken pickle: False.
    Why: torch's weights_only refusal of a protocol-4 pickle names an opcode, not the global behind it."""
    import pickletools

    try:
        with open(path, "rb") as f:
            return any(op.name in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ") for op, _, _ in pickletools.genops(f))
    except Exception:  # not a pickle, truncated, unreadable
        return False
