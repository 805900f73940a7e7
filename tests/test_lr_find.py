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
