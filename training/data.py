"""Datasets: CIFAR-10/100, Fashion-MNIST and ImageFolder, with the paper's augmentation.

Small datasets (CIFAR, Fashion-MNIST) are held in memory as uint8 tensors and batched by
``InMemoryLoader``, which augments whole batches at once (random crop with 4 px padding +
horizontal flip) — far cheaper on a CPU than per-image PIL transforms — and draws every
random number from a generator seeded by (seed, epoch) — each DDP rank's crops and flips from
one seeded by (seed, epoch, rank) — so a resumed run sees exactly the batches an uninterrupted
run would. ImageFolder (ImageNet layout) goes through a regular
DataLoader with torchvision transforms.
"""

from __future__ import annotations

import gzip
import math
import os
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


class DatasetNotFoundError(FileNotFoundError):
    """The data set is not on disk and could not be fetched; the message says what to do."""

    def __str__(self) -> str:
        # Raised in a DataLoader worker, torch re-raises it in the main process with the worker's
        # whole traceback as its message ("Caught ... in DataLoader worker process 0.\nOriginal
        # Traceback ..."): the commands print this error as one line, so say only what went wrong.
        text = super().__str__()
        if text.startswith("Caught ") and "\nOriginal Traceback" in text:
            last = text.rstrip().splitlines()[-1]
            return last.split(": ", 1)[1] if last.startswith(f"{__name__}.") and ": " in last else last
        return text


