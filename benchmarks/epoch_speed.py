"""Seconds per training epoch: the studies' notebook pipeline against classlab's loop, side by side.

    python benchmarks/epoch_speed.py                  # studies A, D (one run + the 8-cell grid), E; 2 epochs
    python benchmarks/epoch_speed.py --quick          # 1 epoch on a 6,400-image subset: a smoke run
    python benchmarks/epoch_speed.py --studies D grid --epochs 3 --threads 1 --json out.json

The notebook pipeline is what the studies' notebooks do: a torchvision FashionMNIST-style Dataset
over the same uint8 tensors (a PIL image per sample, as torchvision's `__getitem__` makes it),
per-sample `transforms.Compose([... ToTensor(), Normalize()])`, a shuffling DataLoader (num_workers 0
and 2), torch's default optimizer implementation, `.item()` per step, a validation pass per epoch
through a DataLoader. classlab's side is `classlab.train.loop.fit` (one run) and
`classlab.train.stacked.fit_stacked` (study D's grid) on the same data, model (same initial weights),
optimizer and batch size, in the same process. An epoch here is one training pass plus one pass
over the held-out split (validation for D and E, test for A, which has no validation split).
Ratios are against the notebook pipeline with num_workers 0. Accuracy is on the test set after the
same number of epochs. This is a benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
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
from classlab.models import build_model
from classlab.study import preprocess_for
from classlab.train.loop import evaluate_split, fit
from classlab.train.speed import forward_macs
from classlab.train.stacked import can_stack, fit_stacked
from classlab.transforms import BatchTransform

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / ".." / "shared" / "data" / "fashion-mnist"
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


def notebook_run(model: nn.Module, cfg: RunConfig, data: ImageData, held_out: Split, epochs: int,
                 workers: int, seed: int) -> dict:
    """Train like the notebooks; returns seconds per epoch (train + held-out pass) and test accuracy."""
    torch.manual_seed(seed)
    train_set = NotebookFashionMNIST(data.train, notebook_transforms(cfg, data, train=True))
    eval_tf = notebook_transforms(cfg, data, train=False)
    train_loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True, num_workers=workers)
    held_loader = DataLoader(NotebookFashionMNIST(held_out, eval_tf), batch_size=cfg.train.batch_size,
                             num_workers=workers)
    criterion = nn.CrossEntropyLoss()
    optimizer = notebook_optimizer(model, cfg)
    l1 = cfg.train.l1
    times, train_times = [], []
    for _ in range(epochs):
        t0 = time.perf_counter()
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
        train_times.append(time.perf_counter() - t0)
        notebook_evaluate(model, held_loader)
        times.append(time.perf_counter() - t0)
    test_loader = DataLoader(NotebookFashionMNIST(data.test, eval_tf), batch_size=256, num_workers=0)
    return {"epoch_s": times, "train_s": train_times, "test_acc": notebook_evaluate(model, test_loader)}


def notebook_evaluate(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct, seen = 0, 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            seen += x.size(0)
    return correct / max(seen, 1)


# ----------------------------------------------------------------------------- classlab


def classlab_test_acc(model: nn.Module, cfg: RunConfig, data: ImageData, pre, device) -> float:
    return evaluate_split(model, data.test, BatchTransform(pre, None, device), cfg, device)[1]


def last_epoch_acc(out: dict, k: int, model: nn.Module, cfg: RunConfig, data: ImageData, pre):
    """An on_epoch_end hook: test accuracy of the last epoch's weights (fit later restores the best
    validation epoch; the notebooks keep the last), outside the timed epoch."""
    def hook(row: dict, state: dict) -> None:
        if row["epoch"] == cfg.train.epochs:
            out[k] = classlab_test_acc(model, cfg, data, pre, torch.device("cpu"))
    return hook


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
    epoch_s: float
    test_acc: float | None
    note: str = ""
    ratio: float | None = None
    per_epoch: list[float] = field(default_factory=list)
    threads: int = 0
    ref: str | None = None  # the pipeline this row's ratio is against (default: the study's notebook w0)


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


def bench_single(key: str, cfg: RunConfig, args, rows: list[Row], notebook_cache: dict) -> None:
    cpu = torch.device("cpu")
    data, held = with_held_out(subset(load_dataset(cfg.data), args.subset))
    cfg = classlab_cfg(cfg, args)
    for workers in args.workers:
        model, _ = fresh_model(cfg, data)
        threads = notebook_threads(args)
        print(f"[{key}] notebook pipeline, num_workers {workers} (load {load_avg()})", flush=True)
        res = notebook_cache.get((cfg.name, workers)) or notebook_run(model, cfg, data, held, args.epochs, workers,
                                                                       cfg.seed)
        notebook_cache[(cfg.name, workers)] = res
        rows.append(Row(key, f"notebook, num_workers {workers}", mean(res["epoch_s"]), res["test_acc"],
                        per_epoch=res["epoch_s"], threads=threads))
    model, pre = fresh_model(cfg, data)
    cfg = classlab_cfg(cfg, args)
    print(f"[{key}] classlab fit (load {load_avg()})", flush=True)
    last: dict[int, float] = {}
    result = fit(model, data, cfg, pre, cpu, on_epoch_end=last_epoch_acc(last, 0, model, cfg, data, pre))
    secs = [r["seconds"] for r in result.history]
    rows.append(Row(key, "classlab fit", mean(secs), last[0], per_epoch=secs, threads=torch.get_num_threads()))
    if key == "D" and args.noise_seeds > 1:
        seed_noise(cfg, data, args, rows)
    floor = compute_floor(model, pre.input_shape, len(data.train), len(held), args.peak)
    for r in rows:
        if r.study == key and r.threads:
            r.note = f"{floor / r.epoch_s:.0%} of the compute-floor speed" + (f"; {r.note}" if r.note else "")
    rows.append(Row(key, f"compute floor ({args.peak / 1e9:.0f} GFLOP/s)", floor, None,
                    note=f"{forward_macs(model, pre.input_shape) / 1e6:.2f} M multiply-adds per image forward"))


def seed_noise(cfg: RunConfig, data: ImageData, args, rows: list[Row]) -> None:
    """The same run with N seeds (stacked, so it is cheap): the spread of test accuracy that a
    difference between two single-seed numbers has to be judged against."""
    cfgs = [cfg.model_copy(update={"seed": s, "name": f"{cfg.name}-seed{s}"}) for s in range(args.noise_seeds)]
    built = [fresh_model(c, data) for c in cfgs]
    models, pre = [m for m, _ in built], built[0][1]
    print(f"[D] classlab fit_stacked, {len(cfgs)} seeds (load {load_avg()})", flush=True)
    last: dict[int, float] = {}
    hooks = [last_epoch_acc(last, k, m, c, data, pre) for k, (m, c) in enumerate(zip(models, cfgs, strict=True))]
    results = fit_stacked(models, data, cfgs, pre, torch.device("cpu"),
                          on_epoch_end=lambda k, row, state: hooks[k](row, state))
    group = [r["group_seconds"] for r in results[0].history]
    accs = [last[k] for k in range(len(cfgs))]
    std = statistics.stdev(accs)
    rows.append(Row("D", f"classlab fit_stacked, seeds 0–{len(cfgs) - 1}", mean(group) / len(cfgs), mean(accs),
                    per_epoch=[g / len(cfgs) for g in group], threads=torch.get_num_threads(),
                    note=f"amortized; seed noise: test acc std {std * 100:.2f} points, "
                         f"range {min(accs) * 100:.2f}–{max(accs) * 100:.2f}%"))


def bench_grid(cfgs: list[RunConfig], args, rows: list[Row], notebook_cache: dict) -> None:
    cpu = torch.device("cpu")
    cfgs = [classlab_cfg(c, args) for c in cfgs]
    data, held = with_held_out(subset(load_dataset(cfgs[0].data), args.subset))
    assert can_stack(cfgs)
    total_nb, accs_nb = [], []
    for cfg in cfgs:
        model, _ = fresh_model(cfg, data)
        threads = notebook_threads(args)
        print(f"[grid] notebook {cfg.name} (load {load_avg()})", flush=True)
        res = notebook_cache.get((cfg.name, 0)) or notebook_run(model, cfg, data, held, args.epochs, 0, cfg.seed)
        notebook_cache[(cfg.name, 0)] = res
        total_nb.append(res["epoch_s"])
        accs_nb.append(res["test_acc"])
        rows.append(Row("grid", f"notebook {cfg.name}", mean(res["epoch_s"]), res["test_acc"],
                        per_epoch=res["epoch_s"], threads=threads, ref=f"notebook {cfg.name}"))
    per_epoch_nb = [sum(run[e] for run in total_nb) for e in range(args.epochs)]
    rows.append(Row("grid", "notebook, 8 runs one after another", mean(per_epoch_nb), mean(accs_nb),
                    note="accuracy: mean of the 8", per_epoch=per_epoch_nb, threads=threads))
    if args.grid_one_by_one:
        secs_all, accs = [0.0] * args.epochs, []
        print(f"[grid] classlab fit, one by one (load {load_avg()})", flush=True)
        cfgs = [classlab_cfg(c, args) for c in cfgs]
        for cfg in cfgs:
            model, pre = fresh_model(cfg, data)
            last: dict[int, float] = {}
            result = fit(model, data, cfg, pre, cpu, on_epoch_end=last_epoch_acc(last, 0, model, cfg, data, pre))
            for e, r in enumerate(result.history):
                secs_all[e] += r["seconds"]
            accs.append(last[0])
        rows.append(Row("grid", "classlab fit, 8 runs one after another", mean(secs_all), mean(accs),
                        note="accuracy: mean of the 8", per_epoch=secs_all, threads=torch.get_num_threads()))
    built = [fresh_model(c, data) for c in cfgs]
    models, pre = [m for m, _ in built], built[0][1]
    cfgs = [classlab_cfg(c, args) for c in cfgs]
    print(f"[grid] classlab fit_stacked (load {load_avg()})", flush=True)
    last: dict[int, float] = {}
    hooks = [last_epoch_acc(last, k, m, c, data, pre) for k, (m, c) in enumerate(zip(models, cfgs, strict=True))]
    results = fit_stacked(models, data, cfgs, pre, cpu, on_epoch_end=lambda k, row, state: hooks[k](row, state))
    group = [r["group_seconds"] for r in results[0].history]
    for k, cfg in enumerate(cfgs):
        rows.append(Row("grid", f"stacked {cfg.name}", mean(group) / len(cfgs), last[k],
                        note="amortized: the group's time / 8", per_epoch=[g / len(cfgs) for g in group],
                        threads=torch.get_num_threads(), ref=f"notebook {cfg.name}"))
    rows.append(Row("grid", "classlab fit_stacked, 8 runs at once", mean(group), mean(last.values()),
                    note="accuracy: mean of the 8", per_epoch=group, threads=torch.get_num_threads()))


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def add_ratios(rows: list[Row]) -> None:
    """Ratio = notebook (num_workers 0) seconds per epoch / this row's, per study."""
    for r in rows:
        default = "notebook, 8 runs one after another" if r.study == "grid" else "notebook, num_workers 0"
        ref = next((x for x in rows if x.study == r.study and x.pipeline == (r.ref or default)), None)
        if ref is not None and r.epoch_s > 0:
            r.ratio = ref.epoch_s / r.epoch_s


