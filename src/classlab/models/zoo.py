"""Any timm or torchvision classification architecture (`timm/<arch>`, `torchvision/<arch>`), with its
pretrained weights and the preprocessing those weights were trained with.

`pretrained:` is `none`, `imagenet` (the library's default weights: timm's Hugging Face hub files or
torchvision's URLs, from their caches, downloaded when online unless CLASSLAB_OFFLINE is set), a local
.pth / .safetensors file (in the library's own layout), or a classlab run folder (the weights its test
results came from). The head is always new: a Linear to the class count, after `head:` layers if given.
Nothing here re-implements an architecture. `resnet18` is torchvision/resnet18 whose family record
(classlab.registry) gives it a first convolution on the images' own channels.
"""

from __future__ import annotations

import difflib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from classlab.config import ZooConfig
from classlab.errors import ClasslabError, one_line
from classlab.models.cnn import CNN
from classlab.models.freeze import freeze_all_but
from classlab.models.weights import hub_checkpoint_dirs, load_state_dict_from, offline
from classlab.registry import model_family, suggest


@dataclass(frozen=True)
class WeightsPreprocessing:
    """What the pretrained weights expect: channels, H×W, mean / std, resize interpolation, and where
    that was read (shown in preprocessing.json, run.log and `classlab summary`)."""

    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    source: str


# ----------------------------------------------------------------------------- names


def _timm_names(pretrained: bool = False) -> list[str]:
    import timm

    return timm.list_models(pretrained=pretrained)


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_arch(cfg: ZooConfig) -> None:
    """An unknown architecture is one line with the closest names."""
    if cfg.family == "timm":
        import timm

        if timm.is_model(cfg.arch):
            return
        names = _timm_names()
    else:
        names = _torchvision_names()
        if cfg.arch in names:
            return
    close = suggest(cfg.arch, names)
    raise ClasslabError(f"model.name: {cfg.family} has no architecture '{cfg.arch}'{close}; "
                        f"list them with: classlab models {listing_pattern(cfg.arch, names)}")


def listing_pattern(arch: str, names: list[str]) -> str:
    """A `classlab models` pattern that lists something: the longest start of the misspelt name that some
    architecture still holds (`resnt18` -> `res`), else the closest name's family (`classlab models resnet`)."""
    word = arch.split("_")[0].lower()
    for n in range(min(len(word), 8), 2, -1):
        if any(word[:n] in name.lower() for name in names):
            return word[:n]
    close = difflib.get_close_matches(arch, names, n=1, cutoff=0.0)
    return re.split(r"[_\d]", close[0])[0] if close and re.split(r"[_\d]", close[0])[0] else "'*'"


def list_architectures(pattern: str | None = None, pretrained: bool = False) -> list[str]:
    """`timm/<arch>` and `torchvision/<arch>` names (fnmatch pattern, e.g. '*efficientnet*'); with
    `pretrained`, only those with default weights (timm's names then carry the weights' tag)."""
    import fnmatch

    import timm

    pat = pattern if pattern and any(c in pattern for c in "*?[") else f"*{pattern or ''}*"
    out = [f"timm/{n}" for n in timm.list_models(pat, pretrained=pretrained)]
    out += [f"torchvision/{n}" for n in _torchvision_names() if fnmatch.fnmatch(n, pat)]
    return out


# ----------------------------------------------------------------------------- preprocessing


def _run_folder(source: str) -> Path | None:
    if source in ("none", "imagenet"):
        return None
    path = Path(source).expanduser()
    return path if path.is_dir() else None


def _timm_pretrained_cfg(arch: str):
    import timm

    return timm.get_pretrained_cfg(arch)  # arch or arch.tag; None when the architecture has no weights


