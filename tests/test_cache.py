"""The decoded-image cache: hit, miss, invalidation, corrupt files, the process pool, two processes sharing it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from classlab.config import DataConfig
from classlab.data import cache, clear_cache, load_dataset
from classlab.data.folder import decode_files, list_class_files
from classlab.errors import ClasslabError

REPO = Path(__file__).resolve().parents[1]


def _folder(root: Path, per_class: int = 6, size: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size), dtype=np.uint8) // 2 + 60 * c
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def _items(root: Path) -> list[tuple[Path, int]]:
    return list_class_files(root / "train", ["cat", "dog"])


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "decoded"
    monkeypatch.setenv("CLASSLAB_CACHE", str(folder))
    return folder


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """How many files the cache decoded (0 on a hit)."""
    counted: list[int] = []
    real = cache.decode_arrays

    def counting(items, *args, **kwargs):
        counted.append(len(items))
        return real(items, *args, **kwargs)

    monkeypatch.setattr(cache, "decode_arrays", counting)
    return counted


def _load(items, channels=1, size=None):
    cache.clear_memo()
    return cache.decoded_images(items, channels, size, workers=1)


def test_miss_then_hit_gives_the_decoders_pixels_from_a_memory_map(tmp_path, cache_root, decodes):
    items = _items(_folder(tmp_path / "data"))
    reference = decode_files(items, 1, None)
    images, labels, skipped = _load(items)
    assert decodes == [len(items)] and len(list(cache_root.glob("*.bin"))) == 1
    assert torch.equal(images, reference.images) and torch.equal(labels, reference.labels) and skipped == []
    decodes.clear()
    again, labels2, _ = _load(items)
    assert decodes == []  # read from the file, not decoded
    assert torch.equal(again, reference.images) and torch.equal(labels2, reference.labels)
    assert again.untyped_storage().data_ptr() != images.untyped_storage().data_ptr()
    # another size or channel count is another file
    _load(items, 3, (8, 8))
    assert len(list(cache_root.glob("*.bin"))) == 2 and decodes == [len(items)]


@pytest.mark.parametrize("change", ["mtime", "size", "added", "removed"])
def test_a_changed_file_makes_the_cache_decode_again(tmp_path, cache_root, decodes, change):
    root = _folder(tmp_path / "data")
    items = _items(root)
    _load(items)
    target = Path(items[0][0])
    if change == "mtime":
        stat = target.stat()
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    elif change == "size":  # new pixels in a file of another length, mtime forced back: size alone must count
        stat = target.stat()
        Image.fromarray(np.full((12, 12), 255, np.uint8)).save(target)
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert target.stat().st_size != stat.st_size
    elif change == "added":
        Image.fromarray(np.zeros((12, 12), np.uint8)).save(target.parent / "new.png")
    else:
        target.unlink()
    decodes.clear()
    items = _items(root)
    images, _, _ = _load(items)
    assert decodes == [len(items)]
    assert torch.equal(images, decode_files(items, 1, None).images)
    assert len(list(cache_root.glob("*.bin"))) == (1 if change in ("mtime", "size") else 2)


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "empty"])
def test_a_corrupt_cache_file_is_rebuilt_never_read(tmp_path, cache_root, decodes, damage):
    items = _items(_folder(tmp_path / "data"))
    reference = decode_files(items, 1, None)
    _load(items)
    (path,) = cache_root.glob("*.bin")
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-100] ^= 0xFF  # one byte of the images
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "header":
        raw[-40:-30] = b"\xff" * 10  # inside the JSON trailer
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    with pytest.raises(cache.CorruptCache):
        cache.read_cache(path, cache.cache_key(items, 1, None)[1])
    decodes.clear()
    images, labels, _ = _load(items)
    assert decodes == [len(items)]
    assert torch.equal(images, reference.images) and torch.equal(labels, reference.labels)
    assert cache.read_cache(path, cache.cache_key(items, 1, None)[1]) is not None  # whole again


def test_the_process_pool_gives_the_same_images_and_skips_the_same_files(tmp_path, cache_root, monkeypatch):
    root = _folder(tmp_path / "data", per_class=40)
    monkeypatch.setattr(cache, "POOL_MIN_FILES", 0)
    items = _items(root)
    cache.clear_memo()
    images, labels, skipped = cache.decoded_images(items, 1, None, workers=2)  # every row written by a worker
    assert torch.equal(images, decode_files(items, 1, None).images) and skipped == []
    (root / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    items = _items(root)
    reference = decode_files(items, 1, None)
    cache.clear_memo()
    images, labels, skipped = cache.decoded_images(items, 1, None, workers=2)
    assert torch.equal(images, reference.images) and torch.equal(labels, reference.labels)
    assert skipped == reference.skipped and len(skipped) == 1 and "broken.png" in skipped[0]
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "train" / "dog" / "z-big.png")
    cache.clear_memo()
    with pytest.raises(ClasslabError, match="z-big.png: size 20×20 differs from 12×12"):
        cache.decoded_images(_items(root), 1, None, workers=2)


def test_cache_off_writes_nothing_and_the_loader_caches_under_the_data_dir(tmp_path, monkeypatch):
    root = _folder(tmp_path / "data")
    monkeypatch.setenv("CLASSLAB_CACHE", "off")
    first = load_dataset(DataConfig(dataset="image-folder", root=str(root), val_fraction=None))
    assert not (tmp_path / "classlab-data" / "decoded").exists()  # conftest's $CLASSLAB_DATA
    monkeypatch.delenv("CLASSLAB_CACHE")
    clear_cache()
    second = load_dataset(DataConfig(dataset="image-folder", root=str(root), val_fraction=None))
    assert len(list((tmp_path / "classlab-data" / "decoded").glob("*.bin"))) == 2  # train and test
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.test.labels, second.test.labels)


READER = """
import sys, zlib
from pathlib import Path
from classlab.data import cache
from classlab.data.folder import list_class_files
def refuse(*a, **k):
    raise SystemExit('decoded instead of reading the cache')
cache.decode_arrays = refuse
items = list_class_files(Path(sys.argv[1]), ['cat', 'dog'])
images, labels, _ = cache.decoded_images(items, 1, None)
mapped = [line for line in open('/proc/self/maps') if line.rstrip().endswith('.bin')]
print(zlib.crc32(images.numpy().tobytes()), int(labels.sum()), len(mapped))
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_two_processes_read_the_same_cache_file_memory_mapped(tmp_path, cache_root):
    root = _folder(tmp_path / "data")
    items = _items(root)
    images, labels, _ = _load(items)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    procs = [subprocess.Popen([sys.executable, "-c", READER, str(root / "train")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    import zlib

    expected = f"{zlib.crc32(images.numpy().tobytes())} {int(labels.sum())} 1"
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert out.strip() == expected
