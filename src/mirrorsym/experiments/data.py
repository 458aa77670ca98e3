"""Embedded data sets: scikit-learn's 8×8 digits (shipped with the package, no download); and loaders for
CIFAR-10 and MNIST when the user has them on disk in torchvision's layout (``--data-dir``)."""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import numpy as np
import torch


def digits(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """X (1797, 64) with pixel values scaled to [0, 1], y (1797,) int64 in 0..9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=dtype), torch.tensor(d.target, dtype=torch.int64)


def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The same digits as images (1797, 1, 8, 8), standardised to mean 0 and std 1 (float32)."""
    x, y = digits()
    x = x.reshape(-1, 1, 8, 8)
    return (x - x.mean()) / x.std(), y


# ---------------------------------------------------------------------------------------------------------
# Real data sets the user already has on disk (``mirrorsym reproduce --data-dir DIR``), in torchvision's
# layout, read without importing torchvision and without any download.

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)
# per-channel mean and std of the CIFAR-10 training images (pixel values in [0, 1])
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
MNIST_RAW = ("MNIST", "raw")
MNIST_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _cifar10_folder(root: Path | str) -> Path:
    root = Path(root)
    return root if root.name == CIFAR10_DIR else root / CIFAR10_DIR


def has_cifar10(root: Path | str | None) -> bool:
    """Whether ``root`` holds CIFAR-10 in torchvision's layout (``root/cifar-10-batches-py/``)."""
    if root is None:
        return False
    folder = _cifar10_folder(root)
    return all((folder / f).is_file() for f in CIFAR10_TRAIN + CIFAR10_TEST)


# What a CIFAR-10 python batch may name when unpickled: numpy's array and dtype reconstruction (numpy 2
# moved ``numpy.core`` to ``numpy._core``; protocol-5 pickles use ``_frombuffer``) and ``_codecs.encode``
# (how Python 3 writes bytes into protocol-2 pickles). Dicts, lists, str, bytes and ints need no global.
CIFAR10_PICKLE_GLOBALS = (
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
)


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for a global that the restricted unpickler does not allow (nothing was executed)."""


def _numpy_internal(module: str, name: str):
    """``numpy.core.X`` and ``numpy._core.X`` resolve to whichever this numpy has (``_core`` first, so that
    numpy 2 does not warn about the deprecated ``numpy.core`` alias)."""
    suffix = module.split(".", 2)[2]
    for candidate in (f"numpy._core.{suffix}", f"numpy.core.{suffix}"):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise UnsafePickleError(f"this numpy has no {module}.{name}")


class CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch without running code from the file: ``find_class`` returns only the
    globals in :data:`CIFAR10_PICKLE_GLOBALS` and raises :class:`UnsafePickleError` naming any other one
    (a crafted file's ``__reduce__`` would otherwise call it, e.g. ``os.system``)."""

    def __init__(self, file, path: Path | str = "<pickle>"):
        super().__init__(file, encoding="latin1")  # the batches are Python 2 pickles of latin-1 strings
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in CIFAR10_PICKLE_GLOBALS:
            raise UnsafePickleError(
                f"{self.path}: refuses to unpickle the global {module}.{name}: a CIFAR-10 python batch holds "
                "only a dict of numpy arrays, lists and strings; this file is not one (or was tampered "
                "with). Replace it with the extracted 'CIFAR-10 python version' archive")
        if module.startswith("numpy.") and module != "numpy":
            return _numpy_internal(module, name)
        return getattr(importlib.import_module(module), name)


def read_cifar10_batch(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch file: images uint8 (n, 3, 32, 32) and labels int64 (n,) in 0..9.

    The file is read with :class:`CifarUnpickler` (no code from the file runs) and checked: a dict (str or
    bytes keys) with ``data`` a uint8 array (n, 3072) and ``labels`` n integers in 0..9. Anything else
    raises ValueError naming the file and what is wrong."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            batch = CifarUnpickler(fh, path).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # truncated or foreign files fail in many ways (EOFError, UnpicklingError, ...)
        raise ValueError(f"{path} cannot be read as a CIFAR-10 python batch ({type(exc).__name__}: {exc}); "
                         "replace it with the file from the extracted 'CIFAR-10 python version' archive") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path} holds a {type(batch).__name__}, not a CIFAR-10 batch dict")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} array {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a uint8 array (n, 3072) (3 × 32 × 32 pixels per row), "
                         f"found {what}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: 'labels' must be a list of integers ({exc})") from exc
    if labels.shape != (len(data),) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"{path}: 'labels' must be {len(data)} integers in 0..9 (one per row of 'data'), "
                         f"found shape {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar10_path(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(
            f"mirrorsym.experiments.data.cifar10: {path} not found; --data-dir must hold CIFAR-10 in "
            f"torchvision's layout: DIR/{CIFAR10_DIR}/{{{', '.join(CIFAR10_TRAIN + CIFAR10_TEST)}}} "
            "(the 'CIFAR-10 python version' archive, extracted)")
    return path


