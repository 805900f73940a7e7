"""Layer rows as tables show them, a pure function of stored rows (no torch): `classlab summary` and the
report draw the same table, the report from the run folder's model_summary.json alone."""

from __future__ import annotations


def with_child_totals(rows: list[dict]) -> list[dict]:
    """Rows as tables show them: a layer that holds others (a block, a Sequential) counts the parameters
    of everything inside it, its own included, instead of the 0 it holds itself. `rows` are
    models.summary.model_table's (depth-first, each with its own parameters only); a copy is returned."""
    out = [dict(r) for r in rows]
    for i, row in enumerate(rows):
        end = i + 1
        while end < len(rows) and rows[end].get("depth", 0) > row.get("depth", 0):
            end += 1
        if end > i + 1:
            for key in ("params", "trainable"):
                out[i][key] = int(sum(r.get(key, 0) for r in rows[i:end]))
    return out
