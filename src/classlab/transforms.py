"""Batched, on-device transforms: uint8 batch in, normalized float batch out.

Everything works on whole N×C×H×W batches (no per-sample PIL): flips are a `where`, rotations one
`affine_grid` + `grid_sample` call, the pixel permutation one gather. The same `Preprocess` (minus
augmentation) is stored with a run so `predict` applies exactly what evaluation did.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from classlab.config import (
    Augment,
    ColorJitter,
    RandAugment,
    RandomErasing,
    RandomResizedCrop,
    RunConfig,
    TrivialAugment,
)
from classlab.errors import ClasslabError
from classlab.registry import model_family


def pixel_permutation(seed: int, num_pixels: int) -> torch.Tensor:
    """One fixed permutation of pixel positions, the same for the same seed on every machine."""
    return torch.randperm(num_pixels, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Preprocess:
    """Evaluation preprocessing of a run; serialisable to preprocessing.json."""

    input_shape: tuple[int, int, int]  # C×H×W the model sees
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    permutation: tuple[int, ...] | None = None
    source_shape: tuple[int, int, int] | None = None  # C×H×W of the stored uint8 images (None: = input_shape)
    to_rgb: bool = False
    resize: tuple[int, int] | None = None
    interpolation: str = "bilinear"  # of the resize: the pretrained weights' own (timm / torchvision), else bilinear
    origin: tuple[tuple[str, str], ...] = ()  # where input size, mean / std, interpolation came from
    warnings: tuple[str, ...] = ()  # preprocessing that usually means a mistake (logged in run.log, summary)

    @property
    def stored_shape(self) -> tuple[int, int, int]:
        return self.source_shape or self.input_shape

    def to_dict(self) -> dict:
        d = asdict(self)
        d["origin"] = dict(self.origin)
        d["warnings"] = list(self.warnings)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        perm = d.get("permutation")
        source = d.get("source_shape")
        resize = d.get("resize")
        return cls(
            input_shape=tuple(d["input_shape"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
            classes=tuple(d["classes"]), permutation=tuple(perm) if perm is not None else None,
            source_shape=tuple(source) if source else None, to_rgb=bool(d.get("to_rgb", False)),
            resize=tuple(resize) if resize else None, interpolation=str(d.get("interpolation", "bilinear")),
            origin=tuple((str(k), str(v)) for k, v in dict(d.get("origin") or {}).items()),
            warnings=tuple(str(w) for w in d.get("warnings") or ()),
        )


def preprocess_for(cfg: RunConfig, data) -> Preprocess:
    """What evaluation (and prediction) applies, from the stored uint8 shape to the model's input:
    `data.to_rgb` (or a model that takes 3 channels) copies gray to 3 channels, and a one-value mean / std
    is repeated for every channel. With pretrained timm / torchvision weights, the input size, mean / std
    and interpolation are the weights' own unless `data.resize` / `data.normalize` set them."""
    c, h, w = data.image_shape
    perm = None
    if cfg.data.permute_pixels is not None:
        perm = tuple(pixel_permutation(cfg.data.permute_pixels.seed, h * w).tolist())
    weights, model_c = None, None
    if model_family(cfg.model.name).input == "weights":  # timm/<arch>, torchvision/<arch>: the weights' own
        from classlab.models.zoo import expected_channels, weights_preprocessing

        weights = weights_preprocessing(cfg.model)
        model_c = 3 if weights is None and cfg.data.to_rgb else expected_channels(cfg.model, c)
    out_c = model_c or (3 if cfg.data.to_rgb and c == 1 else c)
    if out_c != c and not (c == 1 and out_c == 3):
        raise ClasslabError(f"the model takes {out_c}-channel input but the images have {c} channel(s)")
    origin = {}
    if cfg.data.resize:
        (out_h, out_w), origin["input_size"] = cfg.data.resize, "data.resize"
    elif weights is not None:
        (out_h, out_w), origin["input_size"] = weights.size, weights.source
    else:
        (out_h, out_w), origin["input_size"] = (h, w), "the images"
    mean, std = tuple(data.mean), tuple(data.std)
    if cfg.data.normalize is not None:
        origin["mean_std"] = "data.normalize"
    elif weights is not None:
        mean, std = weights.mean, weights.std
        origin["mean_std"] = weights.source
    else:
        origin["mean_std"] = "the dataset (its known statistics, else measured on the training split)"
    if len(mean) == 1 and out_c > 1:
        mean, std = mean * out_c, std * out_c
    if len(mean) != out_c:
        raise ClasslabError(f"data.normalize has {len(mean)} values but the model input has {out_c} channel(s)")
    interpolation = weights.interpolation if weights is not None else "bilinear"
    origin["interpolation"] = weights.source if weights is not None else "default (bilinear)"
    if out_c != c:
        origin["channels"] = f"gray copied to {out_c} channels" + (" (data.to_rgb)" if model_c is None else
                                                                   " (what the model takes)")
    warnings = []
    if weights is not None:
        wh, ww = weights.size
        if min(out_h / wh, out_w / ww) < 0.5:
            warnings.append(f"input {out_h}x{out_w} is under half the {wh}x{ww} the pretrained weights were "
                            f"trained at ({weights.source}); pretrained features degrade on small inputs "
                            "(set data.resize, or remove it to use the weights' size)")
        if cfg.data.normalize is not None and not _close(mean, weights.mean, std, weights.std):
            warnings.append(f"data.normalize (mean {_fmt(mean)}, std {_fmt(std)}) differs from the pretrained "
                            f"weights' (mean {_fmt(weights.mean)}, std {_fmt(weights.std)}, {weights.source}); "
                            "remove data.normalize to use the weights' own")
    resize = (out_h, out_w) if cfg.data.resize or (out_h, out_w) != (h, w) else None
    return Preprocess(input_shape=(out_c, out_h, out_w), mean=mean, std=std, classes=tuple(data.classes),
                      permutation=perm, source_shape=(c, h, w), to_rgb=out_c == 3 and c == 1,
                      resize=tuple(resize) if resize else None, interpolation=interpolation,
                      origin=tuple(origin.items()), warnings=tuple(warnings))