def _torchvision_weights(arch: str):
    import torchvision

    try:
        return torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def weights_preprocessing(cfg: ZooConfig) -> WeightsPreprocessing | None:
    """The preprocessing of the model's pretrained weights, or None when it starts from scratch (or the
    library knows no config for them)."""
    if cfg.pretrained == "none":
        return None
    folder = _run_folder(cfg.pretrained)
    if folder is not None:
        from classlab.runs import RunFolder

        try:
            pre = RunFolder(folder).read_preprocessing()
        except (ClasslabError, OSError):
            return None
        shape = pre.get("input_shape") or [3, 224, 224]
        return WeightsPreprocessing(int(shape[0]), (int(shape[1]), int(shape[2])), tuple(pre["mean"]),
                                    tuple(pre["std"]), pre.get("interpolation", "bilinear"),
                                    f"run folder {folder} (its preprocessing.json)")
    check_arch(cfg)
    what = "the weights" if cfg.pretrained == "imagenet" else f"{cfg.pretrained}, taken as {cfg.arch}'s default weights"
    if cfg.family == "timm":
        from timm.data import resolve_data_config

        pc = _timm_pretrained_cfg(cfg.arch)
        if pc is None:
            return None
        d = resolve_data_config({}, pretrained_cfg=pc.to_dict())
        c, h, w = d["input_size"]
        return WeightsPreprocessing(int(c), (int(h), int(w)), tuple(d["mean"]), tuple(d["std"]),
                                    str(d["interpolation"]),
                                    f"timm pretrained_cfg of {pc.architecture}.{pc.tag} ({what})")
    weights = _torchvision_weights(cfg.arch)
    if weights is None:
        return None
    t = weights.transforms()
    size = t.crop_size if isinstance(t.crop_size, list | tuple) else [t.crop_size]
    h, w = (int(size[0]), int(size[-1]))
    return WeightsPreprocessing(3, (h, w), tuple(t.mean), tuple(t.std), t.interpolation.value,
                                f"torchvision {weights}.transforms() ({what})")


def expected_channels(cfg: ZooConfig, stored_channels: int) -> int:
    """Channels the model takes: its weights' (3 for ImageNet), else timm follows the images
    (in_chans) and torchvision models take 3 (gray is copied)."""
    weights = weights_preprocessing(cfg)
    if weights is not None:
        return weights.channels
    return stored_channels if cfg.family == "timm" else 3


# ----------------------------------------------------------------------------- weight files


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def _load_file(path: Path, origin: str) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # a truncated or foreign file
            raise ClasslabError(f"{origin}: not a readable safetensors file ({one_line(e)[:120]})") from None
    state, _ = load_state_dict_from(str(path))
    return state


