"""The GPU path's logic, tested on the CPU: precision policy, cross-device resume, per-worker devices,
deterministic settings, torch.compile without recompiling, checkpoint frequency, DDP batch warning."""

import os

import pytest
import torch
from rich.console import Console

from classlab.config import RunConfig, validate
from classlab.errors import ClasslabError
from classlab.runs import RunFolder, safe_torch_load
from classlab.train import distributed
from classlab.train.device import amp_dtype, configure_backends, grad_scaler
from tests.conftest import stop_fit_after

QUIET = Console(quiet=True)
CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def _cfg(idx_folder, **train) -> RunConfig:
    t = {"epochs": 3, "batch_size": 50, "optimizer": "adam", "lr": 0.01, **train}  # 192 train images: ragged
    d = {"dataset": "idx", "root": str(idx_folder), "val_fraction": 0.2, "augment": {"hflip": 0.5, "rotate": 10}}
    return validate(RunConfig, {"name": "r", "data": d, "model": {"name": "mlp", "hidden": [16]}, "train": t})


def test_precision_policy_follows_the_compute_capability():
    assert amp_dtype(CUDA, "auto", (9, 0)) == torch.bfloat16  # H100 / H200
    assert amp_dtype(CUDA, "auto", (8, 0)) == torch.bfloat16  # A100
    assert amp_dtype(CUDA, "auto", (7, 5)) == torch.float16  # T4: no bf16 tensor cores
    assert amp_dtype(CUDA, "auto", (6, 0)) == torch.float16  # P100
    assert amp_dtype(CUDA, "fp16", (9, 0)) == torch.float16
    assert amp_dtype(CUDA, "off", (9, 0)) is None
    assert amp_dtype(CPU, "auto") is None and amp_dtype(CPU, "bf16") is None  # the CPU trains in fp32
    with pytest.raises(ClasslabError, match="compute capability 8.0"):
        amp_dtype(CUDA, "bf16", (7, 0))
    assert grad_scaler(torch.bfloat16) is None and grad_scaler(None) is None  # only fp16 scales the loss
    old = validate(RunConfig, {"name": "r", "model": {"name": "mlp"}, "train": {"amp": False}})
    assert old.train.amp == "off" and validate(RunConfig, {"name": "r", "model": {"name": "mlp"},
                                                           "train": {"amp": True}}).train.amp == "auto"


def test_deterministic_settings_are_set_and_undone():
    try:
        configure_backends(CPU, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
        assert not torch.backends.cudnn.benchmark
        configure_backends(CPU, deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def test_each_jobs_worker_gets_its_own_gpu():
    from classlab.launch import worker_env

    base = {"PATH": "/bin"}
    assert [worker_env(i, 1, 2, base)["CUDA_VISIBLE_DEVICES"] for i in range(4)] == ["0", "1", "0", "1"]
    chosen = {**base, "CUDA_VISIBLE_DEVICES": "4,6,7"}
    assert [worker_env(i, 2, 3, chosen)["CUDA_VISIBLE_DEVICES"] for i in range(4)] == ["4", "6", "7", "4"]
    one = worker_env(1, 2, 1, base)
    assert "CUDA_VISIBLE_DEVICES" not in one and one["OMP_NUM_THREADS"] == "2"


def test_small_per_process_batch_warns(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    assert "8 images each" in distributed.batch_warning(32)
    assert distributed.batch_warning(128) is None


def test_resume_of_a_checkpoint_saved_on_another_device_kind(idx_folder, tmp_path, monkeypatch):
    """A run started on a GPU and resumed on the CPU: the augmentation stream (CUDA Philox there, CPU
    MT19937 here) cannot continue, so it is reseeded from the seed and epoch, with a note in run.log."""
    from classlab.study import train_run

    cfg = _cfg(idx_folder)
    folder = RunFolder(tmp_path / "r")
    with monkeypatch.context() as m:
        stop_fit_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            train_run(cfg, folder, CPU, QUIET)
    state = safe_torch_load(folder.last_path)
    state["rng"].update(augment_device="cuda", augment=torch.zeros(16, dtype=torch.uint8))  # a Philox state
    torch.save(state, folder.last_path)
    summary = train_run(cfg, folder, CPU, QUIET)
    assert summary["epochs_run"] == 3
    log = "\n".join(folder.read_run_log())
    assert "augmentation stream was saved on cuda: reseeded from the seed and epoch" in log
    # a checkpoint from before the device was recorded: told apart by the state's size
    from classlab.train.checkpoint import rng_state, set_rng_state

    old = rng_state(torch.Generator(), torch.Generator())
    del old["augment_device"]
    old["augment"] = torch.zeros(16, dtype=torch.uint8)
    assert set_rng_state(old, torch.Generator(), torch.Generator()) is False


def test_compiled_model_does_not_recompile_every_epoch(idx_folder, tmp_path, monkeypatch):
    """torch.compile with static shapes: the full batch and the ragged last one compile once each."""
    from torch._dynamo.utils import counters

    from classlab.study import train_run
    from classlab.train import members

    monkeypatch.setattr(members, "COMPILE_BACKEND", "eager")  # dynamo's graph capture without a C++ build
    torch._dynamo.reset()
    counters.clear()
    summary = train_run(_cfg(idx_folder, compile=True, epochs=3), RunFolder(tmp_path / "r"), CPU, QUIET)
    assert summary["epochs_run"] == 3
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


def test_checkpoint_every_n_epochs_and_at_the_end(idx_folder, tmp_path, monkeypatch):
    from classlab.study import train_run

    saved: list[int] = []
    real = RunFolder.save_epoch
    monkeypatch.setattr(RunFolder, "save_epoch", lambda self, state, best: (saved.append(state["epoch"]),
                                                                             real(self, state, best)))
    train_run(_cfg(idx_folder, epochs=5, checkpoint_every=2), RunFolder(tmp_path / "r"), CPU, QUIET)
    assert saved == [2, 4, 5]
    assert safe_torch_load(tmp_path / "r" / "checkpoints" / "best.pt")["epoch"] >= 1


def test_hue_jitter_builds_its_matrices_once(monkeypatch):
    from classlab.config import ColorJitter
    from classlab.transforms import color_jitter

    x = torch.rand(4, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    color_jitter(x, ColorJitter(hue=0.1), gen)  # the first call may build this device's matrices

    def no_inverse(*args, **kwargs):
        raise AssertionError("inverted again: a host sync per batch on a GPU")

    monkeypatch.setattr(torch.linalg, "inv", no_inverse)
    out = color_jitter(x, ColorJitter(hue=0.1), gen)
    assert out.shape == x.shape and not torch.equal(out, x)
