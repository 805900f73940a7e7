"""Manifest tables (CSV, or Parquet when pyarrow is importable): one row per image.

Columns: `path` (relative to the table's folder, or absolute), `label`, optional `split` (train / val /
test, with the image folders' spellings: training, valid, validation, testing) and any other columns,
usable as data.cv.group_by. Every problem with a row is one line naming the table and the row; the images
are decoded (and cached on disk) by the image folders' own data.cache.decoded_images, so both sources give
the same tensors and share one cache.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classlab.data.cache import decoded_images
from classlab.data.folder import SPLIT_NAMES, FolderSplit, _guess_channels
from classlab.errors import ClasslabError
from classlab.registry import suggest

REQUIRED = ("path", "label")
SPLIT_OF = {name: split for split, names in SPLIT_NAMES.items() for name in names}


@dataclass(frozen=True)
class ManifestRow:
    where: str  # "line 7" (CSV, as an editor numbers it) or "row 6" (Parquet, 1-based)
    path: Path
    label: str
    split: str
    group: str | None


def read_table(table: Path) -> tuple[list[str], list[tuple[str, dict[str, str]]]]:
    """(columns, [(where, row)]) with every cell as text ('' for empty); Parquet needs pyarrow."""
    if not table.is_file():
        raise ClasslabError(f"manifest {table} does not exist; set data.root to a .csv (or .parquet) table with "
                            "columns path, label[, split]")
    if table.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ClasslabError(f"{table}: reading Parquet needs pyarrow (pip install pyarrow), or save the "
                                "manifest as CSV") from None
        try:
            data = pq.read_table(table).to_pylist()
            columns = pq.read_schema(table).names
        except Exception as e:  # pyarrow raises its own error types for a damaged file
            raise ClasslabError(f"{table}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        return columns, [(f"row {i + 1}", {k: "" if v is None else str(v) for k, v in row.items()})
                         for i, row in enumerate(data)]
    try:
        with open(table, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = []
            for row in reader:
                cells = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in row.items()}
                rows.append((f"line {reader.line_num}", cells))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ClasslabError(f"{table}: not a readable UTF-8 CSV table ({e})") from None
    return columns, rows


def parse_rows(table: Path, group_by: str | None = None, classes: list[str] | None = None
               ) -> tuple[list[ManifestRow], list[str]]:
    """The table's rows, checked (missing file, unknown label or split, duplicate path: one line each with the
    row), and the class names: `classes` when given (a label outside them is an error), else the labels found,
    sorted."""
    columns, raw = read_table(table)
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise ClasslabError(f"{table}: no '{missing[0]}' column; a manifest needs columns path, label (optional: "
                            f"split, group columns); found: {', '.join(columns) or 'none'}")
    if group_by is not None and group_by not in columns:
        raise ClasslabError(f"data.cv.group_by: no column '{group_by}' in {table}{suggest(group_by, columns)}; "
                            f"columns: {', '.join(columns)}")
    if not raw:
        raise ClasslabError(f"{table}: the manifest has no rows")
    base = table.parent
    rows: list[ManifestRow] = []
    seen: dict[Path, str] = {}
    for where, cells in raw:
        at = f"{table}, {where}"
        if not cells.get("path"):
            raise ClasslabError(f"{at}: empty path")
        path = Path(cells["path"]).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise ClasslabError(f"{at}: image {cells['path']} not found (looked at {path}; paths are relative to the "
                                "manifest's folder)")
        label = cells.get("label", "")
        if not label:
            raise ClasslabError(f"{at}: empty label")
        if classes is not None and label not in classes:
            raise ClasslabError(f"{at}: unknown label '{label}'{suggest(label, classes)}; data.classes lists "
                                f"{', '.join(classes)}")
        split_cell = cells.get("split", "train") if "split" in columns else "train"
        split = SPLIT_OF.get(split_cell.lower())
        if split is None:
            raise ClasslabError(f"{at}: unknown split '{split_cell}'; write train, val or test")
        key = path.resolve()
        if key in seen:
            raise ClasslabError(f"{at}: duplicate path {cells['path']} (also at {seen[key]}); list each image once")
        seen[key] = where
        group = cells.get(group_by, "") if group_by else None
        if group_by and not group:
            raise ClasslabError(f"{at}: empty {group_by} (data.cv.group_by needs every image's group)")
        rows.append(ManifestRow(where, path, label, split, group))
    names = list(classes) if classes is not None else sorted({r.label for r in rows})
    return rows, names


@dataclass
class ManifestData:
    splits: dict[str, FolderSplit]
    groups: dict[str, np.ndarray | None]
    classes: list[str]


def read_manifest(table: Path, channels: int | None, size: tuple[int, int] | None, group_by: str | None = None,
                  classes: list[str] | None = None) -> ManifestData:
    """Decode a manifest's images per split ('all' when the table has no split column or only one split's
    rows are train); unreadable files are skipped and listed, as for image folders, with their groups."""
    rows, names = parse_rows(table, group_by, classes)
    index = {name: i for i, name in enumerate(names)}
    if channels is None:
        channels = _guess_channels([r.path for r in rows])
    by_split: dict[str, list[ManifestRow]] = {}
    for row in rows:
        by_split.setdefault(row.split, []).append(row)
    if "train" not in by_split:
        raise ClasslabError(f"{table}: no rows with split train; mark the training images' rows train")
    if set(by_split) == {"train"}:
        by_split = {"all": by_split.pop("train")}  # no given test split: load_dataset makes one
    splits, groups = {}, {}
    for split, part in by_split.items():
        decoded = FolderSplit(*decoded_images([(str(r.path), index[r.label]) for r in part], channels, size))
        skipped = {s.rsplit(" (", 1)[0] for s in decoded.skipped}
        kept = [r for r in part if str(r.path) not in skipped]
        if not kept:
            raise ClasslabError(f"{table}: none of the {len(part)} {split} images could be read")
        splits[split] = decoded
        groups[split] = np.array([r.group for r in kept]) if group_by else None
    if size is None and len({tuple(s.images.shape[1:]) for s in splits.values()}) > 1:
        raise ClasslabError(f"{table}: splits have different image sizes; set data.image_size")
    return ManifestData(splits, groups, names)
