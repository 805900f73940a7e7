"""`classlab run --jobs N` (local workers of the study's Optuna queue, classlab.launch) and the run locks
beneath the queue that keep two processes from ever training the same run."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from classlab.plan import expand
from classlab.runs import LOCK_NAME, RunFolder, RunLock, RunLocked, read_lock
from classlab.study import run_study
from tests.conftest import make_idx_folder, tiny_study, write_study

TIMEOUT = 300


def _four_run_study(tmp_path: Path, epochs: int = 1) -> Path:
    """2 variants × 2 seeds = 4 runs, each a second or two on one CPU thread."""
    data = make_idx_folder(tmp_path / "data", n_train=120, n_test=40)
    study = tiny_study(tmp_path, data, runs=[{"name": "adam"}, {"name": "sgd", "train": {"optimizer": "sgd"}}],
                       seeds=[0, 1])
    study["train"].update({"epochs": epochs, "threads": 1})
    return write_study(tmp_path / "study.yaml", study)


def _planned_names(path: Path) -> list[str]:
    from classlab.config import load_study

    study = load_study(path)
    return [p.config.name for p in expand(study)]


def _write_lock(run_dir: Path, host: str, pid: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps({"host": host, "pid": pid, "started": "earlier", "token": "x"}))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ----------------------------------------------------------------------------- workers


def _trained(output: str) -> list[str]:
    """The runs a process trained: its `run i/k: NAME` lines, less any it skipped."""
    names = re.findall(r"^run \d+/\d+: (\S+)$", output, flags=re.M)
    return [n for n in names if f"{n}: skipped" not in output and f"{n}: already complete" not in output]


# ----------------------------------------------------------------------------- locks


def test_a_lock_is_created_atomically_with_its_owner_and_released(tmp_path: Path) -> None:
    lock = RunLock.acquire(tmp_path / "run")
    owner = read_lock(tmp_path / "run" / LOCK_NAME)
    assert owner == lock.owner and owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):  # a live process's lock is respected
        RunLock.acquire(tmp_path / "run", steal=True)
    lock.release()
    assert read_lock(tmp_path / "run" / LOCK_NAME) is None


def test_a_dead_process_lock_on_this_machine_is_taken_over(tmp_path: Path) -> None:
    _write_lock(tmp_path / "run", socket.gethostname(), _dead_pid())
    lock = RunLock.acquire(tmp_path / "run")
    assert read_lock(lock.path)["pid"] == os.getpid()
    assert [p.name for p in (tmp_path / "run").iterdir()] == [LOCK_NAME]  # nothing moved aside is left


def test_a_zombie_counts_as_dead(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    stat = Path(f"/proc/{child.pid}/stat")
    while stat.is_file() and stat.read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    try:
        _write_lock(tmp_path / "run", socket.gethostname(), child.pid)
        RunLock.acquire(tmp_path / "run").release()
    finally:
        child.wait()


def test_another_machines_lock_is_respected_unless_the_queue_hands_the_run_over(tmp_path: Path) -> None:
    """`steal` is set only for a trial Optuna's heartbeat saw the old worker of die (search.py)."""
    _write_lock(tmp_path / "run", "some-other-host", 12345)
    with pytest.raises(RunLocked, match="pid 12345 on some-other-host.*remove the lock file"):
        RunLock.acquire(tmp_path / "run")
    lock = RunLock.acquire(tmp_path / "run", steal=True)
    assert read_lock(lock.path)["host"] == socket.gethostname()


def test_release_never_removes_a_lock_someone_else_took_over(tmp_path: Path) -> None:
    lock = RunLock.acquire(tmp_path / "run")
    _write_lock(tmp_path / "run", "some-other-host", 1)
    lock.release()
    assert read_lock(lock.path)["host"] == "some-other-host"


def test_restart_keeps_the_lock_while_clearing_the_run(tmp_path: Path) -> None:
    lock = RunLock.acquire(tmp_path / "run")
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    RunFolder(tmp_path / "run").prepare(restart=True)
    assert [p.name for p in (tmp_path / "run").iterdir()] == [LOCK_NAME]
    lock.release()


