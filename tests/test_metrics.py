import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from classlab.evaluate import classification_report


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