def _close(mean, w_mean, std, w_std) -> bool:
    return len(mean) == len(w_mean) and all(abs(a - b) < 1e-3 for a, b in zip((*mean, *std), (*w_mean, *w_std),
                                                                              strict=True))


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def describe(pre: Preprocess) -> list[str]:
    """The preprocessing in a few lines (run.log, `classlab summary`): what, where from, and warnings."""
    c, h, w = pre.input_shape
    sc, sh, sw = pre.stored_shape
    resize = f", resized {pre.interpolation} from {sh}x{sw}" if pre.resize and (sh, sw) != (h, w) else ""
    gray = f", gray copied to {c} channels" if pre.to_rgb else ""
    lines = [f"preprocessing: input {c}x{h}x{w}{resize}{gray}, mean {_fmt(pre.mean)}, std {_fmt(pre.std)}"]
    lines += [f"  {key} from {where}" for key, where in pre.origin]
    lines += [f"warning: {text}" for text in pre.warnings]
    return lines


def random_hflip(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def random_rotate(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image by its own angle in ±degrees about the centre, zeros outside (torchvision's fill=0)."""
    n = x.shape[0]
    return rotate(x, (torch.rand(n, device=x.device, generator=generator) * 2 - 1) * math.radians(degrees))


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate image i by angles[i] radians about the centre: one affine_grid + grid_sample (bilinear, zeros
    outside). The training rotation and the rotated TTA views both come through here."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, as torchvision's rgb_to_grayscale."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                       dtype=torch.float64)
_YIQ_CACHE: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _yiq_matrices(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB -> YIQ and back, inverted once on the CPU and copied to each device once: building or inverting
    them per batch was two host syncs per training step on a GPU."""
    key = (device, dtype)
    if key not in _YIQ_CACHE:
        _YIQ_CACHE[key] = (_TO_YIQ.to(device, dtype), torch.linalg.inv(_TO_YIQ).to(device, dtype))
    return _YIQ_CACHE[key]


def color_jitter(x: torch.Tensor, jitter: ColorJitter, generator: torch.Generator) -> torch.Tensor:
    """Per-image brightness, contrast, saturation and hue on an RGB batch in [0, 1].
    Hue is a rotation of the chroma plane in YIQ space (a cheap, batched equivalent of an HSV hue shift)."""
    n = x.shape[0]

    def factors(amount: float) -> torch.Tensor:
        u = torch.rand(n, 1, 1, 1, device=x.device, generator=generator)
        return 1 + (u * 2 - 1) * amount

    if jitter.brightness > 0:
        x = (x * factors(jitter.brightness)).clamp_(0, 1)
    if jitter.contrast > 0:
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True) if x.shape[1] == 3 else x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * factors(jitter.contrast) + mean).clamp_(0, 1)
    if x.shape[1] != 3:
        return x
    if jitter.saturation > 0:
        gray = _gray(x)
        x = ((x - gray) * factors(jitter.saturation) + gray).clamp_(0, 1)
    if jitter.hue > 0:
        angle = (torch.rand(n, device=x.device, generator=generator) * 2 - 1) * jitter.hue * 2 * math.pi
        to_yiq, from_yiq = _yiq_matrices(x.device, x.dtype)
        yiq = torch.einsum("ij,njhw->nihw", to_yiq, x)
        cos, sin = torch.cos(angle).view(n, 1, 1), torch.sin(angle).view(n, 1, 1)
        i, q = yiq[:, 1], yiq[:, 2]
        yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], 1)
        x = torch.einsum("ij,njhw->nihw", from_yiq, yiq).clamp_(0, 1)
    return x


# ----------------------------------------------------------------------------- presets: crop, erasing, policies, mixing
# Every preset draws its random numbers per image from the run's augmentation generator, a fixed number of them
# per call whatever the draws are (so a checkpointed generator resumes exactly), and needs no host sync on a GPU.

_ATTEMPTS = 10  # torchvision's tries for a crop / erasing box that fits


def _log_uniform(lo: float, hi: float, u: torch.Tensor) -> torch.Tensor:
    return torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u)


def _first_fit(fits: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(any fit per row, then each value at its row's first fitting attempt, the first attempt when none fits)."""
    first = fits.to(torch.uint8).argmax(1, keepdim=True)
    return (fits.any(1), *(v.gather(1, first).squeeze(1) for v in values))


def random_resized_crop(x: torch.Tensor, crop: RandomResizedCrop, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop per image, resampled to the input's own size: up to 10 tries at a box of
    area `scale` and aspect `ratio` (the first that fits wins; else torchvision's central fallback), at a uniform
    position, all crops in one affine_grid + grid_sample (bilinear; border padding, so it commutes with the
    per-channel normalization)."""
    n, _, h, w = x.shape
    dev = x.device
    u = torch.rand(2, n, _ATTEMPTS, device=dev, generator=generator)
    area = (crop.scale[0] + (crop.scale[1] - crop.scale[0]) * u[0]) * (h * w)
    aspect = _log_uniform(crop.ratio[0], crop.ratio[1], u[1])
    cw, ch = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    ok, cw, ch = _first_fit((cw <= w) & (ch <= h), cw, ch)
    fw, fh = float(w), float(h)  # fallback: the largest central box with the aspect clamped into `ratio`
    if w / h < crop.ratio[0]:
        fh = w / crop.ratio[0]
    elif w / h > crop.ratio[1]:
        fw = h * crop.ratio[1]
    cw, ch = torch.where(ok, cw, fw), torch.where(ok, ch, fh)
    pos = torch.where(ok, torch.rand(2, n, device=dev, generator=generator), 0.5)
    cx = (pos[0] * (w - cw) + cw / 2) / w * 2 - 1  # box centre in affine_grid's [-1, 1] coordinates
    cy = (pos[1] * (h - ch) + ch / 2) / h * 2 - 1
    zero = torch.zeros_like(cx)
    theta = torch.stack([torch.stack([cw / w, zero, cx], 1), torch.stack([zero, ch / h, cy], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def erasing_mask(n: int, h: int, w: int, erase: RandomErasing, device: torch.device,
                 generator: torch.Generator) -> torch.Tensor:
    """[N, 1, H, W] bool, True inside each image's erased rectangle: torchvision's RandomErasing box (up to 10
    tries at an area in `scale`, aspect in `ratio`, whole pixels; none when none fits), applied with
    probability p."""
    u = torch.rand(2, n, _ATTEMPTS, device=device, generator=generator)
    area = (erase.scale[0] + (erase.scale[1] - erase.scale[0]) * u[0]) * (h * w)
    aspect = _log_uniform(erase.ratio[0], erase.ratio[1], u[1])
    eh, ew = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    ok, eh, ew = _first_fit((eh < h) & (ew < w), eh, ew)
    pos = torch.rand(3, n, device=device, generator=generator)
    top, left = (pos[0] * (h - eh + 1)).floor(), (pos[1] * (w - ew + 1)).floor()
    on = (ok & (pos[2] < erase.p)).view(n, 1, 1, 1)
    rows = torch.arange(h, device=device).view(1, 1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, 1, w)
    inside_r = (rows >= top.view(n, 1, 1, 1)) & (rows < (top + eh).view(n, 1, 1, 1))
    inside_c = (cols >= left.view(n, 1, 1, 1)) & (cols < (left + ew).view(n, 1, 1, 1))
    return on & inside_r & inside_c


def random_erasing(x: torch.Tensor, erase: RandomErasing, generator: torch.Generator,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Erase each image's rectangle (`mask`, else drawn here at x's size) with `value` or standard normal noise."""
    n, c, h, w = x.shape
    if mask is None:
        mask = erasing_mask(n, h, w, erase, x.device, generator)
    if erase.value == "random":
        fill = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    else:
        fill = torch.tensor(float(erase.value), device=x.device, dtype=x.dtype)
    return torch.where(mask, fill, x)


# RandAugment / TrivialAugmentWide: torchvision's 14 operations and magnitude ranges, on [0, 1] batches.
_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
        "sharpness", "posterize", "solarize", "autocontrast", "equalize")
_SIGNED = (False, True, True, True, True, True, True, True, True, True, False, False, False, False)
_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _magnitudes(wide: bool, bins: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """([ops, bins] magnitudes, [ops] signed) as torchvision's RandAugment (wide=False) / TrivialAugmentWide
    define them (translations in pixels of the image as it is at this step), built once per device."""
    key = (wide, bins, h, w, device)
    if key not in _TABLES:
        def lin(hi: float) -> torch.Tensor:
            return torch.linspace(0.0, hi, bins)

        shear, tx, ty, rot, enhance, steps = (0.99, 32.0, 32.0, 135.0, 0.99, 6) if wide else (
            0.3, 150 / 331 * w, 150 / 331 * h, 30.0, 0.9, 4)
        posterize = 8 - (torch.arange(bins) / ((bins - 1) / steps)).round()
        zero = torch.zeros(bins)
        table = torch.stack([zero, lin(shear), lin(shear), lin(tx), lin(ty), lin(rot), lin(enhance), lin(enhance),
                             lin(enhance), lin(enhance), posterize, torch.linspace(1.0, 0.0, bins), zero, zero])
        _TABLES[key] = (table.to(device), torch.tensor(_SIGNED, device=device))
    return _TABLES[key]


def _geometric(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Shear (about the top-left corner, as torchvision), translate (pixels) or rotate (degrees, about the centre)
    per image, as one affine_grid + grid_sample, nearest neighbour with black fill (torchvision's defaults)."""
    _, _, h, w = x.shape
    zero = torch.zeros_like(m)
    sx, sy = torch.where(op == 1, m, zero), torch.where(op == 2, m, zero)
    angle = torch.deg2rad(torch.where(op == 5, m, zero))
    cos, sin = torch.cos(angle), torch.sin(angle)
    # the sampling map in affine_grid's [-1, 1] coordinates; each image has one non-identity part
    a01 = (sx - sin) * (h / w)
    a10 = (sy + sin) * (w / h)
    b0 = sx * (h / w) - torch.where(op == 3, m, zero) * (2 / w)
    b1 = sy * (w / h) - torch.where(op == 4, m, zero) * (2 / h)
    theta = torch.stack([torch.stack([cos, a01, b0], 1), torch.stack([a10, cos, b1], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (other + factor.view(-1, 1, 1, 1) * (x - other)).clamp_(0, 1)


def _brightness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (x * (1 + m).view(-1, 1, 1, 1)).clamp_(0, 1)


def _color(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), 1 + m) if x.shape[1] == 3 else x


def _contrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    gray = _gray(x) if x.shape[1] == 3 else x
    return _blend(x, gray.mean(dim=(1, 2, 3), keepdim=True), 1 + m)


def _sharpness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_sharpness: blend with a 3×3 smoothed image inside a one-pixel border."""
    h, w = x.shape[-2:]
    if h <= 2 or w <= 2:
        return x
    # kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 = (3×3 box sum + 4 × centre) / 13; pooling is faster than a
    # depthwise conv2d on the CPU
    blurred = (F.avg_pool2d(x, 3, stride=1) * 9 + 4 * x[..., 1:-1, 1:-1]) / 13
    out = x.clone()
    out[..., 1:-1, 1:-1] = _blend(x[..., 1:-1, 1:-1], blurred, 1 + m)
    return out


def _posterize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    step = torch.exp2(8 - m).view(-1, 1, 1, 1)  # keep `m` bits of the 8-bit value
    return (x.mul(255.999).floor_().div_(step).floor_().mul_(step)).div_(255)


def _solarize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= m.view(-1, 1, 1, 1), 1 - x, x)


def _autocontrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    flat = hi <= lo
    return ((x - torch.where(flat, 0, lo)) / torch.where(flat, 1, hi - lo)).clamp_(0, 1)


def _equalize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms.v2.functional import equalize  # batched, per image and channel

    return equalize(x)


_POINTWISE = ((6, _brightness), (7, _color), (8, _contrast), (9, _sharpness), (10, _posterize), (11, _solarize),
              (12, _autocontrast), (13, _equalize))


def auto_augment(x: torch.Tensor, generator: torch.Generator, *, rounds: int, bins: int, magnitude: int | None,
                 wide: bool, subsets: bool | None = None) -> torch.Tensor:
    """RandAugment (`magnitude` fixed, `rounds` = num_ops) or TrivialAugmentWide (magnitude None: a random bin
    per image, one round) on an N×C×H×W batch in [0, 1]. Each round every image draws one of torchvision's 14
    operations and a sign; each operation then runs once on the images that drew it (on a GPU: on the whole
    batch, kept where drawn, so no host sync; `subsets` picks), with per-image magnitudes."""
    n, _, h, w = x.shape
    dev = x.device
    table, signed = _magnitudes(wide, bins, h, w, dev)
    ops = torch.randint(len(_OPS), (rounds, n), device=dev, generator=generator)
    if magnitude is None:
        level = torch.randint(bins, (rounds, n), device=dev, generator=generator)
    else:
        level = torch.full((rounds, n), magnitude, device=dev)
    sign = torch.randint(2, (rounds, n), device=dev, generator=generator) * 2 - 1
    mags = (table[ops, level] * torch.where(signed[ops], sign, 1)).to(x.dtype)
    subsets = dev.type == "cpu" if subsets is None else subsets
    if subsets:
        x = x.clone()  # written in place below, one image subset at a time
    for op, m in zip(ops, mags, strict=True):
        steps = [((op >= 1) & (op <= 5), _geometric)]  # ops 1-5: one grid_sample for all five
        steps += [(op == j, lambda v, o, g, fn=fn: fn(v, g)) for j, fn in _POINTWISE]
        for chosen, fn in steps:
            if subsets:
                idx = chosen.nonzero().squeeze(1)
                if idx.numel():
                    x.index_copy_(0, idx, fn(x.index_select(0, idx), op[idx], m[idx]))
            else:
                x = torch.where(chosen.view(-1, 1, 1, 1), fn(x, op, m), x)
    return x


def _log_gamma(alpha: float, n: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """log of n Gamma(alpha, 1) draws from `generator` (torch.distributions cannot take one): Marsaglia & Tsang's
    squeeze-free rejection with 16 proposals per draw (each accepted with probability > 0.95, so all 16 fail
    with probability < 1e-20), boosted by U^(1/alpha) for alpha < 1; in logs, so small alphas do not underflow."""
    a = alpha + 1 if alpha < 1 else alpha
    d = a - 1 / 3
    c = 1 / math.sqrt(9 * d)
    z = torch.randn(n, 16, device=device, generator=generator)
    u = torch.rand(n, 16, device=device, generator=generator).clamp_min_(1e-30)
    v = (1 + c * z) ** 3
    log_v = v.clamp_min(1e-30).log()
    ok = (v > 0) & (u.log() < 0.5 * z * z + d - d * v + d * log_v)
    _, log_v = _first_fit(ok, log_v)
    out = math.log(d) + log_v
    boost = torch.rand(n, device=device, generator=generator).clamp_min_(1e-30)
    return out + boost.log() / alpha if alpha < 1 else out


def sample_beta(alpha: float, n: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """n draws of Beta(alpha, alpha) = G1 / (G1 + G2) for G ~ Gamma(alpha, 1)."""
    g = _log_gamma(alpha, 2 * n, device, generator)
    return torch.sigmoid(g[:n] - g[n:])


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup: float, cutmix: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp (α = `mixup`) and / or CutMix (α = `cutmix`) per image, as torchvision.transforms.v2 defines them but
    with λ ~ Beta(α, α) drawn per image (timm's "elem" mode) from `generator`: image i is mixed with image i-1
    of the batch (torchvision's pairing: the batch is already in random order). With both set, each image gets
    one of the two with probability 1/2. One lerp over the batch: each pixel takes `weight` of its partner
    (1 - λ for MixUp, 1 inside the CutMix box, 0 outside). Returns the mixed batch and [N, classes] targets,
    λ · own + (1 - λ) · partner's, which sum to 1."""
    n, _, h, w = x.shape
    dev = x.device
    keep = torch.ones(n, device=dev, dtype=x.dtype)  # λ: the share of the image's own target
    weight = torch.zeros(n, 1, 1, 1, device=dev, dtype=x.dtype)
    if mixup > 0:
        keep = sample_beta(mixup, n, dev, generator).to(x.dtype)
        weight = (1 - keep).view(n, 1, 1, 1)
    if cutmix > 0:
        lam = sample_beta(cutmix, n, dev, generator)
        centre = torch.rand(2, n, device=dev, generator=generator)
        half = 0.5 * torch.sqrt(1 - lam)
        cy, cx = (centre[0] * h).floor(), (centre[1] * w).floor()
        y0, y1 = (cy - (half * h).floor()).clamp_min(0), (cy + (half * h).floor()).clamp_max(h)
        x0, x1 = (cx - (half * w).floor()).clamp_min(0), (cx + (half * w).floor()).clamp_max(w)
        rows = torch.arange(h, device=dev).view(1, 1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, 1, w)
        box = ((rows >= y0.view(n, 1, 1, 1)) & (rows < y1.view(n, 1, 1, 1))
               & (cols >= x0.view(n, 1, 1, 1)) & (cols < x1.view(n, 1, 1, 1))).to(x.dtype)
        kept = (1 - (y1 - y0) * (x1 - x0) / (h * w)).to(x.dtype)  # the area actually kept
        if mixup > 0:
            use_cut = torch.rand(n, device=dev, generator=generator) < 0.5
            weight = torch.where(use_cut.view(n, 1, 1, 1), box, weight)
            keep = torch.where(use_cut, kept, keep)
        else:
            weight, keep = box, kept
    target = F.one_hot(y, num_classes).to(x.dtype)
    # lerp is exact at weights 0 and 1, so CutMix pixels are exactly the partner's or the image's own
    return torch.lerp(x, x.roll(1, 0), weight), torch.lerp(target.roll(1, 0), target, keep.view(n, 1))


# ----------------------------------------------------------------------------- the augmentation table


@dataclass(frozen=True)
class AugmentOp:
    """One augmentation in BatchTransform's pipeline. `setting` reads the op's setting from `augment` (None: off);
    `apply(transform, x, setting)` runs it on a batch with the transform's generator. `stage`: where it runs,
    `stored` (on the image as stored: before the pixel permutation and resizing), `model` (on the model's input
    size and channels), `normalized` (last, on the normalized input) or `labels` (fit's `mix`, with the labels).
    `pixels`: it needs plain pixel values (a zero fill that must stay black, a clamp to [0, 1]), so the batch
    cannot be normalized first; `unit`: it works on [0, 1] values. An op with neither is a gather or an average
    with weights summing to one, which commutes with the per-channel normalization. `view(x, value)`: the
    deterministic version on a uint8 batch, a test-time augmentation view (tta.py) named `name[:value]`."""

    name: str
    setting: Callable[[Augment], Any] | None
    apply: Callable[[BatchTransform, torch.Tensor, Any], torch.Tensor] | None
    stage: Literal["stored", "model", "normalized", "labels"]
    pixels: bool = False
    unit: bool = False
    view: Callable[[torch.Tensor, float | None], torch.Tensor] | None = None


def _rotate_view(x: torch.Tensor, degrees: float | None) -> torch.Tensor:
    """A uint8 batch rotated by `degrees` (the training rotation at one angle), rounded back to uint8."""
    angles = torch.full((x.shape[0],), math.radians(degrees or 0.0), dtype=torch.float64)  # cos, sin in fp64
    return rotate(x.float(), angles).round_().clamp_(0, 255).to(torch.uint8)


# In pipeline order (the order each op draws from the generator: changing it changes every augmented stream).
AUGMENT_OPS: tuple[AugmentOp, ...] = (
    AugmentOp("random_resized_crop", lambda a: a.random_resized_crop,
              lambda t, x, crop: random_resized_crop(x, crop, t.generator), "stored"),
    AugmentOp("hflip", lambda a: a.hflip if a.hflip > 0 else None,
              lambda t, x, p: random_hflip(x, p, t.generator), "stored", view=lambda x, _: x.flip(-1)),
    AugmentOp("vflip", None, None, "stored", view=lambda x, _: x.flip(-2)),  # a TTA view only
    AugmentOp("rotate", lambda a: a.rotate if a.rotate > 0 else None,
              lambda t, x, degrees: random_rotate(x, degrees, t.generator), "stored", pixels=True, view=_rotate_view),
    AugmentOp("policy", lambda a: a.randaugment or a.trivialaugment, lambda t, x, p: t._policy(x, p), "stored",
              unit=True),
    AugmentOp("color_jitter", lambda a: a.color_jitter,
              lambda t, x, jitter: color_jitter(x.contiguous(), jitter, t.generator), "model", unit=True),
    AugmentOp("random_erasing", lambda a: a.random_erasing, lambda t, x, erase: t._erase(x, erase), "normalized"),
    AugmentOp("mix", lambda a: (a.mixup, a.cutmix) if a.mixup > 0 or a.cutmix > 0 else None, None, "labels"),
)
VIEWS = {op.name: op for op in AUGMENT_OPS if op.view is not None}  # test-time augmentation views


class BatchTransform:
    """Callable turning a uint8 batch on the device into the model's float input.

    Normalization is one multiply-add, `x * scale + shift`, with the 1/255 folded into `scale`. Where
    every step is a gather or an average with weights summing to one (flip, pixel permutation, gray → RGB),
    it commutes with that per-channel affine map, so the batch is normalized while it is converted from
    uint8: one pass over the data instead of four. Rotation (whose zero fill is black, not the mean),
    resizing and colour jitter (which clamps to [0, 1]) run on plain pixel values, normalized last.
    The presets (random resized crop, RandAugment / TrivialAugment, random erasing; MixUp / CutMix through
    `mix`) are batched too, every draw per image from `generator`. Which ops run, in which order, at which
    stage, and whether the fast path applies all come from AUGMENT_OPS.
    """

    def __init__(self, pre: Preprocess, augment: Augment | None, device: torch.device,
                 generator: torch.Generator | None = None) -> None:
        self.pre = pre
        self.augment = augment if generator is not None else None  # eval: no generator, no augmentation
        self.generator = generator
        c = pre.input_shape[0]
        mean = torch.tensor(pre.mean, dtype=torch.float64).view(1, c, 1, 1)
        std = torch.tensor(pre.std, dtype=torch.float64).view(1, c, 1, 1)
        self.shift = (-mean / std).float().to(device)
        self.scale = (1 / (255 * std)).float().to(device)  # from 0..255 pixel values
        self.unit_scale = (1 / std).float().to(device)  # from [0, 1] pixel values (colour jitter)
        # one mean and std for all channels (gray images, 0.5 / 0.5): a scalar multiply-add, the fastest
        # kernel (study D's batch: 14 µs against 39 µs broadcasting per-channel tensors, 44 µs in four ops)
        self.uniform = bool((mean == mean.flatten()[0]).all() and (std == std.flatten()[0]).all())
        self.shift0 = self.shift.flatten()[0].clone()
        self.factors = (float(self.scale.flatten()[0]), float(self.unit_scale.flatten()[0]))  # no sync per batch
        self.perm = torch.tensor(pre.permutation, device=device) if pre.permutation is not None else None
        aug = self.augment
        on = [(op, op.setting(aug)) for op in AUGMENT_OPS if aug is not None and op.setting is not None]
        on = [(op, value) for op, value in on if value is not None]
        self.steps = {stage: [(op, v) for op, v in on if op.stage == stage] for stage in ("stored", "model",
                                                                                        "normalized")}
        self.mixes = any(op.stage == "labels" for op, _ in on)  # fit calls `mix` with the labels
        self.unit = any(op.unit for op, _ in on)  # colour jitter and the policies work on [0, 1]
        self.resize = pre.resize is not None and tuple(pre.stored_shape[-2:]) != tuple(pre.resize)
        self.mode = pre.interpolation if pre.interpolation in ("nearest", "bilinear", "bicubic") else "bilinear"
        # antialias only when shrinking (when enlarging it changes nothing but the time)
        self.antialias = self.resize and self.mode != "nearest" and any(
            o < i for o, i in zip(pre.resize, pre.stored_shape[-2:], strict=True))
        # the fast path: every step before the normalization commutes with it (no op needs plain pixels)
        self.normalize_first = not (any(op.pixels or op.unit for op, _ in on) or self.resize)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize_first:
            x = self._affine(x, unit=False)  # uint8 in, normalized float out
        elif self.unit:
            x = x.float().div_(255)  # colour jitter and the policies work on [0, 1]
        else:
            x = x.float()  # rotation and resizing: 0..255, the 1/255 is in the final scale
        x = self._steps("stored", x)
        if self.perm is not None:
            n, c, h, w = x.shape
            x = x.reshape(n, c, h * w)[:, :, self.perm].reshape(n, c, h, w)
        if self.normalize_first:
            return self._steps("normalized", x.expand(-1, 3, -1, -1) if self.pre.to_rgb and x.shape[1] == 1 else x)
        if self.resize and tuple(x.shape[-2:]) != tuple(self.pre.resize):  # gray still 1 channel: 3x less work
            x = F.interpolate(x, size=tuple(self.pre.resize), mode=self.mode,
                              align_corners=None if self.mode == "nearest" else False, antialias=self.antialias)
        if self.pre.to_rgb and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = self._steps("model", x)
        return self._steps("normalized", self._affine(x, unit=self.unit))

    def _steps(self, stage: str, x: torch.Tensor) -> torch.Tensor:
        for op, value in self.steps[stage]:
            x = op.apply(self, x, value)
        return x

    def _policy(self, x: torch.Tensor, p: RandAugment | TrivialAugment) -> torch.Tensor:
        if isinstance(p, RandAugment):
            return auto_augment(x, self.generator, rounds=p.num_ops, bins=p.num_magnitude_bins,
                                magnitude=p.magnitude, wide=False)
        return auto_augment(x, self.generator, rounds=1, bins=p.num_magnitude_bins, magnitude=None, wide=True)

    def _erase(self, x: torch.Tensor, erase: RandomErasing) -> torch.Tensor:
        """Random erasing on the normalized input. The rectangle is drawn on the image as stored (before the
        pixel permutation and resizing) and follows it through both, so a permuted run erases the same pixels."""
        n = x.shape[0]
        h, w = self.pre.stored_shape[-2:]
        mask = erasing_mask(n, h, w, erase, x.device, self.generator)
        if self.perm is not None:
            mask = mask.reshape(n, 1, h * w)[:, :, self.perm].reshape(n, 1, h, w)
        if tuple(mask.shape[-2:]) != tuple(x.shape[-2:]):
            mask = F.interpolate(mask.to(x.dtype), size=tuple(x.shape[-2:]), mode="nearest").bool()
        return random_erasing(x, erase, self.generator, mask)

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MixUp / CutMix (augment.mixup / cutmix) on a transformed training batch and its labels: the mixed
        batch and [N, classes] class-probability targets."""
        aug = self.augment
        return mix_batch(x, y, len(self.pre.classes), aug.mixup, aug.cutmix, self.generator)

    def _affine(self, x: torch.Tensor, unit: bool) -> torch.Tensor:
        """shift + scale · x per channel, x in [0, 1] (`unit`) or 0..255; a 1-channel x broadcasts to the
        model's channels."""
        if self.uniform and x.shape[1] == self.shift.shape[1]:
            return torch.add(self.shift0, x, alpha=self.factors[unit])
        return torch.addcmul(self.shift, x, self.unit_scale if unit else self.scale)
