"""Fault tests on the real command: `classlab run` in a subprocess, killed with SIGKILL during epoch 2 (or
interrupted with SIGINT, as Ctrl-C does), then run again. The resumed run's final summary, metrics and
test probabilities must equal those of an uninterrupted run exactly (CPU, one thread).

The uninterrupted run and both interrupted ones start together, and both re-runs start as soon as their
interruption is recorded, so the module costs about as long as two runs one after the other.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from classlab.runs import safe_torch_load
from tests.conftest import CliRun, make_idx_folder, start_cli_run, tiny_study, write_study

EPOCHS = 3
TIMEOUT = 300


def _epochs_in_metrics(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()] if path.is_file() else []


@dataclass
class Interruption:
    """What an interrupted run left behind, recorded before it is run again."""

    code: int
    stderr: str
    last_epoch: int
    metric_epochs: list[int]
    complete: bool
    temp_files: list[str]
    rerun: CliRun | None = field(default=None, repr=False)


def _interrupt_in_epoch_2(victims: dict[signal.Signals, CliRun]) -> dict[signal.Signals, Interruption]:
    """Poll until each run has saved epoch 1 (metrics.jsonl is written after last.pt), then signal it."""
    pending = dict(victims)
    deadline = time.monotonic() + TIMEOUT
    while pending:
        for sig, proc in list(pending.items()):
            if proc.popen.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.popen.returncode}) before epoch 1 was saved:\n"
                            + proc.output())
            if 1 in _epochs_in_metrics(proc.run):
                time.sleep(0.1)  # well inside epoch 2 (an epoch takes about a second)
                proc.popen.send_signal(sig)
                del pending[sig]
        if time.monotonic() > deadline:
            pytest.fail("epoch 1 took too long")
        time.sleep(0.02)
    out = {}
    for sig, proc in victims.items():
        code = proc.wait()
        out[sig] = Interruption(
            code=code, stderr=proc.stderr.read_text(),
            last_epoch=int(safe_torch_load(proc.run / "checkpoints" / "last.pt")["epoch"]),
            metric_epochs=_epochs_in_metrics(proc.run), complete=(proc.run / "summary.json").exists(),
            temp_files=[str(p) for p in proc.run.rglob("*.tmp")])
    return out


@dataclass
class Faults:
    study: Path
    reference: CliRun
    killed: Interruption
    interrupted: Interruption
    terminated: Interruption  # SIGTERM (a scheduler's stop): as Ctrl-C; not run again (SIGINT's rerun covers it)


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    tmp = tmp_path_factory.mktemp("fault")
    data = make_idx_folder(tmp / "data", n_train=8000, n_test=400)
    study = tiny_study(tmp, data)
    study["data"]["augment"] = {"rotate": 10}  # the augmentation RNG must resume too (hflip would merge classes)
    study["train"].update({"epochs": EPOCHS, "threads": 1, "optimizer": "sgd", "lr": 0.002, "momentum": 0.9,
                           "scheduler": {"name": "step", "step_size": 1, "gamma": 0.5},
                           "early_stopping": {"patience": 5}})
    path = write_study(tmp / "study.yaml", study)
    env = {**os.environ, "CLASSLAB_OFFLINE": "1", "CLASSLAB_DATA": str(tmp / "no-data"),
           "TORCH_HOME": str(tmp / "torch-home"), "COLUMNS": "200"}
    reference = start_cli_run(path, tmp / "reference", env, "first")
    victims = {signal.SIGKILL: start_cli_run(path, tmp / "killed", env, "first"),
               signal.SIGINT: start_cli_run(path, tmp / "interrupted", env, "first"),
               signal.SIGTERM: start_cli_run(path, tmp / "terminated", env, "first")}
    procs = [reference, *victims.values()]
    try:
        done = _interrupt_in_epoch_2(victims)
        for sig in (signal.SIGKILL, signal.SIGINT):
            done[sig].rerun = start_cli_run(path, victims[sig].out_dir, env, "again")
            procs.append(done[sig].rerun)
        yield Faults(path, reference, done[signal.SIGKILL], done[signal.SIGINT], done[signal.SIGTERM])
    finally:
        for proc in procs:
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait()


def _assert_saved_epoch_1_only(state: Interruption) -> None:
    """Epoch 1 saved, epoch 2 not; nothing marks the run complete."""
    assert state.last_epoch == 1 and state.metric_epochs == [1]
    assert not state.complete


def _assert_resumed_and_equal(state: Interruption, reference: CliRun) -> None:
    assert state.rerun is not None
    assert state.rerun.wait() == 0, state.rerun.output()
    assert "resuming after epoch 1" in state.rerun.stdout.read_text()
    assert reference.wait() == 0, reference.output()
    run, ref = state.rerun.run, reference.run
    got, want = (json.loads((p / "summary.json").read_text()) for p in (run, ref))
    assert got["test"] == want["test"]  # loss, accuracy, confusion matrix, per-class P/R/F1, macro/weighted
    for key in ("best_epoch", "epochs_run", "stopped_early", "final_train", "best_val", "parameters"):
        assert got[key] == want[key], key
    assert got["epochs_run"] == EPOCHS
    keys = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "best")
    rows = [[{k: r[k] for k in keys} for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())]
            for p in (run, ref)]
    assert rows[0] == rows[1]
    with np.load(run / "predictions.npz") as a, np.load(ref / "predictions.npz") as b:
        assert np.array_equal(a["probs"], b["probs"]) and np.array_equal(a["y_pred"], b["y_pred"])
    assert not list(run.rglob("*.tmp"))  # a temp file the kill cut short is cleaned up on resume


def test_sigkill_during_epoch_2_then_resume_equals_uninterrupted(faults: Faults) -> None:
    state = faults.killed
    assert state.code == -signal.SIGKILL
    _assert_saved_epoch_1_only(state)
    _assert_resumed_and_equal(state, faults.reference)


def test_ctrl_c_saves_says_how_to_resume_and_exits_130(faults: Faults) -> None:
    state = faults.interrupted
    assert state.code == 130, state.stderr
    assert "Traceback" not in state.stderr
    lines = [line for line in state.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted: every finished epoch is saved"), state.stderr
    out_dir = state.rerun.out_dir if state.rerun else "?"
    assert f"resume with: classlab run {faults.study} -o out_dir={out_dir} --device=cpu" in lines[0]
    _assert_saved_epoch_1_only(state)
    assert not state.temp_files
    _assert_resumed_and_equal(state, faults.reference)


def test_sigterm_is_treated_like_ctrl_c(faults: Faults) -> None:
    """SIGTERM (kill, a scheduler's stop): every finished epoch saved, one line with the resume command, 130."""
    state = faults.terminated
    assert state.code == 130, state.stderr
    assert "Traceback" not in state.stderr
    lines = [line for line in state.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted: every finished epoch is saved"), state.stderr
    assert f"resume with: classlab run {faults.study} -o out_dir=" in lines[0]
    _assert_saved_epoch_1_only(state)
    assert not state.temp_files


def test_rng_state_round_trips_through_a_weights_only_checkpoint() -> None:
    """Every RNG a run draws from (torch, numpy, python incl. its cached gauss, data order, augmentation)."""
    import io
    import random

    import torch

    from classlab.train.checkpoint import rng_state, set_rng_state

    def draw(order: torch.Generator, aug: torch.Generator) -> list[float]:
        return [float(torch.rand(1)), float(np.random.rand()), random.random(), random.gauss(0, 1),
                float(torch.randperm(10, generator=order)[0]), float(torch.rand(1, generator=aug))]

    random.seed(1)
    np.random.seed(1)
    random.gauss(0, 1)  # leaves a cached second value in python's state
    order, aug = torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)
    buffer = io.BytesIO()
    torch.save(rng_state(order, aug), buffer)
    expected = draw(order, aug)
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True), order, aug)
    assert draw(order, aug) == expected
