"""Run claims: `<run>/.lock`, so two processes (two accidental `classlab run`s, a worker and a plain run)
never train the same run. Which worker trains which run across processes and machines is decided by the
study's Optuna storage (search.py); the lock is the thin guard beneath it. See RunLock for the policy on a
lock that is already there."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from classlab.errors import ClasslabError
from classlab.io import FILE_MODE

LOCK_NAME = ".lock"


class RunLocked(Exception):
    """The run is claimed by another process that is (or may be) alive."""

    def __init__(self, path: Path, owner: dict) -> None:
        self.path, self.owner = path, owner
        super().__init__(describe_lock(path, owner))


def describe_lock(path: Path, owner: dict) -> str:
    if not owner:
        return f"locked by an unreadable {path}; remove it if no job trains this run"
    who = f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('started')}"
    hint = "" if _alive_here(owner) else "; if that job is gone, remove the lock file"
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
    """One process's claim on a run folder, so two processes (workers, or two accidental `classlab run`s)
    never train the same run: `<run>/.lock`, created atomically with
    O_CREAT | O_EXCL (atomic on local file systems and on NFSv3+), holding host, pid, start time and a
    random token.

    Policy for a lock that is already there: a lock of a process on this machine that no longer
    exists (killed, crashed) is taken over; a live process's lock is respected; a lock from another
    machine cannot be checked from here, so it is respected unless `steal` is set: only for a trial that the
    study's Optuna storage handed over after its heartbeat saw the old worker die. Taking over moves the old lock
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
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
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
