"""The study report: made after `classlab run`, re-made from run folders alone, self-contained, escaped,
and it opens in a real browser (headless Chromium) with every image decoded."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from classlab.evidence import compare_runs
from classlab.report import make_report
from classlab.report.context import build_context, comparison_rows, confused_pairs
from classlab.report.load import RunData
from classlab.report.plots import learning_curves
from classlab.report.render import md_escape, render_markdown
from classlab.report.sanity import sanity_notes
from tests.conftest import demo_study_copy, make_idx_folder, tiny_study, write_study

EVIL = "<script>alert(1)</script>"


def _cli(*args: str) -> int:
    from classlab.cli import main

    try:
        main(list(args))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory) -> Path:
    """The bundled demo study, trained once for this module: 1 epoch on 600 / 200 images."""
    root = tmp_path_factory.mktemp("demo")
    path = demo_study_copy(root)
    code = _cli("run", str(path), "-o", "train.epochs=1", "-o", "data.subset={train: 600, test: 200}")
    assert code == 0
    return root / "runs" / "demo"


def test_run_writes_self_contained_report(demo_runs):
    html_path, md_path = demo_runs / "report.html", demo_runs / "report.md"
    assert html_path.is_file() and md_path.is_file()
    html = html_path.read_text()
    assert 'id="comparison"' in html and "original" in html and "permuted" in html
    # self-contained: every image is a data URI, nothing is fetched from anywhere
    sources = re.findall(r'<img src="([^"]*)"', html)
    # overlaid curves + per run: curves, confusion, mistakes, reliability diagram, Grad-CAM on the mistakes
    # + the two-variant diff: confusion difference, gallery
    assert len(sources) == 1 + 2 * 5 + 2
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="(https?:)?//', html) and "<link" not in html
    # the report's sections, per run and per study
    for needle in ("Sanity notes", "Learning curves of all runs", "Confusion matrix", "Per-class precision",
                   "macro avg", "weighted avg", "Most-confused class pairs", "Worst test mistakes",
                   "torchinfo summary", "trainable", "frozen", "pixel-permuted version of original"):
        assert needle in html, needle
    # the Markdown twin references PNG files that exist beside it
    md = md_path.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(sources)
    assert all((demo_runs / link).is_file() and (demo_runs / link).read_bytes()[:4] == b"\x89PNG" for link in links)
    assert "| run | seeds | test accuracy %" in md


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def _chromium_run(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=180)


def test_report_opens_in_headless_chromium(demo_runs, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("headless Chromium is not installed and could not be (Debian: apt-get install chromium; "
                    ".ci/run installs it where it can)")
    url = (demo_runs / "report.html").resolve().as_uri()
    dom = _chromium_run(binary, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stdout[:500]
    images = re.search(r'data-images="(\d+)"', body.group(0))
    broken = re.search(r'data-broken-images="(\d+)"', body.group(0))
    assert images and broken, f"the page's load check did not run: {body.group(0)}"
    assert int(images.group(1)) == 13 and int(broken.group(1)) == 0
    assert 'id="comparison"' in dom.stdout and "<td" in dom.stdout

    shot = demo_runs / "report_screenshot.png"
    run = _chromium_run(binary, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,900", url)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1280, 900)
        assert len(np.unique(np.asarray(img.convert("L")))) > 10  # not a blank page


def test_report_command_remakes_without_training(demo_runs, run_cli, monkeypatch):
    import classlab.study
    import classlab.train.fit

    def no_training(*args, **kwargs):
        raise AssertionError("the report must not train")

    monkeypatch.setattr(classlab.study, "train_run", no_training)
    monkeypatch.setattr(classlab.train.fit, "fit", no_training)
    run_files = {p: p.stat().st_mtime_ns for run in demo_runs.glob("*/summary.json") for p in run.parent.rglob("*")
                 if p.is_file()}
    assert len(run_files) > 10
    (demo_runs / "report.html").unlink()
    (demo_runs / "report.md").unlink()
    shutil.rmtree(demo_runs / "report_files")
    code, out, err = run_cli("report", str(demo_runs))
    assert code == 0, err
    assert "report.html" in out
    assert (demo_runs / "report.html").is_file() and (demo_runs / "report.md").is_file()
    assert len(list((demo_runs / "report_files").glob("*.png"))) == 13
    assert {p: p.stat().st_mtime_ns for p in run_files} == run_files  # run folders untouched


def test_report_command_bad_folder_is_one_line(run_cli, tmp_path):
    code, _, err = run_cli("report", str(tmp_path / "absent"))
    assert code == 2 and err.startswith("error: ") and "absent" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("report", str(tmp_path / "empty"))
    assert code == 2 and "no classlab runs" in err


def test_user_strings_are_escaped(run_cli, tmp_path):
    data = make_idx_folder(tmp_path / "toy")
    study = tiny_study(tmp_path, data, runs=[{"name": "original"}])
    study["data"]["relabel"] = {EVIL: ["0", "1"], "other": ["2", "3"]}
    study["train"]["epochs"] = 1
    code, _, err = run_cli("run", str(write_study(tmp_path / "s.yaml", study)))
    assert code == 0, err
    folder = tmp_path / "runs" / "toy"
    html = (folder / "report.html").read_text()
    assert EVIL not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<script") == 1  # only the report's own offline image check
    md = (folder / "report.md").read_text()
    assert EVIL not in md and "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    assert md_escape("a|b <i>[x]</i>") == "a\\|b &lt;i&gt;\\[x\\]&lt;/i&gt;"


# ----------------------------------------------------------------------------- computed content, no training


def _summary(name: str, accuracy: float, seed: int = 0, classes: int = 4, n: int = 400) -> dict:
    support = [n // classes] * classes
    f1 = {"precision": accuracy, "recall": accuracy, "f1": accuracy, "support": n}
    cm = [[0] * classes for _ in range(classes)]
    for i in range(classes):
        right = round(support[i] * accuracy)
        cm[i][i] = right
        cm[i][(i + 1) % classes] = support[i] - right
    return {"name": name, "seed": seed, "classes": [f"c{i}" for i in range(classes)],
            "test": {"loss": 1 - accuracy, "accuracy": accuracy, "macro": f1, "weighted": f1,
                     "per_class": {"precision": [accuracy] * classes, "recall": [accuracy] * classes,
                                   "f1": [accuracy] * classes, "support": support},
                     "confusion_matrix": cm},
            "best_epoch": 2, "epochs_run": 2, "stopped_early": False,
            "parameters": {"total": 100, "trainable": 100, "frozen": 0}, "seconds": 1.0}


def _run(name: str, accuracy: float, seed: int = 0, permuted: bool = False,
         metrics: list[dict] | None = None) -> RunData:
    config = {"name": name, "seed": seed, "data": {"dataset": "idx", "permute_pixels": {"seed": 0} if permuted
                                                   else None}, "model": {"name": "mlp"}, "train": {"epochs": 2}}
    metrics = metrics or [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 0.5 + 0.1 * e,
                           "val_loss": 1.1 / e, "val_accuracy": 0.5 + 0.1 * e} for e in (1, 2)]
    return RunData(name, Path(name), _summary(name, accuracy, seed), config, metrics, None, None, None, None)


def _notes(runs: list[RunData]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for note in sanity_notes(compare_runs([r.summary for r in runs]), runs):
        out.setdefault(note.kind, []).append(note.subject)
    return out


def test_sanity_near_chance_and_val_above_train():
    lazy = [{"epoch": 1, "train_loss": 2.0, "train_accuracy": 0.30, "val_loss": 1.0, "val_accuracy": 0.62}]
    notes = _notes([_run("good", 0.9), _run("guessing", 0.27), _run("odd", 0.6, metrics=lazy)])
    assert notes["near_chance"] == ["guessing"]
    assert notes["val_above_train"] == ["odd"]
    assert "permuted_beats_original" not in notes


def test_sanity_permuted_beating_original_beyond_noise():
    # one seed each: test-set sampling noise on 400 images is about ±6 points for this gap
    assert "permuted_beats_original" not in _notes([_run("original", 0.80), _run("permuted", 0.82, permuted=True)])
    assert _notes([_run("original", 0.70), _run("permuted", 0.85, permuted=True)])["permuted_beats_original"] == \
        ["permuted"]
    # several seeds: the seed noise decides
    tight = [_run(f"original-seed{s}", 0.70 + 0.002 * s, s) for s in range(3)]
    tight += [_run(f"permuted-seed{s}", 0.74 + 0.002 * s, s, permuted=True) for s in range(3)]
    assert _notes(tight)["permuted_beats_original"] == ["permuted"]
    noisy = [_run(f"original-seed{s}", a, s) for s, a in enumerate((0.6, 0.8, 0.7))]
    noisy += [_run(f"permuted-seed{s}", a, s, permuted=True) for s, a in enumerate((0.65, 0.85, 0.72))]
    assert "permuted_beats_original" not in _notes(noisy)


def test_comparison_marks_runs_within_seed_noise():
    runs = [_run(f"a-seed{s}", acc, s) for s, acc in enumerate((0.80, 0.84, 0.82))]
    runs += [_run(f"b-seed{s}", acc, s) for s, acc in enumerate((0.81, 0.83, 0.82))]
    runs += [_run(f"c-seed{s}", acc, s) for s, acc in enumerate((0.50, 0.51, 0.52))]
    rows = {r["variant"]: r for r in comparison_rows(compare_runs([r.summary for r in runs]), {})}
    assert rows["a"]["within_noise"] == ["b"] and rows["b"]["within_noise"] == ["a"]
    assert rows["c"]["within_noise"] == [] and rows["a"]["ci"].startswith("[")
    assert "±" in rows["a"]["accuracy"] and rows["a"]["best"] and not rows["c"]["best"]


def test_context_of_two_seeded_runs():
    runs = [_run(f"a-seed{s}", acc, s) for s, acc in enumerate((0.80, 0.84))]
    context, figures = build_context("s", runs, [])
    assert context["multi_seed"] and [r["name"] for r in context["runs"]] == ["a-seed0", "a-seed1"]
    # seed-band curves + the variant's mean confusion + curves and confusion per run (no predictions stored)
    assert len(figures) == 2 + 2 * len(runs)
    assert context["seed_bands"] and [v["variant"] for v in context["seeded"]] == ["a"]
    assert len({f.key for f in figures}) == len(figures)


def test_confused_pairs_and_curves_with_early_stop():
    pairs = confused_pairs([[5, 3, 0], [0, 6, 1], [2, 0, 4]], ["x", "y", "z"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [("x", "y", 3), ("z", "x", 2), ("y", "z", 1)]
    metrics = [{"epoch": e, "train_loss": 1 / e, "train_accuracy": 0.1 * e, "val_loss": 1 / e,
                "val_accuracy": 0.1 * e} for e in range(1, 5)]
    plot = learning_curves(metrics, 2, True, 10, "k", "a $run with $ signs")
    assert plot.png[:4] == b"\x89PNG"


def test_report_from_folders_with_a_failed_run(tmp_path):
    """Run folders written by hand (as an older or partial run): missing pieces say so, failures are listed."""
    folder = tmp_path / "study"
    run = folder / "one"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(_summary("one", 0.9)))
    (run / "config.yaml").write_text(yaml.safe_dump(_run("one", 0.9).config))
    (folder / "broken").mkdir()
    (folder / "broken" / "failed.json").write_text(json.dumps({"reason": "loss became nan at epoch 3"}))
    html_path, md_path = make_report(folder)
    html = html_path.read_text()
    assert "No metrics.jsonl" in html and "No model summary" in html and "loss became nan at epoch 3" in html
    assert "Failed runs" in md_path.read_text()


# ----------------------------------------------------------------------------- is the difference real?


def test_demo_report_has_verdicts_and_comparison_json(demo_runs):
    saved = json.loads((demo_runs / "comparison.json").read_text())
    assert saved["reference"] == "original"
    rows = {r["metric"]: r for r in saved["rows"]}
    assert set(rows) == {"accuracy", "macro_f1"} and rows["accuracy"]["a"] == "permuted"
    assert rows["accuracy"]["test"].startswith("McNemar") and rows["accuracy"]["n_seeds_a"] == 1
    html = (demo_runs / "report.html").read_text()
    assert 'id="evidence"' in html and "verdict" in html and "Holm correction was applied" in html
    assert rows["accuracy"]["verdict"] in html and 'id="variant-diff-classes"' in html
    md = (demo_runs / "report.md").read_text()
    assert "## Is the difference real?" in md and "| permuted vs original | accuracy | models | 1 / 1 |" in md
    assert "## Variant diff: permuted against original" in md


def test_terminal_comparison_has_the_verdict_column(demo_runs, capsys):
    from classlab.cli import print_comparison
    from classlab.runs import find_runs

    summaries = [f.read_summary() for f in find_runs(demo_runs)]
    print_comparison(summaries, "demo: test set", folder=demo_runs)
    out = capsys.readouterr().out
    assert "verdict" in out and "reference" in out and "Δ acc vs original" in out and "Holm" in out
    saved = json.loads((demo_runs / "comparison.json").read_text())
    assert next(r for r in saved["rows"] if r["metric"] == "accuracy")["verdict"] in out
    print_comparison(summaries, "demo: test set")  # without the folder: the table as before
    assert "verdict" not in capsys.readouterr().out


def test_context_of_seeded_variants_with_predictions():
    """Two variants × 2 seeds with predictions: hierarchical test rows, seed bands, the variant diff."""
    rng = np.random.default_rng(0)
    y_true = np.arange(400) % 4
    runs = []
    for variant, accuracy in (("a", 0.6), ("b", 0.9)):
        for s in range(2):
            run = _run(f"{variant}-seed{s}", accuracy, s)
            correct = (rng.random(400) < accuracy) | (y_true == 3)  # class 3: both always right
            y_pred = np.where(correct, y_true, (y_true + 1) % 4)
            probs = np.eye(4, dtype=np.float32)[y_pred]
            wrong = np.flatnonzero(~correct)[:4]
            run.predictions = {"y_true": y_true, "y_pred": y_pred, "probs": probs, "worst_index": wrong,
                               "worst_images": np.zeros((len(wrong), 1, 8, 8), np.uint8)}
            runs.append(run)
    context, figures = build_context("s", runs, [])
    assert context["reference"] == "a" and context["seed_bands"] and len(context["seeded"]) == 2
    accuracy = next(r for r in context["evidence"] if r["metric"] == "accuracy")
    assert accuracy["verdict"] == "better" and accuracy["seeds"] == "2 / 2" and accuracy["diff"].startswith("+")
    assert "Welch t test on per-seed metrics" in context["evidence_tests"]  # the settings question (issue 25)
    rows = {r["variant"]: r for r in context["comparison"]}
    assert rows["a"]["verdict"] == "reference" and rows["b"]["verdict"] == "better"
    diff = context["variant_diff"]
    assert diff["a"] == "b" and diff["b"] == "a" and len(diff["rows"]) == 4 and diff["gallery"] is not None
    assert diff["rows"][0]["recall"]["excludes_zero"] and not diff["rows"][3]["recall"]["excludes_zero"]
    md = render_markdown("report.md.j2", context, "files")
    assert "| c0 | " in md and "| **+" in md and "| +0.00 \\[+0.00, +0.00\\] |" in md  # bold only where it excludes 0
    # band curves + 2 mean confusions + diff confusion + gallery + per run: curves, confusion, mistakes
    # (+ per run: the reliability diagram, from predictions.npz; no Grad-CAM: these runs have no checkpoint)
    assert len(figures) == 1 + 2 + 2 + 4 * len(runs) and len({f.key for f in figures}) == len(figures)


# ----------------------------------------------------------------------------- issue 15: order, intervals, fonts


def test_runs_come_in_the_recorded_study_order_else_natural_order(tmp_path):
    from classlab.report.load import load_study_runs, write_run_order

    folder = tmp_path / "study"
    names = ["b-seed10", "b-seed2", "a-seed1", "retrain-b-seed2"]
    for name in names:
        (folder / name).mkdir(parents=True)
        (folder / name / "summary.json").write_text(json.dumps(_summary(name, 0.9)))
    runs, _ = load_study_runs(folder)  # no recorded order (an older folder): natural order, seed2 before seed10
    assert [r.name for r in runs] == ["a-seed1", "b-seed2", "b-seed10", "retrain-b-seed2"]
    write_run_order(folder, ["b-seed2", "b-seed10", "a-seed1"])  # as study.py writes it: the plan's order
    runs, _ = load_study_runs(folder)
    assert [r.name for r in runs] == ["b-seed2", "b-seed10", "a-seed1", "retrain-b-seed2"]


def test_no_seed_interval_from_two_seeds():
    from classlab.evidence import within_noise

    two = [_run(f"a-seed{s}", acc, s) for s, acc in enumerate((0.80, 0.84))]
    two += [_run(f"b-seed{s}", acc, s) for s, acc in enumerate((0.10, 0.95))]
    rows = compare_runs([r.summary for r in two])
    shown = {r["variant"]: r for r in comparison_rows(rows, {})}
    assert shown["a"]["ci"] == "needs ≥ 3 seeds"  # t = 12.7 with 2 seeds: [0.00, 100.00] once clipped
    assert not within_noise(rows[0].accuracy, rows[1].accuracy)
    three = [_run(f"a-seed{s}", acc, s) for s, acc in enumerate((0.80, 0.84, 0.82))]
    assert comparison_rows(compare_runs([r.summary for r in three]), {})[0]["ci"] == "[77.03, 86.97]"


def test_cjk_class_names_draw_without_warnings_or_boxes():
    import warnings

    import matplotlib.pyplot as plt

    from classlab.report import plots

    names = ["猫", "犬 dog", "\u1d81", "plain"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Glyph … missing from font(s) DejaVu Sans" would fail here
        plot = plots.confusion(np.eye(4) * 5, names, "k", "実験 run")
        plots.learning_curves([{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5}], None, False, 1, "c", "実験")
    assert plot.png[:4] == b"\x89PNG"
    for char in "猫\u1d81":
        family = plots._font_for(char)
        with plt.rc_context(plots.STYLE):
            shown = plots.drawable(f"x{char}")
            if family is None:  # no installed font has it: a plain '?', never a box
                assert shown == "x?"
            else:  # an installed font that has it joins this figure's font families
                assert shown == f"x{char}" and family in plt.rcParams["font.family"]
    assert plots._font_for("a") == "" and plots.drawable("ab−é") == "ab−é"


def test_model_table_parent_rows_sum_their_layers():
    from classlab.report.context import model_table

    rows = [{"layer": "(model)", "depth": 0, "type": "Net", "params": 0, "trainable": 0},
            {"layer": "block", "depth": 1, "type": "Sequential", "params": 0, "trainable": 0},
            {"layer": "block.0", "depth": 2, "type": "Conv2d", "params": 80, "trainable": 80},
            {"layer": "block.1", "depth": 2, "type": "BatchNorm2d", "params": 16, "trainable": 0},
            {"layer": "fc", "depth": 1, "type": "Linear", "params": 40, "trainable": 40}]
    run = _run("r", 0.9)
    run.model_rows = rows
    shown = {r["layer"]: r for r in model_table(run)["rows"]}
    assert (shown["block"]["params"], shown["block"]["trainable"], shown["block"]["frozen"]) == ("96", "80", "16")
    assert shown["(model)"]["params"] == "136" and shown["fc"]["params"] == "40"


def test_confusion_labels_are_never_cut_off(monkeypatch):
    """Even where the layout gives up (tight_layout made a no-op here), the saved figure holds every label:
    a white margin on all four edges."""
    import io

    import matplotlib.figure
    from PIL import Image

    from classlab.report import plots

    monkeypatch.setattr(matplotlib.figure.Figure, "tight_layout", lambda self, *a, **k: None)
    names = [f"a long class name {i}" for i in range(6)]
    for plot in (plots.confusion(np.ones((6, 6)), names, "k", "t"),
                 plots.confusion_difference(np.zeros((6, 6)), names, ("a", "b"), "k")):
        pixels = np.asarray(Image.open(io.BytesIO(plot.png)).convert("L"))
        edges = (pixels[:3], pixels[-3:], pixels[:, :3], pixels[:, -3:])
        assert all(int(edge.min()) == 255 for edge in edges)


def test_classes_without_test_images_are_a_sanity_note():
    run = _run("r", 0.9)
    run.summary["test"]["per_class"]["support"][2] = 0
    notes = [n for n in sanity_notes(compare_runs([run.summary]), [run]) if n.kind == "no_test_images"]
    assert len(notes) == 1 and "no test images for class(es) c2" in notes[0].text
    assert "allow_missing_classes" in notes[0].text


def test_demo_report_shows_calibration_class_distribution_and_grad_cam(demo_runs):
    html = (demo_runs / "report.html").read_text()
    md = (demo_runs / "report.md").read_text()
    for text in (html, md):
        for needle in ("balanced accuracy", "Class distribution", "Calibration", "expected calibration error",
                       "Grad-CAM on the worst mistakes"):
            assert needle.lower() in text.lower(), needle
    assert "Test-time augmentation" not in html  # not asked for: no section
    summary = json.loads((demo_runs / "original" / "summary.json").read_text())
    assert summary["data"]["class_counts"]["test"] == summary["test"]["per_class"]["support"]
    assert 0 <= summary["test"]["ece"] <= 1 and summary["calibration"]["temperature"] is None


def test_grad_cam_maps_are_stored_when_a_run_finishes_and_the_report_only_reads_them(demo_runs, tmp_path,
                                                                                    monkeypatch):
    import torch

    import classlab.cam
    import classlab.inference
    from classlab.runs import RunFolder

    folder = RunFolder(demo_runs / "original")
    stored, pred = folder.read_gradcam(), folder.read_predictions()
    worst = pred["worst_images"]
    assert stored["maps"].shape == (len(worst), *worst.shape[-2:]) and stored["reason"] is None
    assert stored["maps"].min() >= 0 and stored["maps"].max() <= 1 and stored["autocorrelation"] is not None
    # the maps of the weights behind the test numbers, as the report used to compute them from the checkpoint
    run = classlab.inference.load_run(folder.path, device="cpu")
    guess = [int(p) for p in pred["y_pred"][pred["worst_index"]]]
    again = classlab.cam.image_cams(run.model, run.pre, worst, guess, torch.device("cpu"))
    assert np.allclose(stored["maps"], again, atol=2e-3)
    assert f"predicted class at {stored['layer']}" in (demo_runs / "report.html").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("the report ran a model")

    monkeypatch.setattr(classlab.inference, "load_run", refuse)
    monkeypatch.setattr(classlab.cam, "grad_cam", refuse)
    old = tmp_path / "old"  # a run folder from before the maps were stored: reported, the maps said missing
    shutil.copytree(demo_runs, old)
    for path in old.glob("*/gradcam.npz"):
        path.unlink()
    html_path, md_path = make_report(old)
    assert "No maps: not stored with this run" in html_path.read_text()
    assert "not stored with this run" in md_path.read_text()


def test_permuted_grad_cam_noise_is_a_sanity_note():
    runs = [_run("original", 0.9), _run("permuted", 0.8, permuted=True)]
    rows = compare_runs([r.summary for r in runs])
    kinds = lambda scores: [n.kind for n in sanity_notes(rows, runs, scores)]  # noqa: E731
    assert "permuted_cam_noise" in kinds({"original": 0.93, "permuted": 0.04})
    assert "permuted_cam_noise" not in kinds({"original": 0.93, "permuted": 0.8})  # smooth too: no note
    assert "permuted_cam_noise" not in kinds({"original": 0.2, "permuted": 0.04})  # the original is no reference
    assert "permuted_cam_noise" not in kinds({})