def _download(url: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    os.close(fd)
    try:
        torch.hub.download_url_to_file(url, tmp, progress=True)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _timm_imagenet_state(arch: str) -> tuple[dict[str, torch.Tensor], str]:
    """timm's default weights for `arch`: the Hugging Face hub cache, torch.hub's cache (the weights'
    URL), else a download when online."""
    pc = _timm_pretrained_cfg(arch)
    if pc is None or not (pc.hf_hub_id or pc.url):
        raise ClasslabError(f"model.pretrained: timm has no default weights for {arch}; "
                            "see classlab models --pretrained, or use pretrained: none or a weights file")
    looked: list[str] = []
    cache = _hf_cache_dir()
    files = [pc.hf_hub_filename] if pc.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    if pc.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for name in files:
            found = try_to_load_from_cache(pc.hf_hub_id, name, cache_dir=str(cache))
            if isinstance(found, str):
                return _load_file(Path(found), found), found
        looked.append(f"{cache} (hub {pc.hf_hub_id}: {' or '.join(files)})")
    url_file = pc.url.rsplit("/", 1)[1] if pc.url else None
    if url_file:
        for d in hub_checkpoint_dirs():
            if (d / url_file).is_file():
                return _load_file(d / url_file, str(d / url_file)), str(d / url_file)
            looked.append(str(d / url_file))
    problem = "offline (CLASSLAB_OFFLINE is set)"
    if not offline():
        errors = []
        if pc.hf_hub_id:
            from huggingface_hub import hf_hub_download

            for name in files:
                try:
                    path = hf_hub_download(pc.hf_hub_id, name, cache_dir=str(cache))
                    return _load_file(Path(path), path), path
                except Exception as e:  # missing file, no network, auth: all mean "not from here"
                    errors.append(f"hub {pc.hf_hub_id}/{name}: {type(e).__name__}")
        if pc.url:
            target = hub_checkpoint_dirs()[0] / url_file
            try:
                _download(pc.url, target)
                return _load_file(target, str(target)), str(target)
            except Exception as e:
                errors.append(f"{pc.url}: {type(e).__name__}: {str(e)[:80]}")
        problem = "download failed (" + "; ".join(errors) + ")"
    raise ClasslabError(
        f"ImageNet weights for timm/{arch} ({pc.architecture}.{pc.tag}) not found; looked in "
        f"{', '.join(looked)}; {problem}; put the file there (or set $HF_HOME / $TORCH_HOME), "
        "or set model.pretrained to a weights file"
    )


def _torchvision_imagenet_state(arch: str) -> tuple[dict[str, torch.Tensor], str]:
    weights = _torchvision_weights(arch)
    if weights is None:
        raise ClasslabError(f"model.pretrained: torchvision has no default weights for {arch}")
    filename = weights.url.rsplit("/", 1)[1]
    looked = [d / filename for d in hub_checkpoint_dirs()]
    for path in looked:
        if path.is_file():
            return _load_file(path, str(path)), str(path)
    problem = "offline (CLASSLAB_OFFLINE is set)"
    if not offline():
        try:
            _download(weights.url, looked[0])
            return _load_file(looked[0], str(looked[0])), str(looked[0])
        except Exception as e:
            problem = f"download from {weights.url} failed ({type(e).__name__}: {str(e)[:120]})"
    raise ClasslabError(
        f"ImageNet weights for torchvision/{arch} ({weights}) not found; looked for "
        f"{', '.join(map(str, looked))}; {problem}; put {filename} in one of those folders "
        "(or set $TORCH_HOME), or set model.pretrained to a .pth file"
    )


def pretrained_state(cfg: ZooConfig) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, where it came from) for `cfg.pretrained` (not 'none')."""
    if cfg.pretrained == "imagenet":
        return _timm_imagenet_state(cfg.arch) if cfg.family == "timm" else _torchvision_imagenet_state(cfg.arch)
    path = Path(cfg.pretrained).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        return _load_file(path, str(path)), str(path)
    return load_state_dict_from(cfg.pretrained)  # a .pth file or a classlab run folder


# ----------------------------------------------------------------------------- building


def _classifier(model: nn.Module, family: str) -> str:
    if family == "timm":
        name = model.pretrained_cfg.get("classifier")
        if isinstance(name, str):
            return name
        raise ClasslabError(f"model: timm names {name!r} as this model's classifier; classlab needs exactly one")
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ClasslabError("model: this torchvision architecture has no final nn.Linear classifier to replace")
    return last


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], origin: str, classifier: str, arch: str) -> None:
    """Every weight but the classifier's, strictly: a missing key, an extra key or another shape is one
    line naming the first offender. A 3-channel first conv on a 1-channel model is summed (timm's
    adapt_input_conv)."""
    def is_head(k: str) -> bool:
        return k.startswith(classifier + ".")

    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not is_head(k)}
    own = {k: v for k, v in model.state_dict().items() if not is_head(k)}
    for key, value in own.items():
        if key not in state:
            raise ClasslabError(f"{origin}: weights do not fit {arch}: missing key '{key}'")
        if state[key].shape != value.shape:
            if value.ndim == 4 and state[key].ndim == 4 and state[key].shape[0] == value.shape[0] \
                    and state[key].shape[2:] == value.shape[2:]:
                from timm.models import adapt_input_conv

                try:
                    state[key] = adapt_input_conv(value.shape[1], state[key])
                    continue
                except NotImplementedError:
                    pass
            raise ClasslabError(f"{origin}: weights do not fit {arch}: key '{key}' has shape "
                                f"{list(state[key].shape)}, expected {list(value.shape)}")
    extra = [k for k in state if k not in own]
    if extra:
        raise ClasslabError(f"{origin}: weights do not fit {arch}: unexpected key '{extra[0]}'")
    model.load_state_dict({**model.state_dict(), **{k: state[k] for k in own}})


def _new_head(cfg: ZooConfig, in_features: int, num_classes: int) -> nn.Module:
    if not cfg.head:
        return nn.Linear(in_features, num_classes)
    head = CNN(list(cfg.head), (in_features,), num_classes)  # shape-tracked layer list on a feature vector
    return nn.Sequential(*head.features, head.classifier)


def _set_head(model: nn.Module, classifier: str, cfg: ZooConfig, num_classes: int) -> None:
    old = model.get_submodule(classifier)
    if not isinstance(old, nn.Linear):
        raise ClasslabError(f"model: {cfg.name}'s classifier '{classifier}' is a {type(old).__name__}, "
                            "not a Linear; classlab replaces Linear heads only")
    model.set_submodule(classifier, _new_head(cfg, old.in_features, num_classes))


def _adapt_stem(model: nn.Module, channels: int) -> None:
    """The first convolution rebuilt for `channels` input channels (its record's gray_stem: resnet18 on gray
    images); pretrained 3-channel filters are adapted when loaded (load_backbone)."""
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    model.set_submodule(name, nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                        conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode))


def _size_text(arch: str) -> str:
    pc = _timm_pretrained_cfg(arch)
    size = pc.input_size[1:] if pc is not None and pc.input_size else (224, 224)
    return f"{size[0]}x{size[1]}"


def _fixed_size(arch: str, size: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """timm's `img_size` for an architecture with a fixed input size (ViT, DeiT, Swin, ...: their position
    embeddings or windows are sized at build time) when the run's size is another; else nothing."""
    pc = _timm_pretrained_cfg(arch)
    fixed = pc is not None and getattr(pc, "fixed_input_size", False)
    return {"img_size": size} if fixed and tuple(pc.input_size[1:]) != tuple(size) else {}


