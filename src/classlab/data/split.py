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


def stratified_subset(labels: torch.Tensor, size: int, seed: int, what: str = "data.subset") -> torch.Tensor:
    """Exactly `size` indices (sorted), the same for the same seed, with every class present and each
    class's share as close to its share of `labels` as whole images allow (largest remainders)."""
    classes, counts = torch.unique(labels, return_counts=True)
    total, k = len(labels), len(classes)
    if size > total:
        raise ClasslabError(f"{what} {size}: the split has only {total} images; ask for at most {total}")
    if size < k:
        raise ClasslabError(f"{what} {size}: fewer images than the {k} classes; a stratified subset keeps every "
                            f"class, so ask for at least {k}")
    quota = counts.double() * size / total
    take = quota.floor().long().clamp(min=1)
    while int(take.sum()) > size:  # the floor of 1 per class overshot: take back where it is furthest above quota
        over = torch.where(take > 1, take - quota, torch.full_like(quota, -float("inf")))
        take[int(over.argmax())] -= 1
    while int(take.sum()) < size:  # hand out the rest by the largest remainder, within each class's images
        under = torch.where(take < counts, quota - take, torch.full_like(quota, -float("inf")))
        take[int(under.argmax())] += 1
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c, n in zip(classes.tolist(), take.tolist(), strict=True):
        idx = torch.nonzero(labels == c).flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=g)][:n])
    return torch.sort(torch.cat(chosen)).values


def _class_of(member: str | int, classes: list[str], group: str) -> int:
    """A relabel member's class index. Names come first: a number is the class of that name when there is one
    (folders named 1, 2, 10), else an index; a number that names one class and indexes another is an error."""
    if isinstance(member, bool) or not isinstance(member, int | str):
        raise ClasslabError(f"data.relabel.{group}: '{member}' is neither a class name nor a class index")
    name = str(member)
    if isinstance(member, str):
        if name in classes:
            return classes.index(name)
        raise ClasslabError(f"data.relabel.{group}: unknown class '{member}'{suggest(name, classes)}; "
                            f"classes are: {', '.join(classes)}")
    named = classes.index(name) if name in classes else None
    indexed = member if 0 <= member < len(classes) else None
    if named is not None and indexed is not None and named != indexed:
        raise ClasslabError(
            f"data.relabel.{group}: {member} is ambiguous: the class named '{name}' is index {named}, and index "
            f"{member} is the class '{classes[indexed]}'; write '{name}' (quoted) for the class named {name}, or "
            f"'{classes[indexed]}' for the class at index {member}")
    if named is None and indexed is None:
        raise ClasslabError(f"data.relabel.{group}: no class named '{name}' and class index {member} is outside "
                            f"0–{len(classes) - 1}; classes are: {', '.join(classes)}")
    return named if named is not None else indexed  # type: ignore[return-value]


def relabel(classes: list[str], groups: dict[str, list[str | int]]) -> tuple[torch.Tensor, list[str]]:
    """Map old class index -> new group index; every class must land in exactly one group."""
    mapping = torch.full((len(classes),), -1, dtype=torch.long)
    for new_index, (group, members) in enumerate(groups.items()):
        for member in members:
            old = _class_of(member, classes, group)
            if mapping[old] != -1:
                raise ClasslabError(f"data.relabel: class '{classes[old]}' is in more than one group")
            mapping[old] = new_index
    unmapped = [classes[i] for i in range(len(classes)) if mapping[i] == -1]
    if unmapped:
        raise ClasslabError(f"data.relabel: classes not in any group: {', '.join(unmapped)}; add them to a group")
    return mapping, list(groups)


def keep_fraction(labels: torch.Tensor, fractions: dict[int, float], seed: int) -> torch.Tensor:
    """Indices that keep every image except all but `fractions[c]` of class c's (seeded, at least one)."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.ones(len(labels), dtype=torch.bool)
    for c, fraction in fractions.items():
        members = torch.nonzero(labels == c).flatten()
        drop = members[torch.randperm(len(members), generator=gen)][max(1, round(fraction * len(members))):]
        keep[drop] = False
    return torch.nonzero(keep).flatten()

