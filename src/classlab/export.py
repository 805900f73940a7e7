"""`classlab export`: a run's model, with its preprocessing folded into the graph, as ONNX or TorchScript.

The exported graph takes what a dataset stores, uint8 images N×C×H×W at the run's stored shape (any N),
and returns the run's own class probabilities (N×K float32), those of predictions.npz and `classlab predict`.
Inside it, exactly the run's evaluation transform (transforms.BatchTransform without augmentation): to float,
the pixel permutation (one Gather), gray → RGB, the resize, the normalization (one multiply-add), then the
model, the fitted temperature (eval.temperature_scaling: logits / T) and a softmax; with eval.tta, the same for
each test-time view (mirror images by a Gather, rotations by one GridSample on a fixed grid, rounded to uint8
as tta.rotate_uint8) and the probabilities averaged. So another program needs nothing of classlab: beside the
model file go `preprocessing.json` (the run's stored preprocessing, everything the graph does with it, the
input and output names) and `classes.txt` (one class name a line, in output order).

The input size is the run's stored H×W, and only that: the resize in the graph goes from the stored size to
the model's (fixed matrices), so another size is refused, by onnxruntime's shape check and, in TorchScript, by
a check at the graph's start naming the shape it takes. A photo of any size goes through `classlab predict`,
which prepares and resizes it to the stored shape first.

The resize is the run's own (torch's interpolate: its mode, antialiased when a side shrinks, as
BatchTransform) written as two matrix products, `Wh @ x @ Ww^T`: that resize is separable and linear in the
pixels, so its matrices are computed once by resizing the identity, and the graph holds no Resize operator
whose antialiasing or rounding an ONNX runtime might do differently.
What stays outside the graph is a photo's preparation (gray, inversion, crop to the object), which
`classlab predict` does before an image reaches the model; preprocessing.json says which runs expect it.

ONNX uses torch's TorchScript-based exporter (`dynamo=False`): it needs no package beyond torch and onnx
(the dynamo exporter needs onnxscript), handles a dynamic batch axis, and exports every classlab model.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from classlab.errors import ClasslabError, one_line
from classlab.io import atomic_write_json, atomic_write_text
from classlab.transforms import Preprocess

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
OPSET = 17  # ONNX opset: MatMul, Gather, Softmax and every layer classlab builds; onnxruntime ≥ 1.12 runs it
INPUT, OUTPUT = "image", "probabilities"
EXPORT_DIR = "export"  # default: <run>/export/model.onnx (RunFolder should own this name: see the report)
PREPROCESSING, CLASSES = "preprocessing.json", "classes.txt"


def resize_matrix(size_in: int, size_out: int, mode: str = "bilinear", antialias: bool = True) -> torch.Tensor:
    """The size_out × size_in matrix of torch's 1-D resize (`F.interpolate` with this mode and antialias,
    align_corners=False): row i holds the weights output pixel i gives to each input pixel. Found by resizing
    the identity; torch's 2-D resize is this in each dimension."""
    # two identical columns resized 2 -> 2 (an identity): torch's antialiased kernel mishandles a width of 1
    eye = torch.eye(size_in, dtype=torch.float64).view(size_in, 1, size_in, 1).expand(-1, -1, -1, 2).contiguous()
    out = F.interpolate(eye, size=(size_out, 2), mode=mode, align_corners=None if mode == "nearest" else False,
                        antialias=antialias and mode != "nearest")
    return out[:, 0, :, 0].T.float().contiguous()