def print_table(rows: list[Row], header: dict) -> str:
    h = header
    lines = [f"date {h['date']}, {h['machine']}, torch {h['torch']}, torchvision {h['torchvision']}, "
             f"threads {h['threads']}, fp32 GEMM peak {h['peak_gflops']} GFLOP/s, epochs {h['epochs']}, "
             f"train subset {h['subset'] or 'all'}",
             f"load average (1, 5, 15 min) at start {header['load_start']}, at end {header['load_end']}", "",
             "| study | pipeline | threads | s / epoch | × notebook (w0) | test acc | note |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        acc = f"{r.test_acc * 100:.2f}%" if r.test_acc is not None else "–"
        ratio = f"{r.ratio:.1f}×" if r.ratio is not None else ""
        threads = r.threads or ""
        lines.append(f"| {r.study} | {r.pipeline} | {threads} | {r.epoch_s:.2f} | {ratio} | {acc} | {r.note} |")
    text = "\n".join(lines)
    print(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 epoch on a 6,400-image training subset")
    parser.add_argument("--studies", nargs="*", default=["D", "grid", "A", "E"], choices=["A", "D", "E", "grid"])
    parser.add_argument("--workers", nargs="*", type=int, default=[0, 2], help="notebook DataLoader num_workers")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--grid-one-by-one", action="store_true", help="also time classlab fit on the 8 cells in turn")
    parser.add_argument("--noise-seeds", type=int, default=8, help="study D: also train this many seeds (stacked) "
                        "to measure seed noise; 0 to skip")
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
              "peak_gflops": round(args.peak / 1e9, 1), "epochs": args.epochs,
              "subset": args.subset,
              "load_start": load_avg()}
    cfgs = study_configs(str(Path(args.data).expanduser()))
    rows: list[Row] = []
    notebook_cache: dict = {}
    for key in args.studies:
        if key == "grid":
            bench_grid(cfgs["grid"], args, rows, notebook_cache)
        else:
            bench_single(key, cfgs[key][0], args, rows, notebook_cache)
    header["load_end"] = load_avg()
    add_ratios(rows)
    print()
    print_table(rows, header)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": [r.__dict__ for r in rows]}, indent=1))


if __name__ == "__main__":
    main()

