"""Grad-CAM class-activation maps through the maintained `grad-cam` package (pytorch_grad_cam), not a
home-made one: which parts of an image drove a class's score.

The target layer is chosen per architecture (`target_layer`): a timm model's last feature stage (its
`feature_info`), a torchvision ResNet's `layer4`, another torchvision model's `features`, else (classlab's
`cnn` layer lists and the study presets) the last Conv2d. A model without a convolution gets no map.

Maps are computed on the model's input (after the run's evaluation transform) and brought back to the
image as stored (`to_stored`: resized to the stored size, the pixel permutation undone), so they overlay
the image the user sees. A pixel-permuted run's map, undone that way, is scattered over the image: its
neighbouring pixels are nearly uncorrelated (`spatial_autocorrelation`), where an ordinary CNN's map is smooth.

A run's maps of its worst mistakes are made when it finishes (`mistake_cams`, study.py) and kept in its folder
(gradcam.npz): the report only reads them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from classlab.transforms import BatchTransform, Preprocess


def target_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of the layer Grad-CAM reads, or None for a model without any Conv2d."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return None
    info = getattr(model, "feature_info", None)  # timm: one entry per stage, the last is the deepest
    if info is not None:
        try:
            name = info[-1]["module"] if isinstance(info, list) else info.get_dicts()[-1]["module"]
            return name, model.get_submodule(name)
        except (AttributeError, IndexError, KeyError, TypeError):
            pass
    for name in ("layer4", "features"):  # torchvision ResNets; VGG, MobileNet, EfficientNet, ConvNeXt, ...
        module = getattr(model, name, None)
        if (isinstance(module, nn.Module) and any(isinstance(m, nn.Conv2d) for m in module.modules())
                and not any(isinstance(m, nn.Linear | nn.Flatten) for m in module.modules())):
            return name, module  # a convolutional stage (classlab's own `features` also hold the Linear layers)
    return convs[-1]


def grad_cam(model: nn.Module, inputs: torch.Tensor, targets: list[int],
             layer: nn.Module | None = None) -> np.ndarray:
    """Grad-CAM maps [N, H, W] in [0, 1] (each scaled to its own maximum) at the input's size, for class
    targets[i] of input i. The model's mode is restored afterwards; its hooks are removed."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if layer is None:
        found = target_layer(model)
        if found is None:
            raise ValueError("the model has no convolution: Grad-CAM needs one")
        layer = found[1]
    was_training = model.training
    # the input asks for its gradient, so the target layer's output has one even when every weight is frozen
    x = inputs.detach().float().clone().requires_grad_(True)
    try:
        with torch.inference_mode(False), torch.enable_grad(), GradCAM(model=model, target_layers=[layer]) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return np.asarray(maps, dtype=np.float32)


def to_stored(maps: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Maps on the model's input -> maps on the image as stored: resized back, the permutation undone."""
    n = len(maps)
    h, w = pre.stored_shape[-2:]
    out = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    if tuple(out.shape[-2:]) != (h, w):
        out = F.interpolate(out[:, None], size=(h, w), mode="area" if out.shape[-1] > w else "bilinear")[:, 0]
    out = out.numpy()
    if pre.permutation is not None:  # the model's pixel j is the stored pixel perm[j]
        stored = np.empty_like(out).reshape(n, h * w)
        stored[:, np.asarray(pre.permutation)] = out.reshape(n, h * w)
        out = stored.reshape(n, h, w)
    return out


def image_cams(model: nn.Module, pre: Preprocess, images: torch.Tensor | np.ndarray, targets: list[int],
               device: torch.device) -> np.ndarray:
    """Grad-CAM maps [N, h, w] on uint8 N×C×h×w images as stored, for the given classes, through the run's
    own evaluation transform."""
    batch = torch.as_tensor(np.ascontiguousarray(images)).to(device)
    with torch.no_grad():
        x = BatchTransform(pre, None, device)(batch)
    return to_stored(grad_cam(model, x, targets), pre)


def spatial_autocorrelation(maps: np.ndarray) -> float | None:
    """The correlation of each map pixel with its right and lower neighbours, pooled per map and averaged
    over the maps (constant maps skipped): about 1 for a smooth map, about 0 for noise. None without maps."""
    values = []
    for m in np.asarray(maps, dtype=np.float64):
        a = np.concatenate([m[:, :-1].ravel(), m[:-1, :].ravel()])
        b = np.concatenate([m[:, 1:].ravel(), m[1:, :].ravel()])
        if a.std() > 0 and b.std() > 0:
            values.append(float(np.corrcoef(a, b)[0, 1]))
    return float(np.mean(values)) if values else None


def mass_fraction(cam: np.ndarray, region: tuple[slice, slice]) -> float:
    """The share of a map's total in a region (rows, cols)."""
    total = float(cam.sum())
    return float(cam[region].sum()) / total if total > 0 else 0.0


# ----------------------------------------------------------------------------- figures


def overlay(ax, image: np.ndarray, cam: np.ndarray | None, alpha: float = 0.45) -> None:
    """Draw a uint8 C×H×W image and, over it, a map in [0, 1] (jet colours, transparent where it is low)."""
    img = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
    ax.imshow(img, cmap="gray" if image.shape[0] == 1 else None, vmin=0, vmax=255, interpolation="nearest")
    if cam is not None:
        ax.imshow(cam, cmap="jet", alpha=alpha, vmin=0, vmax=1, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])


def save_photo_cams(path: Path, name: str, image: np.ndarray, maps: np.ndarray, labels: list[str],
                    layer: str) -> None:
    """`classlab predict --cam`: the prepared photo, then one Grad-CAM overlay per class in `labels`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from classlab.io import atomic_write_bytes

    n = 1 + len(maps)
    fig = Figure(figsize=(2.8 * n, 3.3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    overlay(axes[0], image, None)
    axes[0].set_title("prepared input", fontsize=9)
    for ax, cam, label in zip(axes[1:], maps, labels, strict=True):
        overlay(ax, image, cam)
        ax.set_title(label.replace("$", r"\$"), fontsize=9)
    fig.suptitle(f"{name}: Grad-CAM ({layer})".replace("$", r"\$"), fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


def mistake_cams(model: nn.Module, pre: Preprocess, images: np.ndarray, targets: list[int],
                 device: torch.device) -> dict:
    """What a run folder keeps of Grad-CAM when the run finishes (RunFolder.write_gradcam's arguments): the maps
    of the trained model on its worst mistakes (stored uint8 images, their predicted classes), the target layer
    and the maps' neighbouring-pixel correlation; without maps (no mistakes, no convolution, a failing hook)
    the reason instead, so the report says why and never has to run the model itself."""
    found = target_layer(model)
    if len(images) == 0:
        return {"maps": None, "layer": None, "autocorrelation": None, "reason": "no mistakes on the test set"}
    if found is None:
        return {"maps": None, "layer": None, "autocorrelation": None, "reason": "the model has no convolution"}
    try:
        maps = image_cams(model, pre, images, targets, device)
    except Exception as e:  # an optional figure: the report says why it is missing, the run goes on
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        return {"maps": None, "layer": None, "autocorrelation": None, "reason": reason}
    return {"maps": maps, "layer": found[0], "autocorrelation": spatial_autocorrelation(maps), "reason": None}