class Preprocessing(nn.Module):
    """The run's evaluation transform as graph operations: uint8 N×C×H×W in, the model's float input out."""

    def __init__(self, pre: Preprocess) -> None:
        super().__init__()
        c, h, w = pre.stored_shape
        out_c, out_h, out_w = pre.input_shape
        self.stored_shape = (c, h, w)
        self.to_rgb = bool(pre.to_rgb and c == 1 and out_c == 3)
        mean = torch.tensor(pre.mean, dtype=torch.float64).view(1, -1, 1, 1)
        std = torch.tensor(pre.std, dtype=torch.float64).view(1, -1, 1, 1)
        self.register_buffer("scale", (1 / (255 * std)).float())  # from 0..255, as BatchTransform
        self.register_buffer("shift", (-mean / std).float())
        self.permute = pre.permutation is not None
        perm = torch.tensor(pre.permutation if self.permute else [], dtype=torch.int64)
        self.register_buffer("perm", perm)
        self.resize = pre.resize is not None and (h, w) != (out_h, out_w)
        # as BatchTransform: the run's interpolation, antialiased only when a side shrinks
        mode = getattr(pre, "interpolation", "bilinear")
        mode = mode if mode in ("nearest", "bilinear", "bicubic") else "bilinear"
        aa = mode != "nearest" and (out_h < h or out_w < w)
        self.register_buffer("rows", resize_matrix(h, out_h, mode, aa) if self.resize else torch.empty(0))
        self.register_buffer("cols_t", resize_matrix(w, out_w, mode, aa).T.contiguous() if self.resize
                             else torch.empty(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # uint8 images, or their uint8 values as float (a test-time view)
        if self.permute:
            x = x.flatten(2).index_select(2, self.perm).view(x.shape)
        if self.to_rgb:
            x = torch.cat([x, x, x], 1)
        if self.resize:
            x = torch.matmul(torch.matmul(self.rows, x), self.cols_t)
        return x * self.scale + self.shift


class View(nn.Module):
    """One test-time view of uint8-valued images (as float), as tta.view_fn does it: the image, its mirror image
    (a Gather with reversed indices), or a rotation (GridSample on the grid tta.rotate_uint8 computes, zeros
    outside, rounded back to 0..255)."""

    def __init__(self, name: str, shape: tuple[int, int, int]) -> None:
        super().__init__()
        c, h, w = shape
        self.name = name
        self.axis = {"hflip": 3, "vflip": 2}.get(name, 0)
        self.register_buffer("reverse", torch.arange((w if self.axis == 3 else h) - 1, -1, -1) if self.axis
                             else torch.empty(0, dtype=torch.int64))
        self.rotate = name.startswith("rotate:")
        grid = torch.empty(0)
        if self.rotate:
            a = math.radians(float(name.split(":", 1)[1]))
            theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
            grid = F.affine_grid(theta[None], [1, c, h, w], align_corners=False)
        self.register_buffer("grid", grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis:
            return x.index_select(self.axis, self.reverse)
        if self.rotate:
            grid = self.grid.expand(x.shape[0], -1, -1, -1)
            out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            return out.round().clamp(0, 255)
        return x


@torch.jit.script
def check_shape(x: torch.Tensor, c: int, h: int, w: int, message: str) -> torch.Tensor:
    """TorchScript's own check of the input's shape (kept as code by the trace, not frozen into it)."""
    if x.dim() != 4 or x.size(1) != c or x.size(2) != h or x.size(3) != w:
        raise RuntimeError(message + " (got " + str(list(x.shape)) + ")")
    return x


class Exported(nn.Module):
    """Preprocessing, the trained model, the run's temperature and a softmax, averaged over its test-time views:
    uint8 images in, the run's own probabilities out."""

    def __init__(self, pre: Preprocess, model: nn.Module, temperature: float | None = None,
                 tta: tuple[str, ...] | list[str] = (), check: bool = False) -> None:
        super().__init__()
        from classlab.tta import view_names

        self.preprocess = Preprocessing(pre)
        self.model = model
        self.temperature = float(temperature) if temperature else 1.0
        self.views = nn.ModuleList(View(name, tuple(pre.stored_shape)) for name in view_names(list(tta)))
        self.check = check
        c, h, w = pre.stored_shape
        self.shape = (int(c), int(h), int(w))
        self.message = (f"this model takes uint8 images N x {c} x {h} x {w} (the run's stored shape); resize or "
                        "prepare other images first (classlab predict does)")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.check:
            image = check_shape(image, self.shape[0], self.shape[1], self.shape[2], self.message)
        x = image.float()
        total = None
        for view in self.views:
            probs = (self.model(self.preprocess(view(x))).float() / self.temperature).softmax(1)
            total = probs if total is None else total + probs
        return total if len(self.views) == 1 else total / len(self.views)


@dataclass
class ExportResult:
    path: Path
    format: str
    preprocessing: Path
    classes: Path
    seconds: float


def default_output(run: str | Path, fmt: str) -> Path:
    return Path(run) / EXPORT_DIR / f"model{SUFFIX[fmt]}"


def export_run(run: str | Path, out: str | Path | None = None, fmt: str = "onnx") -> ExportResult:
    """Export a finished (or interrupted) run's model with its preprocessing; see the module docstring."""
    from classlab.inference import load_run

    if fmt not in FORMATS:
        raise ClasslabError(f"--format '{fmt}': choose {' or '.join(FORMATS)}")
    loaded = load_run(run, "cpu")
    out = Path(out) if out is not None else default_output(run, fmt)
    started = time.perf_counter()
    module = Exported(loaded.pre, loaded.model, loaded.temperature, loaded.tta, check=fmt == "torchscript").eval()
    example = torch.zeros((2, *loaded.stored_shape), dtype=torch.uint8)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClasslabError(f"cannot create {out.parent}: {e.strerror or e}") from None
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        if fmt == "onnx":
            _onnx(module, example, tmp)
        else:
            _torchscript(module, example, tmp)
        tmp.replace(out)
    except ClasslabError:
        raise
    except Exception as e:  # the exporters raise many kinds; the user gets one line, not a traceback
        raise ClasslabError(f"{loaded.path}: its model ({loaded.config.model.name}) cannot be exported to {fmt}: "
                            f"{type(e).__name__}: {one_line(e)[:300]}") from None
    finally:
        tmp.unlink(missing_ok=True)
    pre_path, classes_path = out.with_name(PREPROCESSING), out.with_name(CLASSES)
    atomic_write_json(pre_path, describe(loaded, fmt, out.name))
    atomic_write_text(classes_path, "".join(f"{c}\n" for c in loaded.classes))
    return ExportResult(out, fmt, pre_path, classes_path, time.perf_counter() - started)


@torch.no_grad()
def _onnx(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer warnings
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, do_constant_folding=True)
    try:
        import onnx
    except ImportError:  # the structural check is optional: torch writes the file without the onnx package
        return
    onnx.checker.check_model(str(path))


@torch.no_grad()
def _torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (example,), check_trace=False)
        other = torch.zeros((3, *example.shape[1:]), dtype=torch.uint8)  # another batch size must work too
        if tuple(traced(other).shape) != (3, tuple(module(other).shape)[1]):
            raise ClasslabError("the traced model does not take another batch size")
        traced.save(str(path))


def describe(loaded, fmt: str, model_file: str) -> dict:
    """preprocessing.json beside an exported model: the run's stored preprocessing and what the graph does."""
    pre = loaded.pre
    c, h, w = pre.stored_shape
    steps = ["uint8 -> float"]
    if pre.permutation is not None:
        steps.append("pixel permutation (flattened H*W index: output pixel i = input pixel permutation[i])")
    if pre.to_rgb and c == 1:
        steps.append("gray -> RGB (the channel copied 3 times)")
    if pre.resize is not None and (h, w) != tuple(pre.resize):
        steps.append(f"resize to {list(pre.resize)} ({getattr(pre, 'interpolation', 'bilinear')}, as torch's "
                     "interpolate, antialiased when a side shrinks)")
    steps += ["normalize: (x / 255 - mean) / std per channel", "model"]
    if loaded.temperature:
        steps.append(f"temperature: logits / {loaded.temperature:.6g} (eval.temperature_scaling, temperature.json)")
    steps.append("softmax")
    if loaded.tta:
        from classlab.tta import view_names

        views = view_names(list(loaded.tta))
        steps.insert(0, f"test-time augmentation (eval.tta): every step below for each view of the image ("
                     f"{', '.join(views)}; a rotation bilinear about the centre, zeros outside, rounded to uint8)")
        steps.append(f"average of the {len(views)} views' probabilities")
    return {
        "format": fmt,
        "model_file": model_file,
        "input": {"name": INPUT, "dtype": "uint8", "layout": "NCHW", "shape": ["batch", c, h, w],
                  "range": "0..255, as the dataset stores images"},
        "output": {"name": OUTPUT, "dtype": "float32", "shape": ["batch", len(pre.classes)],
                   "meaning": "class probabilities, in the order of classes: the run's own, as classlab predict "
                   "gives them" + (" (averaged over the eval.tta views, as test_tta; predictions.npz holds the plain "
                                   "view's)" if loaded.tta else " and predictions.npz holds them")},
        "input_size": f"{h} x {w} only (the run's stored size; the resize in the graph goes from it to the model's "
                      f"{list(pre.input_shape[1:])}); another size is refused",
        "temperature": loaded.temperature,
        "tta": list(loaded.tta),
        "in_graph": steps,
        "classes": list(pre.classes),
        "photo_preparation": ("outside the graph: gray, invert when the background is lighter than the object, "
                              "crop to the object, resize keeping the aspect (classlab predict does this)"
                              if loaded.mnist_style else "none: the images are given as the dataset stores them"),
        "light_object_on_dark": bool(loaded.mnist_style),
        "run": {"path": str(loaded.path), "name": loaded.config.name, "model": loaded.config.model.name,
                "dataset": loaded.config.data.dataset, "weights": Path(loaded.checkpoint).name,
                "finished": loaded.finished},
        "opset": OPSET if fmt == "onnx" else None,
        "preprocessing": pre.to_dict(),
    }


def read_classes(path: str | Path) -> list[str]:
    return Path(path).read_text(encoding="utf-8").splitlines()


def read_description(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
