"""Seconds per training epoch: the studies' notebook pipeline against classlab's loop, side by side.

    python benchmarks/epoch_speed.py                  # studies A, D (one run + the 8-cell grid), E; 2 epochs
    python benchmarks/epoch_speed.py --quick          # 1 epoch on a 6,400-image subset: a smoke run
    python benchmarks/epoch_speed.py --studies D grid --epochs 3 --threads 1 --json out.json

The notebook pipeline is what the studies' notebooks do: a torchvision FashionMNIST-style Dataset
over the same uint8 tensors (a PIL image per sample, as torchvision's `__getitem__` makes it),
per-sample `transforms.Compose([... ToTensor(), Normalize()])`, a shuffling DataLoader (num_workers 0
and 2), torch's default optimizer implementation, `.item()` per step, a validation pass per epoch
through a DataLoader. classlab's side is `classlab.train.fit.fit` (one run, K = 1) and
the same `fit` with all of study D's grid cells as one member stack on the same data, model (same initial weights),
optimizer and batch size, in the same process; the grid also as `classlab run --jobs 2` trains it (two
processes, each stacking its half of the grid on one thread, started together). An epoch here is one
training pass plus one pass over the held-out split (validation for D and E, test for A, which has no validation split).
Ratios are against the notebook pipeline with num_workers 0, in wall time and in CPU time (this
process plus its DataLoader workers: the work done, much less disturbed by other processes on a
shared machine). Threads: the notebook runs with torch's default, classlab with its own choice
(train/speed.py: one thread for small models), unless --threads pins both. Accuracy is on the test
set after the same number of epochs (last epoch's weights in both). A compute floor per CNN/MLP
(every multiply-add at the measured fp32 GEMM peak) shows how much of the CPU each pipeline uses.
Before the studies it times the notebook's data pipeline alone against torchvision's own
`FashionMNIST` class over the same files, to show the emulation costs what the real class costs.
This is a benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
import warnings
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from classlab.config import RunConfig, validate
from classlab.data import ImageData, Split, load_dataset
from classlab.evaluate import evaluate_test
from classlab.models import build_model
from classlab.plan import can_stack
from classlab.train.fit import fit
from classlab.train.speed import forward_macs
from classlab.transforms import BatchTransform, preprocess_for

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / ".." / "shared" / "data" / "fashion-mnist"
CPU = torch.device("cpu")
RELABEL_3 = {"clothes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Shirt"],
             "shoes": ["Sandal", "Sneaker", "Ankle boot"], "other": ["Bag"]}


# ----------------------------------------------------------------------------- the studies' configs


def study_configs(root: str) -> dict[str, list[RunConfig]]:
    """A (CNN, SGD), D (MLP grid: Adam / RMSprop × none / BN / dropout / L1) and E (CNN, augmented)."""
    fm = {"dataset": "fashion-mnist", "root": root}
    a = {"name": "A-cnn", "data": {**fm, "val_fraction": None, "normalize": {"mean": [0.1307], "std": [0.3081]},
                                   "relabel": RELABEL_3},
         "model": {"name": "study_a_cnn"}, "train": {"optimizer": "sgd", "lr": 0.001, "momentum": 0.9}}
    e = {"name": "E-cnn", "data": {**fm, "val_fraction": 0.1, "normalize": {"mean": [0.5], "std": [0.5]},
                                   "augment": {"hflip": 0.5, "rotate": 10}},
         "model": {"name": "study_e_cnn"}, "train": {"optimizer": "adam", "lr": 0.001}}
    grid = []
    for reg in ("none", "batchnorm", "dropout", "l1"):
        for opt in ("adam", "rmsprop"):
            model = {"name": "study_d_mlp", **({"batchnorm": True} if reg == "batchnorm" else {}),
                     **({"dropout": 0.2} if reg == "dropout" else {})}
            train = {"optimizer": opt, "lr": 1e-3, **({"l1": 1e-4} if reg == "l1" else {})}
            grid.append({"name": f"D-{reg}-{opt}", "data": {**fm, "val_fraction": 0.15}, "model": model,
                         "train": train})
    out = {}
    for key, raws in (("A", [a]), ("E", [e]), ("grid", grid)):
        out[key] = [validate(RunConfig, {**r, "train": {"batch_size": 64, **r["train"]}}) for r in raws]
    out["D"] = [c for c in out["grid"] if c.name == "D-batchnorm-adam"]
    return out


# ----------------------------------------------------------------------------- the notebook pipeline

_fromarray = getattr(torchvision.datasets.mnist, "_Image_fromarray", None)


def _pil(array) -> Image.Image:
    if _fromarray is not None:
        return _fromarray(array, mode="L")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return Image.fromarray(array, mode="L")


class NotebookFashionMNIST(Dataset):
    """torchvision.datasets.FashionMNIST's item path over given tensors: uint8 N×28×28 data, int targets."""

    def __init__(self, split: Split, transform=None) -> None:
        self.data = split.images[:, 0]
        self.targets = split.labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        img, target = self.data[index], int(self.targets[index])
        img = _pil(img.numpy())
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def loader_ms_per_batch(dataset: Dataset, batches: int = 150) -> float:
    loader = DataLoader(dataset, batch_size=64, shuffle=True, num_workers=0)
    t0, n = time.perf_counter(), 0
    for _ in loader:
        n += 1
        if n == batches:
            break
    return (time.perf_counter() - t0) / n * 1e3


