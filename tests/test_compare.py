"""`classlab compare RUN_A RUN_B`: both models' probabilities per image, and where they disagree."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classlab.compare import compare, image_files, photo_inputs
from classlab.inference import load_run
from classlab.predict import expand_inputs, photo_options, predict_paths
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
    predictions = RunFolder(run).read_predictions()
    assert predictions is not None
    return predictions


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
    normalization and (for the permuted run) the pixel permutation are all applied as in evaluation
    (photo preparation off: the PNG already is a dataset image)."""
    images, labels = synthetic_images(80, 4, 28, seed=1)  # the toy test split, in file order
    for i in range(5):
        Image.fromarray(images[i]).save(tmp_path / f"img{i}.png")
    a, b = RunFolder(two_runs / "original"), RunFolder(two_runs / "permuted")
    inputs, side_a, side_b = photo_inputs(a, b, tmp_path, device="cpu", prepare_photo=False)
    assert not inputs.skipped and inputs.names == [f"img{i}.png" for i in range(5)]
    for side, run in ((side_a, a), (side_b, b)):
        stored = _npz(run.path)
        assert np.array_equal(stored["y_true"], labels)
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


# ----------------------------------------------------------------------------- one inference path


def _rgb_image_folder(root: Path, size: int = 16) -> Path:
    """Three classes of RGB images: class c is bright in colour channel c (a split per folder)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c, name in enumerate(("red", "green", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 70, (size, size, 3), dtype=np.uint8)
                arr[..., c] += 150
                Image.fromarray(arr).save(folder / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory) -> Path:
    """An image-folder run on 3-channel 16×16 images, one epoch: trained once for this module."""
    from classlab.cli import main

    root = tmp_path_factory.mktemp("rgb")
    data = {"dataset": "image-folder", "root": str(_rgb_image_folder(root / "images")), "val_fraction": 0.2}
    study = tiny_study(root, root / "images", data=data, train={"epochs": 1, "batch_size": 8, "optimizer": "adam",
                                                                 "lr": 0.01})
    try:
        main(["run", str(write_study(root / "s.yaml", study))])
    except SystemExit as e:
        assert not e.code
    return root / "runs" / "toy" / "base"


def _photos(folder: Path, seed: int) -> Path:
    """Photos as users have them: a dark drawing on a white page, a colour JPEG, a transparent PNG,
    a 16-bit gray PNG and a palette GIF, each at its own size."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    page = np.full((70, 90), 255, np.uint8)
    page[20:50, 30:55] = rng.integers(0, 80, (30, 25), dtype=np.uint8)
    Image.fromarray(page).save(folder / "drawing.png")
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(folder / "colour.jpg", quality=90)
    rgba = rng.integers(0, 255, (40, 40, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "transparent.png")
    Image.fromarray(rng.integers(0, 65535, (33, 31), dtype=np.uint16)).save(folder / "sixteen.png")
    Image.fromarray(rng.integers(0, 255, (24, 36, 3), dtype=np.uint8)).convert("P", palette=Image.ADAPTIVE).save(
        folder / "palette.gif")
    return folder


def _assert_compare_equals_predict(run_a: Path, run_b: Path, photos: Path, run_cli) -> None:
    """Each photo's probabilities in `compare --images` (its library call) equal `predict`'s, photo by
    photo (predict sees one file at a time, compare all of them in one batch), within 1e-6."""
    inputs, side_a, side_b = photo_inputs(RunFolder(run_a), RunFolder(run_b), photos, device="cpu")
    assert not inputs.skipped and len(inputs.names) == len(image_files(photos)) == 5
    for side, run_dir in ((side_a, run_a), (side_b, run_b)):
        run = load_run(run_dir, "cpu")
        for name, probs in zip(inputs.names, side.probs, strict=True):
            (result,) = predict_paths(run, expand_inputs([photos / name]), photo_options(run))
            np.testing.assert_allclose(probs, result.probs, rtol=0, atol=1e-6)
        # and through the command line (its JSON rounds to 6 decimals: within 5e-7 of the value)
        name = inputs.names[0]
        code, out, err = run_cli("predict", str(run_dir), str(photos / name), "--json", "--device", "cpu",
                                 "--top-k", str(len(run.classes)))
        assert code == 0, err
        top = {t["index"]: t["probability"] for t in json.loads(out)[0]["top"]}
        np.testing.assert_allclose([top[k] for k in range(len(run.classes))], side.probs[0], rtol=0, atol=1e-6)


def test_compare_and_predict_agree_on_an_mnist_style_run(two_runs, tmp_path, run_cli):
    """1-channel 28×28 runs: the photos are prepared (inverted, cropped, ...) the same way by both."""
    assert load_run(two_runs / "original", "cpu").mnist_style
    _assert_compare_equals_predict(two_runs / "original", two_runs / "permuted", _photos(tmp_path / "p", 0), run_cli)


def test_compare_and_predict_agree_on_an_rgb_run(rgb_run, tmp_path, run_cli):
    run = load_run(rgb_run, "cpu")
    assert run.stored_shape == (3, 16, 16) and not run.mnist_style
    _assert_compare_equals_predict(rgb_run, rgb_run, _photos(tmp_path / "p", 1), run_cli)
