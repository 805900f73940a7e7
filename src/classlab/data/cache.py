"""Decoded images on disk, memory-mapped: a dataset of files is decoded once per machine, not per process.

`decoded_images(items, channels, size)` is the one entry point (image folders, the CSV manifest). The
result lives in one file per list of files and decode settings, under $CLASSLAB_CACHE (default
<data dir>/decoded, the data dir being $CLASSLAB_DATA or ~/.cache/classlab; `CLASSLAB_CACHE=off` turns the
cache off). The file is:

    images uint8 N×C×H×W | labels int64 N | JSON trailer | trailer length (uint64 LE) | MAGIC

The images start at byte 0 (page-aligned for the map; the workers of a first decode write their rows in
place). The trailer holds the key (a SHA-256 of the files' paths, labels, sizes and modification times, the
channels, the size, the Pillow version and this format's version), the shape, the unreadable files and
CRC-32s of the images (one per range a worker wrote) and of the labels. A file whose key differs (a
file changed, was added or removed) is decoded again and replaced; one whose length or CRC does not
match (torn, truncated, flipped bits) is never used: it is rebuilt. Files are written to a temp name
and renamed (classlab.io.commit), so a reader sees a whole file or none, and a lock file makes a second
process wait for the first one's decode instead of doing it again.

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
import tempfile
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

from classlab.data.files import UNREADABLE, decode_arrays, open_image, size_mismatch
from classlab.data.locate import default_root
from classlab.errors import ClasslabError
from classlab.io import FILE_MODE, atomic_write, commit

MAGIC = b"CLDECODE"
FORMAT = 1  # bump when the file layout or the decoder's output changes
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


def _cached(path: Path, key: str, items: Sequence[tuple[str | Path, int]], channels: int,
            size: tuple[int, int] | None, workers: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
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
        try:
            built = build_cache(path, key, items, channels, size, workers)
        except ClasslabError as e:  # disk full, read-only: this process still decodes its images
            if "cannot write" not in str(e):
                raise
            warnings.warn(f"decoded images not cached ({e}); each process decodes them again", stacklevel=3)
            return _as_tensors(*_decode(items, channels, size, workers))
        if built is not None:
            return built
    # no image could be read: nothing was cached, and the caller's one line names the files
    return _as_tensors(*_decode(items, channels, size, workers))


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


def _use_pool(workers: int, n: int) -> bool:
    import multiprocessing

    return workers > 1 and n >= POOL_MIN_FILES and "fork" in multiprocessing.get_all_start_methods()


def _decode(items: Sequence[tuple[str | Path, int]], channels: int, size: tuple[int, int] | None,
            workers: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """In memory, no cache (CLASSLAB_CACHE=off): N×H×W×C images, labels, skipped files, in this process or
    across `workers` forked processes over chunks of files."""
    if not _use_pool(workers, len(items)):
        return decode_arrays(items, channels, size)
    head, _, _ = decode_arrays(items[:64], channels, size)
    like = head.shape[1:] if len(head) else None
    step = -(-len(items) // (workers * 4))
    chunks = [(items[i:i + step], channels, size, like) for i in range(0, len(items), step)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork")) as pool:
        parts = list(pool.map(_decode_chunk, chunks))
    kept = [p for p in parts if len(p[1])] or parts[:1]
    return (np.concatenate([p[0] for p in kept]), np.concatenate([p[1] for p in parts]),
            [s for p in parts for s in p[2]])


def _decode_chunk(args: tuple) -> tuple[np.ndarray, np.ndarray, list[str]]:
    return decode_arrays(*args)


def build_cache(path: Path, key: str, items: Sequence[tuple[str | Path, int]], channels: int,
                size: tuple[int, int] | None, workers: int) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
    """Decode `items` straight into a temp file beside `path` (each worker fills its chunk's rows of the
    memory-mapped file and checksums them), append labels and the trailer, fsync, rename; then read it
    back. None when no image could be read (nothing is cached)."""
    head, _, _ = decode_arrays(items[:64], channels, size)
    if not len(head):  # the first files are all unreadable: decode in memory (and find out why)
        images, labels, skipped = decode_arrays(items, channels, size)
        if not len(labels):
            return None
        write_cache(path, key, np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels, skipped)
        return read_cache(path, key)
    like = head.shape[1:]
    n, chw = len(items), like[2] * like[0] * like[1]
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, FILE_MODE)
            os.ftruncate(fd, n * chw)
        finally:
            os.close(fd)
        step = max(64, -(-n // (max(workers, 1) * 4)))  # a few chunks per worker: an even finish
        chunks = [(str(tmp), n, like, items[i:i + step], i, channels, size) for i in range(0, n, step)]
        if _use_pool(workers, n):
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork")) as pool:
                parts = list(pool.map(_fill_chunk, chunks))
        else:
            parts = [_fill_chunk(chunk) for chunk in chunks]
        skipped = [s for part in parts for s in part[1]]
        if skipped:  # rare: rows of unreadable files are left out, the rest written again in one piece
            drop = {index for index, _ in skipped}
            keep = np.array([i for i in range(n) if i not in drop], dtype=np.int64)
            if not len(keep):
                return None
            rows = np.memmap(tmp, dtype=np.uint8, mode="r", shape=(n, like[2], like[0], like[1]))
            labels = np.array([items[i][1] for i in keep], dtype=np.int64)
            write_cache(path, key, np.asarray(rows[keep]), labels, [message for _, message in skipped])
            del rows
            return read_cache(path, key)
        labels = np.array([label for _, label in items], dtype="<i8")
        trailer = {"format": FORMAT, "key": key, "shape": [n, like[2], like[0], like[1]],
                   "crc32": [[start, stop, crc] for start, stop, crc in (part[0] for part in parts)],
                   "labels_crc32": zlib.crc32(labels), "skipped": []}
        with open(tmp, "r+b") as f:
            f.seek(n * chw)
            f.write(memoryview(labels).cast("B"))
            f.write(_trailer_bytes(trailer))
            f.flush()
            os.fsync(f.fileno())
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return read_cache(path, key)


def _fill_chunk(args: tuple) -> tuple[tuple[int, int, int], list[tuple[int, str]]]:
    """Decode one chunk of files into their rows of the temp file (N×C×H×W); return the chunk's byte range
    with its CRC-32, and the unreadable files by index. Runs in a forked worker: numpy and PIL only."""
    tmp, n, like, chunk, start, channels, size = args
    rows = np.memmap(tmp, dtype=np.uint8, mode="r+", shape=(n, like[2], like[0], like[1]))
    skipped: list[tuple[int, str]] = []
    for offset, (path, _) in enumerate(chunk):
        try:
            arr = open_image(path, channels, size)
        except UNREADABLE as e:
            skipped.append((start + offset, f"{path} ({type(e).__name__})"))
            continue
        if arr.shape != like:
            raise size_mismatch(path, arr.shape, like)
        rows[start + offset] = arr.transpose(2, 0, 1)
    stop = start + len(chunk)
    crc = zlib.crc32(rows[start:stop])
    rows.flush()
    row = like[0] * like[1] * like[2]
    return (start * row, stop * row, crc), skipped


def _trailer_bytes(trailer: dict) -> bytes:
    body = json.dumps(trailer).encode()
    return body + struct.pack("<Q", len(body)) + MAGIC


def write_cache(path: Path, key: str, images: np.ndarray, labels: np.ndarray, skipped: list[str]) -> None:
    """Write images (N×C×H×W), labels and skipped files in one go, atomically (temp file + rename)."""
    images = np.ascontiguousarray(images)
    labels = np.ascontiguousarray(labels, dtype="<i8")
    trailer = {"format": FORMAT, "key": key, "shape": list(images.shape),
               "crc32": [[0, images.nbytes, zlib.crc32(images)]], "labels_crc32": zlib.crc32(labels),
               "skipped": skipped}

    def write(f: IO[bytes]) -> None:
        f.write(memoryview(images).cast("B"))
        f.write(memoryview(labels).cast("B"))
        f.write(_trailer_bytes(trailer))

    atomic_write(path, write)


def read_trailer(path: Path) -> dict:
    """The trailer (key, shape, CRCs, skipped files); CorruptCache when the file is not a whole cache file."""
    tail = len(MAGIC) + 8
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < tail:
            raise CorruptCache(f"{path}: {size} bytes, too short for a classlab decoded-image cache file")
        f.seek(size - tail)
        end = f.read(tail)
        if end[8:] != MAGIC:
            raise CorruptCache(f"{path}: not a whole classlab decoded-image cache file (no end marker)")
        (length,) = struct.unpack("<Q", end[:8])
        if length > size - tail:
            raise CorruptCache(f"{path}: trailer length {length} beyond the file")
        f.seek(size - tail - length)
        body = f.read(length)
    try:
        trailer = json.loads(body)
        n, c, h, w = (int(v) for v in trailer["shape"])
        ranges = [(int(a), int(b), int(crc)) for a, b, crc in trailer["crc32"]]
        int(trailer["labels_crc32"])
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCache(f"{path}: unreadable trailer ({e})") from None
    if size != n * c * h * w + 8 * n + length + tail or n < 1:
        raise CorruptCache(f"{path}: {size} bytes, not what its trailer says")
    if sum(b - a for a, b, _ in ranges) != n * c * h * w or any(a < 0 or b > n * c * h * w for a, b, _ in ranges):
        raise CorruptCache(f"{path}: its checksums do not cover the images")
    return trailer


def read_cache(path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
    """The cached images as a tensor over a copy-on-write memory map, or None when the file is for other
    files (stale); CorruptCache when it is damaged (checked by length and CRC-32 before any use)."""
    trailer = read_trailer(path)
    if trailer.get("format") != FORMAT or trailer.get("key") != key:
        return None
    n, c, h, w = trailer["shape"]
    mapped = np.memmap(path, dtype=np.uint8, mode="c", shape=(n * c * h * w + 8 * n,))
    if any(zlib.crc32(mapped[a:b]) != crc for a, b, crc in trailer["crc32"]) or \
            zlib.crc32(mapped[n * c * h * w:]) != trailer["labels_crc32"]:
        raise CorruptCache(f"{path}: CRC-32 mismatch")
    images = torch.from_numpy(mapped[: n * c * h * w].reshape(n, c, h, w))
    labels = torch.from_numpy(mapped[n * c * h * w:].view("<i8").astype(np.int64))
    return images, labels, list(trailer.get("skipped", []))


__all__ = ["decoded_images", "build_cache", "cache_dir", "cache_key", "clear_memo", "read_cache", "write_cache",
           "CorruptCache"]