def test_a_plain_run_skips_a_run_another_live_process_is_training(tmp_path: Path, run_cli) -> None:
    path = _four_run_study(tmp_path)
    names = _planned_names(path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _write_lock(tmp_path / "runs" / "toy" / names[1], socket.gethostname(), other.pid)
        code, out, err = run_cli("run", str(path), "--device", "cpu")
        assert code == 0, err
        assert f"{names[1]}: skipped, being trained by pid {other.pid}" in " ".join(out.split())
        assert "when they are done: classlab report" in " ".join(out.split())
        folder = tmp_path / "runs" / "toy"
        assert [n for n in names if RunFolder(folder / n).is_complete] == [n for n in names if n != names[1]]
        assert read_lock(folder / names[1] / LOCK_NAME)["pid"] == other.pid  # untouched
        result = run_study(path, device="cpu")  # the other process is still "training": same again
        assert result.busy == [names[1]] and result.waiting == [names[1]]
    finally:
        other.kill()
        other.wait()


# ----------------------------------------------------------------------------- --jobs


def test_jobs_trains_the_study_in_worker_processes_then_finishes_it_once(tmp_path: Path, run_cli) -> None:
    """`classlab run --jobs 2`: two worker processes (one thread each) pop the runs from the study's Optuna
    queue (search.db), each run trained once; a run that diverges fails in its worker and is not retried, and
    the parent alone prints the table and the report."""
    data = make_idx_folder(tmp_path / "data", n_train=120, n_test=40)
    study = tiny_study(tmp_path, data, seeds=[0, 1], runs=[
        {"name": "adam"}, {"name": "sgd", "train": {"optimizer": "sgd"}},
        {"name": "diverge", "train": {"optimizer": "sgd", "lr": 1e38}}])
    study["train"]["epochs"] = 1
    path = write_study(tmp_path / "study.yaml", study)
    names = _planned_names(path)
    env = {**os.environ, "COLUMNS": "200", "CLASSLAB_OFFLINE": "1", "CLASSLAB_DATA": str(tmp_path / "no-data")}
    done = subprocess.run([sys.executable, "-m", "classlab.cli", "run", str(path), "--device", "cpu", "--jobs", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out  # the diverging runs failed; the others finished
    assert "2 worker processes, 1 thread(s) each" in out
    workers, final = out.split(f"toy: {len(names)} run(s)")  # the parent's final pass starts with this line
    assert sorted(_trained(workers)) == sorted(names)  # every run trained once, by one worker
    assert (folder_of(tmp_path) / "search.db").is_file()
    assert not _trained(final) and "diverge" not in final.split("study finished")[0]  # nothing trained again
    folder = tmp_path / "runs" / "toy"
    failed = [n for n in names if n.startswith("diverge")]
    assert all(RunFolder(folder / n).failed_path.is_file() for n in failed)
    assert all(RunFolder(folder / n).is_complete for n in names if n not in failed)
    assert out.count("toy: test set") == 1 and (folder / "report.md").is_file()  # the parent's, once
    assert f"{len(failed)} run(s) failed" in out and not list(folder.rglob(LOCK_NAME + "*"))


def folder_of(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "toy"


def test_jobs_with_nproc_or_ray_is_one_line_exit_2(tmp_path: Path, run_cli) -> None:
    path = _four_run_study(tmp_path)
    for args in (["--jobs", "2", "--nproc", "2"], ["--jobs", "0"], ["--jobs", "2", "--ray", "local"]):
        code, _, err = run_cli("run", str(path), *args)
        assert code == 2 and err.count("\n") == 1 and "--jobs" in err, err


def test_jobs_selects_and_retrains_once_and_restart_redoes_everything(tmp_path: Path) -> None:
    data = make_idx_folder(tmp_path / "data", n_train=120, n_test=40)
    study = tiny_study(tmp_path, data, runs=[{"name": "adam"}, {"name": "sgd", "train": {"optimizer": "sgd"}}],
                       select={"metric": "val_accuracy"}, retrain_on="train+val")
    study["train"]["epochs"] = 1
    path = write_study(tmp_path / "study.yaml", study)
    env = {**os.environ, "COLUMNS": "200", "CLASSLAB_OFFLINE": "1", "CLASSLAB_DATA": str(tmp_path / "no-data")}
    cmd = [sys.executable, "-m", "classlab.cli", "run", str(path), "--device", "cpu", "--jobs", "2"]

    def run(*extra: str) -> str:
        done = subprocess.run([*cmd, *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    out = run()
    folder = tmp_path / "runs" / "toy"
    retrained = [p for p in folder.iterdir() if p.name.startswith("retrain-")]
    assert len(retrained) == 1 and out.count("selected ") == 1 and RunFolder(retrained[0]).is_complete
    stamps = {p.name: (p / "summary.json").stat().st_mtime_ns for p in folder.iterdir() if p.is_dir()
              and (p / "summary.json").is_file()}
    assert len(stamps) == 3
    run()  # nothing to do: every run is reused
    assert stamps == {n: (folder / n / "summary.json").stat().st_mtime_ns for n in stamps}
    run("--restart")  # every run again, the retrain run included
    assert all((folder / n / "summary.json").stat().st_mtime_ns != t for n, t in stamps.items())


def test_ctrl_c_under_jobs_stops_every_worker_and_the_same_command_resumes(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole foreground process group: the workers save and exit, the parent alone
    prints the one-line resume command (with --jobs), and that command finishes the study."""
    import signal

    data = make_idx_folder(tmp_path / "data", n_train=8000, n_test=200)
    study = tiny_study(tmp_path, data, runs=[{"name": "adam"}, {"name": "sgd", "train": {"optimizer": "sgd"}}])
    study["train"]["epochs"] = 8  # Ctrl-C comes after epoch 1: ample margin on a fast machine
    path = write_study(tmp_path / "study.yaml", study)
    env = {**os.environ, "COLUMNS": "200", "CLASSLAB_OFFLINE": "1", "CLASSLAB_DATA": str(tmp_path / "no-data")}
    cmd = [sys.executable, "-m", "classlab.cli", "run", str(path), "--device", "cpu", "--jobs", "2"]
    err_path = tmp_path / "first.stderr"
    with err_path.open("wb") as err:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True,  # its own process group, as a terminal's job
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    folder = tmp_path / "runs" / "toy"
    try:
        deadline = time.monotonic() + TIMEOUT
        while not all((folder / n / "metrics.jsonl").is_file() for n in ("adam", "sgd")):
            assert proc.poll() is None, err_path.read_text()
            assert time.monotonic() < deadline, "epoch 1 took too long"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [line for line in err_path.read_text().splitlines() if line.strip()]
    assert code == 130 and len(lines) == 1, lines
    assert lines[0].startswith("interrupted: every finished epoch is saved") and "--jobs=2" in lines[0]
    assert not any(RunFolder(folder / n).is_complete for n in ("adam", "sgd"))
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming after epoch" in again.stdout
    assert all(RunFolder(folder / n).is_complete for n in ("adam", "sgd"))
