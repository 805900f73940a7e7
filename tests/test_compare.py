"""`classlab compare RUN_A RUN_B`: both models' probabilities per image, and where they disagree."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classlab.report.compare import compare, photo_probs, read_photos
from classlab.runs import RunFolder
from tests.conftest import make_idx_folder, synthetic_images, tiny_study, write_study


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> Path:
    """A toy study trained once for this module: a CNN on the images as they are and on permuted pixels."""
    from classlab.cli import main

    root = tmp_path_factory.mktemp("compare")
    data = make_idx_folder(root / "toy")
    study = tiny_study(root, data, runs=[{"name": "original"},
                                         {"name": "permuted", "data": {"permute_pixels": {"seed": 3}}}])
    try:
        main(["run", str(write_study(root / "s.yaml", study))])
    except SystemExit as e:
        assert not e.code
    return root / "runs" / "toy"


def _npz(run: Path) -> dict[str, np.ndarray]:
    with np.load(run / "predictions.npz") as npz:
        return {k: npz[k] for k in npz.files}


def test_compare_on_the_test_set(two_runs, run_cli):
    a, b = two_runs / "original", two_runs / "permuted"
    code, out, err = run_cli("compare", str(a), str(b), "--n", "3")
    assert code == 0, err
    pa, pb = _npz(a), _npz(b)
    disagree = int((pa["y_pred"] != pb["y_pred"]).sum())
    assert f"disagree on {disagree} of {len(pa['y_true'])} images" in " ".join(out.split())
    folder = two_runs / "compare-original-vs-permuted"
    html = (folder / "compare.html").read_text()
    sources = re.findall(r'<img src="([^"]*)"', html)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert 'id="agreement"' in html and ("id=\"disagreements\"" in html) == (disagree > 0)
    if disagree:
        assert len(re.findall(r"<tr><td class=\"name\">test image \d+</td>", html)) == min(disagree, 100)
    md = (folder / "compare.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 3 and all((folder / link).is_file() for link in links)


def test_counts_add_up(two_runs, tmp_path):
    result = compare(two_runs / "original", two_runs / "permuted", n=1, out=tmp_path / "out")
    c = result.counts
    assert c["agree"] + c["disagree"] == c["images"] == len(_npz(two_runs / "original")["y_true"])
    assert c["both_right"] + c["only_a"] + c["only_b"] + c["both_wrong"] == c["images"]
    assert len(result.disagreements) == c["disagree"]


def test_own_images_go_through_each_runs_preprocessing(two_runs, tmp_path):
    """A test image saved as a PNG gets exactly the probabilities the run stored for it: channels, size,
    normalization and (for the permuted run) the pixel permutation are all applied as in evaluation."""
    images, labels = synthetic_images(80, 4, 28, seed=1)  # the toy test split, in file order
    for run in ("original", "permuted"):
        stored = _npz(two_runs / run)
        assert np.array_equal(stored["y_true"], labels)
        folder = tmp_path / run
        folder.mkdir()
        for i in range(5):
            Image.fromarray(images[i]).save(folder / f"img{i}.png")
        files, photos, skipped = read_photos(sorted(folder.glob("*.png")))
        assert not skipped
        side = photo_probs(RunFolder(two_runs / run), photos)
        np.testing.assert_allclose(side.probs, stored["probs"][:5], atol=1e-5)


def test_compare_own_images_escapes_file_names(two_runs, run_cli, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(photos / "<b onmouseover=alert(1)>.jpg")
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(photos / "gray.png")
    (photos / "broken.png").write_bytes(b"not an image")
    out_dir = tmp_path / "out"
    code, out, err = run_cli("compare", str(two_runs / "original"), str(two_runs / "permuted"),
                             "--images", str(photos), "--out", str(out_dir))
    assert code == 0, err
    html = (out_dir / "compare.html").read_text()
    assert "<b onmouseover" not in html and "&lt;b onmouseover=alert(1)&gt;.jpg" in html
    assert "broken.png" in html  # named as skipped
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == 2
    md = (out_dir / "compare.md").read_text()
    assert "<b onmouseover" not in md


def test_compare_bad_input_is_one_line(two_runs, run_cli, tmp_path):
    code, _, err = run_cli("compare", str(two_runs / "original"), str(tmp_path / "nowhere"))
    assert code == 2 and err.startswith("error: ") and "not a finished classlab run" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("compare", str(two_runs / "original"), str(two_runs / "permuted"),
                           "--images", str(tmp_path / "empty"))
    assert code == 2 and "no image files" in err and len(err.strip().splitlines()) == 1
