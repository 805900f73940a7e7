"""One prepared check of classlab's GPU path: the CUDA tests, then one table of training speed.

    python benchmarks/gpu_check.py                 # ~6 minutes on one GPU
    python benchmarks/gpu_check.py --quick         # fewer steps per row (a smoke run)
    python benchmarks/gpu_check.py --cpu-dry-run 64 --size 32   # the studies' rows on the CPU, 64 images

Rows (each: training images/s, seconds per epoch, peak GPU memory):
- the studies' own recipe on FER-2013 complete: experiments/fer2013-resnet18.yaml's scratch-sgd run as it
  is (ResNet-18 from scratch, 224 px, batch 64, SGD 1e-3 momentum 0.9, the studies' split: 25,838 training
  images), one whole training epoch timed after a warm-up epoch, eager and with train.compile;
- FER's ResNet-18 at 224 px (the FER sample repeated to 28,709 training images, batch 64, as in the
  studies), classlab eager and compiled, bf16 autocast (the precision policy's choice on >= 8.0);
- the same through the notebooks' pipeline: a torchvision-style dataset decoding a PIL image per sample,
  per-sample Resize(224) + Grayscale(3) + ToTensor + Normalize, a DataLoader with workers, `.item()` per
  step: the ratio row;
- study D's MLP (one run) and its 8-cell grid stacked, study E's CNN, on Fashion-MNIST.
Long rows time a fixed number of steps after a warm-up and report the epoch time those steps imply.
On a machine without a GPU it says so and exits 0. This is a benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"
FER_TRAIN_IMAGES = 28_709


def cuda_tests() -> str:
    """The CUDA-marked tests (tests/test_cuda.py), run by pytest in a child process."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    last = [line for line in done.stdout.splitlines() if line.strip()]
    return last[-1] if last else f"pytest exit code {done.returncode}"


def _cfg(name: str, data: dict, model: dict, train: dict):
    from classlab.config import RunConfig, validate

    return validate(RunConfig, {"name": name, "data": data, "model": model,
                                "train": {"device": "cuda", "epochs": 1, **train}})


