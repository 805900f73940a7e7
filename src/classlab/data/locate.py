"""Where data lives: `data.root`, else $CLASSLAB_DATA, else ~/.cache/classlab, plus the folders
other tools install to; download with torchvision's mirrors when online."""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

from classlab.data.idx import IDX_FILES, expected_names, find_idx_file
from classlab.errors import ClasslabError

# dataset -> (folder names tried under a data root, system folders, torchvision dataset class name)
KNOWN_IDX = {
    "fashion-mnist": (("fashion-mnist", "FashionMNIST/raw", "fashion_mnist"),
                      ("/usr/share/datasets/fashion-mnist",), "FashionMNIST"),
    "mnist": (("mnist", "MNIST/raw"), ("/usr/share/datasets/mnist",), "MNIST"),
}


def default_root() -> Path:
    env = os.environ.get("CLASSLAB_DATA")
    return Path(env).expanduser() if env else Path("~/.cache/classlab").expanduser()


def candidate_folders(dataset: str, root: str | None) -> list[Path]:
    """Every folder looked in, in order, for a named IDX dataset."""
    subdirs, system, _ = KNOWN_IDX.get(dataset, ((), (), ""))
    bases = [Path(root).expanduser()] if root else [default_root()]
    folders: list[Path] = []
    for base in bases:
        folders.append(base)
        folders.extend(base / sub for sub in subdirs)
    if not root:
        folders.extend(Path(s) for s in system)
    return folders


def has_idx_set(folder: Path) -> bool:
    return all(find_idx_file(folder, stem) is not None for stem in IDX_FILES)


def fetch(url: str, target: Path, timeout: float = 30.0) -> None:
    """Stream one URL (http(s) or file://) to `target`."""
    with urllib.request.urlopen(url, timeout=timeout) as response, target.open("wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def download_idx(dataset: str, dest: Path, mirrors: list[str] | None = None) -> Path:
    """Download the four IDX files with torchvision's mirror list and MD5s into `dest`.
    `mirrors` may point at a local folder (file://...), which is how the tests exercise this."""
    from torchvision import datasets
    from torchvision.datasets.utils import check_integrity

    cls = getattr(datasets, KNOWN_IDX[dataset][2])
    mirrors = mirrors or list(cls.mirrors)
    dest.mkdir(parents=True, exist_ok=True)
    for filename, md5 in cls.resources:
        if check_integrity(str(dest / filename), md5):
            continue
        errors = []
        for mirror in mirrors:
            with tempfile.TemporaryDirectory(dir=dest) as tmp:
                target = Path(tmp) / filename
                try:
                    fetch(mirror.rstrip("/") + "/" + filename, target)
                except (OSError, ValueError) as e:  # URLError is an OSError
                    errors.append(f"{mirror}: {e}")
                    continue
                if not check_integrity(str(target), md5):
                    errors.append(f"{mirror}{filename}: MD5 mismatch")
                    continue
                os.replace(Path(tmp) / filename, dest / filename)
                break
        else:
            raise OSError("; ".join(errors) or "no mirror")
    return dest


def locate_idx(dataset: str, root: str | None, download: bool) -> Path:
    """The folder holding the four IDX files of `dataset`, downloading them when allowed and needed."""
    folders = candidate_folders(dataset, root)
    for folder in folders:
        if has_idx_set(folder):
            return folder
    partial = [f for f in folders if f.is_dir() and any(find_idx_file(f, s) for s in IDX_FILES)]
    problem = ""
    if download and dataset in KNOWN_IDX and not partial:
        base = Path(root).expanduser() if root else default_root()
        dest = base / KNOWN_IDX[dataset][0][0] if not root else base
        try:
            return download_idx(dataset, dest)
        except OSError as e:
            problem = f"; download into {dest} failed ({str(e)[:200]})"
            if dest.is_dir() and not any(dest.iterdir()):
                shutil.rmtree(dest, ignore_errors=True)
    files = ", ".join(expected_names(stem)[0] for stem in IDX_FILES)
    if partial:
        missing = [expected_names(s)[0] for s in IDX_FILES if find_idx_file(partial[0], s) is None]
        raise ClasslabError(
            f"data for '{dataset}' is incomplete in {partial[0]}: missing {', '.join(missing)}{problem}"
        )
    looked = ", ".join(str(f) for f in folders)
    hint = "set data.root (or $CLASSLAB_DATA) to the folder holding them"
    raise ClasslabError(
        f"data for '{dataset}' not found; looked in: {looked}; expected files: {files}{problem}; {hint}"
    )
