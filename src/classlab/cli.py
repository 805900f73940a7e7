"""The `classlab` command: thin typer commands, each one call into the library."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from classlab import __version__
from classlab.errors import ClasslabError, one_line

if TYPE_CHECKING:
    from classlab.results import RunSummary
    from classlab.study import StudyResult

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Image-classification studies from one YAML file.")
console = Console()


def interruptible(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Ctrl-C in a command: one line and exit 130 (typer would print 'Aborted!' and exit 1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            raise typer.Exit(130) from None

    return wrapper


def demo_study() -> Path:
    return Path(str(resources.files("classlab") / "demo" / "demo.yaml"))


def print_comparison(summaries: list[RunSummary], title: str, folder: Path | None = None,
                     reference: str | None = None) -> None:
    """The comparison table; given the study folder, also each variant's accuracy difference against the
    reference (`reference`, else the first variant) with its 95% interval and the paired test's verdict."""
    from classlab import metrics
    from classlab.evidence import against_reference, compare_runs
    from classlab.report.context import seconds_digits
    from classlab.results import summary_from

    rows = compare_runs(summaries)
    tests: list[dict] = []
    if folder is not None:
        from classlab.report.context import folder_tests

        tests = folder_tests(folder, {s.name for s in map(summary_from, summaries)}, reference)
    table = Table(title=title)
    width = max((len(r.variant) for r in rows), default=3)
    table.add_column("run", no_wrap=True, min_width=width)  # names must stay whole, even on 80 columns
    for col in ("seeds", *(metrics.get(name).label for name in metrics.TABLE), "params", "epochs", "sec"):
        table.add_column(col, justify="right")
    if tests:
        table.add_column(f"Δ acc vs {tests[0]['b']} [95% CI]", justify="right", no_wrap=True)
        table.add_column("verdict", no_wrap=True)
    for r in rows:
        shown = [metrics.get(name).format_stat(getattr(r, name)) for name in metrics.TABLE]  # as the report shows them
        cells = [r.variant, str(r.accuracy.n), *shown, f"{r.parameters:,}", r.epochs.format(1, 1),
                 r.seconds.format(1, seconds_digits(r.seconds.mean))]
        table.add_row(*cells, *(against_reference(r.variant, tests) if tests else ()))
    needed = Measurement.get(console, console.options.update_width(400), table).maximum
    out = console if needed <= console.width else Console(file=console.file, width=needed,
                                                          force_terminal=console.is_terminal)
    out.print(table)  # never squeeze numbers into "8…" on an 80-column log: print this table wider
    if tests:
        methods = "; ".join(dict.fromkeys(t["test"] for t in tests if t["test"]))
        from classlab import evidence

        asked = dict.fromkeys(t["question"] for t in tests if t.get("question"))
        lines = [f"verdict: α = 0.05, Holm-corrected; {methods}"]
        lines += [f"  question {q}: {evidence.QUESTIONS[q]}" for q in asked]
        lines += [f"  {t['a']}: {t['note']}" for t in tests if t["metric"] == "accuracy" and t.get("note")]
        lines += [f"  {t['a']}: {t['power']}" for t in tests if t["metric"] == "accuracy" and t.get("power")]
        lines += [f"  {t['a']}: not compared: {t['reason']}" for t in tests if t["metric"] == "accuracy"
                  and t.get("reason")]
        console.print("\n".join(lines), style="dim", markup=False, highlight=False, soft_wrap=True)


