"""Real-data checks on ../shared/data (skipped with a reason when that folder is absent)."""

import pytest
import torch

from classlab.config import DataConfig
from classlab.data import FASHION_CLASSES, load_dataset
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "fashion-mnist").is_dir(),
                                reason=f"{SHARED_DATA} absent: real-data tests need ../shared/data")


def test_fashion_mnist_official_files_decode():
    data = load_dataset(DataConfig(dataset="fashion-mnist", root=str(SHARED_DATA / "fashion-mnist"),
                                   val_fraction=0.15))
    assert data.classes == FASHION_CLASSES
    assert len(data.train) == 51000 and len(data.val) == 9000 and len(data.test) == 10000
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10
    assert torch.bincount(data.val.labels).tolist() == [900] * 10
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (1, 28, 28)


def test_three_class_relabel_counts():
    groups = {"clothes": [0, 1, 2, 3, 4, 6], "shoes": [5, 7, 9], "other": [8]}
    data = load_dataset(DataConfig(dataset="fashion-mnist", root=str(SHARED_DATA), relabel=groups,
                                   val_fraction=None))
    assert torch.bincount(data.test.labels).tolist() == [6000 // 10 * 10, 3000, 1000]


def test_mnist_and_notmnist_idx():
    mnist = load_dataset(DataConfig(dataset="mnist", root=str(SHARED_DATA / "mnist"), val_fraction=None))
    assert torch.bincount(mnist.test.labels).tolist()[:3] == [980, 1135, 1032]
    notmnist = SHARED_DATA / "notmnist-small" / "idx"
    if notmnist.is_dir():
        from classlab.data.idx import read_idx_pair

        x, y = read_idx_pair(notmnist / "t10k-images-idx3-ubyte.gz", notmnist / "t10k-labels-idx1-ubyte.gz")
        assert x.shape == (10000, 1, 28, 28) and int(y.max()) == 9


def test_image_folders_notmnist_and_fer():
    notmnist = SHARED_DATA / "notmnist-small"
    fer = SHARED_DATA / "fer-sample"
    if not notmnist.is_dir() or not fer.is_dir():
        pytest.skip("notmnist-small / fer-sample absent from ../shared/data")
    letters = load_dataset(DataConfig(dataset="image-folder", root=str(notmnist), val_fraction=None))
    assert letters.classes == list("ABCDEFGHIJ") and len(letters.train) == 2000 and len(letters.test) == 500
    assert letters.train.images.shape[1:] == (1, 28, 28)
    faces = load_dataset(DataConfig(dataset="fer2013", root=str(fer), val_fraction=0.1))
    assert faces.classes == ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    assert (len(faces.train), len(faces.val), len(faces.test)) == (700, 140, 210)  # its own validation/ split
    assert faces.train.images.shape[1:] == (1, 48, 48)


@pytest.mark.slow
def test_fer2013_complete_both_splits_from_one_folder():
    """The studies' split (test = validation/ + test/, study C's support exactly) and the official one, from the
    same folder, decoded once into the cache and said where each split came from."""
    root = SHARED_DATA / "fer2013"
    if not root.is_dir():
        pytest.skip("fer2013 absent from ../shared/data")
    studies = load_dataset(DataConfig(dataset="fer2013", root=str(root), val_fraction=0.1,
                                      splits={"train": ["train"], "test": ["validation", "test"]}))
    assert len(studies.train) + len(studies.val) == 28709
    assert torch.bincount(studies.test.labels).tolist() == [958, 111, 1024, 1774, 1233, 1247, 831]
    assert studies.origins == {"train": "train/ less the validation share",
                               "val": "carved from train by data.val_fraction 0.1 (split_seed 0)",
                               "test": "validation/ + test/"}
    official = load_dataset(DataConfig(dataset="fer2013", root=str(root), val_fraction=0.1))
    assert (len(official.train), len(official.val), len(official.test)) == (28709, 3589, 3589)
    assert official.origins["val"].startswith("validation/; the folder's own validation split")
    assert torch.equal(torch.cat([official.val.images, official.test.images]), studies.test.images)
