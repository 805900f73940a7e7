"""Batched, on-device transforms: uint8 batch in, normalized float batch out.

Everything works on whole N×C×H×W batches (no per-sample PIL): flips are a `where`, rotations one
`affine_grid` + `grid_sample` call, the pixel permutation one gather. The same `Preprocess` (minus
augmentation) is stored with a run so `predict` applies exactly what evaluation did.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from classlab.config import Augment, ColorJitter, RunConfig
from classlab.errors import ClasslabError


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

    @property
    def stored_shape(self) -> tuple[int, int, int]:
        return self.source_shape or self.input_shape

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        perm = d.get("permutation")
        source = d.get("source_shape")
        resize = d.get("resize")
        return cls(
            input_shape=tuple(d["input_shape"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
            classes=tuple(d["classes"]), permutation=tuple(perm) if perm is not None else None,
            source_shape=tuple(source) if source else None, to_rgb=bool(d.get("to_rgb", False)),
            resize=tuple(resize) if resize else None,
        )


def preprocess_for(cfg: RunConfig, data) -> Preprocess:
    """What evaluation (and prediction) applies, from the stored uint8 shape to the model's input:
    `data.to_rgb` copies gray to 3 channels, and a one-value mean / std is repeated for every channel."""
    c, h, w = data.image_shape
    perm = None
    if cfg.data.permute_pixels is not None:
        perm = tuple(pixel_permutation(cfg.data.permute_pixels.seed, h * w).tolist())
    out_c = 3 if cfg.data.to_rgb and c == 1 else c
    out_h, out_w = cfg.data.resize or (h, w)
    mean, std = tuple(data.mean), tuple(data.std)
    if len(mean) == 1 and out_c > 1:
        mean, std = mean * out_c, std * out_c
    if len(mean) != out_c:
        raise ClasslabError(f"data.normalize has {len(mean)} values but the model input has {out_c} channel(s)")
    return Preprocess(input_shape=(out_c, out_h, out_w), mean=mean, std=std, classes=tuple(data.classes),
                      permutation=perm, source_shape=(c, h, w), to_rgb=cfg.data.to_rgb and c == 1,
                      resize=tuple(cfg.data.resize) if cfg.data.resize else None)


def random_hflip(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def random_rotate(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image by its own angle in ±degrees about the centre, zeros outside (torchvision's fill=0)."""
    n = x.shape[0]
    angles = (torch.rand(n, device=x.device, generator=generator) * 2 - 1) * math.radians(degrees)
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
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


class BatchTransform:
    """Callable turning a uint8 batch on the device into the model's float input.

    Normalization is one multiply-add, `x * scale + shift`, with the 1/255 folded into `scale`. Where
    every step is a gather or an average with weights summing to one (flip, pixel permutation, gray → RGB),
    it commutes with that per-channel affine map, so the batch is normalized while it is converted from
    uint8: one pass over the data instead of four. Rotation (whose zero fill is black, not the mean),
    resizing and colour jitter (which clamps to [0, 1]) run on plain pixel values, normalized last.
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
        self.jitter = aug is not None and aug.color_jitter is not None
        self.rotate = aug is not None and aug.rotate > 0
        self.resize = pre.resize is not None and tuple(pre.stored_shape[-2:]) != tuple(pre.resize)
        self.normalize_first = not (self.rotate or self.jitter or self.resize)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        aug = self.augment
        if self.normalize_first:
            x = self._affine(x, unit=False)  # uint8 in, normalized float out
        elif self.jitter:
            x = x.float().div_(255)  # colour jitter works on [0, 1]
        else:
            x = x.float()  # rotation and resizing: 0..255, the 1/255 is in the final scale
        if aug is not None and aug.hflip > 0:
            x = random_hflip(x, aug.hflip, self.generator)
        if self.rotate:
            x = random_rotate(x, aug.rotate, self.generator)
        if self.perm is not None:
            n, c, h, w = x.shape
            x = x.reshape(n, c, h * w)[:, :, self.perm].reshape(n, c, h, w)
        if self.pre.to_rgb and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.normalize_first:
            return x
        if self.resize and tuple(x.shape[-2:]) != tuple(self.pre.resize):
            x = F.interpolate(x, size=tuple(self.pre.resize), mode="bilinear", align_corners=False, antialias=True)
        if self.jitter:
            x = color_jitter(x.contiguous(), aug.color_jitter, self.generator)
        return self._affine(x, unit=self.jitter)

    def _affine(self, x: torch.Tensor, unit: bool) -> torch.Tensor:
        """shift + scale · x per channel, x in [0, 1] (`unit`) or 0..255; a 1-channel x broadcasts to the
        model's channels."""
        if self.uniform and x.shape[1] == self.shift.shape[1]:
            return torch.add(self.shift0, x, alpha=self.factors[unit])
        return torch.addcmul(self.shift, x, self.unit_scale if unit else self.scale)
