"""Stacked training (many models at once) against the same runs trained one by one with `fit`."""

import copy

import pytest
import torch

from classlab import plan
from classlab.config import RunConfig, validate
from classlab.data import load_dataset
from classlab.models import build_model
from classlab.plan import can_stack, stack_groups
from classlab.train.fit import fit
from classlab.train.members import VmapStack, WideMLP, make_backend
from classlab.transforms import BatchTransform, preprocess_for
from tests.conftest import TINY_CNN

CPU = torch.device("cpu")
SMALL_MLP = {"name": "mlp", "hidden": [32, 16], "activation": "tanh"}


def _cfg(idx_folder, name="r", seed=0, model=None, **train) -> RunConfig:
    t = {"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 0.01, **train}
    d = {"dataset": "idx", "root": str(idx_folder), "val_fraction": 0.2}
    return validate(RunConfig, {"name": name, "seed": seed, "data": d, "model": model or SMALL_MLP, "train": t})


def _build(cfg, data):
    pre = preprocess_for(cfg, data)
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, len(data.classes), pre.input_shape), pre


def _both(cfgs, dtype=torch.float32, monkeypatch=None):
    """(stacked results + models, one-by-one results + models) from identical initial weights. In float64
    (`monkeypatch` turns the float32 model inputs into float64) the two compute the same maths to rounding."""
    data = load_dataset(cfgs[0].data)
    if dtype == torch.float64:
        _float64_inputs(monkeypatch)
    stacked_models, alone_models = [], []
    for cfg in cfgs:
        model, pre = _build(cfg, data)
        model.to(dtype)
        stacked_models.append(model)
        alone_models.append(copy.deepcopy(model))
    stacked = fit(stacked_models, data, cfgs, pre, CPU)
    alone = [fit([m], data, [c], pre, CPU)[0] for m, c in zip(alone_models, cfgs, strict=True)]
    return stacked, stacked_models, alone, alone_models


def _float64_inputs(monkeypatch) -> None:
    call = BatchTransform.__call__
    monkeypatch.setattr(BatchTransform, "__call__", lambda self, x: call(self, x).double())


def _assert_same(stacked, stacked_models, alone, alone_models, atol=1e-9):
    for s, a in zip(stacked, alone, strict=True):
        assert len(s.history) == len(a.history) and s.best_epoch == a.best_epoch
        for rs, ra in zip(s.history, a.history, strict=True):
            for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
                assert rs[key] == pytest.approx(ra[key], abs=atol), key
    for ms, ma in zip(stacked_models, alone_models, strict=True):
        for (name, ts), (_, ta) in zip(ms.state_dict().items(), ma.state_dict().items(), strict=True):
            assert torch.allclose(ts.double(), ta.double(), atol=atol, rtol=0), name


GRID = [("adam", {}), ("rmsprop-bn", {"optimizer": "rmsprop", "lr": 0.003, "model": {**SMALL_MLP, "batchnorm": True}}),
        ("adam-l1", {"l1": 1e-3}),
        ("sgd-step", {"optimizer": "sgd", "momentum": 0.9, "lr": 0.05, "weight_decay": 1e-3,
                      "scheduler": {"name": "step", "step_size": 1, "gamma": 0.5}})]


def test_wide_mlp_grid_matches_one_by_one(idx_folder, monkeypatch):
    """Study D's kind of grid: optimizers × {none, BN, L1} (+ a scheduler), one stacked model, against each
    run alone: in float64 the same numbers to 1e-9 after two epochs, on any CPU."""
    cfgs = [_cfg(idx_folder, name, **train) for name, train in GRID]
    assert can_stack(cfgs)
    stacked, sm, alone, am = _both(cfgs, torch.float64, monkeypatch)
    assert all(r.stacked == 4 for r in stacked)
    assert stacked[3].history[1]["lr"] == pytest.approx(0.025)
    _assert_same(stacked, sm, alone, am)


