"""Data sets for the batch-size study, as tensors in memory.

Every loader returns a `StudyData`: float32 inputs (N, C, *spatial), standardized per channel with the
training set's mean and std, and int64 labels. Four sources:

- ``digits``  scikit-learn's bundled 8x8 digits (1797 images, no download), a fixed 75/25 split per class.
- ``mnist1d`` MNIST-1D from the ``mnist1d`` package's offline generator (4000/1000 signals of length 40).
- ``cifar10`` CIFAR-10's "python version" pickle batches in a local folder.
- ``mnist``   MNIST's IDX files (optionally gzipped) in a local folder.

Files that are missing or malformed raise `DataError`, whose message names the files expected.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("digits", "mnist1d", "cifar10", "mnist")

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


class DataError(ValueError):
    """A data folder is missing, incomplete or holds files of the wrong format."""


@dataclass
class StudyData:
    name: str
    x_train: torch.Tensor  # (N, C, *spatial) float32, standardized
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[2:])

    def describe(self) -> str:
        shape = "x".join(str(s) for s in self.spatial)
        return (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test, "
            f"{self.in_channels} channel(s) of {shape}, {self.num_classes} classes"
        )


def load_dataset(
    name: str, data_dir: str | Path | None = None, train_size: int | None = None, test_size: int | None = None
) -> StudyData:
    """Load data set ``name`` (one of `DATASETS`); keep a fixed random subset when a size is given."""
    if name == "digits":
        arrays = _load_digits()
    elif name == "mnist1d":
        arrays = _load_mnist1d()
    elif name in ("cifar10", "mnist"):
        if data_dir is None:
            raise DataError(f"data set {name!r} is read from local files: pass the folder with --data-dir")
        arrays = _load_cifar10(Path(data_dir)) if name == "cifar10" else _load_mnist(Path(data_dir))
    else:
        raise DataError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
    x_train, y_train, x_test, y_test = arrays
    x_train, y_train = _subset(x_train, y_train, train_size)
    x_test, y_test = _subset(x_test, y_test, test_size)
    return _to_study_data(name, x_train, y_train, x_test, y_test)


def _subset(x: np.ndarray, y: np.ndarray, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    # The subset is fixed (its own seed), the same for every run of the study.
    if size is None or size >= len(y):
        return x, y
    if size < 1:
        raise DataError(f"a subset size must be at least 1, got {size}")
    keep = np.sort(np.random.default_rng(12345).permutation(len(y))[:size])
    return x[keep], y[keep]


def _to_study_data(name: str, x_train, y_train, x_test, y_test) -> StudyData:
    x_train = torch.as_tensor(np.asarray(x_train, dtype=np.float32))
    x_test = torch.as_tensor(np.asarray(x_test, dtype=np.float32))
    # Standardize each channel with the training set's statistics (the test set never informs them).
    reduce = [0, *range(2, x_train.dim())]
    mean = x_train.mean(dim=reduce, keepdim=True)
    std = x_train.std(dim=reduce, keepdim=True).clamp_min(1e-6)
    y_train = torch.as_tensor(np.asarray(y_train, dtype=np.int64))
    y_test = torch.as_tensor(np.asarray(y_test, dtype=np.int64))
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return StudyData(name, (x_train - mean) / std, y_train, (x_test - mean) / std, y_test, num_classes)


# --- built-in data sets ---------------------------------------------------------------------------------


def _load_digits():
    """The 1797 8x8 digits bundled with scikit-learn (values 0..16), split 75/25 per class, fixed seed."""
    x, y = _read_bundled_digits()
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test[members[: int(round(0.25 * len(members)))]] = True
    x = x.reshape(-1, 1, 8, 8).astype(np.float32)
    return x[~test], y[~test], x[test], y[test]


def _read_bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    # Read scikit-learn's bundled file without importing scikit-learn (seconds of start-up per worker);
    # fall back to its loader should the file have moved.
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = Path(root) / "datasets" / "data" / "digits.csv.gz"
            if path.is_file():
                table = np.loadtxt(path, delimiter=",", dtype=np.float32)
                return table[:, :-1], table[:, -1].astype(np.int64)
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise DataError("data set 'digits' needs scikit-learn: pip install scikit-learn") from err
    digits = load_digits()
    return digits.data.astype(np.float32), digits.target.astype(np.int64)


def _load_mnist1d():
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise DataError("data set 'mnist1d' needs the mnist1d package: pip install mnist1d") from err
    # The generator reseeds NumPy's global RNG (legacy API); leave it as we found it.
    state = np.random.get_state()  # noqa: NPY002
    try:
        data = make_dataset(get_dataset_args())  # generated offline, seed 42: the same signals every time
    finally:
        np.random.set_state(state)  # noqa: NPY002
    return data["x"][:, None], data["y"], data["x_test"][:, None], data["y_test"]


# --- CIFAR-10, python pickle batches ----------------------------------------------------------------------


def _load_cifar10(data_dir: Path):
    folder = _find_folder(data_dir, "cifar-10-batches-py", CIFAR10_TEST)
    expected = ", ".join((*CIFAR10_TRAIN, CIFAR10_TEST))
    missing = [f for f in (*CIFAR10_TRAIN, CIFAR10_TEST) if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 folder {data_dir} is missing {', '.join(missing)}: expected the 'python version' "
            f"batches {expected} (the folder cifar-10-batches-py/ of cifar-10-python.tar.gz, or its parent)"
        )
    train = [_read_cifar_batch(folder / f) for f in CIFAR10_TRAIN]
    x_test, y_test = _read_cifar_batch(folder / CIFAR10_TEST)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, x_test, y_test


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    what = "a CIFAR-10 batch: a pickled dict with b'data' (N x 3072 uint8) and b'labels' (N ints)"
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as err:
        raise DataError(f"{path} is not {what} ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not {what} (it holds a {type(batch).__name__})")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path} is not {what} (keys found: {sorted(map(repr, batch))})")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path} is not {what} (b'data' has shape {data.shape}, {len(labels)} labels)")
    return data.reshape(-1, 3, 32, 32), labels


# --- MNIST, IDX files ---------------------------------------------------------------------------------------


def _load_mnist(data_dir: Path):
    folder = _find_folder(data_dir, "MNIST/raw", MNIST_FILES["x_test"], gz_ok=True)
    paths, missing = {}, []
    for key, name in MNIST_FILES.items():
        found = [folder / n for n in (name, name + ".gz") if (folder / n).is_file()]
        if found:
            paths[key] = found[0]
        else:
            missing.append(name)
    if missing:
        raise DataError(
            f"MNIST folder {data_dir} is missing {', '.join(missing)}: expected the four IDX files "
            f"{', '.join(MNIST_FILES.values())} (each may be gzipped, with a .gz suffix)"
        )
    arrays = {key: _read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"MNIST {split} files {paths[f'x_{split}'].name} and {paths[f'y_{split}'].name} do not match: "
                f"expected images (N, H, W) and labels (N,), got {x.shape} and {y.shape}"
            )
    return arrays["x_train"][:, None], arrays["y_train"], arrays["x_test"][:, None], arrays["y_test"]


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
    """Read one IDX file: magic (0, 0, type code, ndim), ndim big-endian int32 sizes, then the data."""
    what = "an IDX file (magic 0x00 0x00 <type> <ndim>, big-endian sizes, then the values)"
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path} could not be read as {what}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not {what}: its first bytes are {raw[:4].hex(' ') or 'missing'}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is not {what}: the header ends early")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    count = int(np.prod(shape)) if shape else 0
    if len(raw) - header != count * dtype.itemsize:
        raise DataError(
            f"{path} is not {what}: the header promises shape {shape} ({count * dtype.itemsize} bytes of "
            f"data) but {len(raw) - header} bytes follow"
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)


def _find_folder(data_dir: Path, subfolder: str, marker: str, gz_ok: bool = False) -> Path:
    """``data_dir`` itself, or its conventional subfolder when that is where the files are."""
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist (or is not a folder)")
    for folder in (data_dir, data_dir / subfolder):
        if (folder / marker).is_file() or (gz_ok and (folder / (marker + ".gz")).is_file()):
            return folder
    return data_dir
