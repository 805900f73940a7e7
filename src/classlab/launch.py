"""Process fan-out for `classlab run`: `--jobs N` local workers of one Optuna storage, `--nproc N` under
torchrun, the signals that stop them (Ctrl-C, SIGTERM), and the resume command printed after a stop.
The commands (cli.py) stay thin; what a worker trains is study.py's and trials.py's business."""

from __future__ import annotations

import math
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from classlab.errors import ClasslabError


def interrupted(study: Path | None, flags: list[str]) -> NoReturn:
    """The one line after Ctrl-C / SIGTERM: every finished epoch is saved, and the command that resumes."""
    import typer

    again = ["classlab", "run", *([str(study)] if study else []), *flags]
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        sys.stderr.write(
            "interrupted: every finished epoch is saved; resume with: "
            f"{shlex.join(again)} (add --restart to start over)\n"
        )
    raise typer.Exit(130)


def check_study(path: Path, flags: list[str]):
    """Load and expand the study before starting other processes: bad input is one line and exit code 2
    here, not once per process. Returns the study and its planned runs (none for a search)."""
    from classlab.config import load_study
    from classlab.plan import expand

    overrides = [flags[i + 1] for i, f in enumerate(flags) if f == "-o"]
    study = load_study(path, overrides)
    return study, ([] if study.search is not None else expand(study, where=str(path)))


def run_jobs(jobs: int, path: Path, flags: list[str], restart: bool, storage: str | None,
             console: Console) -> int:
    """`classlab run --jobs N`: N worker processes on this machine sharing the study's Optuna storage (a grid's
    runs queued as fixed trials, a search's trials asked from it), each with 1/N of torch's CPU threads. Why:
    a small model's step is mostly Python and per-op dispatch, which one process runs on one core whatever its
    thread count; N processes run N of them at once (study D's 8-cell grid: 2 processes × 4 stacked runs on
    one thread each train 1.2× faster than 8 stacked runs on 2 threads, see benchmarks/RESULTS.md). A grid
    worker pops ceil(runs / N) runs at a time so they can train stacked. Returns the worst exit code."""
    import torch

    if jobs < 1:
        raise ClasslabError(f"--jobs {jobs}: give at least 1 process")
    study, planned = check_study(path, flags)
    prepare_storage(study, planned, storage, restart, console)
    gpus = torch.cuda.device_count()
    threads = max(1, torch.get_num_threads() // jobs)
    where = f", GPU i mod {gpus} for worker i" if gpus > 1 else ""
    console.print(f"{jobs} worker processes, {threads} thread(s) each{where}", style="dim", markup=False,
                  highlight=False)
    batch = max(1, math.ceil(len(planned) / jobs)) if planned else 1
    extra = [*([f"--storage={storage}"] if storage else []), f"--batch={batch}", "--worker",
             *(["--restart"] if restart else [])]
    procs = [subprocess.Popen([sys.executable, "-m", "classlab.cli", "run", str(path), *flags, *extra],
                              env=worker_env(i, threads, gpus)) for i in range(jobs)]
    codes = [wait(proc, procs) for proc in procs]
    return 130 if 130 in codes else max(codes)


def prepare_storage(study, planned: list, storage: str | None, restart: bool, console: Console) -> None:
    """Before the workers start: the Optuna study exists (and a grid's runs are queued, a search's grid
    cells enqueued), so the workers never race to create it; `restart` starts a grid's queue over."""
    folder = Path(study.out_dir).expanduser() / str(study.name)
    if study.search is None:
        from classlab.trials import open_queue

        open_queue(study, folder, planned, storage, restart, console)
        return
    from classlab import search
    from classlab.trials import _enqueue_grid

    store = search.open_storage(storage, folder)
    if restart:
        search.delete_search(study, store)
    ostudy = search.open_optuna_study(study, store, search.objective_of(study).higher)
    _enqueue_grid(study, ostudy)


def worker_env(i: int, threads: int, gpus: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Worker i's environment: its share of the CPU threads, and with several GPUs its own one (i mod the
    count, as CUDA_VISIBLE_DEVICES, so `cuda` means that GPU to it), instead of every worker on cuda:0."""
    env = {**(os.environ if base is None else base), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "CLASSLAB_WORKER": str(i)}  # search.worker_seed: each worker's sampler draws its own trials
    if gpus > 1:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = [d.strip() for d in visible.split(",")] if visible else [str(g) for g in range(gpus)]
        env["CUDA_VISIBLE_DEVICES"] = ids[i % len(ids)]
    return env


def wait(proc: subprocess.Popen, procs: list[subprocess.Popen] = ()) -> int:  # type: ignore[assignment]
    """The child's exit code. Ctrl-C reaches the children too (same process group): let them save and exit;
    a SIGTERM reaches this process alone, so it is passed on to them."""
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            if _terminated:
                for other in procs:
                    if other.poll() is None:
                        other.send_signal(signal.SIGTERM)
            continue


_terminated = False  # a SIGTERM arrived (on_sigterm)


def on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler's or `kill`'s stop) is Ctrl-C: every finished epoch is saved, one line, the resume
    command, exit 130. Only the first raises: a second while saving would cut the save short."""
    global _terminated
    if _terminated:
        return
    _terminated = True
    raise KeyboardInterrupt


def install_signals() -> None:
    """SIGTERM as Ctrl-C, in the main thread (signal handlers can only be set there)."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)


def torchrun(nproc: int, path: Path, flags: list[str], console: Console) -> int:
    """`classlab run --nproc N ...`: the same command again under PyTorch's torchrun, N processes on this
    machine (`--standalone` picks a free rendezvous port); returns torchrun's exit code. Each run (or search
    trial) is trained by all N together; rank 0 alone talks to the search's storage and hands the others
    the trial's config."""
    if nproc < 1:
        raise ClasslabError(f"--nproc {nproc}: give at least 1 process")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ClasslabError("--nproc: this process was already started by torchrun; drop --nproc")
    check_study(path, flags)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "classlab.cli", "run", str(path), *flags]
    console.print(shlex.join(cmd), style="dim", markup=False, highlight=False)
    return wait(subprocess.Popen(cmd))