def test_wide_mlp_grid_in_float32_stays_close(idx_folder):
    """What users run, end to end in float32. The stacked GEMMs add the same products in another order than
    one model's (and another again on another CPU's kernels): ~1e-7 relative per step, which two epochs of
    Adam / RMSprop amplify where a gradient is near zero (the step is g / sqrt(v), about lr whatever g's
    size). Measured: 2e-3 on an AMD EPYC. So weights within 2e-2 (two such steps at lr 0.01) and losses
    within 1e-2; a real difference (a wrong L1 or BN member) is larger than that."""
    cfgs = [_cfg(idx_folder, name, **train) for name, train in GRID]
    _assert_same(*_both(cfgs), atol=2e-2)


def test_different_seeds_each_see_their_own_data_order(idx_folder, monkeypatch):
    cfgs = [_cfg(idx_folder, "s0", seed=0), _cfg(idx_folder, "s1", seed=1, optimizer="rmsprop", lr=0.003)]
    _assert_same(*_both(cfgs, torch.float64, monkeypatch))


def test_vmap_backend_for_identical_cnns(idx_folder, monkeypatch):
    model = {"name": "cnn", "layers": TINY_CNN}
    cfgs = [_cfg(idx_folder, "a", model=model, epochs=1), _cfg(idx_folder, "b", model=model, epochs=1, optimizer="sgd",
                                                                  momentum=0.9, lr=0.05, l1=1e-3)]
    assert not can_stack(cfgs) and can_stack(cfgs, "cuda")  # CNNs stack on a GPU only (slower on a CPU)
    monkeypatch.setattr(plan, "VMAP_ON_CPU", True)  # the GPU path's maths, checked on the CPU
    data = load_dataset(cfgs[0].data)
    assert isinstance(_backend(cfgs, data), VmapStack)
    results = _both(cfgs, torch.float64, monkeypatch)
    assert results[0][0].stacked == 2
    _assert_same(*results)


def _backend(cfgs, data):
    return make_backend([_build(c, data)[0] for c in cfgs])


def test_dropout_members_train_with_their_own_masks(idx_folder, monkeypatch):
    cfgs = [_cfg(idx_folder, "drop", model={**SMALL_MLP, "dropout": 0.5}), _cfg(idx_folder, "plain")]
    data = load_dataset(cfgs[0].data)
    backend = _backend(cfgs, data)
    assert isinstance(backend, WideMLP) and backend.drop_p[0] == [(0, 0.5)]
    x = data.train.images[:8].float()
    out = backend.forward(x, shared=True, training=True)
    assert not torch.allclose(out, backend.forward(x, shared=True, training=True))  # dropout is on in training
    assert torch.equal(backend.forward(x, shared=True, training=False), backend.forward(x, shared=True,
                                                                                       training=False))
    stacked, _, alone, _ = _both(cfgs, torch.float64, monkeypatch)  # the member without dropout is unchanged
    assert stacked[1].history[-1]["val_loss"] == pytest.approx(alone[1].history[-1]["val_loss"], abs=1e-9)
    assert stacked[0].history[-1]["val_accuracy"] > 0.5


def test_different_shapes_fall_back_to_one_by_one(idx_folder):
    cfgs = [_cfg(idx_folder, "narrow"), _cfg(idx_folder, "wide", model={**SMALL_MLP, "hidden": [64, 16]})]
    assert not can_stack(cfgs)
    assert stack_groups([*cfgs, _cfg(idx_folder, "narrow2", optimizer="sgd")]) == [[0, 2], [1]]
    stacked, sm, alone, am = _both(cfgs)
    assert [r.stacked for r in stacked] == [1, 1]  # the same code path alone: exactly equal
    _assert_same(stacked, sm, alone, am, atol=0)


