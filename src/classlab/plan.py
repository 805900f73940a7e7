"""Planning a study, with no torch: runs × grid × seeds, the retrain plan, stacking and selection.

Everything here is a pure function of the study file (and of what finished runs report), so every
process and machine that reads the same file plans the same runs in the same order.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from classlab.config import RunConfig, StudyConfig, deep_merge, validate
from classlab.errors import ClasslabError
from classlab.registry import model_family


@dataclass(frozen=True)
class PlannedRun:
    config: RunConfig
    variant: str  # the run's name without its seed and fold suffixes: runs that differ only by those share it


# Short labels for the grid keys seen most, in cell names: `lr0.001-bs16`; any other key is labelled by its
# last part (`momentum0.9`, `patience3`).
KEY_LABELS = {"batch_size": "bs", "weight_decay": "wd", "eval_batch_size": "ebs", "label_smoothing": "ls"}


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _value_name(value: Any, key: str) -> str:
    """How a grid value names its cell: a word as it is (`adam`, `batchnorm`); anything else (a number, a
    boolean, none, a list) after its key's label, so the name says which parameter is which (`lr0.001`)."""
    if isinstance(value, dict):
        return "-".join(_value_name(v, k) for k, v in value.items())
    if isinstance(value, str):
        return _safe(value)
    if isinstance(value, list | tuple):
        text = "x".join(str(v) for v in value) or "none"
    else:
        text = "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    label = KEY_LABELS.get(key.split(".")[-1], key.split(".")[-1])
    joined = label[-1:].isdigit() or not (text[:1].isdigit() or text[:1] in "-.")  # l1_0.0001, amp_true
    return _safe(f"{label}{'_' if joined else ''}{text}")


