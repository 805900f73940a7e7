"""Parameter groups by the model's own structure, freezing by group, learning rates per group, and
keeping frozen BatchNorm layers in eval mode while training.

A model's parameters fall into ordered groups, each with a role: `stem`, `stage` or `head`.
- timm models: timm's own coarse `group_matcher` (stem, one group per stage), with the classifier
  (and the head module holding it, e.g. ConvNeXt's head.norm) pulled out as the head.
- torchvision models (`torchvision/<arch>`): the top-level children (a `features` or other large
  Sequential of stages is split into its children), top-level parameters (a ViT's class token) included.
- classlab's own models (mlp, cnn, resnet18): their top-level children, as before.
Leading groups made of plain layers are the stem, the group holding the last Linear (and what follows)
is the head, and everything between is a stage. Configs name groups by their module names (layer4, fc,
blocks.6, features.3) or by role: stem, stages, stage1..stageN (1-based), last_stage, head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from classlab.errors import ClasslabError
from classlab.registry import suggest

ROLES = ("stem", "stages", "last_stage", "head")


@dataclass
class Group:
    name: str  # the module names it covers, joined with '+' (conv1, layer4, conv_stem+bn1, blocks.6+conv_head+bn2)
    role: str  # stem | stage | head
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)

    @property
    def modules(self) -> list[str]:
        return self.name.split("+")


def _module_prefix(param_name: str) -> str:
    """'blocks.3.0.conv_pw.weight' -> 'blocks.3'; 'conv_stem.weight' -> 'conv_stem'; 'cls_token' -> 'cls_token'."""
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else parts[0]


def _name_of(param_names: list[str]) -> str:
    seen: dict[str, None] = {}
    for n in param_names:
        seen.setdefault(_module_prefix(n), None)
    return "+".join(seen)


def _classifier_name(model: nn.Module) -> str | None:
    """Dotted name of the final classifier: timm's pretrained_cfg says; else the last nn.Linear."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("classifier"), str):
        return cfg["classifier"]
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return last


def _timm_groups(model: nn.Module) -> list[Group]:
    from timm.models import group_parameters

    matcher = model.group_matcher(coarse=True)
    by_id = group_parameters(model, matcher)
    params = dict(model.named_parameters())
    classifier = _classifier_name(model) or ""
    head_root = classifier.rsplit(".", 1)[0] + "." if "." in classifier else classifier + "."

    def is_head(n: str) -> bool:
        return bool(classifier) and (n.startswith(head_root) or n.startswith(classifier + "."))

    groups: list[Group] = []
    head = Group("", "head")
    has_stem = "stem" in matcher
    for i, names in enumerate(by_id.values()):
        body = [n for n in names if not is_head(n)]
        head.params += [(n, params[n]) for n in names if is_head(n)]
        if body:
            role = "stem" if has_stem and i == 0 else "stage"
            groups.append(Group(_name_of(body), role, [(n, params[n]) for n in body]))
    if head.params:
        head.name = _name_of([n for n, _ in head.params])
        groups.append(head)
    return groups


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _plain(m: nn.Module) -> bool:
    """A module whose parameterized children are all leaves (a conv, a norm, a conv-norm-act): stem material."""
    return all(not any(True for _ in c.children()) for c in m.children() if _has_params(c))


def _children_groups(model: nn.Module, split_stages: bool) -> list[Group]:
    """Top-level children (and top-level parameters) in registration order; with `split_stages`, a module
    holding most of the network is opened: a plain Sequential of 3 or more blocks (torchvision's
    `features`, a ViT's encoder layers) becomes one group per block, another module its own parameters
    and children."""
    total = sum(p.numel() for p in model.parameters()) or 1
    units: list[tuple[str, list[tuple[str, nn.Parameter]], nn.Module | None]] = []

    def big(m: nn.Module) -> bool:
        return sum(p.numel() for p in m.parameters()) > total / 2

    def add(prefix: str, module: nn.Module, top: bool, may_open: bool) -> None:
        parts = [(n, c) for n, c in module.named_children() if _has_params(c)]
        dot = f"{prefix}." if prefix else ""
        stages = type(module) is nn.Sequential and len(parts) >= 3
        opened = top or (may_open and split_stages and big(module) and (stages or any(big(c) for _, c in parts)))
        if not opened:
            units.append((prefix, [(f"{dot}{k}", p) for k, p in module.named_parameters()], module))
            return
        for n, p in module.named_parameters(recurse=False):
            units.append((f"{dot}{n}", [(f"{dot}{n}", p)], None))
        for n, c in parts:
            add(f"{dot}{n}", c, False, may_open and not (stages and not top))  # a stage's blocks stay whole

    add("", model, True, True)
    classifier = _classifier_name(model)
    head_from = len(units)
    if classifier is not None:
        for i, (name, _, _) in enumerate(units):
            if classifier == name or classifier.startswith(name + "."):
                head_from = i
                break
    groups: list[Group] = []
    for i, (name, params, module) in enumerate(units):
        plain = module is None or _plain(module)
        if i >= head_from:
            groups.append(Group(name, "head", params))
        elif plain and all(g.role == "stem" for g in groups):
            groups.append(Group(name, "stem", params))
        elif plain:  # a norm or 1x1 conv after the stages (ViT's ln, EfficientNet's last conv): the last stage's
            groups[-1] = Group(f"{groups[-1].name}+{name}", groups[-1].role, groups[-1].params + params)
        else:
            groups.append(Group(name, "stage", params))
    return groups


def model_groups(model: nn.Module) -> list[Group]:
    """The model's parameter groups in forward order; every parameter is in exactly one."""
    if hasattr(model, "group_matcher") and isinstance(getattr(model, "pretrained_cfg", None), dict):
        return _timm_groups(model)
    return _children_groups(model, split_stages=getattr(model, "classlab_family", None) == "torchvision")


