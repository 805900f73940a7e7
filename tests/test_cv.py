"""data.cv: folds planned as runs, fold index sets from scikit-learn's splitters, out-of-fold predictions
covering every training image once, selection on the folds' validation and the retrain on all the data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.model_selection import RepeatedStratifiedKFold

from classlab.config import CrossValidation, DataConfig, load_study
from classlab.data import load_dataset
from classlab.data.folds import fold_indices
from classlab.errors import ClasslabError
from classlab.evidence import variant_of
from classlab.plan import expand, retrain_plan, stack_groups
from classlab.runs import RunFolder
from tests.conftest import make_csv_manifest, tiny_study, write_study


def _plan(tmp_path, **sections):
    study = tiny_study(tmp_path, tmp_path / "none", **sections)
    path = write_study(tmp_path / "s.yaml", study)
    return expand(load_study(path), str(path))


def test_folds_are_runs_named_and_grouped_like_seeds(tmp_path):
    planned = _plan(tmp_path, seeds=[0, 1], data={"dataset": "idx", "root": "x", "cv": {"folds": 3}},
                    runs=[{"name": "a"}, {"name": "b", "train": {"lr": 0.1}}])
    names = [p.config.name for p in planned]
    assert names[:6] == ["a-seed0-fold1", "a-seed0-fold2", "a-seed0-fold3", "a-seed1-fold1", "a-seed1-fold2",
                         "a-seed1-fold3"]
    assert len(names) == 12 and len(set(names)) == 12
    assert {p.variant for p in planned} == {"a", "b"}
    assert all(variant_of(n) == p.variant for n, p in zip(names, planned, strict=True))
    assert [p.config.data.cv.fold for p in planned[:3]] == [(1, 1), (1, 2), (1, 3)]
    repeated = _plan(tmp_path, data={"dataset": "idx", "root": "x", "cv": {"folds": 2, "repeats": 2}})
    assert [p.config.name for p in repeated] == ["base-r1-fold1", "base-r1-fold2", "base-r2-fold1", "base-r2-fold2"]
    # seeds of one fold share their data and stack; different folds never share a member stack
    groups = stack_groups([p.config for p in planned], "cuda")
    assert all(len({planned[i].config.data.cv.fold for i in g}) == 1 for g in groups)


def test_the_fold_is_the_plans_and_early_stopping_needs_no_val_fraction(tmp_path):
    with pytest.raises(ClasslabError, match="data.cv.fold is set by the plan"):
        _plan(tmp_path, data={"dataset": "idx", "root": "x", "cv": {"folds": 3, "fold": [1, 1]}})
    planned = _plan(tmp_path, data={"dataset": "idx", "root": "x", "val_fraction": None, "cv": {"folds": 2}},
                    train={"epochs": 2, "early_stopping": {"patience": 1}})
    assert len(planned) == 2
    with pytest.raises(ValueError, match="outside 1 repeat"):
        CrossValidation(folds=3, fold=(1, 4))


def test_retrain_plan_trains_once_per_seed_on_all_the_data(tmp_path):
    planned = _plan(tmp_path, seeds=[0, 1], data={"dataset": "idx", "root": "x", "cv": {"folds": 3}},
                    runs=[{"name": "a"}, {"name": "b"}], select={"rule": "mean"})
    retrain = retrain_plan(planned, "a", "here")
    assert [r.config.name for r in retrain] == ["retrain-a-seed0", "retrain-a-seed1"]
    assert all(r.config.data.cv is None and r.config.data.val_fraction is None for r in retrain)


@pytest.mark.parametrize("folds, repeats", [(5, 1), (3, 2)])
def test_fold_index_sets_are_scikit_learns_and_partition_the_pool(folds, repeats):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 103)
    reference = list(RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=7).split(
        np.zeros((103, 1)), labels))
    for r in range(1, repeats + 1):
        seen = []
        for f in range(1, folds + 1):
            train, held = fold_indices(labels, None, CrossValidation(folds=folds, repeats=repeats, fold=(r, f)), 7)
            ref_train, ref_held = reference[(r - 1) * folds + f - 1]
            assert np.array_equal(held, np.sort(ref_held)) and np.array_equal(train, np.sort(ref_train))
            assert not set(train) & set(held) and len(train) + len(held) == 103
            # stratified: each class's share in the fold within one image of its share overall
            assert np.all(np.abs(np.bincount(labels[held], minlength=4) - np.bincount(labels, minlength=4) / folds)
                          <= 1)
            seen.extend(held)
        assert sorted(seen) == list(range(103))  # each repeat holds out every image exactly once


def test_group_folds_never_split_a_group_and_bad_fold_counts_are_one_line():
    rng = np.random.default_rng(1)
    groups = np.array([f"g{i}" for i in rng.integers(0, 20, 200)])
    labels = rng.integers(0, 3, 200)
    held_all = []
    for f in range(1, 5):
        train, held = fold_indices(labels, groups, CrossValidation(folds=4, group_by="g", fold=(1, f)), 0)
        assert not set(groups[train]) & set(groups[held])
        held_all.extend(held)
    assert sorted(held_all) == list(range(200))
    with pytest.raises(ClasslabError, match="only 3 groups; ask for at most 3 folds"):
        fold_indices(labels[:30], np.array(["a", "b", "c"] * 10), CrossValidation(folds=4, fold=(1, 1)), 0)
    with pytest.raises(ClasslabError, match="a class has only 2 training image"):
        fold_indices(np.array([0] * 10 + [1, 1]), None, CrossValidation(folds=3, fold=(1, 1)), 0)


def test_load_dataset_fold_keeps_the_test_split_and_inner_val(tmp_path):
    table = make_csv_manifest(tmp_path / "m", n_train=90, n_test=30)
    plain = load_dataset(DataConfig(dataset="csv", root=str(table), val_fraction=None))
    cv = {"folds": 3, "fold": (1, 2)}
    data = load_dataset(DataConfig(dataset="csv", root=str(table), cv=cv))
    assert torch.equal(data.test.images, plain.test.images)
    assert (len(data.train), len(data.val), data.pool_size) == (60, 30, 90)
    assert torch.equal(data.held_out.images, plain.train.images[torch.as_tensor(data.held_out_index)])
    inner = load_dataset(DataConfig(dataset="csv", root=str(table), cv={**cv, "inner_val": 0.2}))
    assert torch.equal(inner.held_out.images, data.held_out.images)
    assert (len(inner.train), len(inner.val)) == (48, 12)  # the validation share comes out of the fold's training part


@pytest.mark.slow
def test_cv_study_end_to_end(tmp_path):
    """A cross-validated study on the tiny manifest: fold runs validated on their held-out part (early
    stopping, select), out-of-fold predictions covering every training image once, the comparison table over
    folds, the fold-paired corrected test's inputs, and the chosen variant retrained on all the data."""
    from classlab.report.context import evidence_inputs
    from classlab.report.load import load_study_runs
    from classlab.study import run_study

    table = make_csv_manifest(tmp_path / "m", n_train=90, n_test=30)
    study = tiny_study(tmp_path, table, data={"dataset": "csv", "root": str(table), "val_fraction": None,
                                              "cv": {"folds": 3, "group_by": "writer"}},
                       train={"epochs": 2, "batch_size": 16, "optimizer": "adam", "lr": 0.01,
                              "early_stopping": {"patience": 3}},
                       runs=[{"name": "fast"}, {"name": "slow", "train": {"lr": 0.0001}}], select={"rule": "mean"})
    result = run_study(write_study(tmp_path / "cv.yaml", study))
    names = [s["name"] for s in result.summaries]
    assert names == ["fast-fold1", "fast-fold2", "fast-fold3", "slow-fold1", "slow-fold2", "slow-fold3",
                     "retrain-fast"]
    assert result.selected == "fast"
    for variant in ("fast", "slow"):
        oofs = [RunFolder(result.folder / f"{variant}-fold{f}").read_oof() for f in (1, 2, 3)]
        index = np.concatenate([o["index"] for o in oofs])
        assert sorted(index.tolist()) == list(range(90)) and all(int(o["pool_size"]) == 90 for o in oofs)
        summaries = [s for s in result.summaries if variant_of(s["name"]) == variant]
        for o, s in zip(oofs, summaries, strict=True):
            assert s["data"]["val"] == len(o["index"]) and s["data"]["train"] == 90 - len(o["index"])
            assert s["data"]["test"] == 30
    retrain = result.summaries[-1]
    assert retrain["data"]["train"] == 90 and retrain["data"]["val"] == 0 and retrain["data"]["test"] == 30
    assert RunFolder(result.folder / "retrain-fast").read_oof() is None
    runs, _ = load_study_runs(result.folder)
    inputs = [r for r in evidence_inputs(runs) if r.fold is not None]
    assert sorted((r.variant, r.fold) for r in inputs) == [(v, (1, f)) for v in ("fast", "slow") for f in (1, 2, 3)]
    assert all(r.train_size + len(r.y_true) == 90 for r in inputs)
    from classlab.report import make_report

    _, md = make_report(result.folder)
    text = md.read_text()
    assert "## Cross-validation: out-of-fold predictions" in text
    assert "### fast (3 folds, 90 training images, each held out once)" in text
    oofs = [RunFolder(result.folder / f"slow-fold{f}").read_oof() for f in (1, 2, 3)]
    y_true = np.concatenate([o["y_true"] for o in oofs])
    y_pred = np.concatenate([o["probs"].argmax(1) for o in oofs])
    from sklearn.metrics import f1_score

    f1 = f1_score(y_true, y_pred, average=None, labels=[0, 1, 2], zero_division=0)
    slow = text.split("### slow (3 folds")[1]
    assert all(f"| c{c} |" in slow and f"| {f1[c]:.3f} |" in slow for c in range(3))
    again = run_study(write_study(tmp_path / "cv.yaml", study))  # resume: every fold already complete
    assert [s["name"] for s in again.summaries] == names