def grid_cells(grid: dict[str, list[Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Cartesian product of the grid's dotted keys; each cell named by its values, e.g. 'adam-batchnorm', a
    number with its key's label, e.g. 'lr0.001-bs16' (plan._value_name: the one place a cell gets its name)."""
    keys = list(grid)
    cells = []
    for values in itertools.product(*(grid[k] for k in keys)):
        name = "-".join(_value_name(v, k) for k, v in zip(keys, values, strict=True))
        cells.append((name, dict(zip(keys, values, strict=True))))
    names = [n for n, _ in cells]
    if len(set(names)) != len(names):  # words alone are ambiguous: prefix each with its key
        cells = [("-".join(f"{k.split('.')[-1]}={_safe(v)}" if isinstance(v, str) else _value_name(v, k)
                           for k, v in cell.items()), cell)
                 for _, cell in cells]
    return cells


def fold_suffix(fold: tuple[int, int], repeats: int) -> str:
    """A fold run's name suffix: `-fold3`, or `-r2-fold3` when data.cv repeats the split."""
    return f"-r{fold[0]}-fold{fold[1]}" if repeats > 1 else f"-fold{fold[1]}"


def _folds(data: dict, at: str) -> list[tuple[int, int] | None]:
    """data.cv's (repeat, fold) pairs in order, 1-based; [None] without cross-validation."""
    cv = data.get("cv") if isinstance(data, dict) else None
    if not isinstance(cv, dict):
        return [None]
    if cv.get("fold") is not None:
        raise ClasslabError(f"{at}: data.cv.fold is set by the plan for each fold's run; remove it from the study")
    folds, repeats = cv.get("folds", 5), cv.get("repeats", 1)
    if not isinstance(folds, int) or not isinstance(repeats, int) or folds < 2 or repeats < 1:
        return [None]  # validation below says what is wrong with them
    return [(r, f) for r in range(1, repeats + 1) for f in range(1, folds + 1)]


def expand(study: StudyConfig, where: str = "") -> list[PlannedRun]:
    """One RunConfig per (run, grid cell, seed[, fold]). Names are stable: `<run>[-<cell>][-seed<k>][-fold<f>]`
    (`-r<r>-fold<f>` with repeats): with data.cv every (repeat, fold) is a run, planned like a seed."""
    base = {"data": study.data, "model": study.model, "train": study.train, "eval": study.eval}
    variants: list[tuple[str, dict[str, Any]]] = []
    run_list = study.runs or [{"name": "base"}]
    cells = grid_cells(study.grid) if study.grid else [("", {})]
    for run in run_list:
        for cell_name, cell in cells:
            name = f"{run['name']}-{cell_name}" if study.runs and cell_name else cell_name or run["name"]
            override = {k: v for k, v in run.items() if k != "name"}
            variants.append((name, {**override, **cell}))
    planned = []
    for index, (variant, override) in enumerate(variants):
        merged = deep_merge(base, override)
        at = f"{where} run '{variant}'" if study.runs or study.grid else where
        if study.runs and not study.grid:
            at = f"{where} runs[{index}] ({variant})"
        for seed in study.seeds:
            for fold in _folds(merged.get("data"), at.strip()):
                name = variant if len(study.seeds) == 1 else f"{variant}-seed{seed}"
                raw = {**merged, "name": name, "seed": seed}
                if fold is not None:
                    raw["name"] = name + fold_suffix(fold, merged["data"]["cv"].get("repeats", 1))
                    raw["data"] = {**merged["data"], "cv": {**merged["data"]["cv"], "fold": list(fold)}}
                cfg = validate(RunConfig, raw, where=at.strip())
                planned.append(PlannedRun(cfg, variant))
    return planned


def run_config_dict(cfg: RunConfig) -> dict:
    return cfg.model_dump(mode="json")


def retrain_plan(planned: list[PlannedRun], variant: str, where: str) -> list[PlannedRun]:
    """The chosen variant again, trained on train + validation (no split, so no early stopping); a
    cross-validated variant once per seed, on all its training data (no folds), named without the fold."""
    out = []
    seen = set()
    for run in planned:
        if run.variant != variant:
            continue
        raw = run_config_dict(run.config)
        cv = raw["data"]["cv"]
        raw["name"] = "retrain-" + run.config.name
        if cv is not None:
            raw["name"] = raw["name"].removesuffix(fold_suffix(tuple(cv["fold"]), cv["repeats"]))
            raw["data"]["cv"] = None
        if raw["name"] in seen:
            continue
        seen.add(raw["name"])
        raw["data"]["val_fraction"] = None
        raw["train"]["early_stopping"] = None
        raw["eval"]["temperature_scaling"] = False  # no validation split left to fit a temperature on
        out.append(PlannedRun(validate(RunConfig, raw, where=where), "retrain-" + variant))
    return out


# ----------------------------------------------------------------------------- selection


def confirm_seeds(study: StudyConfig) -> list[int]:
    """The fresh seeds that confirm the selected cell (select.confirm_seeds): `auto` = as many seeds as the
    study has, numbered after its largest, when it has ≥ 2 (none with one seed: nothing to pool a spread from);
    a count, the same numbering; a list, those seeds. Disjoint from the selection seeds, so the selected cell's
    test reference is not the seeds whose lucky validation scores picked it."""
    select = study.select
    if select is None or select.confirm_seeds is None:
        return []
    chosen = select.confirm_seeds
    if chosen == "auto":
        chosen = len(study.seeds) if len(study.seeds) >= 2 else 0
    if isinstance(chosen, int):
        return [max(study.seeds) + 1 + i for i in range(chosen)]
    return list(chosen)


def confirm_plan(planned: list[PlannedRun], variant: str, seeds: Sequence[int], where: str = "") -> list[PlannedRun]:
    """The chosen variant trained again, as it was, with fresh seeds: ordinary runs named
    `confirm-<variant>-seed<k>` (variant `confirm-<variant>`), whose test scores are the comparisons' reference
    and whose validation scores measure the selection's optimism."""
    first = next((run for run in planned if run.variant == variant), None)
    if first is None:
        raise ClasslabError(f"{where}: confirm: no run of variant '{variant}' in this study".lstrip(": "))
    out = []
    for seed in seeds:
        raw = run_config_dict(first.config)
        raw["name"], raw["seed"] = f"confirm-{variant}-seed{seed}", seed
        out.append(PlannedRun(validate(RunConfig, raw, where=where), f"confirm-{variant}"))
    return out


# ----------------------------------------------------------------------------- stacking

# Train settings that must be equal for members to share steps and evaluation; everything else
# (optimizer, lr, momentum, weight decay, L1, scheduler, early stopping, seed) may differ per member.
SHARED_TRAIN_KEYS = ("epochs", "batch_size", "eval_batch_size", "loss", "softmax_before_loss", "label_smoothing",
                     "amp", "compile", "deterministic", "device", "threads", "class_weights")

# On a CPU, vmapped convolutions (grouped convolutions underneath, no channels-last) lose to one-by-one
# training: 3 × study A's CNN took 188 ms per step stacked against 78 ms one after another. So on a
# CPU only MLP-family runs stack; identical CNNs stack where the device is a GPU.
VMAP_ON_CPU = False


def stack_key(cfg: RunConfig, device_type: str = "cpu") -> tuple | None:
    """Runs with equal keys can be trained together on a device of `device_type`; None: this run trains alone.
    What the model must share comes from its family record (registry.MODEL_FAMILIES)."""
    t = cfg.train
    family = model_family(cfg.model.name)
    model = family.stack_signature(cfg.model)
    if model is None or t.lr_groups:  # ImageNet-size nets (resnet18, timm/, torchvision/); per-layer LRs
        return None
    if family.stacking == "same" and device_type == "cpu" and not VMAP_ON_CPU:
        return None
    return model, repr(cfg.data), tuple(repr(getattr(t, k)) for k in SHARED_TRAIN_KEYS)


def can_stack(cfgs: Sequence[RunConfig], device_type: str = "cpu") -> bool:
    """True when all runs can train as one stacked group (at least two, equal `stack_key`s)."""
    keys = [stack_key(c, device_type) for c in cfgs]
    return len(keys) > 1 and keys[0] is not None and all(k == keys[0] for k in keys)


def stack_groups(cfgs: Sequence[RunConfig], device_type: str = "cpu") -> list[list[int]]:
    """Partition run indices into stackable groups (in first-appearance order); singletons train alone."""
    groups: dict[Any, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        key = stack_key(cfg, device_type)
        groups.setdefault(key if key is not None else ("alone", i), []).append(i)
    return list(groups.values())


def optimizer_key(cfg: RunConfig) -> tuple:
    """Members with equal keys share one optimizer (and scheduler) over their stacked parameters."""
    t = cfg.train
    return t.optimizer, t.lr, t.momentum, t.nesterov, t.weight_decay, repr(t.scheduler)


def stack_order(cfgs: Sequence[RunConfig]) -> list[int]:
    """Member order within a stack: those sharing an optimizer next to each other, in first-appearance order."""
    keys = [optimizer_key(c) for c in cfgs]
    first_seen = {key: i for i, key in reversed(list(enumerate(keys)))}
    return sorted(range(len(cfgs)), key=lambda i: (first_seen[keys[i]], i))
