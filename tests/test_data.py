import gzip
import shutil

import numpy as np
import pytest
import torch

from classlab.config import DataConfig
from classlab.data import load_dataset
from classlab.data.idx import read_idx, write_idx
from classlab.data.locate import candidate_folders, download_idx, locate_idx
from classlab.data.split import stratified_split
from classlab.errors import ClasslabError
from tests.conftest import SHARED_DATA, make_idx_folder


def test_idx_roundtrip_gzip_and_raw(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    write_idx(tmp_path / "a", arr, compress=False)
    assert (read_idx(tmp_path / "a.gz") == arr).all() and (read_idx(tmp_path / "a") == arr).all()


def test_idx_folder_raw_files_load(tmp_path):
    folder = make_idx_folder(tmp_path / "raw", gzip=False)
    data = load_dataset(DataConfig(dataset="idx", root=str(folder), val_fraction=None))
    assert data.train.images.shape == (240, 1, 28, 28) and data.train.images.dtype == torch.uint8
    assert data.classes == ["0", "1", "2", "3"] and data.val is None


def test_truncated_and_wrong_magic_are_clear(tmp_path):
    folder = make_idx_folder(tmp_path / "d")
    raw = gzip.decompress((folder / "train-images-idx3-ubyte.gz").read_bytes())
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:5000]))
    with pytest.raises(ClasslabError, match="truncated IDX file"):
        load_dataset(DataConfig(dataset="idx", root=str(folder)))
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x12\x34\x56\x78" + raw[4:]))
    with pytest.raises(ClasslabError, match="wrong magic"):
        load_dataset(DataConfig(dataset="idx", root=str(folder)))


def test_count_mismatch(tmp_path):
    folder = make_idx_folder(tmp_path / "d")
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(10, dtype=np.uint8))
    with pytest.raises(ClasslabError, match="240 images but 10 labels"):
        load_dataset(DataConfig(dataset="idx", root=str(folder)))


def test_missing_folder_names_every_place_and_file(tmp_path):
    with pytest.raises(ClasslabError) as e:
        locate_idx("fashion-mnist", None, download=False)
    msg = str(e.value)
    assert "/usr/share/datasets/fashion-mnist" in msg and "train-images-idx3-ubyte.gz" in msg
    assert "t10k-labels-idx1-ubyte.gz" in msg and str(tmp_path / "classlab-data") in msg
    assert any("FashionMNIST/raw" in str(f) for f in candidate_folders("fashion-mnist", None))


def test_stratified_split_is_seeded_and_stratified():
    labels = torch.arange(1000) % 4
    keep, held = stratified_split(labels, 0.1, seed=3)
    keep2, held2 = stratified_split(labels, 0.1, seed=3)
    assert torch.equal(held, held2) and len(held) == 100 and len(keep) == 900
    assert torch.bincount(labels[held]).tolist() == [25, 25, 25, 25]
    assert not set(keep.tolist()) & set(held.tolist())
    _, other = stratified_split(labels, 0.1, seed=4)
    assert not torch.equal(held, other)


def test_relabel_and_subset(idx_folder):
    cfg = DataConfig(dataset="idx", root=str(idx_folder), relabel={"low": ["0", "1"], "high": [2, 3]},
                     subset={"train": 100}, val_fraction=0.2)
    data = load_dataset(cfg)
    assert data.classes == ["low", "high"]
    assert len(data.train) + len(data.val) == 100
    assert set(data.test.labels.tolist()) == {0, 1}


@pytest.mark.parametrize(
    ("groups", "needle"),
    [({"a": ["0", "1", "2"], "b": ["4"]}, "unknown class '4'"), ({"a": ["0", "1"], "b": ["2"]}, "not in any group: 3"),
     ({"a": ["0", "1", "2"], "b": ["2", "3"]}, "more than one group")],
)
def test_relabel_errors(idx_folder, groups, needle):
    with pytest.raises(ClasslabError, match=needle):
        load_dataset(DataConfig(dataset="idx", root=str(idx_folder), relabel=groups))


def test_download_from_a_local_mirror(tmp_path):
    """The real downloader (torchvision's download_url + MD5) pointed at a local folder of the files."""
    source = SHARED_DATA / "fashion-mnist"
    if not source.is_dir():
        pytest.skip(f"{source} absent: the official Fashion-MNIST files are needed for their MD5s")
    dest = download_idx("fashion-mnist", tmp_path / "dl", mirrors=[source.as_uri() + "/"])
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz"])