def cifar10(root: Path | str, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from torchvision's python-pickle layout: X (N, 3, 32, 32) float32, y (N,) int64 in 0..9.

    ``root`` is the folder holding ``cifar-10-batches-py/`` (or that folder itself). Each batch file is a
    pickled dict with ``data`` (uint8, (n, 3072): 1024 red, then green, then blue values, row-major 32×32)
    and ``labels``; it is read by :func:`read_cifar10_batch`, whose restricted unpickler runs no code from
    the file. Pixels are scaled to [0, 1] and then standardised per channel with the usual CIFAR-10
    training mean and std: x ← (x/255 − mean_c)/std_c. 50 000 training images (``data_batch_1..5``) or
    10 000 test images (``test_batch``)."""
    folder = _cifar10_folder(root)
    xs, ys = [], []
    for name in CIFAR10_TRAIN if train else CIFAR10_TEST:
        x, y = read_cifar10_batch(_cifar10_path(folder, name))
        xs.append(x)
        ys.append(y)
    images = torch.from_numpy(np.concatenate(xs)).float().div_(255.0)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (images - mean) / std, torch.from_numpy(np.concatenate(ys))


def check_cifar10(root: Path | str) -> None:
    """Raise FileNotFoundError / ValueError (naming the file and the fix) unless every CIFAR-10 batch under
    ``root`` exists and is a valid batch (:func:`read_cifar10_batch`); reads each file once, runs nothing."""
    folder = _cifar10_folder(root)
    for name in CIFAR10_TRAIN + CIFAR10_TEST:
        read_cifar10_batch(_cifar10_path(folder, name))


def _mnist_folder(root: Path | str) -> Path:
    root = Path(root)
    nested = root.joinpath(*MNIST_RAW)
    return nested if nested.is_dir() else root


def _idx_path(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def has_mnist(root: Path | str | None) -> bool:
    """Whether ``root`` holds MNIST in torchvision's layout (``root/MNIST/raw/`` idx files, plain or .gz)."""
    if root is None:
        return False
    folder = _mnist_folder(root)
    return all(_idx_path(folder, n) is not None for names in MNIST_FILES.values() for n in names)


def available_datasets(root: Path | str | None) -> list[str]:
    """Which of the real data sets ``root`` holds: a sublist of ["cifar10", "mnist"]."""
    return [name for name, has in (("cifar10", has_cifar10), ("mnist", has_mnist)) if has(root)]


def read_idx(path: Path | str) -> np.ndarray:
    """One idx file (LeCun's MNIST format, optionally gzipped) as a uint8 array of its stated shape.

    Header: two zero bytes, a type byte (0x08 = unsigned byte, the only one MNIST uses), the number of
    dimensions, then each dimension as a big-endian int32; then the values, row-major."""
    import gzip

    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"mirrorsym.experiments.data.read_idx: {path} is not an unsigned-byte idx file "
                         f"(header {raw[:4].hex()}, expected 000008xx)")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    values = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"mirrorsym.experiments.data.read_idx: {path} states shape {shape} but holds "
                         f"{values.size} values (truncated file?)")
    return values.reshape(shape)


def _mnist_arrays(root: Path | str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """The images (N, rows, cols) and labels (N,) uint8 idx arrays of one MNIST split, checked."""
    folder = _mnist_folder(root)
    arrays = []
    for name in MNIST_FILES[train]:
        path = _idx_path(folder, name)
        if path is None:
            raise FileNotFoundError(
                f"mirrorsym.experiments.data.mnist: {folder / name}[.gz] not found; --data-dir must hold MNIST "
                f"in torchvision's layout: DIR/{'/'.join(MNIST_RAW)}/{{{', '.join(sum(MNIST_FILES.values(), ()))}}}"
                " (plain or .gz)")
        arrays.append(read_idx(path))
    images, labels = arrays
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"mirrorsym.experiments.data.mnist: images {images.shape} and labels {labels.shape} "
                         f"in {folder} do not match (expected (N, 28, 28) and (N,))")
    if labels.size and labels.max() > 9:
        raise ValueError(f"mirrorsym.experiments.data.mnist: the labels in {folder} go up to {labels.max()}; "
                         "MNIST labels are 0..9 (is this the labels file of another data set?)")
    return images, labels


def mnist(root: Path | str, train: bool = True, flat: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST from torchvision's raw layout: X float32 with pixels scaled to [0, 1], (N, 784) if ``flat``
    else (N, 1, 28, 28); y (N,) int64 in 0..9. 60 000 training or 10 000 test images.

    ``root`` is the folder holding ``MNIST/raw/`` (or a folder holding the idx files directly); the files
    are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte``, each plain or gzipped (``.gz``)."""
    images, labels = _mnist_arrays(root, train)
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    x = x.reshape(len(x), -1) if flat else x.unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def check_mnist(root: Path | str) -> None:
    """Raise FileNotFoundError / ValueError (naming the file and the fix) unless the four MNIST idx files
    under ``root`` exist, are unsigned-byte idx files of their stated size and images and labels match."""
    for train in (True, False):
        _mnist_arrays(root, train)


def present_files(root: Path | str | None, name: str) -> list[Path]:
    """The files of data set ``name`` ("cifar10" or "mnist") that exist under ``root``, complete or not: a
    data set with some but not all of its files is a broken copy rather than an absent one."""
    if root is None:
        return []
    if name == "cifar10":
        folder = _cifar10_folder(root)
        return [folder / f for f in CIFAR10_TRAIN + CIFAR10_TEST if (folder / f).is_file()]
    if name == "mnist":
        folder = _mnist_folder(root)
        found = (_idx_path(folder, n) for names in MNIST_FILES.values() for n in names)
        return [p for p in found if p is not None]
    raise ValueError(f"present_files: unknown data set {name!r}; choose 'cifar10' or 'mnist'")
