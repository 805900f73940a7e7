"""Tiny, deterministic data built on the fly, and helpers to run the CLI in-process."""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from classlab.data import clear_cache
from classlab.data.idx import write_idx

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


def synthetic_images(n: int, num_classes: int = 4, size: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable toy images: class c is a bright block in its own quadrant-ish spot, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, size, size), dtype=np.int64)
    block = size // 3
    for i, c in enumerate(labels):
        r = (c // 2) * (size - block - 2) + 1 if num_classes > 2 else 1
        col = (c % 2) * (size - block - 2) + 1
        images[i, r : r + block, col : col + block] += 180
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def make_idx_folder(folder: Path, n_train: int = 240, n_test: int = 80, num_classes: int = 4,
                    size: int = 28, gzip: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    x, y = synthetic_images(n_train, num_classes, size, seed=0)
    xt, yt = synthetic_images(n_test, num_classes, size, seed=1)
    suffix = ".gz" if gzip else ""
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", x, compress=gzip)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", y, compress=gzip)
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", xt, compress=gzip)
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", yt, compress=gzip)
    return folder


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch, tmp_path):
    """Every test decodes its own data and never touches the user's data folders or the network."""
    clear_cache()
    monkeypatch.setenv("CLASSLAB_DATA", str(tmp_path / "classlab-data"))
    monkeypatch.setenv("CLASSLAB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    yield
    clear_cache()


@pytest.fixture
def idx_folder(tmp_path: Path) -> Path:
    return make_idx_folder(tmp_path / "toy")


TINY_CNN = [{"conv": {"out": 4, "kernel": 3}}, "relu", {"maxpool": 2}, "flatten", {"linear": 16}, "relu"]


def tiny_study(tmp_path: Path, data_root: Path, **sections) -> dict:
    """A small but real study dict: toy IDX data, a 2-conv CNN, 2 epochs."""
    study = {
        "name": "toy",
        "out_dir": str(tmp_path / "runs"),
        "seeds": [0],
        "data": {"dataset": "idx", "root": str(data_root), "val_fraction": 0.2},
        "model": {"name": "cnn", "layers": copy.deepcopy(TINY_CNN)},
        "train": {"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 0.01},
    }
    for key, value in sections.items():
        study[key] = value
    return study


def write_study(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def demo_study_copy(root: Path) -> Path:
    """The bundled demo study as root/demo.yaml, its runs going to root/runs (study folder root/runs/demo)."""
    from classlab.cli import demo_study

    study = yaml.safe_load(demo_study().read_text())
    study["out_dir"] = str(root / "runs")
    return write_study(root / "demo.yaml", study)


@pytest.fixture
def run_cli(capsys):
    """Run `classlab ARGS` in-process; returns (exit_code, stdout, stderr)."""
    from classlab.cli import main

    def _run(*args: str) -> tuple[int, str, str]:
        argv0 = sys.argv
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.argv = argv0
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


# ----------------------------------------------------------------------------- `classlab run` in a subprocess

TINY_RUN = Path("toy") / "base"  # tiny_study's run folder below out_dir: <out_dir>/<study>/<run>
PROCESS_TIMEOUT = 300


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill_tree(popen: subprocess.Popen) -> None:
    """SIGKILL a process and everything below it (by ancestry first, then its group when it leads one)."""
    for pid in [*descendants(popen.pid), popen.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(popen.pid) == popen.pid:
            os.killpg(popen.pid, signal.SIGKILL)
    popen.wait()


@dataclass
class CliRun:
    """One `classlab run` in a subprocess, its output in files (a full pipe can never stall it)."""

    out_dir: Path
    popen: subprocess.Popen
    stdout: Path
    stderr: Path

    @property
    def run(self) -> Path:
        return self.out_dir / TINY_RUN

    def wait(self) -> int:
        try:
            return self.popen.wait(timeout=PROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            kill_tree(self.popen)
            raise

    def output(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()


def start_cli_run(study: Path, out_dir: Path, env: dict[str, str], tag: str, *extra: str) -> CliRun:
    """`classlab run STUDY -o out_dir=OUT_DIR --device cpu EXTRA...` in a session of its own (so a kill reaches
    torchrun and its workers at once), with SIGINT reset to its default in the child, so Python turns it
    into KeyboardInterrupt even when the test runner itself was started in the background (where SIGINT
    is ignored and inherited)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stdout, stderr = out_dir / f"{tag}.stdout", out_dir / f"{tag}.stderr"
    cmd = [sys.executable, "-m", "classlab.cli", "run", str(study), "-o", f"out_dir={out_dir}", "--device", "cpu",
           *extra]
    with stdout.open("wb") as out, stderr.open("wb") as err:
        popen = subprocess.Popen(cmd, cwd=out_dir, env=env, stdout=out, stderr=err, start_new_session=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return CliRun(out_dir, popen, stdout, stderr)


def stop_fit_after(monkeypatch, epoch: int) -> None:
    """Make every `fit` the study runs raise KeyboardInterrupt once epoch `epoch` has been saved (after the
    run's own callbacks), as a kill would: the tests then run again to resume."""
    from classlab import study as study_mod

    real_fit = study_mod.fit

    def fit_until(*args, **kwargs):
        def stop(k, row, state):
            if row["epoch"] == epoch:
                raise KeyboardInterrupt

        kwargs["callbacks"] = [*kwargs["callbacks"], stop]
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(study_mod, "fit", fit_until)



def make_csv_manifest(folder: Path, n_train: int = 120, n_test: int = 40, num_classes: int = 3, writers: int = 12,
                      size: int = 12) -> Path:
    """A tiny manifest table (folder/manifest.csv): PNGs of synthetic_images under folder/img/, columns path
    (relative to the table), label (class names c0..), split (train / test) and a made-up `writer` group."""
    from PIL import Image

    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = ["path,label,split,writer"]
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        x, y = synthetic_images(n, num_classes, size, seed=seed)
        for i in range(n):
            name = f"img/{split}{i:04d}.png"
            Image.fromarray(x[i]).save(folder / name)
            lines.append(f"{name},c{y[i]},{split},w{(i * 7 + seed) % writers}")
    table = folder / "manifest.csv"
    table.write_text("\n".join(lines) + "\n")
    return table
