"""Class imbalance: class weights, the balanced sampler, macro-F1 / balanced-accuracy validation and
selection, and subset.keep, checked against scikit-learn where it has the same thing."""

import copy

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.utils.class_weight import compute_class_weight

from classlab.config import RunConfig, validate
from classlab.data import load_dataset
from classlab.errors import ClasslabError
from classlab.models import build_model
from classlab.train.fit import _Loop, fit
from classlab.train.members import member_losses
from classlab.train.optim import class_weights, loss_fn
from classlab.transforms import BatchTransform, preprocess_for

CPU = torch.device("cpu")


def _cfg(idx_folder, data=None, **train) -> RunConfig:
    t = {"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 0.01, **train}
    d = {"dataset": "idx", "root": str(idx_folder), "val_fraction": 0.25, "subset": {"keep": {"3": 0.2}},
         **(data or {})}
    return validate(RunConfig, {"name": "r", "data": d, "model": {"name": "mlp", "hidden": [16]}, "train": t})


def _model(cfg, data):
    pre = preprocess_for(cfg, data)
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, len(data.classes), pre.input_shape), pre


def test_subset_keep_makes_one_class_rare(idx_folder):
    full = load_dataset(_cfg(idx_folder, data={"subset": None}).data)
    rare = load_dataset(_cfg(idx_folder).data)
    count = lambda d, c: int((d.train.labels == c).sum() + (d.val.labels == c).sum())  # noqa: E731
    assert count(rare, 3) == round(0.2 * count(full, 3)) and count(rare, 0) == count(full, 0)
    assert torch.equal(rare.test.labels, full.test.labels)  # the test split is untouched
    with pytest.raises(ClasslabError, match=r"no class '9'"):
        load_dataset(_cfg(idx_folder, data={"subset": {"keep": {"9": 0.5}}}).data)


def test_auto_class_weights_are_sklearns_balanced_weights(idx_folder):
    data = load_dataset(_cfg(idx_folder).data)
    ours = class_weights("auto", data.classes, data.train.labels)
    y = data.train.labels.numpy()
    want = compute_class_weight("balanced", classes=np.arange(4), y=y)
    assert np.allclose(ours.numpy(), want, rtol=1e-6)
    assert float(ours[torch.as_tensor(y)].mean()) == pytest.approx(1.0)  # the loss keeps its scale
    named = class_weights({"3": 4.0}, data.classes, data.train.labels)
    assert named.tolist() == [1.0, 1.0, 1.0, 4.0]
    with pytest.raises(ClasslabError, match=r"no class 'x3'"):
        class_weights({"x3": 2.0}, data.classes, data.train.labels)


def test_weighted_loss_is_the_mean_of_weighted_image_losses(idx_folder):
    tc = _cfg(idx_folder, class_weights="auto").train
    logits, y = torch.randn(1, 10, 4, dtype=torch.float64), torch.randint(0, 4, (10,))
    w = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    loss, logged, weight = member_losses(logits, y, tc, 10, 1, w)
    per = loss_fn(logits[0], y, tc, reduction="none")
    assert float(loss) == pytest.approx(float((w[y] * per).mean())) and float(logged) * weight / 10 == \
        pytest.approx(float(loss))


def test_stacked_members_with_class_weights_match_each_alone(idx_folder, monkeypatch):
    call = BatchTransform.__call__
    monkeypatch.setattr(BatchTransform, "__call__", lambda self, x: call(self, x).double())
    cfgs = [_cfg(idx_folder, class_weights="auto").model_copy(update={"name": "a"}),
            _cfg(idx_folder, class_weights="auto", optimizer="sgd", lr=0.05).model_copy(update={"name": "b"})]
    data = load_dataset(cfgs[0].data)
    built = [_model(c, data) for c in cfgs]
    stacked_models = [m.double() for m, _ in built]
    alone_models = [copy.deepcopy(m) for m in stacked_models]
    stacked = fit(stacked_models, data, cfgs, built[0][1], CPU)
    alone = [fit([m], data, [c], built[0][1], CPU)[0] for m, c in zip(alone_models, cfgs, strict=True)]
    assert [r.stacked for r in stacked] == [2, 2]
    for s, a in zip(stacked, alone, strict=True):
        assert s.history[-1]["train_loss"] == pytest.approx(a.history[-1]["train_loss"], abs=1e-9)


def test_balanced_sampler_draws_classes_evenly_and_is_seeded(idx_folder):
    cfg = _cfg(idx_folder, data={"sampler": "balanced"})
    data = load_dataset(cfg.data)
    model, pre = _model(cfg, data)
    from classlab.train.members import build_members

    loop = _Loop(build_members([model], [cfg], CPU), data, pre, CPU, [])
    gen = torch.Generator().manual_seed(0)
    orders = [loop._order(gen) for _ in range(20)]  # 20 epochs' draws: 2,880 images
    counts = torch.bincount(data.train.labels[torch.cat(orders)], minlength=4).double()
    plain = torch.bincount(data.train.labels, minlength=4).double()
    assert len(orders[0]) == len(data.train) and counts.min() / counts.max() > 0.85 > 0.4 > plain.min() / plain.max()
    assert torch.equal(orders[0], loop._order(torch.Generator().manual_seed(0)))


def test_validation_macro_f1_and_balanced_accuracy_match_sklearn(idx_folder):
    cfg = _cfg(idx_folder, epochs=1, lr=0.003)
    data = load_dataset(cfg.data)
    model, pre = _model(cfg, data)
    (result,) = fit([model], data, [cfg], pre, CPU)
    from classlab.train.forward import predict_logits

    pred = predict_logits(model, data.val.images, BatchTransform(pre, None, CPU), 256, CPU).argmax(1).numpy()
    y = data.val.labels.numpy()
    row = result.history[-1]
    assert row["val_macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=range(4),
                                                         zero_division=0))
    assert row["val_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))


def test_early_stopping_and_select_on_macro_f1(idx_folder):
    cfg = _cfg(idx_folder, epochs=6, early_stopping={"patience": 1, "monitor": "val_macro_f1"})
    data = load_dataset(cfg.data)
    model, pre = _model(cfg, data)
    (result,) = fit([model], data, [cfg], pre, CPU)
    f1s = [r["val_macro_f1"] for r in result.history]
    assert result.kept_epoch == 1 + int(np.argmax(f1s))
    from classlab.evidence import select_variant, validation_scores

    summaries = [{"name": "a", "kept_val": {"macro_f1": 0.5, "balanced_accuracy": 0.9}},
                 {"name": "b", "kept_val": {"macro_f1": 0.7, "balanced_accuracy": 0.6}}]
    assert select_variant(validation_scores(summaries, "macro_f1")) == "b"
    assert select_variant(validation_scores(summaries, "balanced_accuracy")) == "a"