def test_stacked_checkpoints_resume_stacked_and_with_fit(idx_folder, monkeypatch):
    """A stacked epoch's state is a run's checkpoint format: both a stacked and a plain resume continue it
    (in float64, so the plain run's other summation order stays at rounding level on any CPU)."""
    _float64_inputs(monkeypatch)
    cfgs = [_cfg(idx_folder, "a", epochs=3, model={**SMALL_MLP, "batchnorm": True}),
            _cfg(idx_folder, "b", epochs=3, optimizer="rmsprop", lr=0.003, momentum=0.5)]
    data = load_dataset(cfgs[0].data)
    built = [(m.double(), p) for m, p in (_build(c, data) for c in cfgs)]
    pre = built[0][1]
    fresh = [copy.deepcopy(m) for m, _ in built]
    states: dict[int, dict] = {}

    def keep_epoch_2(k, row, state):
        if row["epoch"] == 2:
            states[k] = copy.deepcopy(state)

    full = fit([m for m, _ in built], data, cfgs, pre, CPU, callbacks=[keep_epoch_2])
    resumed_models = [copy.deepcopy(m) for m in fresh]
    resumed = fit(resumed_models, data, cfgs, pre, CPU, resume=[states[0], states[1]])
    (plain,) = fit([copy.deepcopy(fresh[1])], data, [cfgs[1]], pre, CPU, resume=[states[1]])
    for k in (0, 1):
        assert [r["epoch"] for r in resumed[k].history] == [1, 2, 3]
        assert resumed[k].history[-1]["val_loss"] == pytest.approx(full[k].history[-1]["val_loss"], abs=1e-5)
    assert plain.history[-1]["val_loss"] == pytest.approx(full[1].history[-1]["val_loss"], abs=1e-9)


def test_a_diverging_member_fails_alone(idx_folder):
    cfgs = [_cfg(idx_folder, "ok"), _cfg(idx_folder, "bad", optimizer="sgd", lr=1e38)]
    data = load_dataset(cfgs[0].data)
    built = [_build(c, data) for c in cfgs]
    results = fit([m for m, _ in built], data, cfgs, built[0][1], CPU)
    assert "non-finite" in results[1].failed and results[0].failed is None
    assert len(results[0].history) == 2 and results[0].history[-1]["val_accuracy"] > 0.5


def test_small_models_train_on_one_thread_and_cnns_channels_last(idx_folder):
    from classlab.train.speed import DEFAULT_THREADS, cpu_threads_for, is_channels_last

    data = load_dataset(_cfg(idx_folder).data)
    mlp, pre = _build(_cfg(idx_folder), data)
    assert cpu_threads_for(mlp, pre.input_shape, 64) == 1
    big = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 4096), torch.nn.Linear(4096, 4096))
    assert cpu_threads_for(big, (1, 28, 28), 64) == DEFAULT_THREADS
    # study D's MLP alone is small; its 8-cell grid stacked is one model 8 times as wide
    d_mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 256), torch.nn.Linear(256, 128),
                                torch.nn.Linear(128, 64), torch.nn.Linear(64, 10))
    assert cpu_threads_for(d_mlp, (1, 28, 28), 64) == 1
    assert cpu_threads_for(d_mlp, (1, 28, 28), 64, members=8) == DEFAULT_THREADS
    two_convs = [{"conv": {"out": 4, "kernel": 3}}, "relu", {"conv": {"out": 4, "kernel": 3}}, "relu", "flatten"]
    cfg = _cfg(idx_folder, model={"name": "cnn", "layers": two_convs}, epochs=1)
    cnn, pre = _build(cfg, data)
    fit([cnn], data, [cfg], pre, CPU)
    assert is_channels_last(cnn)


def test_stacked_linear_models_without_hidden_layers(idx_folder, monkeypatch):
    """`hidden: []` (softmax regression) stacks too, and matches each run alone."""
    linear = {"name": "mlp", "hidden": []}
    cfgs = [_cfg(idx_folder, "a", model=linear, epochs=1), _cfg(idx_folder, "b", model=linear, epochs=1, lr=0.003)]
    assert can_stack(cfgs)
    stacked, sm, alone, am = _both(cfgs, torch.float64, monkeypatch)
    assert [r.stacked for r in stacked] == [2, 2]
    _assert_same(stacked, sm, alone, am)
