"""Every key a study file can hold, with its type, default and meaning, read from the pydantic models of
config.py (nothing is written twice): `classlab config --reference` prints it, and docs/config.md is the
same reference as Markdown (`classlab config --reference --markdown > docs/config.md`; a test checks that
the file is current).

The walk starts at `StudyConfig`; its `data`, `model` and `train` sections (raw mappings there, since runs
and grid cells override them before validation) are documented by the models that validate them in
`RunConfig`. A nested model gets its own section under its dotted path (`train.early_stopping`); each model
of the `model:` union gets one (`model (name: cnn)`); a model met a second time (a CNN's layers, a ResNet's
head) points to its first section.
"""

from __future__ import annotations

import inspect
import json
import typing
from dataclasses import dataclass, field
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from classlab import config as C

ROOT_DOC = ("A study file is YAML: the keys below, top level first. `data`, `model` and `train` form the base "
            "every run starts from; `runs:` and `grid:` override them with the same keys (dotted in `grid:` and "
            "in `-o key.path=value` on the command line). A misspelt key is an error naming its path. Each run's "
            "resolved data / model / train, with its name and seed, is written to <run>/config.yaml.")


@dataclass(frozen=True)
class Key:
    path: str  # dotted, e.g. train.early_stopping.patience; a list's items are []
    type: str
    default: str
    meaning: str


@dataclass
class Section:
    path: str  # the keys' dotted prefix, e.g. "train.early_stopping"; "" = the study file's top level
    model: type[BaseModel]
    doc: str
    keys: list[Key] = field(default_factory=list)
    variant: str | None = None  # for a member of the model union: its name, e.g. cnn

    @property
    def title(self) -> str:
        if self.variant is not None:
            return f"{self.path} (name: {self.variant})"
        return self.path or "study file (top level)"


def _doc(cls: type[BaseModel]) -> str:
    own = cls.__dict__.get("__doc__")
    return " ".join(inspect.cleandoc(own).split()) if own else ""


def _strip(annotation: Any) -> Any:
    """An annotation without Annotated[...] wrappers."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _union_args(annotation: Any) -> list[Any] | None:
    annotation = _strip(annotation)
    if typing.get_origin(annotation) in (Union, UnionType):
        return [_strip(a) for a in typing.get_args(annotation)]
    return None


def _constraints(metadata: list[Any]) -> str:
    bounds = {k: getattr(m, k) for m in metadata for k in ("gt", "ge", "lt", "le") if getattr(m, k, None) is not None}
    lo = ("(", bounds["gt"]) if "gt" in bounds else ("[", bounds["ge"]) if "ge" in bounds else None
    hi = (")", bounds["lt"]) if "lt" in bounds else ("]", bounds["le"]) if "le" in bounds else None
    min_len = next((m.min_length for m in metadata if getattr(m, "min_length", None)), None)
    parts = []
    if lo and hi:
        parts.append(f"in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}")
    elif lo:
        parts.append(f"{'>' if lo[0] == '(' else '≥'} {_num(lo[1])}")
    elif hi:
        parts.append(f"{'<' if hi[0] == ')' else '≤'} {_num(hi[1])}")
    if min_len:
        parts.append(f"(at least {min_len})")
    return " ".join(parts)


def _num(v: Any) -> str:
    return json.dumps(v) if isinstance(v, int | float) else str(v)


def type_name(annotation: Any, metadata: list[Any] | None = None, see: dict[type, str] | None = None) -> str:
    """A YAML-minded type: int, float ≥ 0, "a" | "b", [float, float], list of int, mapping, section names."""
    see = see or {}
    inner_meta: list[Any] = list(metadata or [])
    while typing.get_origin(annotation) is Annotated:
        annotation, *extra = typing.get_args(annotation)
        inner_meta += [m for m in extra if not isinstance(m, FieldInfo)]
        inner_meta += [m for f in extra if isinstance(f, FieldInfo) for m in f.metadata]
    bounds = _constraints(inner_meta)
    suffix = f" {bounds}" if bounds else ""
    args = _union_args(annotation)
    if args is not None:
        parts = [type_name(a, None, see) for a in args if a is not NoneType]
        return " | ".join(dict.fromkeys(parts)) + suffix + (" | null" if NoneType in args else "")
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(str(v) for v in typing.get_args(annotation)) + suffix
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"section {see[annotation]}" if annotation in see else "section"
    if origin is tuple:
        items = typing.get_args(annotation)
        if len(items) == 2 and items[1] is Ellipsis:
            return f"list of {type_name(items[0], None, see)}" + suffix
        return "[" + ", ".join(type_name(i, None, see) for i in items) + "]" + suffix
    if origin is list:
        return f"list of {type_name(typing.get_args(annotation)[0], None, see)}" + suffix
    if origin is dict:
        k, v = typing.get_args(annotation)
        return f"mapping {type_name(k, None, see)} → {type_name(v, None, see)}" + suffix
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation)) + suffix


def default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        dumped = value.model_dump(mode="json")
        return "{}" if value == type(value)() else json.dumps(dumped)
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    return json.dumps(_short(value), ensure_ascii=False)


def _short(value: Any) -> Any:
    """Floats to 6 significant digits (4/3 as 1.33333), tuples as lists."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, tuple | list):
        return [_short(v) for v in value]
    return value


