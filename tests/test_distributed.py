"""Data-parallel training on the real command: `classlab run --nproc 2` (torchrun, 2 CPU processes, gloo)
against a one-process run with the same global batch size; only rank 0 may write; a DDP run killed
mid-training resumes (taking over its dead lock) and ends exactly where the uninterrupted one did.

Every rank's file-system writes are recorded by a Python audit hook (a sitecustomize.py put on the
subprocesses' PYTHONPATH), so a stray write by rank 1 (even one later overwritten by rank 0) fails.
All four `classlab run`s start together; the module costs about as long as its slowest run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from classlab.runs import LOCK_NAME, safe_torch_load
from classlab.train.fit import _shard
from classlab.train.members import member_losses
from tests.conftest import CliRun, kill_tree, make_idx_folder, start_cli_run, tiny_study, write_study

EPOCHS = 4
BATCH = 37  # 2 processes: 19 + 18 per step, and the last batch of the epoch splits unevenly too
TIMEOUT = 300
ROW_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "best")

# Records every write-like file-system call under $WATCH_WRITES into $RECORD_WRITES/<rank>.txt.
AUDIT_HOOK = '''
import os, sys
_watch, _record = os.environ.get("WATCH_WRITES"), os.environ.get("RECORD_WRITES")
if _watch and _record:
    _me = "rank" + os.environ["RANK"] if "RANK" in os.environ else "launcher-" + str(os.getpid())
    _busy = []
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.link", "os.symlink",
               "os.truncate", "os.utime")

    def _hook(event, args):
        if _busy or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        if event == "open":
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE)
        else:
            writes = event in _EVENTS
        paths = [os.fsdecode(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]  # rename: both
        if writes and any(os.path.abspath(p).startswith(_watch) for p in paths):
            _busy.append(1)
            try:
                with open(os.path.join(_record, _me + ".txt"), "a") as f:
                    f.write(f"{event} {' '.join(paths)}\\n")
            finally:
                _busy.clear()

    sys.addaudithook(_hook)
'''


def _epochs_saved(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()] if path.is_file() else []


def _rows(run: Path) -> list[dict]:
    return [{k: r[k] for k in ROW_KEYS} for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@dataclass
class Runs:
    single: CliRun
    ddp: CliRun
    resumed: CliRun
    records: Path
    killed_at_epoch: int
    killed_complete: bool


def _kill_after_epoch_1(proc: CliRun) -> tuple[int, bool]:
    """SIGKILL torchrun and its workers as soon as epoch 1 is saved; returns (epoch in last.pt, complete)."""
    deadline = time.monotonic() + TIMEOUT
    while 1 not in _epochs_saved(proc.run):
        if proc.popen.poll() is not None:
            pytest.fail(f"the DDP run ended (exit {proc.popen.returncode}) before epoch 1 was saved:\n"
                        + proc.output())
        if time.monotonic() > deadline:
            pytest.fail("epoch 1 took too long")
        time.sleep(0.01)
    kill_tree(proc.popen)
    time.sleep(0.2)  # the orphaned workers are gone (and reaped, or zombies, which count as dead)
    return int(safe_torch_load(proc.run / "checkpoints" / "last.pt")["epoch"]), (proc.run / "summary.json").exists()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    tmp = tmp_path_factory.mktemp("ddp")
    data = make_idx_folder(tmp / "data", n_train=1500, n_test=200)
    study = tiny_study(tmp, data)  # no dropout, no BatchNorm: DDP must equal one process up to rounding
    study["train"].update({"epochs": EPOCHS, "batch_size": BATCH, "threads": 1, "optimizer": "sgd", "lr": 0.01,
                           "momentum": 0.9})
    path = write_study(tmp / "study.yaml", study)
    hook, records = tmp / "hook", tmp / "writes"
    hook.mkdir()
    records.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT_HOOK)
    env = {**os.environ, "CLASSLAB_OFFLINE": "1", "CLASSLAB_DATA": str(tmp / "no-data"), "COLUMNS": "200",
           "TORCH_HOME": str(tmp / "torch-home"), "OMP_NUM_THREADS": "1"}
    watched = {**env, "PYTHONPATH": os.pathsep.join([str(hook), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "WATCH_WRITES": str(tmp / "ddp"), "RECORD_WRITES": str(records)}
    procs = [start_cli_run(path, tmp / "single", env, "run"),
             start_cli_run(path, tmp / "ddp", watched, "run", "--nproc", "2"),
             start_cli_run(path, tmp / "killed", env, "first", "--nproc", "2")]
    try:
        epoch, complete = _kill_after_epoch_1(procs[2])
        procs.append(start_cli_run(path, tmp / "killed", env, "again", "--nproc", "2"))
        yield Runs(procs[0], procs[1], procs[3], records, epoch, complete)
    finally:
        for proc in procs:  # torchrun's workers live in sessions of their own: kill them by ancestry first
            if proc.popen.poll() is None:
                kill_tree(proc.popen)


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(runs: Runs) -> None:
    assert runs.single.wait() == 0, runs.single.output()
    assert runs.ddp.wait() == 0, runs.ddp.output()
    assert "2 processes × cpu" in runs.ddp.output()
    ddp, one = _rows(runs.ddp.run), _rows(runs.single.run)
    assert len(ddp) == len(one) == EPOCHS
    for a, b in zip(ddp, one, strict=True):
        for key in ("train_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (a["epoch"], key)
        for key in ("train_accuracy", "val_accuracy"):  # at most one image may land the other way
            assert abs(a[key] - b[key]) <= 1.5 / 300, (a["epoch"], key)
        assert a["epoch"] == b["epoch"] and a["lr"] == b["lr"]
    got, want = (json.loads((p.run / "summary.json").read_text()) for p in (runs.ddp, runs.single))
    assert got["test"]["loss"] == pytest.approx(want["test"]["loss"], rel=1e-4, abs=1e-7)
    assert abs(got["test"]["accuracy"] - want["test"]["accuracy"]) <= 1.5 / 200
    assert got["data"]["train"] == want["data"]["train"] and got["epochs_run"] == EPOCHS
    assert "trained by 2 processes (torch.distributed, gloo)" in (runs.ddp.run / "run.log").read_text()
    assert (runs.ddp.run.parent / "report.html").is_file()


def test_only_rank_0_wrote_anything(runs: Runs) -> None:
    assert runs.ddp.wait() == 0, runs.ddp.output()
    written = {p.stem: p.read_text().splitlines() for p in runs.records.glob("*.txt")}
    assert set(written) == {"rank0"}, {k: v[:5] for k, v in written.items()}  # no rank 1, no launcher
    paths = [p for line in written["rank0"] for p in line.split()[1:]]
    assert any(p.endswith("summary.json") for p in paths) and any(p.endswith("report.html") for p in paths)
    assert not list(runs.ddp.run.rglob("*.tmp")) and not (runs.ddp.run / LOCK_NAME).exists()


def test_a_killed_ddp_run_resumes_and_ends_where_the_uninterrupted_one_did(runs: Runs) -> None:
    assert 1 <= runs.killed_at_epoch < EPOCHS and not runs.killed_complete
    assert runs.resumed.wait() == 0, runs.resumed.output()
    assert f"resuming after epoch {runs.killed_at_epoch}" in runs.resumed.output()  # the dead lock was taken over
    assert runs.ddp.wait() == 0, runs.ddp.output()
    assert _rows(runs.resumed.run) == _rows(runs.ddp.run)
    got, want = (json.loads((p.run / "summary.json").read_text()) for p in (runs.resumed, runs.ddp))
    assert got["test"] == want["test"]
    with np.load(runs.resumed.run / "predictions.npz") as a, np.load(runs.ddp.run / "predictions.npz") as b:
        assert np.array_equal(a["probs"], b["probs"])
    last = safe_torch_load(runs.resumed.run / "checkpoints" / "last.pt")
    assert len(last["rng"]["ranks"]) == 2  # each rank's own RNG streams, for an exact resume
    assert last["model"].keys() == safe_torch_load(runs.single.run / "checkpoints" / "last.pt")["model"].keys()


@pytest.mark.parametrize("size", [37, 36, 5])
def test_shard_losses_average_to_the_whole_batch_gradient(size: int) -> None:
    """What DDP computes (each rank's scaled loss, gradients averaged over ranks) is the gradient of
    the global batch's mean loss, also when the batch splits unevenly."""
    from classlab.config import TrainConfig

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    x, y = torch.randn(size, 6), torch.randint(0, 3, (size,))
    tc = TrainConfig()
    whole, _, _ = member_losses(model(x).unsqueeze(0), y, tc, size, 1)
    want = torch.autograd.grad(whole, list(model.parameters()))
    world = 2
    grads = []
    for rank in range(world):
        idx = _shard(torch.arange(size), rank, world)
        loss, _, _ = member_losses(model(x[idx]).unsqueeze(0), y[idx], tc, size, world)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for i, w in enumerate(want):
        assert torch.allclose(sum(g[i] for g in grads) / world, w, atol=1e-6)
    assert sorted(torch.cat([_shard(torch.arange(size), r, world) for r in range(world)]).tolist()) == list(range(size))


def test_nproc_checks_the_study_before_starting_torchrun(tmp_path: Path, run_cli) -> None:
    study = tmp_path / "study.yaml"
    study.write_text("model: {name: mlp}\ntrain: {epochs: 0}\n")
    code, _, err = run_cli("run", str(study), "--nproc", "2")
    assert code == 2 and err.count("\n") == 1 and "train.epochs" in err and "torch.distributed.run" not in err
    code, _, err = run_cli("run", str(study), "--nproc", "0")
    assert code == 2 and "--nproc 0" in err