def block_names(model: nn.Module) -> list[str]:
    return [g.name for g in model_groups(model)]


def _select(groups: list[Group], key: str, where: str) -> list[int]:
    """Indices of the groups a config key names: a group or module name, or a role."""
    stages = [i for i, g in enumerate(groups) if g.role == "stage"]
    if len(groups) == 1 and (key in ROLES or key == "fc" or re.fullmatch(r"stage\d+", key)):
        raise ClasslabError(f"{where}: '{key}' would be the whole network: this model is one parameter group "
                            f"({groups[0].name}), with no head or stages apart; use train.lr (and no freeze) for it")
    if key in ("stem", "head"):
        found = [i for i, g in enumerate(groups) if g.role == key]
    elif key == "stages":
        found = stages
    elif key == "last_stage":
        found = stages[-1:]
    elif re.fullmatch(r"stage\d+", key):
        k = int(key[5:])
        if not 1 <= k <= len(stages):
            raise ClasslabError(f"{where}: '{key}': the model has {len(stages)} stages (stage1..stage{len(stages)})")
        found = [stages[k - 1]]
    else:
        found = [i for i, g in enumerate(groups) if key == g.name or key in g.modules]
        if not found and key == "fc":  # classlab's old spelling of the head, for any model
            found = [i for i, g in enumerate(groups) if g.role == "head"]
    if not found:
        names = [g.name for g in groups]
        choices = names + [r for r in ROLES if any(g.role in r for g in groups)] + ["stage1..stageN"]
        raise ClasslabError(
            f"{where}: unknown group '{key}'{suggest(key, names + list(ROLES))}; groups: {', '.join(names)}; "
            f"or a role: {', '.join(c for c in choices if c not in names)}"
        )
    return found


def freeze_all_but(model: nn.Module, keep: list[str]) -> None:
    groups = model_groups(model)
    kept: set[int] = set()
    for k in keep:
        kept.update(_select(groups, k, "model.freeze.all_but"))
    for i, g in enumerate(groups):
        for _, p in g.params:
            p.requires_grad_(i in kept)


def frozen_batchnorm_to_eval(model: nn.Module) -> None:
    """A frozen block's BatchNorm must not update its running statistics: put it in eval mode.
    Called after every model.train()."""
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not any(p.requires_grad for p in module.parameters()):
            module.eval()


def _levels(groups: list[Group]) -> list[int]:
    """Depth level of each group for layer-wise decay: stem 0, stage i → i, head n + 1."""
    out, stage = [], 0
    n = sum(g.role == "stage" for g in groups)
    for g in groups:
        if g.role == "stage":
            stage += 1
        out.append(0 if g.role == "stem" else n + 1 if g.role == "head" else stage)
    return out


def group_lrs(groups: list[Group], lr_groups: dict | None, base_lr: float) -> list[float | None]:
    """The learning rate of each group. No lr_groups: `base_lr` for all. Otherwise roles first (stem,
    stages, head), then stageN / last_stage, then group names, each more specific key winning; `decay`
    fills the groups left without a rate from the head down; without it every trainable group needs one."""
    if not lr_groups:
        return [base_lr] * len(groups)
    spec = dict(lr_groups)
    decay = spec.pop("decay", None)
    lrs: list[float | None] = [None] * len(groups)
    where = "train.lr_groups"

    def rank(key: str) -> int:
        if key in ("stem", "stages", "head"):
            return 0
        return 1 if key == "last_stage" or re.fullmatch(r"stage\d+", key) else 2

    for key in sorted(spec, key=rank):
        value = spec[key]
        idx = _select(groups, key, where)
        if isinstance(value, list):
            if len(value) != len(idx):
                raise ClasslabError(f"{where}.{key}: {len(value)} rates for {len(idx)} stages; give one per stage")
            for i, v in zip(idx, value, strict=True):
                lrs[i] = float(v)
        else:
            for i in idx:
                lrs[i] = float(value)
    if decay is not None:
        levels = _levels(groups)
        top = max(levels)
        head_lr = next((lrs[i] for i, g in enumerate(groups) if g.role == "head" and lrs[i] is not None), base_lr)
        for i in range(len(groups)):
            if lrs[i] is None:
                lrs[i] = head_lr * float(decay) ** (top - levels[i])
    missing = [g.name for g, lr in zip(groups, lrs, strict=True)
               if lr is None and any(p.requires_grad for _, p in g.params)]
    if missing:
        raise ClasslabError(
            f"{where}: trainable groups without a learning rate: {', '.join(missing)}; give every trainable "
            "group one (by name, or stem / stages / head, or decay: 0.7), or freeze it"
        )
    return lrs


def parameter_groups(model: nn.Module, lrs: dict, base_lr: float | None = None) -> list[dict]:
    """One optimizer group per model group with trainable parameters; every trainable parameter in exactly one."""
    groups = model_groups(model)
    rates = group_lrs(groups, lrs, base_lr if base_lr is not None else 1e-3)
    out = []
    for g, lr in zip(groups, rates, strict=True):
        params = [p for _, p in g.params if p.requires_grad]
        if params:
            out.append({"params": params, "lr": lr, "name": g.name})
    return out


def parameter_assignment(model: nn.Module, lr_groups: dict | None,
                         base_lr: float | None) -> dict[int, tuple[str, float | None]]:
    """id(parameter) -> (group name, learning rate or None when frozen), for the model table."""
    groups = model_groups(model)
    rates = group_lrs(groups, lr_groups, base_lr if base_lr is not None else 1e-3)
    return {id(p): (g.name, lr if p.requires_grad else None)
            for g, lr in zip(groups, rates, strict=True) for _, p in g.params}
