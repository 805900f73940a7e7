"""Model tables (layer, output shape, parameters, trainable / frozen, LR group) via torchinfo; the run folder
keeps them (model_summary.json), so the report shows them without building the model."""

from __future__ import annotations

import torchinfo
from torch import nn

from classlab.models.freeze import parameter_assignment
from classlab.tables import with_child_totals


def _dotted_name(layer) -> str:
    parts = []
    while layer is not None and layer.depth > 0:
        parts.append(layer.var_name)
        layer = layer.parent_info
    return ".".join(reversed(parts)) or "(model)"


def model_table(model: nn.Module, input_shape: tuple[int, int, int],
                lr_groups: dict[str, float] | None = None, default_lr: float | None = None) -> tuple[str, list[dict]]:
    """torchinfo's text table and one row per layer (dotted name, output shape, own parameters,
    trainable count, parameter group and its learning rate, as models.freeze resolves them for the
    optimizer); runs one forward pass."""
    device = next(model.parameters()).device
    try:
        stats = torchinfo.summary(
            model, input_size=(2, *input_shape), col_names=("output_size", "num_params", "trainable"),
            depth=4, verbose=0, device=device, mode="eval",
        )
    except RuntimeError as e:  # torchinfo wraps the forward's error: one line with the cause, not its traceback
        from classlab.errors import ClasslabError, one_line

        cause = e.__cause__ or e.__context__ or e
        raise ClasslabError(f"model: {type(model).__name__} cannot take a {'x'.join(map(str, input_shape))} input "
                            f"({one_line(cause)[:200]}); check data.resize / data.to_rgb") from None
    assigned = parameter_assignment(model, dict(lr_groups) if lr_groups else None, default_lr)
    rows = []
    for layer in stats.summary_list:
        own = list(layer.module.parameters(recurse=False))
        name = _dotted_name(layer)
        trainable = int(sum(p.numel() for p in own if p.requires_grad))
        mine = {assigned[id(p)] for p in (own or list(layer.module.parameters())) if id(p) in assigned}
        group = next(iter(mine))[0] if len({g for g, _ in mine}) == 1 else None
        lrs = {lr for _, lr in mine if lr is not None}
        lr = next(iter(lrs)) if len(lrs) == 1 and (trainable or not own) else None  # a container: its group's
        rows.append({
            "layer": name,
            "type": type(layer.module).__name__,
            "depth": layer.depth,
            "output_shape": list(layer.output_size) if layer.output_size else [],
            "params": int(sum(p.numel() for p in own)),
            "trainable": trainable,
            "lr_group": group,
            "lr": lr,
        })
    return str(stats), rows


def parameter_count(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def layer_table_text(rows: list[dict], params: dict[str, int], input_shape: tuple[int, int, int]) -> str:
    """The table `classlab summary` prints and the run folder keeps: one line per layer, indented by
    depth, with its own parameters split into trainable / frozen and its learning rate."""
    header = ("layer", "type", "output shape", "params", "trainable", "frozen", "group", "lr")
    body = []
    for r in with_child_totals(rows):
        if r["depth"] == 0:
            continue
        frozen = r["params"] - r["trainable"]
        body.append((
            "  " * (r["depth"] - 1) + r["layer"].split(".")[-1] if r["depth"] > 1 else r["layer"],
            r["type"],
            "×".join(str(d) for d in r["output_shape"][1:]) or "-",
            f"{r['params']:,}" if r["params"] else "",
            f"{r['trainable']:,}" if r["trainable"] else "",
            f"{frozen:,}" if frozen else "",
            r.get("lr_group") or "",
            f"{r['lr']:g}" if r.get("lr") is not None else "",
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 3 or i == 6 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*row) for row in body]
    lines.append("")
    lines.append(f"input {'×'.join(map(str, input_shape))}; parameters {params['total']:,}: "
                 f"{params['trainable']:,} trainable, {params['frozen']:,} frozen")
    return "\n".join(lines)
