"""k-fold cross-validation as index sets, from scikit-learn's splitters.

A fold is not a copy of the data: it is the (train, held-out) index pair of one (repeat, fold) of the
training pool, recomputed identically by every process from the labels, the groups and data.split_seed.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import (
    GroupKFold,
    RepeatedKFold,
    RepeatedStratifiedKFold,
    StratifiedGroupKFold,
)

from classlab.config import CrossValidation
from classlab.errors import ClasslabError


def _splits(labels: np.ndarray, groups: np.ndarray | None, cv: CrossValidation, seed: int):
    """Every (train, held-out) pair in (repeat, fold) order. Repeats without groups are
    Repeated(Stratified)KFold's; with groups each repeat is a fresh (Stratified)GroupKFold shuffle drawn
    from one seeded RandomState, exactly as scikit-learn's repeated splitters draw theirs."""
    x = np.zeros((len(labels), 1))
    if groups is None:
        repeated = RepeatedStratifiedKFold if cv.stratify else RepeatedKFold
        yield from repeated(n_splits=cv.folds, n_repeats=cv.repeats, random_state=seed).split(x, labels)
        return
    rng = np.random.RandomState(seed)
    for _ in range(cv.repeats):
        splitter = StratifiedGroupKFold if cv.stratify else GroupKFold
        yield from splitter(n_splits=cv.folds, shuffle=True, random_state=rng).split(x, labels, groups)


def fold_indices(labels: np.ndarray, groups: np.ndarray | None, cv: CrossValidation,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices (sorted) of the pool for the run's fold `cv.fold` = (repeat, fold), 1-based."""
    if cv.fold is None:
        raise ClasslabError("data.cv.fold is not set: each fold's run gets it from the plan (classlab run), "
                            "not from the study file")
    n = len(labels)
    what = "groups" if groups is not None else "images"
    count = len(np.unique(groups)) if groups is not None else n
    if count < cv.folds:
        raise ClasslabError(f"data.cv.folds {cv.folds}: the training data has only {count} {what}; ask for at most "
                            f"{count} folds")
    if cv.stratify and groups is None:
        present = np.bincount(labels)
        smallest = int(present[present > 0].min()) if n else 0
        if smallest < cv.folds:
            raise ClasslabError(f"data.cv.folds {cv.folds}: a class has only {smallest} training image(s), fewer than "
                                "the folds, so a stratified fold cannot hold each class; lower data.cv.folds or set "
                                "data.cv.stratify: false")
    wanted = (cv.fold[0] - 1) * cv.folds + (cv.fold[1] - 1)
    with warnings.catch_warnings():  # the class-count warning is the error above, said once
        warnings.simplefilter("ignore", UserWarning)
        for i, (train, held) in enumerate(_splits(labels, groups, cv, seed)):
            if i == wanted:
                return np.sort(train), np.sort(held)
    raise ClasslabError(f"data.cv.fold {list(cv.fold)}: no such fold")  # _fold_in_range keeps this unreachable


def group_test_split(labels: np.ndarray, groups: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices for data with no test split when folds go by group: a test share of about
    `fraction` made of whole groups (one fold of a stratified group k-fold with k = round(1 / fraction)),
    so no group sits on both sides of the test split either."""
    k = max(2, round(1 / fraction))
    if len(np.unique(groups)) < k:
        raise ClasslabError(f"data.test_fraction {fraction}: a test split of whole groups needs at least {k} groups, "
                            f"the data has {len(np.unique(groups))}; add a split column to the manifest")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        train, test = next(splitter.split(np.zeros((len(labels), 1)), labels, groups))
    return np.sort(train), np.sort(test)



def out_of_fold(oofs: list[dict[str, np.ndarray]], n_classes: int) -> dict:
    """One variant's out-of-fold predictions (RunFolder.read_oof of each fold run) together: the confusion
    matrix summed over its passes (a pass = one seed's one repeat, in which every training image is held out
    exactly once) and whether the folds do cover every image once per pass (a missing or failed fold run
    leaves a gap, said here, not hidden)."""
    pool = int(oofs[0]["pool_size"])
    folds = len({int(o["fold"][1]) for o in oofs})
    passes = max(len(oofs) // max(folds, 1), 1)
    counts = np.bincount(np.concatenate([o["index"] for o in oofs]), minlength=pool)
    y_true = np.concatenate([o["y_true"] for o in oofs]).astype(np.int64)
    y_pred = np.concatenate([o["probs"].argmax(1) for o in oofs]).astype(np.int64)
    cm = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp, support, predicted = np.diag(cm).astype(float), cm.sum(1).astype(float), cm.sum(0).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)  # 0 where undefined, as
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)  # sklearn's zero_division=0
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(tp), where=total > 0)
    per_class = {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
                 "support": support.tolist()}
    return {"confusion": cm, "per_class": per_class, "passes": passes, "pool_size": pool,
            "complete": bool(np.all(counts == passes)), "covered": int(np.sum(counts > 0))}