def _resample_for(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pretrained weights brought to the model as built: timm's own checkpoint filter of its architecture
    (what timm applies when it loads weights itself), which resamples a ViT's position embeddings to another
    grid and a Swin's relative-position tables to another window. Weights that need none pass unchanged."""
    import sys

    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return state
    try:
        return fn(dict(state), model)
    except Exception:  # noqa: BLE001 - a filter that cannot handle these weights: load_backbone names what differs
        return state


def build_zoo(cfg: ZooConfig, num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    check_arch(cfg)
    channels = int(in_shape[0])
    if cfg.family == "timm":
        import timm

        size = _fixed_size(cfg.arch, tuple(int(v) for v in in_shape[1:]))
        try:
            model = timm.create_model(cfg.arch, pretrained=False, num_classes=num_classes, in_chans=channels, **size)
        except (TypeError, ValueError, AssertionError, RuntimeError) as e:
            if size:  # it takes one input size and cannot be built at another: say which
                raise ClasslabError(f"model: {cfg.name} takes {_size_text(cfg.arch)} input only and cannot be built "
                                    f"at the run's {in_shape[1]}x{in_shape[2]} ({one_line(e)[:120]}); set data.resize: "
                                    f"{_size_text(cfg.arch).replace('x', ', ').join('[]')}") from None
            raise ClasslabError(f"model: timm cannot build {cfg.arch} ({one_line(e)[:160]})") from None
    else:
        import torchvision

        gray_stem = model_family(cfg.name).gray_stem
        if channels != 3 and not gray_stem:
            raise ClasslabError(f"model: {cfg.name} takes 3-channel input, got {channels} (set data.to_rgb)")
        model = torchvision.models.get_model(cfg.arch, weights=None)
        model.classlab_family = "torchvision"  # models.freeze splits its stage Sequential into groups
        if channels != 3:
            _adapt_stem(model, channels)
    classifier = _classifier(model, cfg.family)
    if cfg.pretrained != "none":
        state, origin = pretrained_state(cfg)
        if cfg.family == "timm":
            state = _resample_for(model, state)
        load_backbone(model, state, origin, classifier, cfg.name)
    # always a fresh nn.Linear (PyTorch's init): timm's own init of a small head (EfficientNet's uniform
    # ±1/sqrt(classes)) gives 7-class logits in the tens on pretrained features, and a first loss near 10
    _set_head(model, classifier, cfg, num_classes)
    if cfg.freeze != "none":
        freeze_all_but(model, list(cfg.freeze.all_but))
    return model
