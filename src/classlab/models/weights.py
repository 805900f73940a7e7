"""Where pretrained weights come from: ImageNet files in torchvision's cache ($TORCH_HOME), an explicit
file, a classlab run folder, or a download when online. Every load is weights_only=True."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from classlab.errors import ClasslabError
from classlab.io import safe_torch_load
from classlab.runs import RunFolder


def hub_checkpoint_dirs() -> list[Path]:
    """torch.hub's checkpoint folder ($TORCH_HOME/hub/checkpoints) and the default one."""
    dirs = [Path(torch.hub.get_dir()) / "checkpoints"]
    default = Path("~/.cache/torch/hub/checkpoints").expanduser()
    if default not in dirs:
        dirs.append(default)
    return dirs


def offline() -> bool:
    return os.environ.get("CLASSLAB_OFFLINE", "") not in ("", "0")


def load_state_dict_from(source: str) -> tuple[dict[str, torch.Tensor], str]:
    """A state dict from a .pth/.pt file (torchvision or classlab format) or a classlab run folder (the
    weights its test results came from, RunFolder.read_result_weights)."""
    path = Path(source).expanduser()
    if path.is_dir():
        folder = RunFolder(path)
        if not folder.has_checkpoint:
            raise ClasslabError(f"model.pretrained: {source} is a folder but holds no classlab checkpoint")
        try:
            state, found = folder.read_result_weights()
        except ClasslabError as e:
            raise ClasslabError(f"model.pretrained: {e}") from None
        return state, str(found)
    if not path.is_file():
        raise ClasslabError(
            f"model.pretrained: '{source}' is not a file or run folder; use none, imagenet, a .pth file or a run folder"
        )
    obj = safe_torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ClasslabError(f"model.pretrained: {path} holds no state dict of tensors (not a weights file)")
    return obj, str(path)
