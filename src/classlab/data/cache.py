"""Decoded images on disk, memory-mapped: a dataset of files is decoded once per machine, not per process.

`decoded_images(items, channels, size)` is the one entry point (image folders, the CSV manifest). The
result lives in one file per list of files and decode settings, under $CLASSLAB_CACHE (default
<data dir>/decoded, the data dir being $CLASSLAB_DATA or ~/.cache/classlab; `CLASSLAB_CACHE=off` turns the
cache off). The file is:

    MAGIC | header length (uint32 LE) | JSON header | padding to 4 KiB | images uint8 N×C×H×W | labels int64 N

The header holds the key (a SHA-256 of the files' paths, labels, sizes and modification times, the
channels, the size, the Pillow version and this format's version), the shape, the unreadable files and
a CRC-32 of everything after the header. A file whose key differs (a file changed, was added or removed)
is decoded again and replaced; one whose length or CRC does not match (torn, truncated, flipped bits) is
never used: it is rebuilt. Files are written to a temp name and renamed (classlab.io), so a reader sees a
whole file or none, and a lock file makes a second process wait for the first one's decode instead of
doing it again.

Images come back as a tensor over a private (copy-on-write) memory map: every process on the machine
shares the page-cache pages of one file, and a process that writes into its tensor gets its own copy of
the pages it touched, never a changed file. The first decode runs in a process pool over chunks of files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import warnings
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import IO

import numpy as np
import PIL
import torch

from classlab.data.folder import decode_arrays
from classlab.data.locate import default_root
from classlab.errors import ClasslabError
from classlab.io import atomic_write

MAGIC = b"CLDECODE"
FORMAT = 1  # bump when the file layout or the decoder's output changes
ALIGN = 4096
OFF = ("off", "0", "false", "no", "none")
POOL_MIN_FILES = 2000  # below this the pool's start costs more than it saves
_MEMO: dict[str, tuple[torch.Tensor, torch.Tensor, list[str]]] = {}


class CorruptCache(Exception):
    """A cache file that must not be read (torn, truncated, or its bytes do not match its CRC)."""


def cache_dir() -> Path | None:
    """$CLASSLAB_CACHE, else <data dir>/decoded; None when CLASSLAB_CACHE is off."""
    env = os.environ.get("CLASSLAB_CACHE")
    if env is not None and env.strip().lower() in OFF:
        return None
    return Path(env).expanduser() if env else default_root() / "decoded"


def decode_workers() -> int:
    """The cores this process may use ($CLASSLAB_DECODE_WORKERS overrides)."""
    env = os.environ.get("CLASSLAB_DECODE_WORKERS")
    if env:
        return max(1, int(env))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cache_key(items: Sequence[tuple[str | Path, int]], channels: int, size: tuple[int, int] | None
              ) -> tuple[str, str]:
    """(name, key): the name from the paths, labels and settings (one file per list of files), the key adding
    every file's size and modification time (a change makes the file stale, decoded again in place)."""
    settings = json.dumps({"format": FORMAT, "channels": channels, "size": list(size) if size else None,
                           "pillow": PIL.__version__})
    cwd = os.getcwd()
    paths = [os.fspath(p) for p, _ in items]
    listing = "\n".join(f"{p if os.path.isabs(p) else os.path.join(cwd, p)}\0{label}"
                         for p, (_, label) in zip(paths, items, strict=True))
    name = hashlib.sha256(settings.encode() + b"\n" + listing.encode())
    stats = np.empty((len(paths), 2), dtype="<i8")
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
            stats[i] = st.st_size, st.st_mtime_ns
        except OSError:  # vanished: decoding will skip it; the key still differs from when it was there
            stats[i] = -1
    key = name.copy()
    key.update(stats.tobytes())
    return name.hexdigest()[:32], key.hexdigest()


def decoded_images(items: Sequence[tuple[str | Path, int]], channels: int, size: tuple[int, int] | None,
                   workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images (uint8 N×C×H×W, memory-mapped when cached), labels (int64 N) and the unreadable files
    ("path (error)") of `items` = [(path, label)], decoded at `channels` (1 or 3) and `size` ([H, W] or None
    = as stored, all equal). Cached on disk and in this process; the first decode uses `workers` processes
    (default: every core this process may use)."""
    name, key = cache_key(items, channels, size)
    if key in _MEMO:
        return _MEMO[key]
    folder = cache_dir()
    workers = decode_workers() if workers is None else workers
    if folder is None or not items:
        result = _as_tensors(*_decode(items, channels, size, workers))
    else:
        result = _cached(folder / f"{name}.bin", key, items, channels, size, workers)
    _MEMO[key] = result
    return result


def clear_memo() -> None:
    _MEMO.clear()


def _cached(path: Path, key: str, items: Sequence[tuple[str | Path, int]], channels: int, size: tuple[int, int] | None,
            workers: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    with contextlib.suppress(FileNotFoundError, CorruptCache):
        found = read_cache(path, key)
        if found is not None:
            return found
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return _uncached(path, e, items, channels, size, workers)
    with _lock(path.with_suffix(".lock")):
        with contextlib.suppress(FileNotFoundError, CorruptCache):  # another process may have built it meanwhile
            found = read_cache(path, key)
            if found is not None:
                return found
        images, labels, skipped = _decode(items, channels, size, workers)
        try:
            write_cache(path, key, images, labels, skipped)
        except ClasslabError as e:  # disk full, read-only: this process still has its images
            warnings.warn(f"decoded images not cached ({e}); each process decodes them again", stacklevel=3)
            return _as_tensors(images, labels, skipped)
    try:
        found = read_cache(path, key)
    except (FileNotFoundError, CorruptCache):
        found = None
    return found if found is not None else _as_tensors(images, labels, skipped)


def _uncached(path: Path, e: OSError, items: Sequence[tuple[str | Path, int]], channels: int,
              size: tuple[int, int] | None, workers: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    warnings.warn(f"decoded images not cached: cannot create {path.parent} ({e.strerror or e}); set "
                  "$CLASSLAB_CACHE to a writable folder", stacklevel=3)
    return _as_tensors(*_decode(items, channels, size, workers))


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (fcntl; released by the kernel if the holder dies); none without fcntl."""
    try:
        import fcntl
    except ImportError:  # Windows: two processes may both decode; the rename keeps the file whole
        yield
        return
    try:
        handle: IO[bytes] = open(path, "ab")  # noqa: SIM115 -- held for the duration of the block
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _as_tensors(images: np.ndarray, labels: np.ndarray, skipped: list[str]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      list[str]]:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))), torch.from_numpy(labels), skipped


