"""FER-2013 as Kaggle's fer2013.csv: columns emotion, pixels (2304 numbers), Usage."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from classlab.errors import ClasslabError

FER_CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]
USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}


def read_fer_csv(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Decode the csv once into uint8 N×1×48×48 tensors per split (train / val / test)."""
    if not path.is_file():
        raise ClasslabError(f"{path}: FER-2013 csv not found; set data.root to fer2013.csv or its folder")
    pixels: dict[str, list[np.ndarray]] = {s: [] for s in USAGE_TO_SPLIT.values()}
    labels: dict[str, list[int]] = {s: [] for s in USAGE_TO_SPLIT.values()}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"emotion", "pixels", "Usage"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise ClasslabError(f"{path}: expected columns emotion, pixels, Usage; found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            split = USAGE_TO_SPLIT.get(row["Usage"])
            if split is None:
                raise ClasslabError(f"{path}: line {line}: unknown Usage '{row['Usage']}'")
            values = np.array(row["pixels"].split(), dtype=np.uint8)
            if values.size != 48 * 48:
                raise ClasslabError(f"{path}: line {line}: {values.size} pixels, expected 2304 (48×48)")
            label = int(row["emotion"])
            if not 0 <= label < len(FER_CLASSES):
                raise ClasslabError(f"{path}: line {line}: emotion {label} outside 0–6")
            pixels[split].append(values.reshape(1, 48, 48))
            labels[split].append(label)
    out = {}
    for split in pixels:
        if pixels[split]:
            out[split] = (torch.from_numpy(np.stack(pixels[split])), torch.tensor(labels[split], dtype=torch.long))
    if "train" not in out or "test" not in out:
        raise ClasslabError(f"{path}: needs Training and PrivateTest rows")
    return out
