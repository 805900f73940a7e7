"""Where pretrained weights come from: ImageNet files in torchvision's cache ($TORCH_HOME), an explicit
file, a classlab run folder, or a download when online. Every load is weights_only=True."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from classlab.errors import ClasslabError
from classlab.io import safe_torch_load
from classlab.runs import RunFolder

# torchvision's ResNet18_Weights.IMAGENET1K_V1 (file name carries the sha256 prefix torch.hub checks)
IMAGENET_URLS = {"resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth"}


def hub_checkpoint_dirs() -> list[Path]:
    """torch.hub's checkpoint folder ($TORCH_HOME/hub/checkpoints) and the default one."""
    dirs = [Path(torch.hub.get_dir()) / "checkpoints"]
    default = Path("~/.cache/torch/hub/checkpoints").expanduser()
    if default not in dirs:
        dirs.append(default)
    return dirs


def offline() -> bool:
    return os.environ.get("CLASSLAB_OFFLINE", "") not in ("", "0")


def imagenet_weights_file(arch: str) -> Path:
    """The cached ImageNet file for `arch`, downloading it into torch.hub's folder when needed."""
    url = IMAGENET_URLS[arch]
    filename = url.rsplit("/", 1)[1]
    looked = [d / filename for d in hub_checkpoint_dirs()]
    for path in looked:
        if path.is_file():
            return path
    problem = "offline (CLASSLAB_OFFLINE is set)"
    if not offline():
        target = looked[0]
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
            os.close(fd)
            torch.hub.download_url_to_file(url, tmp, hash_prefix=filename.split("-")[-1].split(".")[0],
                                           progress=True)
            os.replace(tmp, target)
            return target
        except Exception as e:  # URLError, timeouts, hash mismatch: all mean "not available"
            Path(tmp).unlink(missing_ok=True)
            problem = f"download from {url} failed ({type(e).__name__}: {str(e)[:120]})"
    places = ", ".join(str(p) for p in looked)
    raise ClasslabError(
        f"ImageNet weights for {arch} not found; looked for {places}; {problem}; put {filename} in one of "
        "those folders (or set $TORCH_HOME), or set model.pretrained to a .pth file"
    )


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