@app.command()
def run(
    study: Path | None = typer.Argument(None, help="study YAML; none = the bundled demo"),
    override: list[str] = typer.Option([], "-o", "--override", help="dotted override, e.g. train.epochs=3"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda (default: the study's train.device)"),
    restart: bool = typer.Option(False, "--restart", help="retrain runs from scratch, even finished ones"),
    restart_run: list[str] = typer.Option([], "--restart-run", metavar="NAME",
                                          help="retrain this run from scratch, the others as usual (repeatable)"),
    nproc: int = typer.Option(1, "--nproc", help="train each run data-parallel in N processes on this machine "
                              "(one per GPU; starts torchrun)"),
    jobs: int = typer.Option(1, "--jobs", "-j", help="train the study's runs (or a search's trials) in N worker "
                             "processes of one Optuna storage on this machine, each with 1/N of the CPU threads, "
                             "then select, retrain and report as usual"),
    storage: str | None = typer.Option(None, "--storage", metavar="URL",
                                       help="Optuna storage shared by every worker on any machine: an RDB URL "
                                       "(sqlite:///..., postgresql://..., mysql://...) or journal[:PATH] (a journal "
                                       "file on a shared file system); default for a search: search.db in the "
                                       "study folder"),
    ray_address: str | None = typer.Option(None, "--ray", metavar="ADDRESS",
                                           help="run the runs / trials as Ray tasks: 'local' (a Ray instance on "
                                           "this machine), 'auto' or ray://host:port (an existing cluster)"),
    worker: bool = typer.Option(False, "--worker", hidden=True, help="one of --jobs' processes: train only"),
    batch: int = typer.Option(1, "--batch", hidden=True, help="a grid worker pops this many runs at a time"),
) -> None:
    """Train every run of a study (or a search's trials), then print the comparison (and write the report)."""
    from classlab import launch
    from classlab.study import RunOptions, run_study

    if device is not None and device not in ("auto", "cpu", "cuda"):
        raise ClasslabError(f"--device '{device}': choose auto, cpu or cuda")
    path = study or demo_study()
    flags = [*(x for o in override for x in ("-o", o)), *([f"--device={device}"] if device else []),
             *([f"--storage={storage}"] if storage and jobs == 1 else [])]
    restarts = [f"--restart-run={name}" for name in restart_run]  # not in the resume command: once is enough
    if ray_address is not None:
        if jobs != 1 or nproc != 1:
            raise ClasslabError("--ray and --jobs / --nproc: choose one (Ray places the runs itself)")
        from classlab.ray_runs import run_on_ray

        result = run_on_ray(path, override, ray_address, storage, device, restart, console)
        if result.writer and result.summaries:
            print_comparison(result.summaries, f"{result.study.name}: test set", folder=result.folder,
                             reference=result.selected)
        if result.writer:
            _report_when_ready(result)
        raise typer.Exit(1 if result.failed else 0)
    if nproc != 1:
        if jobs != 1:
            raise ClasslabError("--jobs and --nproc: choose one (--nproc splits each run, --jobs splits the study)")
        raise typer.Exit(launch.torchrun(nproc, path, [*flags, *(["--restart"] if restart else []), *restarts],
                                         console))
    if jobs != 1 and not worker:
        code = launch.run_jobs(jobs, path, [*flags, *restarts], restart, storage, console)
        if code == 130:
            launch.interrupted(study, [*flags, f"--jobs={jobs}", *([f"--storage={storage}"] if storage else [])])
        if code not in (0, 1):  # 1: some run failed, the rest are done; the final pass below lists them
            raise typer.Exit(code)
    # after --jobs the workers have trained (or restarted) every run: the final pass collects them, selects,
    # and (re)trains only the retrain run (a search's: confirms the best trials first)
    options = RunOptions(device=device, restart=restart and jobs == 1, worker=worker, retry_failed=jobs == 1,
                         restart_retrain=restart and jobs != 1, storage=storage, batch=batch,
                         queue=(worker or storage is not None) and jobs == 1, finish_only=jobs != 1,
                         restart_runs=frozenset(restart_run) if jobs == 1 else frozenset())
    try:
        result = run_study(path, override, console=console, options=options)
        if worker:
            raise typer.Exit(1 if result.failed else 0)
        if result.writer and result.summaries:
            print_comparison(result.summaries, f"{result.study.name}: test set", folder=result.folder,
                             reference=result.selected)
        if result.writer:
            _report_when_ready(result)
    except KeyboardInterrupt:
        if worker:  # the --jobs parent speaks for its workers
            raise typer.Exit(130) from None
        launch.interrupted(study, [*flags, *([f"--jobs={jobs}"] if jobs != 1 else []),
                                   *([f"--storage={storage}"] if storage and jobs != 1 else [])])
    if result.failed and not result.writer:
        raise typer.Exit(1)
    if result.failed:
        from classlab.runs import RunFolder

        where = RunFolder(result.folder / "<run>").failed_path
        sys.stderr.write(f"{len(result.failed)} run(s) failed: {', '.join(result.failed)}; reasons in {where}\n")
        raise typer.Exit(1)


def _report_when_ready(result: StudyResult) -> None:
    """The report covers the whole study folder: written now, and again when runs other processes train are done."""
    if result.busy:
        console.print(f"{len(result.busy)} run(s) were being trained by other processes ({', '.join(result.busy)}); "
                      f"when they are done: classlab report {result.folder}", markup=False, highlight=False)
    if result.report is not None:  # made by the study, once (study.study_report)
        console.print(f"report: {result.report[0]}")


def _make_report(folder: Path, reference: str | None = None) -> None:
    """report.html, report.md and comparison.json; `reference`: the study's selected cell, if any."""
    from classlab.report import make_report

    try:
        paths = make_report(folder, reference=reference)
    except ClasslabError as e:  # training succeeded; a report problem must not hide that
        sys.stderr.write(f"warning: report not written: {one_line(e)}; re-make it with classlab report {folder}\n")
        return
    console.print(f"report: {paths[0]}")


@app.command()
@interruptible
def summary(
    study: Path = typer.Argument(..., help="study YAML"),
    override: list[str] = typer.Option([], "-o", "--override"),
) -> None:
    """Print each run's preprocessing (and where it came from) and model table (layers, output shapes,
    parameters, trainable / frozen, parameter group, LR) without training."""
    import torch

    from classlab.config import load_study
    from classlab.data import load_dataset
    from classlab.models import build_model
    from classlab.models.summary import layer_table_text, model_table, parameter_count
    from classlab.plan import expand
    from classlab.transforms import describe, preprocess_for

    for planned in expand(load_study(study, override), where=str(study)):
        run_cfg = planned.config
        data = load_dataset(run_cfg.data)
        pre = preprocess_for(run_cfg, data)
        torch.manual_seed(run_cfg.seed)
        model = build_model(run_cfg.model, len(data.classes), pre.input_shape)
        _, rows = model_table(model, pre.input_shape, run_cfg.train.lr_groups, run_cfg.train.lr)
        console.print(f"[bold]{run_cfg.name}[/]  {len(data.classes)} classes")
        for line in describe(pre):
            console.print(line, style="yellow" if line.startswith("warning") else None, highlight=False,
                          markup=False, soft_wrap=True)
        console.print(layer_table_text(rows, parameter_count(model), pre.input_shape), highlight=False,
                      markup=False, soft_wrap=True)


@app.command("lr-find")
@interruptible
def lr_find_cmd(
    study: Path | None = typer.Argument(None, help="study YAML; none = the bundled demo"),
    run_name: str | None = typer.Option(None, "--run", help="which run of the study (default: the first)"),
    override: list[str] = typer.Option([], "-o", "--override", help="dotted override, e.g. train.batch_size=128"),
    steps: int = typer.Option(200, "--steps", help="training steps in the sweep"),
    start: float = typer.Option(1e-7, "--start", help="first learning rate"),
    end: float = typer.Option(10.0, "--end", help="last learning rate"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda (default: the study's train.device)"),
) -> None:
    """Sweep the learning rate over a few hundred training steps and suggest one (the study file is not changed).
    The plot and the sweep go into the run's folder and into the study's report."""
    from classlab.config import load_study
    from classlab.data import load_dataset
    from classlab.lr_find import lr_find, plot_png, verdict
    from classlab.plan import expand
    from classlab.runs import RunFolder, find_runs
    from classlab.train.device import resolve_device

    if steps < 10 or not 0 < start < end:
        raise ClasslabError("lr-find: give --steps >= 10 and 0 < --start < --end")
    path = study or demo_study()
    cfg = load_study(path, override)
    planned = expand(cfg, where=str(path))
    names = [p.config.name for p in planned]
    if run_name is not None and run_name not in names:
        raise ClasslabError(f"lr-find --run '{run_name}': not a run of {path}; runs: {', '.join(names)}")
    run_cfg = planned[names.index(run_name) if run_name else 0].config
    dev = resolve_device(device or run_cfg.train.device)
    result = lr_find(run_cfg, load_dataset(run_cfg.data), dev, steps=steps, start=start, end=end)
    folder = RunFolder(Path(cfg.out_dir).expanduser() / str(cfg.name) / run_cfg.name)
    folder.write_lr_find(result.to_dict(), plot_png(result))
    console.print(f"{run_cfg.name}: {len(result.lrs)} steps from {start:g} to {result.lrs[-1]:.3g}; "
                  f"plot: {folder.lr_find_plot_path}", markup=False, highlight=False)
    console.print(verdict(result), markup=False, highlight=False, style=None if result.clear_descent else "yellow")
    if find_runs(folder.path.parent):  # the study has trained: its report gets the sweep now (else the next run's)
        _make_report(folder.path.parent)


@app.command("models")
def models_cmd(
    pattern: str | None = typer.Argument(None, help="part of a name, or a pattern such as '*efficientnet*'"),
    pretrained: bool = typer.Option(False, "--pretrained", help="only architectures with default weights"),
) -> None:
    """List the timm and torchvision architectures `model: {name: ...}` accepts (timm/<arch>, torchvision/<arch>)."""
    from classlab.models.zoo import list_architectures

    names = list_architectures(pattern, pretrained)
    for name in names:
        console.print(name, highlight=False, markup=False)
    sys.stderr.write(f"{len(names)} architectures" + (" with default weights" if pretrained else "") +
                     "; use as model: {name: <one of them>, pretrained: imagenet}\n")


@app.command()
@interruptible
def report(runs_dir: Path = typer.Argument(..., help="a study folder of run folders, e.g. runs/demo")) -> None:
    """Re-make report.html and report.md from a study's run folders, without training."""
    from classlab.report import make_report

    html_path, md_path = make_report(runs_dir)
    console.print(f"report: {html_path}\nmarkdown: {md_path}", markup=False, highlight=False)


@app.command("compare")
@interruptible
def compare_cmd(
    run_a: Path = typer.Argument(..., help="run folder A"),
    run_b: Path = typer.Argument(..., help="run folder B"),
    images: Path | None = typer.Option(None, "--images", help="your own images (folder or file); default: test set"),
    n: int = typer.Option(8, "--n", help="how many images get a probability figure"),
    out: Path | None = typer.Option(None, "--out", help="output folder (default: beside RUN_A)"),
) -> None:
    """Two models' class probabilities side by side, image by image, and where they disagree."""
    from rich.markup import escape

    from classlab.compare import compare

    result = compare(run_a, run_b, images=images, n=n, out=out)
    shown = result.disagreements[:20]
    table = Table(title=escape(f"A = {run_a.name}, B = {run_b.name}: they disagree on "
                               f"{len(result.disagreements)} of {result.total} images"))
    for col in ("image", "true", "A predicts", "p", "B predicts", "p"):
        table.add_column(col, justify="right" if col == "p" else "left")
    for row in shown:
        table.add_row(*(escape(str(row.get(k, ""))) for k in ("image", "true", "a", "pa", "b", "pb")))
    if shown:
        console.print(table)
    else:
        console.print(table.title)
    for name in result.skipped:  # on the console too, not only in compare.md
        console.print(f"skipped {name}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    console.print(f"comparison: {result.html}\nmarkdown: {result.md}", markup=False, highlight=False)


@app.command()
@interruptible
def predict(
    run_dir: Path = typer.Argument(..., help="a run folder, e.g. runs/demo/original"),
    images: list[Path] = typer.Argument(..., help="image files and/or folders of images"),
    top_k: int = typer.Option(3, "--top-k", help="classes shown per image"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
    csv_path: Path | None = typer.Option(None, "--csv", help="also write the top-k rows to this CSV file"),
    show: Path | None = typer.Option(None, "--show", help="figure(s): original, prepared input, probabilities"),
    cam: Path | None = typer.Option(None, "--cam", help="figure(s) F.png: Grad-CAM maps of the top classes over "
                                    "the prepared input (F-<image>.png for several images)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    prepare: bool | None = typer.Option(None, "--prepare/--no-prepare",
                                        help="photo preparation (default: on for MNIST-style runs)"),
    grayscale: bool | None = typer.Option(None, "--grayscale/--no-grayscale", help="convert to gray first"),
    invert: str | None = typer.Option(None, "--invert",
                                      help="auto (if the border is lighter than the object) | yes | no"),
    background: bool | None = typer.Option(None, "--background/--no-background",
                                           help="subtract the background (fitted to the border): black"),
    crop: bool | None = typer.Option(None, "--crop/--no-crop",
                                     help="crop to the object, pad to the input's aspect, resize keeping aspect"),
    margin: float | None = typer.Option(None, "--margin", help="crop margin, a fraction of the object's long side"),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize",
                                   help="the run's normalization (turn off only to diagnose)"),
) -> None:
    """Top-k classes for your own images, prepared exactly as the run's test images were."""
    from classlab.predict import run_predict

    if device not in ("auto", "cpu", "cuda"):
        raise ClasslabError(f"--device '{device}': choose auto, cpu or cuda")
    code = run_predict(run_dir, list(images), top_k=top_k, as_json=as_json, csv_path=csv_path, show=show,
                       device=device, normalize=normalize, console=console, cam=cam, prepare_photo=prepare,
                       grayscale=grayscale, invert=invert, background=background, crop=crop, margin=margin)
    if code:
        raise typer.Exit(code)


@app.command()
@interruptible
def export(
    run_dir: Path = typer.Argument(..., help="a run folder, e.g. runs/demo/original"),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx | torchscript"),
    out: Path | None = typer.Option(None, "-o", "--out", help="model file (default: RUN/export/model.onnx or .pt); "
                                    "preprocessing.json and classes.txt are written beside it"),
) -> None:
    """The trained model with its preprocessing in the graph (uint8 images in, probabilities out)."""
    from classlab.export import export_run

    result = export_run(run_dir, out, fmt)
    console.print(f"{result.format}: {result.path}\npreprocessing: {result.preprocessing}\nclasses: {result.classes}",
                  markup=False, highlight=False)


@app.command("config")
def config_cmd(
    section: str | None = typer.Argument(None, help="only the keys under this dotted path, e.g. train or data.augment"),
    reference: bool = typer.Option(False, "--reference", help="every study-file key: type, default and meaning"),
    markdown: bool = typer.Option(False, "--markdown", help="as Markdown tables (what docs/config.md holds)"),
) -> None:
    """The configuration reference, generated from the config models (docs/config.md is its Markdown form)."""
    from classlab.config_reference import render_markdown, render_text, sections

    if not reference:
        raise ClasslabError("classlab config: add --reference to print every study-file key (or see docs/config.md)")
    secs = sections()
    if section:
        secs = [s for s in secs if s.path == section or s.path.startswith((section + ".", section + "["))]
        if not secs:
            paths = sorted({s.path.split(".")[0] for s in sections() if s.path})
            raise ClasslabError(f"classlab config: no section '{section}'; top-level sections: {', '.join(paths)}")
    text = render_markdown(secs) if markdown else render_text(secs)
    sys.stdout.write(text)


@app.command()
def version() -> None:
    """Print the classlab version."""
    console.print(__version__)


def _version_option(value: bool) -> None:
    if value:
        console.print(__version__, markup=False, highlight=False)
        raise typer.Exit(0)


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version_option, is_eager=True,
                                          help="print the classlab version and exit")) -> None:
    """Image-classification studies from one YAML file."""


def ray_flag(argv: list[str]) -> list[str]:
    """`--ray` may stand alone (a local Ray instance): give it the value 'local' unless an address follows."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--ray":
            following = out[i + 1] if i + 1 < len(out) else None
            if following is None or following.startswith("-") or following.endswith((".yaml", ".yml")) \
                    or Path(following).is_file():
                out[i] = "--ray=local"
            break
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr with their exit code, never a traceback."""
    from classlab.launch import install_signals

    install_signals()
    try:
        app(args=ray_flag(sys.argv[1:] if argv is None else argv), prog_name="classlab")
    except ClasslabError as e:
        sys.stderr.write(f"error: {one_line(e)}\n")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
