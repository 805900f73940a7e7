"""The GPU path on a real GPU (skipped without one; benchmarks/gpu_check.py runs these first)."""

import pytest
import torch
from rich.console import Console

from classlab.config import RunConfig, validate
from classlab.runs import RunFolder, safe_torch_load
from tests.conftest import TINY_CNN, stop_fit_after

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
QUIET = Console(quiet=True)
CUDA = torch.device("cuda")


def _cfg(idx_folder, model=None, **train) -> RunConfig:
    t = {"epochs": 2, "batch_size": 50, "optimizer": "adam", "lr": 0.01, "device": "cuda", **train}
    d = {"dataset": "idx", "root": str(idx_folder), "val_fraction": 0.2, "augment": {"hflip": 0.5, "rotate": 10}}
    return validate(RunConfig, {"name": "r", "data": d, "model": model or {"name": "cnn", "layers": TINY_CNN},
                                "train": t})


@pytest.mark.parametrize("amp", ["auto", "fp16", "off"])
def test_trains_on_the_gpu_with_each_precision(idx_folder, tmp_path, amp):
    from classlab.study import train_run

    summary = train_run(_cfg(idx_folder, amp=amp), RunFolder(tmp_path / "r"), CUDA, QUIET)
    assert summary["device"].startswith("cuda") and summary["test"]["accuracy"] > 0.5
    state = safe_torch_load(tmp_path / "r" / "checkpoints" / "last.pt")
    assert ("scaler" in state) == (amp == "fp16" or (amp == "auto" and torch.cuda.get_device_capability() < (8, 0)))


def test_started_on_the_gpu_resumed_on_the_cpu(idx_folder, tmp_path, monkeypatch):
    from classlab.study import train_run

    cfg = _cfg(idx_folder, epochs=3)
    folder = RunFolder(tmp_path / "r")
    with monkeypatch.context() as m:
        stop_fit_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            train_run(cfg, folder, CUDA, QUIET)
    summary = train_run(cfg, folder, torch.device("cpu"), QUIET)
    assert summary["epochs_run"] == 3 and "reseeded" in "\n".join(folder.read_run_log())


def test_stacked_cnns_match_one_by_one_on_the_gpu(idx_folder):
    from classlab.data import load_dataset
    from classlab.models import build_model
    from classlab.plan import can_stack
    from classlab.train.fit import fit
    from classlab.transforms import preprocess_for

    cfgs = [_cfg(idx_folder, amp="off").model_copy(update={"name": n, "seed": s}) for n, s in (("a", 0), ("b", 1))]
    assert can_stack(cfgs, "cuda")
    data = load_dataset(cfgs[0].data)
    pre = preprocess_for(cfgs[0], data)

    def models():
        out = []
        for c in cfgs:
            torch.manual_seed(c.seed)
            out.append(build_model(c.model, len(data.classes), pre.input_shape).to(CUDA))
        return out

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        stacked = fit(models(), data, cfgs, pre, CUDA)
        alone = [fit([m], data, [c], pre, CUDA)[0] for m, c in zip(models(), cfgs, strict=True)]
    finally:
        torch.backends.cudnn.allow_tf32 = True
    assert [r.stacked for r in stacked] == [2, 2]
    for s, a in zip(stacked, alone, strict=True):
        assert s.history[-1]["val_loss"] == pytest.approx(a.history[-1]["val_loss"], abs=2e-2)


def test_compiled_and_deterministic_runs_repeat(idx_folder, tmp_path):
    from classlab.study import train_run

    cfg = _cfg(idx_folder, compile=True, deterministic=True)
    a = train_run(cfg, RunFolder(tmp_path / "a"), CUDA, QUIET)
    b = train_run(cfg, RunFolder(tmp_path / "b"), CUDA, QUIET)
    assert a["test"] == b["test"]