def _decode_chunk(args: tuple[Sequence[tuple[str | Path, int]], int, tuple[int, int] | None, tuple[int, ...] | None]
                  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    return decode_arrays(*args)


def _decode(items: Sequence[tuple[str | Path, int]], channels: int, size: tuple[int, int] | None,
            workers: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """N×H×W×C images, labels, skipped files: in this process, or across `workers` forked processes over
    chunks of files (numpy and PIL only in the workers; every chunk checks its sizes against the first
    image, decoded here)."""
    if workers <= 1 or len(items) < POOL_MIN_FILES or "fork" not in _start_methods():
        return decode_arrays(items, channels, size)
    head, head_labels, head_skipped = decode_arrays(items[:64], channels, size)
    if not len(head_labels):
        return decode_arrays(items, channels, size)
    rest = items[64:]
    step = max(256, -(-len(rest) // (workers * 4)))  # a few chunks per worker: an even finish
    chunks = [(rest[i:i + step], channels, size, head.shape[1:]) for i in range(0, len(rest), step)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork")) as pool:
        parts = list(pool.map(_decode_chunk, chunks))
    parts = [(head, head_labels, head_skipped), *parts]
    kept = [p for p in parts if len(p[1])]
    images = np.concatenate([p[0] for p in kept]) if kept else head
    labels = np.concatenate([p[1] for p in parts])
    return images, labels, [s for p in parts for s in p[2]]


def _start_methods() -> list[str]:
    import multiprocessing

    return multiprocessing.get_all_start_methods()


def _header_bytes(header: dict) -> bytes:
    body = json.dumps(header).encode()
    raw = MAGIC + struct.pack("<I", len(body)) + body
    return raw + b"\0" * (-len(raw) % ALIGN)


def write_cache(path: Path, key: str, images: np.ndarray, labels: np.ndarray, skipped: list[str]) -> None:
    """Write images (N×H×W×C, stored N×C×H×W), labels and skipped files atomically (temp file + rename)."""
    nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    labels = np.ascontiguousarray(labels, dtype="<i8")
    crc = zlib.crc32(labels, zlib.crc32(nchw))
    header = {"format": FORMAT, "key": key, "shape": list(nchw.shape), "crc32": crc, "skipped": skipped}
    head = _header_bytes(header)

    def write(f: IO[bytes]) -> None:
        f.write(head)
        f.write(memoryview(nchw).cast("B"))
        f.write(memoryview(labels).cast("B"))

    atomic_write(path, write)


def read_header(path: Path) -> tuple[dict, int]:
    """The header and the offset of the images; CorruptCache when the file is not a whole cache file."""
    with open(path, "rb") as f:
        start = f.read(len(MAGIC) + 4)
        if len(start) < len(MAGIC) + 4 or start[: len(MAGIC)] != MAGIC:
            raise CorruptCache(f"{path}: not a classlab decoded-image cache file")
        (length,) = struct.unpack("<I", start[len(MAGIC):])
        body = f.read(length)
    try:
        header = json.loads(body)
        n, c, h, w = (int(v) for v in header["shape"])
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCache(f"{path}: unreadable header ({e})") from None
    offset = len(MAGIC) + 4 + length
    offset += -offset % ALIGN
    if os.path.getsize(path) != offset + n * c * h * w + 8 * n:
        raise CorruptCache(f"{path}: {os.path.getsize(path)} bytes, not the header's {offset + n * c * h * w + 8 * n}")
    return header, offset


def read_cache(path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
    """The cached images as a tensor over a copy-on-write memory map, or None when the file is for other
    files (stale); CorruptCache when it is damaged (checked by length and CRC-32 before any use)."""
    header, offset = read_header(path)
    if header.get("format") != FORMAT or header.get("key") != key:
        return None
    n, c, h, w = header["shape"]
    mapped = np.memmap(path, dtype=np.uint8, mode="c", offset=offset, shape=(n * c * h * w + 8 * n,))
    if zlib.crc32(mapped) != header["crc32"]:
        raise CorruptCache(f"{path}: CRC-32 mismatch")
    images = torch.from_numpy(mapped[: n * c * h * w].reshape(n, c, h, w))
    labels = torch.from_numpy(mapped[n * c * h * w:].view("<i8").astype(np.int64))
    return images, labels, list(header.get("skipped", []))


__all__ = ["decoded_images", "cache_dir", "cache_key", "clear_memo", "read_cache", "write_cache", "CorruptCache"]