class CorruptDatasetError(DatasetNotFoundError):
    """A data set's files are on disk but cannot be read (truncated, not the format); the message names
    the file and what to do. A DatasetNotFoundError, so every command that reports one reports this."""


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a data set: what the model's input and output look like."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 4  # paper's augmentation: random crop after zero-padding, + h-flip


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetSpec("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion-mnist": DatasetSpec("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,)),
    # num_classes is read from the folder; 1000 is what FLOP counting assumes.
    "imagefolder": DatasetSpec("imagefolder", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class ArraySplit:
    """One split held in memory: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor | slice) -> ArraySplit:
        return ArraySplit(self.images[index], self.labels[index])


@dataclass
class DataBundle:
    spec: DatasetSpec
    classes: list[str]
    train: Any  # ArraySplit or a torch Dataset (ImageFolder)
    test: Any
    val: Any = None
    source: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- readers


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzipped or not."""
    path = Path(path)
    fix = "delete it and fetch it again (the system copy: apt-get install --reinstall dataset-fashion-mnist)"
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # cut short, or not gzip at all
        raise CorruptDatasetError(f"{path} is corrupt or truncated ({exc}); {fix}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise CorruptDatasetError(f"{path} is not an IDX file (bad magic number); {fix}")
    dtype_code, ndim = data[2], data[3]
    dtypes: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise CorruptDatasetError(f"{path}: unknown IDX element type 0x{dtype_code:02x}; {fix}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if 4 + 4 * ndim > len(data) or (len(data) - 4 - 4 * ndim) % np.dtype(dtypes[dtype_code]).itemsize:
        raise CorruptDatasetError(f"{path}: the file ends inside its header or an element (truncated?); {fix}")
    array = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if array.size != math.prod(shape):
        raise CorruptDatasetError(
            f"{path}: header says {shape} but the file holds {array.size} values (truncated?); {fix}"
        )
    return array.reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (
        directory / stem,
        directory / f"{stem}.gz",
        directory / "FashionMNIST" / "raw" / stem,
        directory / "FashionMNIST" / "raw" / f"{stem}.gz",
    ):
        if candidate.is_file():
            return candidate
    return None


_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def load_fashion_mnist(data_dir: str | Path | None, download: bool) -> tuple[ArraySplit, ArraySplit, Path]:
    """Fashion-MNIST from idx files: ``data_dir`` (or its fashion-mnist/ subfolder), then the
    Debian package's folder; downloaded with torchvision into ``data_dir`` as a last resort."""
    candidates = []
    if data_dir is not None:
        candidates += [Path(data_dir), Path(data_dir) / "fashion-mnist"]
    candidates.append(FASHION_MNIST_SYSTEM_DIR)
    for directory in candidates:
        files = {k: _find_idx(directory, v) for k, v in _FMNIST_FILES.items()}
        if all(files.values()):
            if data_dir is not None and directory == FASHION_MNIST_SYSTEM_DIR and directory not in candidates[:-1]:
                # Said, not silent: the run's data is not where the user pointed (the same files, but
                # a folder meant to hold another copy would otherwise go unnoticed).
                warnings.warn(
                    f"--data-dir {data_dir} holds no Fashion-MNIST idx files; reading the system copy in "
                    f"{FASHION_MNIST_SYSTEM_DIR} instead",
                    stacklevel=2,
                )
            break
    else:
        if download and data_dir is not None:
            try:
                from torchvision.datasets import FashionMNIST

                FashionMNIST(str(data_dir), train=True, download=True)
                FashionMNIST(str(data_dir), train=False, download=True)
            except Exception as exc:  # network errors come in many types
                raise DatasetNotFoundError(_fmnist_missing(candidates, f"download failed: {exc}")) from exc
            return load_fashion_mnist(data_dir, download=False)
        raise DatasetNotFoundError(_fmnist_missing(candidates, "downloading is off"))
    arrays = {k: read_idx(p) for k, p in files.items() if p is not None}
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise CorruptDatasetError(
                f"Fashion-MNIST in {directory}: {split} images and labels differ in count "
                f"({len(arrays[f'{split}_images'])} vs {len(arrays[f'{split}_labels'])}); a file is truncated or "
                "from another copy: replace the four files"
            )

    def to_split(images: np.ndarray, labels: np.ndarray) -> ArraySplit:
        return ArraySplit(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))

    return (
        to_split(arrays["train_images"], arrays["train_labels"]),
        to_split(arrays["test_images"], arrays["test_labels"]),
        directory,
    )


def _fmnist_missing(candidates: list[Path], why: str) -> str:
    looked = ", ".join(str(c) for c in candidates)
    return (
        f"Fashion-MNIST not found (looked for train-images-idx3-ubyte[.gz] etc. in {looked}; {why}). "
        "Install it with `apt-get install dataset-fashion-mnist` or pass --data-dir pointing at the idx files."
    )


def load_cifar(name: str, data_dir: str | Path, download: bool) -> tuple[ArraySplit, ArraySplit, list[str]]:
    """CIFAR-10/100 through torchvision (its own pickle format and download code)."""
    from torchvision import datasets

    base = datasets.CIFAR100 if name == "cifar100" else datasets.CIFAR10

    class _Cifar(base):  # type: ignore[valid-type,misc]  # a class chosen at run time
        # torchvision checks the md5 of the official files; a folder in the same format
        # (a mirror, or the small files tests write) is accepted if every file is present.
        meta = {**base.meta, "md5": None}  # md5 None: torchvision only checks the file exists

        def _check_integrity(self) -> bool:
            return all((Path(self.root) / self.base_folder / f).is_file() for f, _ in self.train_list + self.test_list)

    folder = Path(data_dir) / base.base_folder
    try:
        train = _Cifar(str(data_dir), train=True, download=download)
        test = _Cifar(str(data_dir), train=False, download=False)
    except Exception as exc:
        pretty = "CIFAR-100" if name == "cifar100" else "CIFAR-10"
        if all((folder / f).is_file() for f, _ in base.train_list + base.test_list):  # there, not readable
            raise CorruptDatasetError(
                f"the {pretty} files in {folder} are corrupt ({type(exc).__name__}: {exc}); delete the folder "
                f"and download {base.url} again"
            ) from exc
        how = "the download failed" if download else "downloading is off (--no-download)"
        raise DatasetNotFoundError(
            f"{pretty} not found in {folder} and {how}: {exc}. Download {base.url} on a machine with "
            f"network and unpack it under {data_dir}, pass --data-dir, or train on the data available "
            "offline with --dataset fashion-mnist."
        ) from exc

    def to_split(ds) -> ArraySplit:
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return ArraySplit(images, torch.as_tensor(ds.targets, dtype=torch.int64))

    return to_split(train), to_split(test), list(train.classes)


def build_datasets(
    name: str,
    data_dir: str | Path | None = None,
    val_split: int = 0,
    subset: int | None = None,
    seed: int = 0,
    download: bool = True,
    train_size: int | None = None,
) -> DataBundle:
    """Load a data set's train/val/test splits.

    ``val_split`` holds out that many training images (a seeded random choice) for model
    selection. ``train_size`` trains on a seeded random N images of the training split and
    leaves the test split whole (small-training-set experiments); the images neither trained
    on nor held out are unused. ``subset`` instead keeps only the first N images of *every*
    split, test included: it is for quick runs, not for measuring accuracy.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    spec = DATASETS[name]
    if name == "imagefolder":
        return _build_imagefolder(spec, data_dir, val_split, subset, seed, train_size)
    if name == "fashion-mnist":
        train, test, where = load_fashion_mnist(data_dir, download)
        classes = list(FASHION_MNIST_CLASSES)
    else:
        root = Path(data_dir) if data_dir is not None else Path("data")
        train, test, classes = load_cifar(name, root, download)
        where = root
    check_arrays(spec, where, classes, train=train, test=test)
    val_idx, train_idx = split_indices(len(train), val_split, train_size, seed)
    val = train.take(val_idx) if val_idx is not None else None
    train = train.take(train_idx) if train_idx is not None else train
    if subset:
        train = train.take(slice(0, subset))
        test = test.take(slice(0, subset))
        val = val.take(slice(0, subset)) if val is not None else None
    return DataBundle(spec, classes, train, test, val, {"path": str(where)})


def check_arrays(spec: DatasetSpec, where: str | Path, classes: list[str], **splits: ArraySplit) -> None:
    """CorruptDatasetError unless the files held what ``spec`` says: a name per class, and per split
    (C, H, W) images of its size with one label each, every label a class index. Unchecked, a CIFAR
    labels list three short shifted every later image's label, nine class names went into a
    10-class manifest, and 32x32 Fashion-MNIST trained at 32 while the run recorded 28."""
    problems = []
    if len(classes) != spec.num_classes:
        problems.append(f"{len(classes)} class names for its {spec.num_classes} classes")
    expected = (spec.channels, spec.image_size, spec.image_size)
    for split, arrays in splits.items():
        shape = tuple(arrays.images.shape[1:])
        if shape != expected:
            problems.append(f"{split} images of shape {shape}, where the data set's are {expected} (C, H, W)")
        if len(arrays.images) != len(arrays.labels):
            problems.append(f"{len(arrays.images)} {split} images but {len(arrays.labels)} labels")
        if len(arrays.labels) and (int(arrays.labels.min()) < 0 or int(arrays.labels.max()) >= spec.num_classes):
            low, high = int(arrays.labels.min()), int(arrays.labels.max())
            problems.append(f"{split} labels from {low} to {high}, where classes are 0..{spec.num_classes - 1}")
    if problems:
        raise CorruptDatasetError(
            f"{spec.name} in {where}: {'; '.join(problems)}. A file is truncated, edited or of another data set: "
            "replace the data set's files"
        )


def split_indices(
    n: int, val_split: int, train_size: int | None, seed: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(validation indices, training indices) into a training split of ``n`` images; None
    means "no validation split" / "all the remaining images".

    One seeded permutation serves both: validation takes its head, ``train_size`` its tail,
    so the training subset depends only on (seed, train_size) — not on ``val_split`` — and
    never overlaps the validation images.
    """
    if val_split and not 0 < val_split < n:
        raise ValueError(f"--val-split {val_split} must be between 1 and {n - 1} (training set size)")
    if train_size is not None and not 0 < train_size <= n - val_split:
        raise ValueError(
            f"--train-size {train_size} must be between 1 and {n - val_split} (the {n} training "
            f"images minus the {val_split} held out by --val-split)"
        )
    if not val_split and train_size is None:
        return None, None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val = perm[:val_split] if val_split else None
    train = perm[n - train_size :] if train_size is not None else perm[val_split:]
    return val, train.sort().values


def _named_image_loader(path: str):
    """torchvision's default loader, with the file named when it is not an image (Pillow's error alone
    does not say which of a folder's files it was)."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (OSError, ValueError) as exc:
        raise DatasetNotFoundError(f"{path} is not a readable image ({exc}); remove or replace it") from None


def _build_imagefolder(spec, data_dir, val_split, subset, seed, train_size=None) -> DataBundle:
    from torchvision import datasets, transforms

    if data_dir is None:
        raise DatasetNotFoundError("--dataset imagefolder needs --data-dir with train/ and val/ class folders")
    root = Path(data_dir)
    missing = [d for d in ("train", "val") if not (root / d).is_dir()]
    if missing:
        raise DatasetNotFoundError(
            f"{root} has no {' and no '.join(d + '/' for d in missing)} folder; --dataset imagefolder expects "
            "DATA_DIR/train/<class>/*.jpg and DATA_DIR/val/<class>/*.jpg (the ImageNet layout)"
        )
    normalize = transforms.Normalize(spec.mean, spec.std)
    train_tf = transforms.Compose(
        [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
    )
    test_tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalize])
    try:
        train = datasets.ImageFolder(str(root / "train"), train_tf, loader=_named_image_loader)
        test = datasets.ImageFolder(str(root / "val"), test_tf, loader=_named_image_loader)
    except FileNotFoundError as exc:  # no class folder, or no image in them
        raise DatasetNotFoundError(
            f"{exc} --dataset imagefolder expects DATA_DIR/train/<class>/*.jpg and val/"
        ) from None
    if train.classes != test.classes:
        # Labels are class-folder indices in sorted order: with other folders in val/, class i of the
        # test split would not be class i of the training split, and every test figure would be wrong.
        only_train = sorted(set(train.classes) - set(test.classes))
        only_val = sorted(set(test.classes) - set(train.classes))
        raise DatasetNotFoundError(
            f"{root}/train and {root}/val hold different class folders (only in train/: {only_train or 'none'}; "
            f"only in val/: {only_val or 'none'}); both need the same classes"
        )
    val = None
    val_idx, train_idx = split_indices(len(train), val_split, train_size, seed)
    if val_idx is not None:
        held = datasets.ImageFolder(str(root / "train"), test_tf, loader=_named_image_loader)
        val = torch.utils.data.Subset(held, val_idx.tolist())
    if train_idx is not None:
        train = torch.utils.data.Subset(train, train_idx.tolist())
    if subset:
        train = torch.utils.data.Subset(train, range(min(subset, len(train))))
        test = torch.utils.data.Subset(test, range(min(subset, len(test))))
        val = torch.utils.data.Subset(val, range(min(subset, len(val)))) if val is not None else None
    folder: Any = test.dataset if isinstance(test, torch.utils.data.Subset) else test
    classes = folder.classes
    spec = DatasetSpec(spec.name, len(classes), spec.channels, spec.image_size, spec.mean, spec.std, 0)
    return DataBundle(spec, list(classes), train, test, val, {"path": str(root)})


# --------------------------------------------------------------------------- loading


def augmentation_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one rank's augmentation in one epoch: hashed from (seed, epoch, rank) apart from
    the shared order's ``seed * 1_000_003 + epoch`` (an affine formula made rank r's epoch 0 the order
    seed of epoch r + 1)."""
    return int(np.random.SeedSequence([seed, epoch, rank, 0xA06]).generate_state(1, np.uint64)[0])


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Batched random crop (after zero padding) and horizontal flip of (N, C, H, W) images."""
    n, _, h, w = images.shape
    flip = torch.rand(n, generator=generator) < 0.5
    if padding:
        padded = torch.nn.functional.pad(images, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W)
        batch = torch.arange(n)[:, None, None, None]
        chans = torch.arange(images.shape[1])[None, :, None, None]
        images = padded[batch, chans, rows, cols]
    return torch.where(flip[:, None, None, None], images.flip(3), images)


class InMemoryLoader:
    """Batches of normalized float images from an ``ArraySplit``; shard-aware for DDP.

    Every epoch's order and augmentation come from a generator seeded by (seed, epoch),
    so ``set_epoch`` fully determines what the loader yields.
    """

    def __init__(
        self,
        split: ArraySplit,
        spec: DatasetSpec,
        batch_size: int,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.split, self.spec, self.batch_size, self.train = split, spec, batch_size, train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std).view(1, -1, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self, generator: torch.Generator) -> torch.Tensor:
        n = len(self.split)
        order = torch.randperm(n, generator=generator) if self.train else torch.arange(n)
        if self.world_size > 1:
            # Like DistributedSampler: pad (training) so every rank gets as many batches.
            per_rank = math.ceil(n / self.world_size)
            if self.train and n % self.world_size:
                order = torch.cat([order, order[: per_rank * self.world_size - n]])
            order = order[self.rank :: self.world_size]
        return order

    def _num_batches(self, count: int) -> int:
        # Training drops a ragged last batch (BN needs > 1 sample) unless it is the only one.
        if self.train and count > self.batch_size:
            return count // self.batch_size
        return math.ceil(count / self.batch_size)

    def __len__(self) -> int:
        count = len(self.split)
        if self.world_size > 1:
            count = math.ceil(count / self.world_size)
        return self._num_batches(count)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = self._indices(generator)  # the same on every rank: the shards must partition it
        # Each DDP rank draws its own crops and flips: from the shared generator, a rank's batch
        # position k got the same crop as every other rank's (a global batch of 128 on two ranks
        # saw 64 distinct draws). One process keeps the shared generator, so its runs reproduce.
        augment = (
            generator
            if self.world_size == 1
            else torch.Generator().manual_seed(augmentation_seed(self.seed, self.epoch, self.rank))
        )
        for b in range(self._num_batches(len(order))):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            images = self.split.images[idx]
            if self.train and self.spec.crop_padding >= 0:
                images = random_crop_flip(images, self.spec.crop_padding, augment)
            images = (images.float().div_(255) - self.mean) / self.std
            yield images, self.split.labels[idx]


def make_loader(
    split,
    spec: DatasetSpec,
    batch_size: int,
    train: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int | None = None,
):
    """An iterable of (images, labels) batches with ``set_epoch``, whatever the split type."""
    if isinstance(split, ArraySplit):
        return InMemoryLoader(split, spec, batch_size, train, seed, rank, world_size)
    return _DatasetLoader(split, batch_size, train, seed, rank, world_size, workers)


def default_workers() -> int:
    """Loader worker processes for on-disk data when --workers is not given (train.py records it)."""
    return min(8, os.cpu_count() or 1)


class _DatasetLoader:
    """DataLoader + DistributedSampler for on-disk datasets (ImageFolder)."""

    def __init__(self, dataset, batch_size, train, seed, rank, world_size, workers):
        from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

        if world_size > 1 and not train:
            # Evaluation shards without padding: DistributedSampler would repeat images to
            # even out the ranks and bias the all-reduced accuracy.
            dataset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
            self.sampler: torch.utils.data.Sampler = SequentialSampler(dataset)
        elif world_size > 1:
            self.sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed)
        elif train:
            self.sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
        else:
            self.sampler = SequentialSampler(dataset)
        workers = default_workers() if workers is None else workers
        # torchvision's random transforms draw from torch's global generator: in the workers,
        # seeded from this loader's generator; without workers, in this process. Both are seeded
        # per (seed, epoch, rank) when an epoch starts, so each DDP rank augments on its own
        # (from the globally seeded defaults, every rank drew the same crops) and a resumed run
        # replays the epochs an uninterrupted run would.
        self.augment = torch.Generator()
        self.train, self.rank, self.workers, self.epoch = train, rank, workers, 0
        self.loader = DataLoader(
            dataset,
            batch_size,
            sampler=self.sampler,
            num_workers=workers,
            generator=self.augment,
            # As the in-memory loader: the ragged last batch is dropped unless it is the only one
            # (a split smaller than a batch trained on nothing, and the epoch's metrics had no loss).
            drop_last=train and len(self.sampler) >= batch_size,
            pin_memory=torch.cuda.is_available(),
        )
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        elif hasattr(self.sampler, "generator"):
            self.sampler.generator.manual_seed(self.seed * 1_000_003 + epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.train:
            seed = augmentation_seed(self.seed, self.epoch, self.rank)
            self.augment.manual_seed(seed)
            if self.workers == 0:
                torch.manual_seed(seed)
        return iter(self.loader)
