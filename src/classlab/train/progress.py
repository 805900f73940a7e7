"""Progress display: rich bars on a terminal, one plain line per epoch otherwise (logs stay readable)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class EpochProgress:
    def __init__(self, console: Console, run_name: str, epochs: int) -> None:
        self.console = console
        self.run_name = run_name
        self.epochs = epochs
        self.bar: Progress | None = None
        self.task = None

    def start_epoch(self, epoch: int, steps: int) -> None:
        if not self.console.is_terminal:
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

    @property
    def wants_updates(self) -> bool:
        return self.bar is not None

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