def test_download_rejects_a_corrupt_mirror(tmp_path):
    bad = tmp_path / "mirror"
    bad.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (bad / name).write_bytes(b"not the real file")
    with pytest.raises(OSError):
        download_idx("fashion-mnist", tmp_path / "dl", mirrors=[bad.as_uri() + "/"])


def test_torchvision_layout_is_found(tmp_path):
    folder = make_idx_folder(tmp_path / "root" / "FashionMNIST" / "raw")
    assert locate_idx("fashion-mnist", str(tmp_path / "root"), download=False) == folder
    shutil.rmtree(folder)


def test_relabel_numbers_are_names_first_and_ambiguity_is_an_error():
    from classlab.data.split import relabel

    folders = ["1", "10", "2"]  # image folders named by number, sorted as text: index 1 is '10'
    mapping, _ = relabel(folders, {"a": [10, 2], "b": ["1"]})
    assert mapping.tolist() == [1, 0, 0]  # 10 and 2 are the classes named so (2 is also index 2: the same class)
    with pytest.raises(ClasslabError, match=r"1 is ambiguous.*write '1' \(quoted\) for the class named 1, or '10' "
                                            r"for the class at index 1"):
        relabel(folders, {"a": [1], "b": ["10", "2"]})
    mapping, _ = relabel(["cat", "dog", "owl"], {"pets": [0, 1], "wild": [2]})  # no such names: indices
    assert mapping.tolist() == [0, 0, 1]
    with pytest.raises(ClasslabError, match="no class named '7' and class index 7 is outside 0–2"):
        relabel(["cat", "dog", "owl"], {"a": [7], "b": [0, 1, 2]})


def test_subset_is_exactly_what_was_asked(idx_folder):
    from classlab.data.split import stratified_subset

    labels = torch.arange(60000) % 10
    for size in (1000, 999, 10, 12, 60000):
        idx = stratified_subset(labels, size, seed=0)
        assert len(idx) == size == len(set(idx.tolist()))
        counts = torch.bincount(labels[idx], minlength=10)
        assert counts.min() >= 1 and counts.max() - counts.min() <= 1  # balanced stays balanced
    assert torch.equal(stratified_subset(labels, 1000, 3), stratified_subset(labels, 1000, 3))
    skewed = torch.tensor([0] * 90 + [1] * 9 + [2])
    assert torch.bincount(skewed[stratified_subset(skewed, 10, 0)]).tolist() == [8, 1, 1]  # every class kept
    for subset, needle in (({"train": 1000}, "data.subset.train 1000: the split has only 240 images"),
                           ({"train": 3}, "data.subset.train 3: fewer images than the 4 classes")):
        with pytest.raises(ClasslabError, match=needle):
            load_dataset(DataConfig(dataset="idx", root=str(idx_folder), subset=subset))
    data = load_dataset(DataConfig(dataset="idx", root=str(idx_folder), subset={"train": 101, "test": 5},
                                   val_fraction=0.2))
    assert len(data.train) + len(data.val) == 101 and len(data.test) == 5


def test_fewer_than_two_classes_is_refused(tmp_path, idx_folder):
    with pytest.raises(ClasslabError, match=r"data.relabel: only one class \('all'\); a classifier needs at least two"):
        load_dataset(DataConfig(dataset="idx", root=str(idx_folder), relabel={"all": ["0", "1", "2", "3"]}))
    folder = make_idx_folder(tmp_path / "one", num_classes=1)
    with pytest.raises(ClasslabError, match=r"only one class \('0'\)"):
        load_dataset(DataConfig(dataset="idx", root=str(folder)))


def _drop_class(folder, stem: str, label: int) -> None:
    labels = read_idx(folder / f"{stem}-labels-idx1-ubyte.gz")
    keep = labels != label
    write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", labels[keep])
    write_idx(folder / f"{stem}-images-idx3-ubyte.gz", read_idx(folder / f"{stem}-images-idx3-ubyte.gz")[keep])


def test_a_class_missing_from_either_split_is_an_error_unless_allowed(tmp_path):
    only_train = make_idx_folder(tmp_path / "only-train")
    _drop_class(only_train, "t10k", 3)
    with pytest.raises(ClasslabError, match="no test images for '3'.*data.allow_missing_classes: true"):
        load_dataset(DataConfig(dataset="idx", root=str(only_train)))
    data = load_dataset(DataConfig(dataset="idx", root=str(only_train), allow_missing_classes=True))
    assert data.classes == ["0", "1", "2", "3"] and 3 not in data.test.labels.tolist()
    only_test = make_idx_folder(tmp_path / "only-test")  # the other way round: the same rule
    _drop_class(only_test, "train", 3)
    with pytest.raises(ClasslabError, match="no training images for '3'"):
        load_dataset(DataConfig(dataset="idx", root=str(only_test)))