def fer_data(root: Path, size: int):
    """The FER sample (48×48 gray) with its training split repeated to FER-2013's 28,709 images."""
    from classlab.data import ImageData, Split, load_dataset

    cfg = _cfg("fer", {"dataset": "image-folder", "root": str(root), "channels": 1, "to_rgb": True,
                       "resize": [size, size], "val_fraction": None}, {"name": "resnet18"}, {})
    data = load_dataset(cfg.data)
    reps = -(-FER_TRAIN_IMAGES // len(data.train))
    idx = torch.arange(len(data.train)).repeat(reps)[:FER_TRAIN_IMAGES]
    train = Split(data.train.images[idx], data.train.labels[idx])
    return cfg, ImageData(train=train, val=None, test=data.test, classes=data.classes, mean=data.mean,
                          std=data.std, source=data.source, skipped=[])


def studies_recipe(root: Path, size: int, device: str, limit: int | None = None):
    """experiments/fer2013-resnet18.yaml's scratch-sgd run as the file writes it, on FER-2013 complete at
    `root` (a stratified `limit` training images for a dry run), and its data."""
    from classlab.config import load_study
    from classlab.data import load_dataset
    from classlab.plan import expand

    overrides = [f"data.root={root}", f"data.resize={size}", f"train.device={device}", "train.epochs=1"]
    if limit:
        overrides += [f"data.subset.train={limit}", f"data.subset.test={max(7, limit // 4)}",
                      f"train.batch_size={min(64, limit // 2)}"]
    study = load_study(REPO / "experiments" / "fer2013-resnet18.yaml", overrides, notes=[])
    cfg = next(p.config for p in expand(study) if p.variant == "scratch-sgd")
    return cfg, load_dataset(cfg.data)


def studies_rows(root: Path, size: int, device: torch.device, limit: int | None = None) -> list[tuple[str, dict]]:
    """The studies' recipe for one whole epoch, eager and compiled."""
    cfg, data = studies_recipe(root, size, device.type, limit)
    steps = -(-len(data.train) // cfg.train.batch_size)
    label = f"FER-2013 studies' recipe (scratch ResNet-18, SGD, {size}px, batch {cfg.train.batch_size}, " \
            f"{len(data.train):,} images)"
    compiled = cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": True})})
    return [(f"{label}, eager", time_fit([cfg], data, steps, device)),
            (f"{label}, compiled", time_fit([compiled], data, steps, device))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fit(cfgs, data, steps: int, device: torch.device | None = None) -> dict:
    """classlab's fit over `steps` training steps (after one warm-up epoch of those steps): images/s and
    the epoch time at that rate, peak memory."""
    from classlab.data import ImageData, Split
    from classlab.models import build_model
    from classlab.train.fit import fit
    from classlab.transforms import preprocess_for

    device = device or torch.device("cuda")
    cuda = device.type == "cuda"
    bs = cfgs[0].train.batch_size
    n = min(len(data.train), steps * bs)
    part = ImageData(train=Split(data.train.images[:n], data.train.labels[:n]), val=None, test=data.test,
                     classes=data.classes, mean=data.mean, std=data.std, source=data.source, skipped=[])
    pre = preprocess_for(cfgs[0], data)
    models = []
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)
        models.append(build_model(cfg.model, len(data.classes), pre.input_shape).to(device))
    two = [c.model_copy(update={"train": c.train.model_copy(update={"epochs": 2})}) for c in cfgs]
    laps: list[float] = []

    def lap(k, row, state) -> None:
        if k == 0:
            _sync(device)
            laps.append(time.perf_counter())

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    fit(models, part, two, pre, device, callbacks=[lap])  # epoch 1 warms up (cuDNN autotune, compile)
    seconds = laps[1] - laps[0]
    rate = n * len(cfgs) / seconds
    return {"images_per_s": rate, "epoch_s": len(data.train) * len(cfgs) / rate, "warmup_s": laps[0] - start,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0}


def time_notebook(data, size: int, steps: int, workers: int) -> dict:
    """The notebooks' pipeline for FER: PIL per sample, per-sample transforms, DataLoader workers."""
    import numpy as np
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import models, transforms

    tf = transforms.Compose([transforms.Resize(size), transforms.Grayscale(3), transforms.ToTensor(),
                             transforms.Normalize([0.5] * 3, [0.5] * 3)])

    class Faces(Dataset):
        def __len__(self) -> int:
            return len(data.train)

        def __getitem__(self, i: int):
            return tf(Image.fromarray(np.asarray(data.train.images[i, 0]), mode="L")), int(data.train.labels[i])

    device = torch.device("cuda")
    model = models.resnet18(num_classes=len(data.classes)).to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loader = DataLoader(Faces(), batch_size=64, shuffle=True, num_workers=workers, pin_memory=True)
    torch.cuda.reset_peak_memory_stats()
    seen, t0 = 0, None
    for step, (x, y) in enumerate(loader):
        if step == 10:  # warm-up: workers started, cuDNN chose its kernels
            torch.cuda.synchronize()
            t0, seen = time.perf_counter(), 0
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()
        seen += len(y)
        if step == 10 + steps:
            break
    torch.cuda.synchronize()
    rate = seen / (time.perf_counter() - t0)
    return {"images_per_s": rate, "epoch_s": len(data.train) / rate, "warmup_s": 0.0,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30}


def fashion_rows(root: Path, steps: int) -> list[tuple[str, dict]]:
    from classlab.data import load_dataset

    fm = {"dataset": "fashion-mnist", "root": str(root), "val_fraction": None}
    d = _cfg("D", {**fm, "normalize": {"mean": [0.5], "std": [0.5]}}, {"name": "study_d_mlp"}, {"batch_size": 64})
    grid = [_cfg(f"D-{reg}-{opt}", d.data.model_dump(), {"name": "study_d_mlp", **extra},
                 {"batch_size": 64, "optimizer": opt, **({"l1": 1e-4} if reg == "l1" else {})})
            for reg, extra in (("none", {}), ("bn", {"batchnorm": True}), ("dropout", {"dropout": 0.2}), ("l1", {}))
            for opt in ("adam", "rmsprop")]
    e = _cfg("E", {**fm, "normalize": {"mean": [0.5], "std": [0.5]}, "augment": {"hflip": 0.5, "rotate": 10}},
             {"name": "study_e_cnn"}, {"batch_size": 64})
    data = load_dataset(d.data)
    return [("D MLP, one run", time_fit([d], data, steps)), ("D grid, 8 cells stacked", time_fit(grid, data, steps)),
            ("E CNN", time_fit([e], load_dataset(e.data), steps))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=8, help="notebook DataLoader workers")
    parser.add_argument("--cpu-dry-run", type=int, metavar="N", help="only the studies' rows, on the CPU, with N "
                        "training images (checks this script's logic where there is no GPU)")
    args = parser.parse_args()
    if args.cpu_dry_run:
        rows = studies_rows(Path(args.data) / "fer2013", args.size, torch.device("cpu"), args.cpu_dry_run)
        print_rows(rows, None)
        return
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine; nothing to check (the CPU tests cover the logic)")
        return
    root = Path(args.data)
    steps = 40 if args.quick else 150
    name = torch.cuda.get_device_name()
    cap = ".".join(map(str, torch.cuda.get_device_capability()))
    print(f"{name} (compute capability {cap}), torch {torch.__version__}", flush=True)
    print(f"CUDA tests: {cuda_tests()}", flush=True)
    rows = studies_rows(root / "fer2013", args.size, torch.device("cuda"))
    print_rows(rows, None)
    cfg, fer = fer_data(root / "fer-sample", args.size)
    base = {"batch_size": 64, "optimizer": "adam", "lr": 1e-3}
    eager = cfg.model_copy(update={"train": cfg.train.model_copy(update=base)})
    rows.append((f"FER ResNet-18 {args.size}px, classlab eager bf16", time_fit([eager], fer, steps)))
    compiled = eager.model_copy(update={"train": eager.train.model_copy(update={"compile": True})})
    rows.append((f"FER ResNet-18 {args.size}px, classlab compiled bf16", time_fit([compiled], fer, steps)))
    rows.append((f"FER ResNet-18 {args.size}px, notebook ({args.workers} workers) bf16",
                 time_notebook(fer, args.size, steps, args.workers)))
    rows += fashion_rows(root / "fashion-mnist", steps * 4)
    print_rows(rows, rows[4][1]["images_per_s"])


def print_rows(rows: list[tuple[str, dict]], notebook: float | None) -> None:
    """One markdown table; `× notebook` against the notebook pipeline's rate for the FER sample rows."""
    print("\n| row | images/s | s/epoch | warm-up s | peak GiB | × notebook |\n|---|---:|---:|---:|---:|---:|")
    for label, r in rows:
        ratio = f"{r['images_per_s'] / notebook:.1f}×" if notebook and label.startswith("FER ResNet") else ""
        print(f"| {label} | {r['images_per_s']:,.0f} | {r['epoch_s']:.2f} | {r['warmup_s']:.1f} | "
              f"{r['peak_gb']:.2f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