def _variant_label(cls: type[BaseModel]) -> str:
    """How a `model:` union member is chosen: its name literal(s), else (a free-form name such as the zoo's
    timm/<arch>) the name field's description."""
    name = cls.model_fields["name"]
    values = typing.get_args(_strip(name.annotation))
    if typing.get_origin(_strip(name.annotation)) is Literal:
        return " | ".join(values)
    return name.description or getattr(cls, "tag", cls.__name__)


def _field_models(annotation: Any) -> list[type[BaseModel]]:
    return C._models_in(annotation)


def sections() -> list[Section]:
    """The whole reference, in reading order (each section followed by the ones nested in it)."""
    out: list[Section] = []
    where: dict[type, str] = {}  # model -> the title of the section that documents it
    run_sections = {name: C.RunConfig.model_fields[name].annotation for name in C.RUN_SECTIONS}

    def walk(cls: type[BaseModel], path: str, doc: str, variant: str | None = None) -> None:
        section = Section(path, cls, doc, variant=variant)
        where[cls] = section.title
        out.append(section)
        nested: list[tuple[type[BaseModel], str, str | None]] = []
        for name, info in cls.model_fields.items():
            annotation = info.annotation
            if cls is C.StudyConfig and name in run_sections:
                annotation = run_sections[name]
            key = f"{path}.{name}" if path else name
            models = [m for m in _field_models(annotation) if m.model_fields]  # `{}`-only kinds need none
            is_list = typing.get_origin(_strip(annotation)) is list or any(
                typing.get_origin(a) is list for a in (_union_args(annotation) or []))
            child = f"{key}[]" if is_list else key
            if len(models) > 1:  # the model union: one section per member
                labels = [_variant_label(m) for m in models]
                kind = "section, by name: " + ", ".join(labels)
                nested += [(m, child, label) for m, label in zip(models, labels, strict=True) if m not in where]
            else:
                if models and models[0] not in where:
                    nested.append((models[0], child, None))
                    where[models[0]] = child
                kind = type_name(annotation, info.metadata, where)
                if not models and _field_models(annotation):
                    kind = kind.replace("section", "{} (or just the name in a layer list)")
            section.keys.append(Key(key, kind, default_text(info), info.description or ""))
        for m, child, label in nested:
            walk(m, child, _doc(m), label)

    walk(C.StudyConfig, "", ROOT_DOC)
    return out


def all_keys() -> list[Key]:
    return [k for s in sections() for k in s.keys]


def render_text(secs: list[Section] | None = None, prefix: str = "") -> str:
    """For a terminal: one block per section, each key on one line with its type and default, its meaning
    indented below. `prefix` keeps the sections whose path starts with it (e.g. `train`)."""
    lines: list[str] = []
    for s in sections() if secs is None else secs:
        if prefix and not s.path.startswith(prefix):
            continue
        lines += [s.title, *([f"  {s.doc}"] if s.doc else [])]
        for k in s.keys:
            lines.append(f"  {k.path}: {k.type} = {k.default}")
            if k.meaning:
                lines.append(f"      {k.meaning}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _md(text: str) -> str:
    """Markdown for a table cell or a paragraph: outside `code`, <arch> and <run> are not HTML tags; | never
    ends a table cell (GitHub splits cells before it reads code spans)."""
    parts = text.replace("\n", " ").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts).replace("|", "\\|")


def _code(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(secs: list[Section] | None = None) -> str:
    """docs/config.md: a table per section."""
    secs = sections() if secs is None else secs
    lines = ["# Configuration reference", "",
             "<!-- generated by `classlab config --reference --markdown > docs/config.md`; do not edit by hand -->",
             "", _md(ROOT_DOC), "", "Sections: " + ", ".join(f"`{s.title}`" for s in secs if s.path) + ".", ""]
    for s in secs:
        lines += [f"## {_md(s.title)}", ""]
        if s.doc and s.path:
            lines += [_md(s.doc), ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        lines += [f"| `{k.path}` | {_md(k.type)} | `{_code(k.default)}` | {_md(k.meaning)} |" for k in s.keys]
        lines.append("")
    return "\n".join(lines)