def _split_folder(root, counts=(("train", 24), ("validation", 8), ("test", 8)), classes=("happy", "sad", "fear")):
    """root/<split>/<class>/*.png, 12x12 gray: a folder with its own validation split."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in counts:
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = (rng.integers(0, 80, (12, 12)) + 60 * c).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_each_split_says_where_it_came_from(tmp_path):
    """Issue 26 item 5: the folder's own validation split wins over data.val_fraction, and says so; data.splits
    carves validation from train instead; val_fraction null names the folder it leaves out."""
    root = _split_folder(tmp_path / "faces")
    own = load_dataset(DataConfig(dataset="fer2013", root=str(root), val_fraction=0.1))
    assert (len(own.train), len(own.val), len(own.test)) == (72, 24, 24)
    assert own.origins["train"] == "train/" and own.origins["test"] == "test/"
    assert own.origins["val"].startswith("validation/; the folder's own validation split, so data.val_fraction 0.1 "
                                         "is not used (to carve validation from train instead: data.splits: "
                                         "{train: [train], test: [test]})")
    studies = load_dataset(DataConfig(dataset="fer2013", root=str(root), val_fraction=0.25, split_seed=3,
                                      splits={"train": ["train"], "test": ["validation", "test"]}))
    assert (len(studies.train), len(studies.val), len(studies.test)) == (54, 18, 48)
    assert studies.origins == {"train": "train/ less the validation share",
                               "val": "carved from train by data.val_fraction 0.25 (split_seed 3)",
                               "test": "validation/ + test/"}
    none = load_dataset(DataConfig(dataset="fer2013", root=str(root), val_fraction=None))
    assert none.val is None and none.origins["val"] == "none (data.val_fraction: null; validation/ not used)"
    pool = load_dataset(DataConfig(dataset="image-folder", root=str(root / "train"), val_fraction=None))
    assert pool.origins["test"] == "carved from the whole folder by data.test_fraction 0.2 (split_seed 0 + 1)"
    assert pool.origins["train"] == "the whole folder less the test share"


def test_subset_train_covers_the_folders_validation_split_as_documented(tmp_path):
    root = _split_folder(tmp_path / "faces")
    data = load_dataset(DataConfig(dataset="fer2013", root=str(root), val_fraction=0.1,
                                   subset={"train": 20, "test": 9}))
    # 20 images for training and validation together, validation in its share (24 of 96 -> 5), every class kept
    assert (len(data.train), len(data.val), len(data.test)) == (15, 5, 9)
    assert set(data.val.labels.tolist()) == {0, 1, 2} and set(data.train.labels.tolist()) == {0, 1, 2}
    assert data.origins["val"].startswith("validation/, a stratified 5 of its 24 (data.subset.train)")
    carved = load_dataset(DataConfig(dataset="fer2013", root=str(root), val_fraction=0.2, subset={"train": 20},
                                     splits={"train": ["train"], "test": ["test"]}))
    assert len(carved.train) + len(carved.val) == 20  # the carved split comes out of the subset too
    with pytest.raises(ClasslabError, match="data.subset.train 200: the training and validation splits have only 96"):
        load_dataset(DataConfig(dataset="fer2013", root=str(root), subset={"train": 200}))
    with pytest.raises(ClasslabError, match="covers the folder's validation split too, .* at least 6 images"):
        load_dataset(DataConfig(dataset="fer2013", root=str(root), subset={"train": 5}))


def test_run_log_and_report_say_which_folders_made_each_split(tmp_path, run_cli):
    from tests.conftest import tiny_study, write_study

    root = _split_folder(tmp_path / "faces")
    study = tiny_study(tmp_path, root, data={"dataset": "fer2013", "root": str(root), "val_fraction": 0.2,
                                             "splits": {"train": ["train"], "test": ["validation", "test"]}})
    study["train"]["epochs"] = 1
    code, out, err = run_cli("run", str(write_study(tmp_path / "s.yaml", study)))
    assert code == 0, err
    run = next((tmp_path / "runs" / "toy").glob("*/run.log")).read_text()
    assert "val split: carved from train by data.val_fraction 0.2 (split_seed 0)" in run
    assert "test split: validation/ + test/" in run
    report = (tmp_path / "runs" / "toy" / "report.md").read_text()
    assert "- test: validation/ + test/" in report and "- val: carved from train by data.val_fraction 0.2" in report
