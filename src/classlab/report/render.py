"""Render the report context with Jinja2: HTML with PNGs embedded as base64, Markdown with PNG files beside it.

HTML autoescapes every value. Markdown has no autoescape, so a `finalize` hook escapes every value that is
not explicitly marked safe: `<`, `>`, `&` (a Markdown viewer renders raw HTML), `|` (table cells) and the
characters that would start code, emphasis or a link.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from classlab.report.plots import Plot
from classlab.runs import atomic_write_bytes, atomic_write_text


def md_escape(value: Any) -> str:
    text = html.escape(str(value), quote=False)
    for char in "\\|`*[]":
        text = text.replace(char, "\\" + char)
    return " ".join(text.split())


def _md_finalize(value: Any) -> Any:
    if value is None:
        return "—"
    return value if isinstance(value, Markup) else md_escape(value)


def _environment(kind: str) -> Environment:
    common = {"loader": PackageLoader("classlab.report", "templates"), "undefined": StrictUndefined,
              "trim_blocks": True, "lstrip_blocks": True, "keep_trailing_newline": True}
    if kind == "html":
        return Environment(autoescape=True, finalize=lambda v: "—" if v is None else v, **common)
    env = Environment(autoescape=False, finalize=_md_finalize, **common)
    env.filters["code"] = lambda text: Markup(str(text).replace("~~~", "~ ~ ~"))
    return env


def data_uri(plot: Plot) -> str:
    return "data:image/png;base64," + base64.b64encode(plot.png).decode("ascii")


def render_html(template: str, context: dict[str, Any]) -> str:
    env = _environment("html")
    env.globals["src"] = data_uri
    return env.get_template(template).render(**context)


def render_markdown(template: str, context: dict[str, Any], files_dir: str) -> str:
    env = _environment("md")
    env.globals["src"] = lambda plot: Markup(f"{files_dir}/{plot.key}.png")
    return env.get_template(template).render(**context)


def write_figures(target: Path, figures: list[Plot]) -> None:
    """PNG files for the Markdown page; PNGs left there by an earlier page are removed."""
    keep = {f"{p.key}.png" for p in figures}
    for plot in figures:
        atomic_write_bytes(target / f"{plot.key}.png", plot.png)
    if target.is_dir():
        for old in target.glob("*.png"):
            if old.name not in keep:
                old.unlink(missing_ok=True)


def write_pages(folder: Path, stem: str, context: dict[str, Any], figures: list[Plot]) -> tuple[Path, Path]:
    """`<stem>.html` (figures embedded) and `<stem>.md` (figures in `<stem>_files/`) from `<stem>.*.j2`."""
    html_path, md_path = folder / f"{stem}.html", folder / f"{stem}.md"
    files_dir = f"{stem}_files"
    write_figures(folder / files_dir, figures)
    atomic_write_text(html_path, render_html(f"{stem}.html.j2", context))
    atomic_write_text(md_path, render_markdown(f"{stem}.md.j2", context, files_dir))
    return html_path, md_path
