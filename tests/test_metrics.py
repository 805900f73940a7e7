import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from classlab.metrics import classification_report


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 8))
    y = rng.integers(0, n_classes, size=int(rng.integers(5, 300)))
    logits = rng.normal(size=(len(y), n_classes))
    if seed % 2:  # some classes never predicted -> zero_division paths
        logits[:, 0] -= 100
    pred = logits.argmax(1)
    ours = classification_report(torch.tensor(y), torch.tensor(logits), n_classes)
    labels = list(range(n_classes))
    assert ours["confusion_matrix"] == confusion_matrix(y, pred, labels=labels).tolist()
    assert ours["accuracy"] == pytest.approx(accuracy_score(y, pred))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    np.testing.assert_allclose(ours["per_class"]["precision"], p)
    np.testing.assert_allclose(ours["per_class"]["recall"], r)
    np.testing.assert_allclose(ours["per_class"]["f1"], f)
    assert ours["per_class"]["support"] == s.tolist()
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y, pred, labels=labels, average=avg, zero_division=0)
        assert ours[avg]["precision"] == pytest.approx(p)
        assert ours[avg]["recall"] == pytest.approx(r)
        assert ours[avg]["f1"] == pytest.approx(f)


@pytest.mark.parametrize("seed", range(4))
def test_registry_metrics_of_stacked_members_match_sklearn(seed):
    """fit validates K members at once from one [K, C, C] confusion matrix: each member's registry metrics
    equal sklearn's on that member's predictions."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    from classlab import metrics

    rng = np.random.default_rng(seed)
    k, c, n = 3, int(rng.integers(2, 7)), int(rng.integers(5, 200))
    y = rng.integers(0, c, size=n)
    pred = rng.integers(0, c, size=(k, n))
    if seed % 2:
        pred[1] = 0  # one member predicts a single class: zero_division paths
        y[y == c - 1] = 0  # a class absent from the labels
    cm = metrics.confusion_matrix(torch.tensor(y), torch.tensor(pred), c)
    assert cm.shape == (k, c, c)
    values = metrics.of_confusion(cm)
    assert set(values) == {"accuracy", "balanced_accuracy", "macro_f1"}
    for i in range(k):
        assert cm[i].tolist() == confusion_matrix(y, pred[i], labels=list(range(c))).tolist()
        assert float(values["accuracy"][i]) == pytest.approx(accuracy_score(y, pred[i]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn warns about the class absent from the labels
            expected_bal = balanced_accuracy_score(y, pred[i])
        assert float(values["balanced_accuracy"][i]) == pytest.approx(expected_bal)
        assert float(values["macro_f1"][i]) == pytest.approx(
            f1_score(y, pred[i], labels=list(range(c)), average="macro", zero_division=0))


def test_ece_matches_a_direct_computation():
    from classlab import metrics

    rng = np.random.default_rng(0)
    probs = torch.tensor(rng.dirichlet(np.ones(5), size=400))
    labels = torch.tensor(rng.integers(0, 5, size=400))
    conf, pred = probs.max(1).values.numpy(), probs.argmax(1).numpy()
    edges = np.linspace(0, 1, metrics.ECE_BINS + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs((pred[inside] == labels.numpy()[inside]).mean() - conf[inside].mean())
    assert metrics.get("ece").of_probs(probs, labels) == pytest.approx(ece)


def test_registry_one_entry_per_metric():
    from classlab import metrics

    assert metrics.VALIDATION == ("loss", "accuracy", "balanced_accuracy", "macro_f1")
    assert [m.higher_is_better for m in map(metrics.get, ("loss", "accuracy", "macro_f1", "ece"))] == [
        False, True, True, False]
    assert metrics.get("val_macro_f1") is metrics.get("macro_f1")  # the older spelling reads the same entry
    assert metrics.get("accuracy").format(0.51234) == "51.23" and metrics.get("macro_f1").format(0.5) == "0.5000"
    with pytest.raises(KeyError, match="unknown metric 'f1'"):
        metrics.get("f1")
