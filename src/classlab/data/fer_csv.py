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
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            need = {"emotion", "pixels", "Usage"}
            if reader.fieldnames is None or not need <= set(reader.fieldnames):
                raise ClasslabError(f"{path}: expected columns emotion, pixels, Usage; found {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                split = USAGE_TO_SPLIT.get(row["Usage"])
                if split is None:
                    raise ClasslabError(f"{path}: line {line}: unknown Usage '{row['Usage']}'")
                try:
                    values = np.array((row["pixels"] or "").split(), dtype=np.uint8)
                except (ValueError, OverflowError):
                    raise ClasslabError(f"{path}: line {line}: pixels must be whole numbers 0–255") from None
                if values.size != 48 * 48:
                    raise ClasslabError(f"{path}: line {line}: {values.size} pixels, expected 2304 (48×48)")
                try:
                    label = int(row["emotion"] or "")
                except ValueError:
                    raise ClasslabError(
                        f"{path}: line {line}: emotion '{row['emotion']}' is not a number 0–6"
                    ) from None
                if not 0 <= label < len(FER_CLASSES):
                    raise ClasslabError(f"{path}: line {line}: emotion {label} outside 0–6")
                pixels[split].append(values.reshape(1, 48, 48))
                labels[split].append(label)
    except (UnicodeDecodeError, csv.Error) as e:
        raise ClasslabError(
            f"{path}: not a readable CSV file ({type(e).__name__}); expected Kaggle's fer2013.csv"
        ) from None
    out = {}
    for split in pixels:
        if pixels[split]:
            out[split] = (torch.from_numpy(np.stack(pixels[split])), torch.tensor(labels[split], dtype=torch.long))
    if "train" not in out or "test" not in out:
        raise ClasslabError(f"{path}: needs Training and PrivateTest rows")
    return out
