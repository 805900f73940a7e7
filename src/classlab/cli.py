"""The `classlab` command: thin typer commands, each one call into the library."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from classlab import __version__
from classlab.errors import ClasslabError, one_line

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Image-classification studies from one YAML file.")
console = Console()


def demo_study() -> Path:
    return Path(str(resources.files("classlab") / "demo" / "demo.yaml"))


def print_comparison(summaries: list[dict], title: str) -> None:
    from classlab.comparison import compare_runs

    rows = compare_runs(summaries)
    table = Table(title=title)
    for col in ("run", "seeds", "acc %", "loss", "macro F1", "params", "epochs", "sec"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for r in rows:
        table.add_row(r.variant, str(r.accuracy.n), r.accuracy.format(100), r.loss.format(1, 4),
                      r.macro_f1.format(1, 4), f"{r.parameters:,}", r.epochs.format(1, 1), r.seconds.format(1, 1))
    console.print(table)


@app.command()
def run(
    study: Path | None = typer.Argument(None, help="study YAML; none = the bundled demo"),
    override: list[str] = typer.Option([], "-o", "--override", help="dotted override, e.g. train.epochs=3"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda (default: the study's train.device)"),
    restart: bool = typer.Option(False, "--restart", help="retrain runs from scratch, even finished ones"),
) -> None:
    """Train every run of a study, then print the comparison (and write the report)."""
    from classlab.study import run_study

    if device is not None and device not in ("auto", "cpu", "cuda"):
        raise ClasslabError(f"--device '{device}': choose auto, cpu or cuda")
    path = study or demo_study()
    try:
        result = run_study(path, override, device=device, restart=restart, console=console)
    except KeyboardInterrupt:
        sys.stderr.write(
            "interrupted: every finished epoch is saved; run the same command again to resume "
            "(or add --restart to start over)\n"
        )
        raise typer.Exit(130) from None
    if result.summaries:
        print_comparison(result.summaries, f"{result.study.name}: test set")
    _make_report(result.folder)
    if result.failed:
        sys.stderr.write(f"{len(result.failed)} run(s) failed: {', '.join(result.failed)}\n")
        raise typer.Exit(1)


def _make_report(folder: Path) -> None:
    try:
        from classlab.report import make_report
    except ImportError:
        return
    paths = make_report(folder)
    console.print(f"report: {paths[0]}")


@app.command()
def summary(
    study: Path = typer.Argument(..., help="study YAML"),
    override: list[str] = typer.Option([], "-o", "--override"),
) -> None:
    """Print each run's model table (layers, output shapes, parameters, trainable) without training."""
    import torch

    from classlab.config import load_study
    from classlab.data import load_dataset
    from classlab.models import build_model
    from classlab.models.summary import model_table
    from classlab.study import expand, preprocess_for

    cfg, cli = load_study(study, override)
    for planned in expand(cfg, cli, where=str(study)):
        run_cfg = planned.config
        data = load_dataset(run_cfg.data)
        pre = preprocess_for(run_cfg, data)
        torch.manual_seed(run_cfg.seed)
        model = build_model(run_cfg.model, len(data.classes), pre.input_shape)
        table, _ = model_table(model, pre.input_shape)
        console.print(f"[bold]{run_cfg.name}[/]  input {list(pre.input_shape)}, {len(data.classes)} classes")
        console.print(table, highlight=False, markup=False)


@app.command()
def version() -> None:
    """Print the classlab version."""
    console.print(__version__)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr with their exit code, never a traceback."""
    try:
        app(args=argv, prog_name="classlab")
    except ClasslabError as e:
        sys.stderr.write(f"error: {one_line(e)}\n")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
