"""Progress display: rich bars on a terminal; otherwise (a log file) one plain line per epoch, and a plain
progress line whenever LOG_EVERY seconds have passed since the last line, so a long epoch is never silent."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class EpochProgress:
    LOG_EVERY = 30.0  # seconds: off a terminal, a progress line at least this often during an epoch

    def __init__(self, console: Console, run_name: str, epochs: int) -> None:
        self.console = console
        self.run_name = run_name
        self.epochs = epochs
        self.bar: Progress | None = None
        self.task = None
        self.epoch, self.steps = 0, 0
        self.last_line = time.monotonic()

    def start_epoch(self, epoch: int, steps: int) -> None:
        self.epoch, self.steps = epoch, steps
        if not self.console.is_terminal:
            self.last_line = time.monotonic()
            return
        self.bar = Progress(
            TextColumn("[bold]{task.fields[run]}[/] epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f} acc {task.fields[acc]:.2%} {task.fields[ips]:,.0f} img/s"),
            TimeRemainingColumn(), console=self.console, transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task("", total=steps, run=self.run_name, epoch=epoch, epochs=self.epochs,
                                      loss=0.0, acc=0.0, ips=0.0)

    def step(self, done: int, loss: float, acc: float, images_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, loss=loss, acc=acc, ips=images_per_s)
            return
        self.console.print(
            f"  {self.run_name} epoch {self.epoch}/{self.epochs}  step {done}/{self.steps}  train loss {loss:.4f} "
            f"acc {acc:.2%}  {images_per_s:,.0f} img/s", highlight=False, soft_wrap=True, markup=False)
        self.last_line = time.monotonic()

    @property
    def wants_updates(self) -> bool:
        """A bar always takes updates; a log only once LOG_EVERY seconds have passed since its last line
        (fit asks every few steps, so the host reads behind an update cost nothing in between)."""
        return self.bar is not None or time.monotonic() - self.last_line >= self.LOG_EVERY

    def note(self, text: str) -> None:
        """A line of its own between epochs (early stopping)."""
        self.console.print(f"  {text}", highlight=False, soft_wrap=True, markup=False)
        self.last_line = time.monotonic()

    def end_epoch(self, row: dict) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        val = ""
        if row.get("val_loss") is not None:
            val = f"  val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.2%}"
        mark = " *" if row.get("best") and row.get("val_loss") is not None else ""  # the best validation epoch
        self.console.print(
            f"  {self.run_name} epoch {row['epoch']}/{self.epochs}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_accuracy']:.2%}{val}  {row['seconds']:.1f}s{mark}",
            highlight=False, soft_wrap=True,
        )
        self.last_line = time.monotonic()
