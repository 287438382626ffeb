"""Small data sets in the real on-disk formats, written by the tests themselves."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write an IDX file (MNIST format): magic 0,0,type,ndim; big-endian dims; raw data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_fashion_mnist(root: Path, n_train: int = 256, n_test: int = 128, seed: int = 0, compress=True) -> Path:
    """A learnable Fashion-MNIST look-alike: each class is a bright bar at its own row band."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, y in enumerate(labels):
            images[i, 2 + 2 * y : 5 + 2 * y, 4:24] = 230
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return root


def make_striped_fashion_mnist(root: Path, n_train: int = 1024, n_test: int = 200, seed: int = 0) -> Path:
    """Fashion-MNIST files where class y is horizontal stripes of period y + 2 px at a random phase.

    Unlike the bars of :func:`make_fashion_mnist`, the class survives the training
    augmentation (a crop shifts the phase, a horizontal flip changes nothing), so a
    network that learns reaches far above chance (10 %) in a few epochs.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = np.arange(28)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, y in enumerate(labels):
            period = 2 + int(y)
            images[i, (rows + rng.integers(0, period)) % period == 0, :] = 220
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def make_cifar(root: Path, num_classes: int, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Path:
    """CIFAR-10 or CIFAR-100 in the official pickle layout (str keys, as Python 2 wrote them), tiny."""
    rng = np.random.default_rng(seed)

    def batch(n, label_key):
        return {
            "data": rng.integers(0, 256, (n, 3 * 32 * 32)).astype(np.uint8),
            label_key: rng.integers(0, num_classes, n).tolist(),
            "batch_label": "test",
        }

    if num_classes == 100:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for name, n in (("train", n_train), ("test", n_test)):
            with open(folder / name, "wb") as fh:
                pickle.dump(batch(n, "fine_labels"), fh)
        with open(folder / "meta", "wb") as fh:
            pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, fh)
    else:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(1, 6):
            with open(folder / f"data_batch_{i}", "wb") as fh:
                pickle.dump(batch(n_train // 5, "labels"), fh)
        with open(folder / "test_batch", "wb") as fh:
            pickle.dump(batch(n_test, "labels"), fh)
        with open(folder / "batches.meta", "wb") as fh:
            pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, fh)
    return root