def check_notebook_dataset(root: str, cfg: RunConfig, data: ImageData) -> dict | None:
    """ms per batch of 64 of NotebookFashionMNIST and of torchvision's own FashionMNIST class over the same
    IDX files (unpacked into torchvision's folder layout in a temporary folder): the emulation must cost
    what the real class costs. None when the training files are not there."""
    import gzip
    import shutil
    import tempfile

    files = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    if not all((Path(root) / f"{f}.gz").is_file() for f in files):
        return None
    tmp = Path(tempfile.mkdtemp())
    try:
        raw = tmp / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for f in files + ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]:
            src = Path(root) / f"{f}.gz"
            if src.is_file():
                (raw / f).write_bytes(gzip.decompress(src.read_bytes()))
        tf = notebook_transforms(cfg, data, train=False)
        real = torchvision.datasets.FashionMNIST(str(tmp), train=True, download=False, transform=tf)
        ours = NotebookFashionMNIST(Split(real.data[:, None], real.targets), tf)
        return {"torchvision FashionMNIST": round(loader_ms_per_batch(real), 2),
                "NotebookFashionMNIST": round(loader_ms_per_batch(ours), 2)}
    except RuntimeError:  # torchvision could not read the files: nothing to compare
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def notebook_transforms(cfg: RunConfig, data: ImageData, train: bool):
    steps = []
    aug = cfg.data.augment
    if train and aug.hflip > 0:
        steps.append(transforms.RandomHorizontalFlip(aug.hflip))
    if train and aug.rotate > 0:
        steps.append(transforms.RandomRotation(aug.rotate))
    steps += [transforms.ToTensor(), transforms.Normalize(data.mean, data.std)]
    return transforms.Compose(steps)


def notebook_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """As a notebook writes it: torch's defaults (per-parameter for-loop implementation on CPU)."""
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum)
    if t.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=t.lr)
    return torch.optim.RMSprop(model.parameters(), lr=t.lr)


class Clock:
    """Wall and CPU seconds per lap. CPU time (this process + its finished children, i.e. the DataLoader
    workers, which exit at each epoch's end) is the work done; on a shared machine it is much less
    disturbed by other processes than wall time."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.mark()

    @staticmethod
    def _cpu() -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime

    def mark(self) -> None:
        self._wall, self._cpu_at = time.perf_counter(), self._cpu()

    def lap(self) -> None:
        self.wall.append(time.perf_counter() - self._wall)
        self.cpu.append(self._cpu() - self._cpu_at)
        self.mark()


def notebook_run(model: nn.Module, cfg: RunConfig, data: ImageData, held_out: Split, epochs: int,
                 workers: int, seed: int) -> dict:
    """Train like the notebooks; returns the epochs' clock (train + held-out pass) and test accuracy."""
    torch.manual_seed(seed)
    train_set = NotebookFashionMNIST(data.train, notebook_transforms(cfg, data, train=True))
    eval_tf = notebook_transforms(cfg, data, train=False)
    train_loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True, num_workers=workers)
    held_loader = DataLoader(NotebookFashionMNIST(held_out, eval_tf), batch_size=cfg.train.batch_size,
                             num_workers=workers)
    criterion = nn.CrossEntropyLoss()
    optimizer = notebook_optimizer(model, cfg)
    l1 = cfg.train.l1
    clock = Clock()
    for _ in range(epochs):
        clock.mark()
        model.train()
        running, correct, seen = 0.0, 0, 0
        for x, y in train_loader:
            optimizer.zero_grad()
            out = model(x)
            loss = criterion(out, y)
            if l1 > 0:
                loss = loss + l1 * sum(p.abs().sum() for p in model.parameters() if p.dim() > 1)
            loss.backward()
            optimizer.step()
            running += loss.item() * x.size(0)
            correct += (out.argmax(1) == y).sum().item()
            seen += x.size(0)
        notebook_evaluate(model, held_loader)
        clock.lap()
    test_loader = DataLoader(NotebookFashionMNIST(data.test, eval_tf), batch_size=256, num_workers=0)
    return {"clock": clock, "test_acc": notebook_evaluate(model, test_loader)}


