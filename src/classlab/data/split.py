"""Seeded, stratified splits and subsets, and relabelling classes into named groups."""

from __future__ import annotations

import torch

from classlab.errors import ClasslabError
from classlab.registry import suggest


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (keep, held_out) with `fraction` of every class held out, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = int(round(len(idx) * fraction))
        n_held = min(max(n_held, 1), len(idx) - 1) if len(idx) > 1 else 0
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(held)).values


def stratified_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """`size` indices with class proportions kept (balanced data stays balanced)."""
    fraction = size / len(labels)
    _, chosen = stratified_split(labels, fraction, seed)
    return chosen


def relabel(classes: list[str], groups: dict[str, list[str | int]]) -> tuple[torch.Tensor, list[str]]:
    """Map old class index -> new group index; every class must land in exactly one group."""
    mapping = torch.full((len(classes),), -1, dtype=torch.long)
    for new_index, (group, members) in enumerate(groups.items()):
        for member in members:
            if isinstance(member, int) and not isinstance(member, bool):
                if not 0 <= member < len(classes):
                    raise ClasslabError(f"data.relabel.{group}: class index {member} outside 0–{len(classes) - 1}")
                old = member
            elif member in classes:
                old = classes.index(member)
            else:
                raise ClasslabError(
                    f"data.relabel.{group}: unknown class '{member}'{suggest(str(member), classes)}; "
                    f"classes are: {', '.join(classes)}"
                )
            if mapping[old] != -1:
                raise ClasslabError(f"data.relabel: class '{classes[old]}' is in more than one group")
            mapping[old] = new_index
    unmapped = [classes[i] for i in range(len(classes)) if mapping[i] == -1]
    if unmapped:
        raise ClasslabError(f"data.relabel: classes not in any group: {', '.join(unmapped)}; add them to a group")
    return mapping, list(groups)
