"""The report's search section, read from the study folder's search/ (written by classlab.search when a
search finishes): the trials, the parameters' importance, the confirmation and the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from classlab.report.plots import Plot

SEARCH_DIR = "search"  # classlab.search.SEARCH_DIR (not imported: the report imports nothing that trains)
ALTS = {"history": "the search's history: each trial's validation score and the best so far",
        "importance": "the parameters' importance (fANOVA) for the validation score",
        "parallel": "parallel coordinates: each trial's parameters, coloured by its validation score"}


def _f(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def search_view(folder: Path) -> tuple[dict[str, Any] | None, list[Plot]]:
    """None when the study is not a search (no search/search.json)."""
    root = Path(folder) / SEARCH_DIR
    try:
        doc = json.loads((root / "search.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, []
    figures = []
    for name, rel in (doc.get("plots") or {}).items():
        try:
            figures.append(Plot(f"search-{name}", ALTS.get(name, name), (Path(folder) / rel).read_bytes()))
        except OSError:
            continue
    trials = doc.get("trials", [])
    states: dict[str, int] = {}
    for t in trials:
        states[t["state"]] = states.get(t["state"], 0) + 1
    done = [t for t in trials if t["state"] == "complete" and t["value"] is not None]
    best = (max if doc.get("direction") == "max" else min)(done, key=lambda t: t["value"]) if done else None
    def params(t: dict) -> str:
        return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())

    rows = [{"run": t["run"], "state": t["state"], "value": _f(t["value"]), "params": params(t),
             "epochs": len(t.get("intermediate") or {}), "best": best is not None and t["number"] == best["number"]}
            for t in trials]
    conf = doc.get("confirmation")
    confirmation = None
    if conf:
        confirmation = {"selected": conf["selected"], "note": conf.get("note"),
                        "rows": [{"trial": r["trial"], "seeds": r["seeds"], "search": _f(r["search_score"]),
                                  "fresh": _f(r["confirmed"]), "optimism": _f(r["optimism"]),
                                  "test": _f(None if r["test_accuracy"] is None else r["test_accuracy"] * 100, 2)}
                                 for r in conf["rows"]],
                        "tests": [{"a": t["a"], "b": t["b"], "diff": f"{t['diff'] * 100:+.2f}",
                                   "ci": f"[{t['ci_low'] * 100:+.2f}, {t['ci_high'] * 100:+.2f}]",
                                   "verdict": t.get("verdict")}
                                  for t in conf.get("tests", []) if t.get("metric") == "accuracy" and t.get("diff")
                                  is not None]}
    summary = (f"{len(trials)} trial(s): " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) +
               f"; objective: validation {doc.get('metric')} ({doc.get('direction')})" +
               (f"; best: {best['run']} at {best['value']:.4f}" if best else ""))
    importance = [{"param": k, "value": f"{v:.3f}"} for k, v in (doc.get("importance") or {}).items()]
    return {"summary": summary, "rows": rows, "importance": importance, "confirmation": confirmation,
            "figures": figures}, figures
