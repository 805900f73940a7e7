"""dataset: csv / parquet — manifest tables of paths and labels, their one-line errors, and the real notMNIST
manifest with a made-up `writer` group column."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from classlab.config import DataConfig
from classlab.data import load_dataset
from classlab.data.folder import read_image_folder
from classlab.errors import ClasslabError
from tests.conftest import SHARED_DATA, make_csv_manifest, synthetic_images

NOTMNIST = SHARED_DATA / "notmnist-small"


def _rewrite(table: Path, edit) -> Path:
    lines = table.read_text().splitlines()
    edit(lines)
    table.write_text("\n".join(lines) + "\n")
    return table


def _load(table: Path, **data) -> object:
    return load_dataset(DataConfig(dataset="csv", root=str(table), **data))


def test_csv_loads_splits_classes_and_relative_paths(tmp_path):
    table = make_csv_manifest(tmp_path / "m", n_train=60, n_test=30)
    data = _load(table, val_fraction=0.2)
    assert data.classes == ["c0", "c1", "c2"]
    assert (len(data.train), len(data.val), len(data.test)) == (48, 12, 30)
    assert data.image_shape == (1, 12, 12)
    assert data.source == str(table)


def test_csv_decodes_as_the_image_folder_loader(tmp_path):
    """Same files, same tensors: the manifest goes through the image folders' decoded_images (and its cache)."""
    root = tmp_path / "folder"
    table = tmp_path / "m.csv"
    rows = ["path,label"]
    x, y = synthetic_images(12, 3, 10)
    for i in range(12):
        (root / f"k{y[i]}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(root / f"k{y[i]}" / f"{i:02d}.png")
    files = sorted(root.rglob("*.png"))
    rows += [f"folder/{p.relative_to(root)},{p.parent.name}" for p in files]
    table.write_text("\n".join(rows) + "\n")
    decoded, classes, _ = read_image_folder(root, None, None)
    from classlab.data.manifest import read_manifest

    m = read_manifest(table, None, None)
    assert m.classes == classes
    assert torch.equal(m.splits["all"].images, decoded["all"].images)
    assert torch.equal(m.splits["all"].labels, decoded["all"].labels)


@pytest.mark.parametrize("edit, message", [
    (lambda lines: lines.__setitem__(3, lines[3].replace("img/", "gone/")), "line 4: image gone/"),
    (lambda lines: lines.__setitem__(5, lines[5].replace(",train,", ",holdout,")), "line 6: unknown split 'holdout'"),
    (lambda lines: lines.append(lines[2]), "duplicate path img/train0001.png (also at line 3)"),
    (lambda lines: lines.__setitem__(0, "file,label,split,writer"), "no 'path' column"),
    (lambda lines: lines.__setitem__(7, ",".join(["img/train0006.png", "", "train", "w1"])), "line 8: empty label"),
])
def test_bad_rows_are_one_line_with_the_row(tmp_path, edit, message):
    table = _rewrite(make_csv_manifest(tmp_path / "m", n_train=12, n_test=6), edit)
    with pytest.raises(ClasslabError) as err:
        _load(table)
    text = str(err.value)
    assert message in text and str(table) in text
    assert "\n" not in text


def test_unknown_label_against_data_classes(tmp_path):
    table = make_csv_manifest(tmp_path / "m", n_train=12, n_test=6)
    with pytest.raises(ClasslabError, match=r"line \d+: unknown label 'c2'; data.classes lists c0, c1"):
        _load(table, classes=["c0", "c1"])
    data = _load(table, classes=["c2", "c1", "c0", "c9"], allow_missing_classes=True)
    assert data.classes == ["c2", "c1", "c0", "c9"]  # the given order, not sorted


def test_group_by_must_name_a_column(tmp_path):
    table = make_csv_manifest(tmp_path / "m", n_train=12, n_test=6)
    with pytest.raises(ClasslabError, match="group_by: no column 'writr'.*did you mean 'writer'"):
        _load(table, cv={"folds": 2, "group_by": "writr", "fold": (1, 1)})
    with pytest.raises(ValueError, match="group_by names a manifest column"):
        DataConfig(dataset="image-folder", root="x", cv={"group_by": "writer"})


def test_manifest_without_split_column_gets_a_test_split(tmp_path):
    table = make_csv_manifest(tmp_path / "m", n_train=40, n_test=20)
    _rewrite(table, lambda lines: lines.__setitem__(slice(None), [",".join(r.split(",")[:2]) for r in lines]))
    data = _load(table, test_fraction=0.25, val_fraction=None)
    assert len(data.train) + len(data.test) == 60 and len(data.test) == 15


def test_parquet_manifest(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.csv as pv
    import pyarrow.parquet as pq

    table = make_csv_manifest(tmp_path / "m", n_train=30, n_test=9)
    pq.write_table(pv.read_csv(table), tmp_path / "m" / "manifest.parquet")
    assert pa is not None
    a = _load(table)
    b = load_dataset(DataConfig(dataset="parquet", root=str(tmp_path / "m" / "manifest.parquet")))
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)


def notmnist_manifest(folder: Path, writers: int = 40) -> Path:
    """A CSV manifest of notMNIST-small (paths relative to the table: ../shared/data/...) with a made-up
    `writer` column: each letter's files in order are dealt round-robin to `writers` writers."""
    rows = ["path,label,split,writer"]
    for split in ("train", "test"):
        for letter in sorted(p.name for p in (NOTMNIST / split).iterdir() if p.is_dir()):
            for i, f in enumerate(sorted((NOTMNIST / split / letter).glob("*.png"))):
                rows.append(f"{os.path.relpath(f, folder)},{letter},{split},w{i % writers}")
    table = folder / "notmnist.csv"
    table.write_text("\n".join(rows) + "\n")
    return table


@pytest.mark.skipif(not NOTMNIST.is_dir(), reason=f"notMNIST-small not found at {NOTMNIST} (../shared/data)")
def test_notmnist_manifest_matches_the_image_folder_and_groups_never_straddle(tmp_path):
    table = notmnist_manifest(tmp_path)
    folder = load_dataset(DataConfig(dataset="image-folder", root=str(NOTMNIST), channels=1, val_fraction=None))
    data = load_dataset(DataConfig(dataset="csv", root=str(table), channels=1,
                                   cv={"folds": 5, "group_by": "writer", "fold": (1, 2)}))
    assert data.classes == folder.classes == list("ABCDEFGHIJ")
    assert len(data.train) + len(data.val) == len(folder.train) and len(data.test) == len(folder.test)
    assert torch.equal(data.test.images, folder.test.images)  # the test split is untouched
    assert not set(data.train.groups) & set(data.val.groups)
    counts = np.bincount(data.val.labels.numpy(), minlength=10)
    assert counts.min() > 0.5 * counts.mean()  # StratifiedGroupKFold keeps every letter in the fold


def test_unreadable_file_is_skipped_with_its_group(tmp_path):
    table = make_csv_manifest(tmp_path / "m", n_train=30, n_test=9)
    (tmp_path / "m" / "img" / "train0004.png").write_bytes(b"not a png")
    data = _load(table, val_fraction=None, cv=None)
    assert len(data.train) == 29 and len(data.skipped) == 1 and "train0004.png" in data.skipped[0]
    folds = _load(table, cv={"folds": 3, "group_by": "writer", "fold": (1, 1)})
    assert len(folds.train.groups) == len(folds.train) and len(folds.val.groups) == len(folds.val)
    assert folds.pool_size == 29
