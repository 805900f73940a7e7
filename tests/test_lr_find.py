"""The LR finder: an exponential sweep through fit's one training step, a documented suggestion rule,
the plot in the run folder, and the study file left as it was."""

import json

import numpy as np
import pytest

from classlab.lr_find import smooth, suggest
from tests.conftest import tiny_study, write_study


def test_suggestion_rule_on_a_known_curve():
    lrs = list(np.logspace(-6, 0, 200))
    x = np.log10(lrs)
    losses = list(2.3 - 1.5 / (1 + np.exp(-3 * (x + 3))) + np.where(x > -1.5, 10 * (x + 1.5) ** 2, 0))
    steepest, min_over_10 = suggest(lrs, losses)  # steepest fall at lr 1e-3, minimum near 10^-1.5
    assert steepest == pytest.approx(1e-3, rel=0.2)
    assert min_over_10 == pytest.approx(10**-1.5 / 10, rel=0.5)
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # bias-corrected: no warm-up dip


def test_lr_find_command_sweeps_and_suggests_without_touching_the_study(tmp_path, idx_folder, run_cli):
    study = write_study(tmp_path / "s.yaml", tiny_study(tmp_path, idx_folder))
    before = study.read_text()
    code, stdout, stderr = run_cli("lr-find", str(study), "--steps", "60", "--start", "1e-5", "--end", "1")
    assert code == 0, stderr
    line = next(x for x in stdout.splitlines() if x.startswith("suggested lr:"))
    suggested = float(line.split()[2])
    assert 1e-5 <= suggested <= 1
    folder = tmp_path / "runs" / "toy" / "base"
    sweep = json.loads((folder / "lr_find.json").read_text())
    assert len(sweep["lrs"]) == len(sweep["losses"]) >= 20 and sweep["lrs"] == sorted(sweep["lrs"])
    assert (folder / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert study.read_text() == before
    code, _, stderr = run_cli("lr-find", str(study), "--run", "nope")
    assert code == 2 and "not a run of" in stderr


def test_the_sweep_is_in_the_study_report_whether_made_before_or_after_training(tmp_path, idx_folder, run_cli):
    study = tiny_study(tmp_path, idx_folder)
    study["train"]["epochs"] = 1
    path = write_study(tmp_path / "s.yaml", study)
    study_folder = tmp_path / "runs" / "toy"
    code, _, stderr = run_cli("lr-find", str(path), "--steps", "20", "--start", "1e-5", "--end", "1")
    assert code == 0, stderr
    assert not (study_folder / "report.md").exists()  # nothing trained yet: no report to re-make
    code, _, stderr = run_cli("run", str(path))  # trains into the swept run's folder, keeping the sweep
    assert code == 0, stderr
    sweep = json.loads((study_folder / "base" / "lr_find.json").read_text())
    md = (study_folder / "report.md").read_text()
    assert "## Learning-rate finder" in md and f"**{sweep['suggested']:.3g}**" in md
    figure = next((study_folder / "report_files").glob("lr-find-*.png"))
    assert figure.read_bytes() == (study_folder / "base" / "lr_find.png").read_bytes()
    assert 'id="lr-find"' in (study_folder / "report.html").read_text()

    code, stdout, stderr = run_cli("lr-find", str(path), "--steps", "20", "--start", "1e-4", "--end", "1")
    assert code == 0, stderr
    assert "report:" in stdout  # a trained study's report is re-made with the new sweep
    again = json.loads((study_folder / "base" / "lr_find.json").read_text())
    assert again["lrs"][0] == pytest.approx(1e-4)
    assert f"**{again['suggested']:.3g}**" in (study_folder / "report.md").read_text()
    from classlab.runs import RunFolder

    RunFolder(study_folder / "base").prepare(restart=True)  # what --restart does first: the sweep is kept
    assert sorted(p.name for p in (study_folder / "base").iterdir()) == ["lr_find.json", "lr_find.png"]


def test_a_flat_noisy_curve_is_no_clear_descent_and_a_real_one_is():
    """Issue 26.9: FER's CNN swept 1.90-1.94 over 1e-7..1 gave a confident "9.3e-06"; such a curve now says
    that it found no clear descent, while a curve that falls is still read."""
    from classlab.lr_find import LrFindResult, descent, smooth_both_ways, verdict

    rng = np.random.default_rng(0)
    lrs = list(np.logspace(-7, 0, 200))
    flat = list(1.92 + 0.01 * rng.standard_normal(200))  # FER-like: level, with step noise
    falling = list(2.3 - 1.8 / (1 + np.exp(-(np.log10(lrs) + 3) * 3)) + 0.05 * rng.standard_normal(200))
    for losses, clear in ((flat, False), (falling, True)):
        smoothed = smooth_both_ways(losses)
        got, fall, noise = descent(losses, smoothed)
        assert got is clear, (fall, noise)
        suggested, over_10 = suggest(lrs, smoothed)
        line = verdict(LrFindResult("r", lrs, losses, smoothed, suggested, over_10, 1e-3, got, fall, noise))
        assert line.startswith("suggested lr: ") is clear and ("no clear descent" in line) is not clear
    assert 0.01 > descent(flat, smooth_both_ways(flat))[1] >= 0


def test_lr_find_command_says_when_the_sweep_found_no_descent(tmp_path, idx_folder, run_cli):
    path = write_study(tmp_path / "s.yaml", tiny_study(tmp_path, idx_folder))
    code, out, err = run_cli("lr-find", str(path), "--steps", "30", "--start", "1e-9", "--end", "1e-8")
    assert code == 0, err
    text = " ".join(out.split())
    assert "no clear descent" in text and "suggested lr:" not in text and "widen --start / --end" in text
    doc = json.loads((tmp_path / "runs" / "toy" / "base" / "lr_find.json").read_text())
    assert doc["clear_descent"] is False and doc["descent"] < 0.1