def notebook_evaluate(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct, seen = 0, 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            seen += x.size(0)
    return correct / max(seen, 1)


# ----------------------------------------------------------------------------- classlab


def classlab_test_acc(model: nn.Module, cfg: RunConfig, data: ImageData, pre) -> float:
    test = evaluate_test(model, data.test.images, data.test.labels, BatchTransform(pre, None, CPU), cfg.train,
                         len(data.classes), CPU)
    return test.metrics["accuracy"]


class EpochHooks:
    """on_epoch_end hooks for fit / fit stacked: a clock lap when an epoch ends (before any other work)
    and, after the last epoch, each model's test accuracy (fit would later restore the best validation
    epoch only with early stopping; the notebooks keep the last epoch's weights, and so do we here)."""

    def __init__(self, models: list[nn.Module], cfgs: list[RunConfig], data: ImageData, pre) -> None:
        self.models, self.cfgs, self.data, self.pre = models, cfgs, data, pre
        self.clock = Clock()
        self.acc: dict[int, float] = {}
        self._epoch = 0

    def __call__(self, k: int, row: dict, state: dict) -> None:
        if row["epoch"] != self._epoch:
            self._epoch = row["epoch"]
            self.clock.lap()
        if row["epoch"] == self.cfgs[k].train.epochs:
            self.acc[k] = classlab_test_acc(self.models[k], self.cfgs[k], self.data, self.pre)


def compute_floor(model: nn.Module, input_shape, n_train: int, n_held: int, peak: float) -> float:
    """Seconds per epoch if every multiply-add ran at the measured GEMM peak: a training image costs
    3 forward passes (forward, input and weight gradients), a held-out image one."""
    return 2 * forward_macs(model, input_shape) * (3 * n_train + n_held) / peak


def gemm_peak(seconds: float = 1.0) -> float:
    """fp32 FLOP/s of a large square matmul at the current thread count (the compute ceiling)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best


def with_held_out(data: ImageData) -> tuple[ImageData, Split]:
    """Study A has no validation split: its held-out pass (and classlab's per-epoch val) is the test set."""
    if data.val is not None:
        return data, data.val
    return ImageData(train=data.train, test=data.test, classes=data.classes, mean=data.mean, std=data.std,
                     val=data.test, source=data.source), data.test


def subset(data: ImageData, n: int | None) -> ImageData:
    if n is None:
        return data
    cut = lambda s, k: Split(s.images[:k], s.labels[:k]) if s is not None else None  # noqa: E731
    return ImageData(train=cut(data.train, n), test=cut(data.test, n // 4), classes=data.classes, mean=data.mean,
                     std=data.std, val=cut(data.val, n // 4), source=data.source)


def fresh_model(cfg: RunConfig, data: ImageData):
    pre = preprocess_for(cfg, data)
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, len(data.classes), pre.input_shape), pre


@dataclass
class Row:
    study: str
    pipeline: str
    wall: list[float]  # seconds per epoch, each epoch
    cpu: list[float]
    test_acc: float | None
    threads: int = 0
    note: str = ""
    ref: str | None = None  # the pipeline this row's ratios are against (default: the study's notebook w0)
    wall_ratio: float | None = None
    cpu_ratio: float | None = None

    @property
    def wall_s(self) -> float:
        return mean(self.wall)

    @property
    def cpu_s(self) -> float:
        return mean(self.cpu)


def load_avg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def notebook_threads(args) -> int:
    """A notebook runs with torch's default thread count (or --threads when given)."""
    torch.set_num_threads(args.threads or args.default_threads)
    return torch.get_num_threads()


def classlab_cfg(cfg: RunConfig, args) -> RunConfig:
    """classlab picks its own threads (train/speed.py) unless --threads pins them for both pipelines."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": args.epochs,
                                                                        "threads": args.threads})})


def run_notebook(key: str, name: str, cfg: RunConfig, data: ImageData, held: Split, workers: int, args,
                 cache: dict) -> tuple[dict, int]:
    threads = notebook_threads(args)
    if (cfg.name, workers) not in cache:
        print(f"[{key}] notebook {name}, num_workers {workers} (load {load_avg()})", flush=True)
        model, _ = fresh_model(cfg, data)
        cache[(cfg.name, workers)] = notebook_run(model, cfg, data, held, args.epochs, workers, cfg.seed)
    return cache[(cfg.name, workers)], threads


def run_classlab(key: str, cfgs: list[RunConfig], data: ImageData, args) -> tuple[EpochHooks, list[nn.Module]]:
    """fit for one config, fit stacked for several; the hooks hold the clock and accuracies."""
    cfgs = [classlab_cfg(c, args) for c in cfgs]
    built = [fresh_model(c, data) for c in cfgs]
    models, pre = [m for m, _ in built], built[0][1]
    hooks = EpochHooks(models, cfgs, data, pre)
    what = "fit" if len(cfgs) == 1 else f"fit stacked ({len(cfgs)} runs)"
    print(f"[{key}] classlab {what} (load {load_avg()})", flush=True)
    hooks.clock.mark()
    assert len(cfgs) == 1 or can_stack(cfgs)
    fit(models, data, cfgs, pre, CPU, callbacks=[hooks])
    return hooks, models


def bench_single(key: str, cfg: RunConfig, args, rows: list[Row], cache: dict) -> None:
    data, held = with_held_out(subset(load_dataset(cfg.data), args.subset))
    cfg = classlab_cfg(cfg, args)
    for workers in args.workers:
        res, threads = run_notebook(key, cfg.name, cfg, data, held, workers, args, cache)
        rows.append(Row(key, f"notebook, num_workers {workers}", res["clock"].wall, res["clock"].cpu,
                        res["test_acc"], threads))
    hooks, models = run_classlab(key, [cfg], data, args)
    rows.append(Row(key, "classlab fit", hooks.clock.wall, hooks.clock.cpu, hooks.acc[0], torch.get_num_threads()))
    if key == "D" and args.noise_seeds > 1:
        seeds = [cfg.model_copy(update={"seed": s, "name": f"{cfg.name}-seed{s}"}) for s in range(args.noise_seeds)]
        hooks_n, _ = run_classlab(key, seeds, data, args)
        accs = [hooks_n.acc[k] for k in range(len(seeds))]
        n = len(seeds)
        rows.append(Row(key, f"classlab fit stacked, seeds 0–{n - 1} (per run)", [w / n for w in hooks_n.clock.wall],
                        [c / n for c in hooks_n.clock.cpu], mean(accs), torch.get_num_threads(),
                        note=f"seed noise: test acc std {statistics.stdev(accs) * 100:.2f} points, "
                             f"range {min(accs) * 100:.2f}–{max(accs) * 100:.2f}%"))
    model, pre = fresh_model(cfg, data)
    floor = compute_floor(model, pre.input_shape, len(data.train), len(held), args.peak)
    for r in rows:
        if r.study == key:
            r.note = f"{floor / r.cpu_s:.0%} of compute-floor speed (CPU)" + (f"; {r.note}" if r.note else "")
    rows.append(Row(key, f"compute floor at {args.peak / 1e9:.0f} GFLOP/s", [floor], [floor], None,
                    note=f"{forward_macs(model, pre.input_shape) / 1e6:.2f} M multiply-adds per image forward"))


def bench_grid(cfgs: list[RunConfig], args, rows: list[Row], cache: dict) -> None:
    data, held = with_held_out(subset(load_dataset(cfgs[0].data), args.subset))
    walls, cpus, accs = [], [], []
    for cfg in cfgs:
        res, threads = run_notebook("grid", cfg.name, cfg, data, held, 0, args, cache)
        walls.append(res["clock"].wall)
        cpus.append(res["clock"].cpu)
        accs.append(res["test_acc"])
        rows.append(Row("grid", f"notebook {cfg.name}", res["clock"].wall, res["clock"].cpu, res["test_acc"], threads,
                        ref=f"notebook {cfg.name}"))
    rows.append(Row("grid", "notebook, 8 runs one after another", list(map(sum, zip(*walls, strict=True))),
                    list(map(sum, zip(*cpus, strict=True))), mean(accs), threads, note="accuracy: mean of the 8"))
    if args.grid_one_by_one:
        walls, cpus, accs = [], [], []
        for cfg in cfgs:
            hooks, _ = run_classlab("grid", [cfg], data, args)
            walls.append(hooks.clock.wall)
            cpus.append(hooks.clock.cpu)
            accs.append(hooks.acc[0])
        rows.append(Row("grid", "classlab fit, 8 runs one after another", list(map(sum, zip(*walls, strict=True))),
                        list(map(sum, zip(*cpus, strict=True))), mean(accs), torch.get_num_threads(),
                        note="accuracy: mean of the 8"))
    hooks, _ = run_classlab("grid", cfgs, data, args)
    n = len(cfgs)
    for k, cfg in enumerate(cfgs):
        rows.append(Row("grid", f"stacked {cfg.name}", [w / n for w in hooks.clock.wall],
                        [c / n for c in hooks.clock.cpu], hooks.acc[k], torch.get_num_threads(),
                        note="amortized: the group's time / 8", ref=f"notebook {cfg.name}"))
    rows.append(Row("grid", "classlab fit stacked, 8 runs at once", hooks.clock.wall, hooks.clock.cpu,
                    mean(hooks.acc.values()), torch.get_num_threads(), note="accuracy: mean of the 8"))
    if args.jobs > 1:
        bench_grid_jobs(cfgs, args, rows)


def _grid_job(job: int, jobs: int, cfgs: list[RunConfig], args, barrier) -> dict:
    """One process of `classlab run --jobs N` on the grid: shard job/N (index mod N, as --shard), stacked, on
    1/N of the threads; training starts when every process has loaded its data (the barrier)."""
    torch.set_num_threads(max(1, args.default_threads // jobs))
    mine = cfgs[job::jobs]
    data, _ = with_held_out(subset(load_dataset(mine[0].data), args.subset))
    mine = [c.model_copy(update={"train": c.train.model_copy(update={"epochs": args.epochs, "threads": None})})
            for c in mine]
    built = [fresh_model(c, data) for c in mine]
    models, pre = [m for m, _ in built], built[0][1]
    hooks = EpochHooks(models, mine, data, pre)
    barrier.wait()
    hooks.clock.mark()
    fit(models, data, mine, pre, CPU, callbacks=[hooks])
    return {"wall": hooks.clock.wall, "cpu": hooks.clock.cpu, "acc": [hooks.acc[k] for k in range(len(mine))],
            "threads": torch.get_num_threads(), "names": [c.name for c in mine]}


def bench_grid_jobs(cfgs: list[RunConfig], args, rows: list[Row]) -> None:
    """The grid as `classlab run --jobs N` trains it: N processes at once, each stacking its shard."""
    import multiprocessing as mp

    jobs = args.jobs
    print(f"[grid] classlab --jobs {jobs}: {jobs} processes × fit stacked (load {load_avg()})", flush=True)
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(jobs)
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(max(1, args.default_threads // jobs))  # as --jobs starts its workers
    try:
        with ctx.Pool(jobs) as pool:
            results = pool.starmap(_grid_job, [(j, jobs, cfgs, args, barrier) for j in range(jobs)])
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    wall = [max(per) for per in zip(*(r["wall"] for r in results), strict=True)]  # all run at once: the slowest
    cpu = [sum(per) for per in zip(*(r["cpu"] for r in results), strict=True)]
    accs = [a for r in results for a in r["acc"]]
    per = ", ".join(f"{len(r['names'])} runs" for r in results)
    rows.append(Row("grid", f"classlab --jobs {jobs} ({per}, stacked)", wall, cpu, mean(accs), results[0]["threads"],
                    note="accuracy: mean of the 8; wall: the slower process's epoch"))


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def add_ratios(rows: list[Row]) -> None:
    """Ratio = the reference's seconds per epoch / this row's (default reference: notebook, num_workers 0)."""
    for r in rows:
        default = "notebook, 8 runs one after another" if r.study == "grid" else "notebook, num_workers 0"
        ref = next((x for x in rows if x.study == r.study and x.pipeline == (r.ref or default)), None)
        if ref is not None and r.wall_s > 0 and r.cpu_s > 0:
            r.wall_ratio, r.cpu_ratio = ref.wall_s / r.wall_s, ref.cpu_s / r.cpu_s


def table(rows: list[Row], header: dict) -> str:
    h = header
    lines = [f"date {h['date']}, {h['machine']}, torch {h['torch']}, torchvision {h['torchvision']}, "
             f"threads: {h['threads']}, fp32 GEMM peak {h['peak_gflops']} GFLOP/s, epochs {h['epochs']}, "
             f"train subset {h['subset'] or 'all'}",
             f"load average (1, 5, 15 min) at start {h['load_start']}, at end {h['load_end']}",
             f"notebook data pipeline alone, ms per batch of 64: "
             f"{h.get('data ms per batch of 64 (shuffled DataLoader, num_workers 0)')}", "",
             "| study | pipeline | threads | wall s/epoch | × (wall) | CPU s/epoch | × (CPU) | test acc | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        acc = f"{r.test_acc * 100:.2f}%" if r.test_acc is not None else "–"
        ratios = [f"{x:.1f}×" if x is not None else "" for x in (r.wall_ratio, r.cpu_ratio)]
        lines.append(f"| {r.study} | {r.pipeline} | {r.threads or ''} | {r.wall_s:.2f} | {ratios[0]} | "
                     f"{r.cpu_s:.2f} | {ratios[1]} | {acc} | {r.note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 epoch on a 6,400-image training subset")
    parser.add_argument("--studies", nargs="*", default=["D", "grid", "A", "E"], choices=["A", "D", "E", "grid"])
    parser.add_argument("--workers", nargs="*", type=int, default=[0, 2], help="notebook DataLoader num_workers")
    parser.add_argument("--threads", type=int, default=None,
                        help="pin torch's intra-op threads for both pipelines (default: torch's default for the "
                             "notebook, classlab's own choice for classlab)")
    parser.add_argument("--grid-one-by-one", action="store_true", help="also time classlab fit on the 8 cells in turn")
    parser.add_argument("--noise-seeds", type=int, default=8,
                        help="study D: also train this many seeds (stacked) to measure seed noise; 0 to skip")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="the grid also as `classlab run --jobs N` trains it (N processes); 1 to skip")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    args.subset = None
    if args.quick:
        args.epochs, args.subset, args.workers, args.noise_seeds = 1, 6400, [0], 0
    args.default_threads = torch.get_num_threads()
    peaks = []
    for threads in sorted({1, args.threads or args.default_threads}):
        torch.set_num_threads(threads)
        peaks.append(gemm_peak())
    args.peak = max(peaks)  # the best this CPU does now, at one thread or all
    header = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs", "torch": torch.__version__, "torchvision": torchvision.__version__,
              "threads": args.threads or f"torch default ({args.default_threads}) for the notebook, classlab's own",
              "peak_gflops": round(args.peak / 1e9, 1), "epochs": args.epochs, "subset": args.subset,
              "load_start": load_avg()}
    cfgs = study_configs(str(Path(args.data).expanduser()))
    torch.set_num_threads(args.threads or args.default_threads)
    d = cfgs["D"][0]
    check = check_notebook_dataset(str(Path(args.data).expanduser()), d, load_dataset(d.data))
    header["data ms per batch of 64 (shuffled DataLoader, num_workers 0)"] = check
    print(f"notebook data pipeline, ms per batch of 64: {check}", flush=True)
    rows: list[Row] = []
    cache: dict = {}
    for key in args.studies:
        if key == "grid":
            bench_grid(cfgs["grid"], args, rows, cache)
        else:
            bench_single(key, cfgs[key][0], args, rows, cache)
    header["load_end"] = load_avg()
    add_ratios(rows)
    print()
    print(table(rows, header))
    if args.json:
        out = {"header": header, "rows": [{**r.__dict__, "wall_s": r.wall_s, "cpu_s": r.cpu_s} for r in rows]}
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
