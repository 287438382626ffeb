import numpy as np
import pytest
import torch
from datagen import make_cifar, make_fashion_mnist, write_idx

from training.data import (
    FASHION_MNIST_SYSTEM_DIR,
    ArraySplit,
    DatasetNotFoundError,
    build_datasets,
    make_loader,
    random_crop_flip,
    read_idx,
)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path, compress):
    make_fashion_mnist(tmp_path, n_train=50, n_test=20, compress=compress)
    data = build_datasets("fashion-mnist", tmp_path, download=False)
    assert data.train.images.shape == (50, 1, 28, 28) and data.train.images.dtype == torch.uint8
    assert data.test.labels.shape == (20,) and data.classes[9] == "Ankle boot"


def test_truncated_idx_file_is_reported(tmp_path):
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DatasetNotFoundError, match="truncated"):  # what every command reports
        read_idx(path)


def test_corrupt_idx_files_are_named_with_what_to_do(tmp_path):
    """A cut-short or non-gzip .gz was a raw EOFError / BadGzipFile traceback from every command."""
    from training.data import CorruptDatasetError

    noise = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)  # does not compress away
    path = write_idx(tmp_path / "y-idx3-ubyte", noise, compress=True)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptDatasetError, match=r"y-idx3-ubyte.gz is corrupt or truncated.*fetch it again"):
        read_idx(path)
    path.write_bytes(b"no gzip here")
    with pytest.raises(CorruptDatasetError, match="corrupt or truncated"):
        read_idx(path)
    assert issubclass(CorruptDatasetError, DatasetNotFoundError)  # every command reports those


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_debian_files():
    data = build_datasets("fashion-mnist", None, download=False)
    assert len(data.train) == 60000 and len(data.test) == 10000
    assert sorted(data.test.labels.unique().tolist()) == list(range(10))


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_pickles(tmp_path, num_classes):
    make_cifar(tmp_path, num_classes)
    name = f"cifar{num_classes}"
    data = build_datasets(name, tmp_path, download=False)
    assert data.train.images.shape == (60, 3, 32, 32)
    assert len(data.test) == 20 and len(data.classes) == num_classes
    assert data.spec.num_classes == num_classes


def _edit_pickle(path, edit):
    import pickle

    with open(path, "rb") as fh:
        content = pickle.load(fh)
    edit(content)
    with open(path, "wb") as fh:
        pickle.dump(content, fh)


@pytest.mark.parametrize(
    "name, change, message",
    [
        # three labels short: every later image took the next one's label, and training ran
        ("data_batch_1", lambda b: b.update(labels=b["labels"][:-3]), "60 train images but 57 labels"),
        # nine names for ten classes: a 10-logit model was exported with nine class names
        ("batches.meta", lambda m: m.update(label_names=m["label_names"][:9]), "9 class names for its 10 classes"),
        ("test_batch", lambda b: b.update(labels=[12] * len(b["labels"])), "test labels from 12 to 12"),
    ],
)
def test_cifar_files_that_do_not_hold_the_data_set_are_refused(tmp_path, name, change, message):
    from training.data import CorruptDatasetError

    make_cifar(tmp_path, 10)
    _edit_pickle(tmp_path / "cifar-10-batches-py" / name, change)
    with pytest.raises(CorruptDatasetError, match=message):
        build_datasets("cifar10", tmp_path, download=False)


@pytest.mark.parametrize("what", ["labels as images", "32x32 images", "a label of 37"])
def test_fashion_mnist_files_that_do_not_hold_the_data_set_are_refused(tmp_path, what):
    # A labels file over the images file was "not enough values to unpack"; a label of 37 an
    # IndexError traceback mid-epoch; 32x32 images trained at 32 while the run recorded 28.
    from training.data import CorruptDatasetError

    make_fashion_mnist(tmp_path, n_train=20, n_test=8)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    if what == "labels as images":
        images.write_bytes((tmp_path / "train-labels-idx1-ubyte.gz").read_bytes())
        message = r"train images of shape \(1,\), where the data set's are \(1, 28, 28\)"
    elif what == "32x32 images":
        write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((20, 32, 32), np.uint8))
        message = r"train images of shape \(1, 32, 32\)"
    else:
        write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(8, 37, np.uint8))
        message = "test labels from 37 to 37, where classes are 0..9"
    with pytest.raises(CorruptDatasetError, match=message):
        build_datasets("fashion-mnist", tmp_path, download=False)


def test_missing_cifar_says_what_to_do(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="CIFAR-100 not found.*--dataset fashion-mnist"):
        build_datasets("cifar100", tmp_path / "nothing", download=False)


def test_val_split_is_disjoint_and_seeded(tmp_path):
    make_fashion_mnist(tmp_path, n_train=100, n_test=10)
    a = build_datasets("fashion-mnist", tmp_path, val_split=30, seed=1, download=False)
    b = build_datasets("fashion-mnist", tmp_path, val_split=30, seed=1, download=False)
    assert len(a.val) == 30 and len(a.train) == 70
    assert torch.equal(a.val.images, b.val.images)
    all_images = {img.numpy().tobytes() for img in torch.cat([a.train.images, a.val.images])}
    assert len(all_images) == 100  # nothing lost, nothing duplicated
    with pytest.raises(ValueError, match="--val-split"):
        build_datasets("fashion-mnist", tmp_path, val_split=100, download=False)


def test_random_crop_flip_moves_content_within_padding():
    img = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    img[:, :, 3, 3] = 255
    out = random_crop_flip(img, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == img.shape
    positions = {tuple(torch.nonzero(o[0]).tolist()[0]) for o in out if o.any()}
    assert len(positions) > 5  # it really is random
    for r, c in positions:  # a shift of at most 2 px, possibly mirrored
        assert abs(r - 3) <= 2 and (abs(c - 3) <= 2 or abs(c - 4) <= 2)


def test_loader_is_deterministic_per_epoch_and_sharded(tmp_path):
    make_fashion_mnist(tmp_path, n_train=40, n_test=10)
    data = build_datasets("fashion-mnist", tmp_path, download=False)
    loader = make_loader(data.train, data.spec, 8, train=True, seed=3)
    loader.set_epoch(1)
    first = [x for x, _ in loader]
    loader.set_epoch(1)
    again = [x for x, _ in loader]
    loader.set_epoch(2)
    other = [x for x, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert abs(first[0].mean().item()) < 3  # normalized
    # Labels replaced by each image's index, so a batch says which images it holds.
    indexed = ArraySplit(data.train.images, torch.arange(len(data.train)))
    shards = [make_loader(indexed, data.spec, 4, True, 3, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        for s in shards:
            s.set_epoch(epoch)
        held = [torch.cat([y for _, y in s]).tolist() for s in shards]
        assert len(held[0]) == len(held[1]) == 20
        # DDP's two ranks train on disjoint halves that together are the whole split.
        assert set(held[0]).isdisjoint(held[1]) and sorted(held[0] + held[1]) == list(range(40)), epoch


def _gray_levels(images: torch.Tensor, spec, y: int = 0, x: int = 0) -> list[float]:
    """The 8-bit gray level of pixel (y, x) of each image, read back through the normalisation."""
    return [(float(v) * spec.std[0] + spec.mean[0]) * 255 for v in images[:, 0, y, x]]


def test_ddp_ranks_draw_their_own_crops_and_flips():
    """Identical images on every rank: what differs between two ranks' batches is augmentation.

    From one shared generator, batch position k got the same crop and flip on every rank, so a
    global batch saw only a rank's worth of distinct draws.
    """
    from training.data import DATASETS, ArraySplit

    n = 64
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 5:9, 3:6] = 255  # an asymmetric patch: every shift and flip moves it somewhere else
    split = ArraySplit(images, torch.zeros(n, dtype=torch.int64))
    spec = DATASETS["fashion-mnist"]
    batches = []
    for rank in range(2):
        loader = make_loader(split, spec, 32, train=True, seed=7, rank=rank, world_size=2)
        loader.set_epoch(3)
        batches.append(next(iter(loader))[0])
        loader.set_epoch(3)  # still a function of (seed, epoch, rank): resumes stay exact
        assert torch.equal(next(iter(loader))[0], batches[-1])
    same_position = [torch.equal(a, b) for a, b in zip(batches[0], batches[1])]
    assert sum(same_position) < 8, f"{sum(same_position)} of 32 positions drew the same crop on both ranks"
    one_process = make_loader(split, spec, 32, train=True, seed=7)
    one_process.set_epoch(3)
    distinct = {tuple(x.flatten().tolist()) for x in next(iter(one_process))[0]}
    assert len(distinct) > 8  # one process still augments per image


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_evaluation_shards_are_disjoint_and_complete_in_memory(world_size):
    from training.data import DATASETS, ArraySplit

    n = 10  # not a multiple of 3: no padding duplicates allowed at evaluation
    split = ArraySplit(
        torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 1, 28, 28).contiguous(),
        torch.zeros(n, dtype=torch.int64),
    )
    spec = DATASETS["fashion-mnist"]
    seen = []
    for rank in range(world_size):
        loader = make_loader(split, spec, 4, train=False, rank=rank, world_size=world_size)
        images = torch.cat([x for x, _ in loader])
        seen += [round(g) for g in _gray_levels(images, spec)]  # gray level = the image's index
    assert sorted(seen) == list(range(n))  # every image exactly once: disjoint and complete


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_evaluation_shards_are_disjoint_and_complete_imagefolder(tmp_path, world_size):
    from PIL import Image

    for split, n in (("train", 2), ("val", 5)):
        for c, cls in enumerate(("cat", "dog")):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):  # gray level = a unique id per validation image
                Image.new("RGB", (224, 224), (10 * (c * n + i) + 5,) * 3).save(folder / f"{i}.png")
    data = build_datasets("imagefolder", tmp_path, seed=0)
    seen = []
    for rank in range(world_size):
        loader = make_loader(data.test, data.spec, 3, train=False, rank=rank, world_size=world_size, workers=0)
        images = torch.cat([x for x, _ in loader])
        seen += [round((g - 5) / 10) for g in _gray_levels(images, data.spec, 112, 112)]
    assert sorted(seen) == list(range(10))


def test_augmentation_seeds_are_apart_from_the_order_seeds():
    # (seed * 1_000_003 + epoch) * 4_099 + rank + 1 made rank r's epoch 0 the order seed of epoch r + 1
    from training.data import augmentation_seed

    for seed in (0, 1, 7):
        order = {seed * 1_000_003 + epoch for epoch in range(1000)}
        augment = {augmentation_seed(seed, epoch, rank) for epoch in range(200) for rank in range(8)}
        assert len(augment) == 200 * 8 and not augment & order


@pytest.mark.parametrize("workers", [0, 1])
def test_ddp_ranks_draw_their_own_imagefolder_augmentation(tmp_path, workers):
    """torchvision's transforms draw from torch's global generator, which every DDP process seeds
    alike (``torch.manual_seed(args.seed)``): each rank must still crop and flip on its own."""
    from PIL import Image

    ramp = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))  # left-right asymmetric: flips show
    for split in ("train", "val"):
        folder = tmp_path / split / "only"
        folder.mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.stack([ramp, ramp.T, ramp], axis=2)).save(folder / f"{i}.png")
    data = build_datasets("imagefolder", tmp_path, seed=0)
    batches = []
    for rank in range(2):
        torch.manual_seed(0)  # as each DDP process does at start
        loader = make_loader(data.train, data.spec, 4, train=True, seed=0, rank=rank, world_size=2, workers=workers)
        loader.set_epoch(1)
        batches.append(next(iter(loader))[0])
    assert not any(torch.equal(a, b) for a, b in zip(batches[0], batches[1]))
    torch.manual_seed(123)  # whatever else drew from the global generator, an epoch replays exactly
    again = make_loader(data.train, data.spec, 4, train=True, seed=0, rank=1, world_size=2, workers=workers)
    again.set_epoch(1)
    assert torch.equal(next(iter(again))[0], batches[1])


def test_imagefolder_layout(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    data = build_datasets("imagefolder", tmp_path, val_split=2, seed=0)
    assert data.classes == ["cat", "dog"] and data.spec.num_classes == 2
    assert len(data.train) == 6 and len(data.val) == 2 and len(data.test) == 4
    loader = make_loader(data.test, data.spec, 3, train=False, workers=0)
    images, labels = next(iter(loader))
    assert images.shape == (3, 3, 224, 224) and labels.tolist() == [0, 0, 1]
    with pytest.raises(DatasetNotFoundError, match="has no train/ and no val/ folder.*ImageNet layout"):
        (tmp_path / "only").mkdir()
        build_datasets("imagefolder", tmp_path / "only")
    # Labels are class-folder indices: other folders in val/ would silently mislabel every test image.
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "bird")
    with pytest.raises(
        DatasetNotFoundError, match=r"different class folders \(only in train/: \['dog'\]; only in val/"
    ):
        build_datasets("imagefolder", tmp_path)
    (tmp_path / "val" / "bird").rename(tmp_path / "val" / "dog")
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    data = build_datasets("imagefolder", tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"broken.jpg is not a readable image"):
        list(make_loader(data.train, data.spec, 8, train=False, workers=0))
    # The images held out for validation (read with the evaluation transform) name it too: PIL's bare
    # UnidentifiedImageError ended the run at its first evaluation. Raised in a DataLoader worker, the
    # error torch re-raises says it in one line, not with the worker's traceback as its message.
    data = build_datasets("imagefolder", tmp_path, val_split=8, seed=0)
    with pytest.raises(DatasetNotFoundError) as raised:
        list(make_loader(data.val, data.spec, 8, train=False, workers=1))
    assert str(raised.value).startswith(str(tmp_path)) and str(raised.value).count("\n") == 0, str(raised.value)
    assert "broken.jpg is not a readable image" in str(raised.value)


def test_an_imagefolder_training_split_smaller_than_a_batch_still_trains(tmp_path):
    """The ragged batch is dropped unless it is the only one, as in memory: with 6 images and a batch
    of 16 an epoch had no batch at all, and train.py then failed on the missing loss."""
    from PIL import Image

    from training.engine import collect_logits
    from training.models import create_model

    for split, n in (("train", 3), ("val", 1)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 40), (40 * i,) * 3).save(tmp_path / split / cls / f"{i}.png")
    data = build_datasets("imagefolder", tmp_path, seed=0)
    loader = make_loader(data.train, data.spec, 16, train=True, workers=0)
    assert [len(y) for _, y in loader] == [6]
    loader = make_loader(data.train, data.spec, 4, train=True, workers=0)
    assert [len(y) for _, y in loader] == [4]  # more than a batch: the ragged rest is dropped, as before
    # A DDP rank whose evaluation shard is empty (a split smaller than the world) returns no rows, in the
    # shapes the accuracy counts need, and joins the all-reduce (torch.cat([]) failed).
    model = create_model("resnet18", 2, 3, 0.0625)
    logits, _, labels = collect_logits(model, [], torch.device("cpu"))
    assert logits.shape == (0, model.num_exits, 2) and labels.shape == (0,)


def test_train_size_shrinks_only_the_training_split(tmp_path):
    """--train-size: a seeded subset of the training split; the test split stays whole, the
    subset does not depend on --val-split and never overlaps the validation images."""
    make_fashion_mnist(tmp_path, n_train=100, n_test=40)
    a = build_datasets("fashion-mnist", tmp_path, val_split=30, seed=3, download=False, train_size=25)
    assert len(a.train) == 25 and len(a.val) == 30 and len(a.test) == 40
    whole = build_datasets("fashion-mnist", tmp_path, download=False)
    assert torch.equal(a.test.images, whole.test.images)
    # Same seed, same images, whatever the validation split; another seed, other images.
    b = build_datasets("fashion-mnist", tmp_path, seed=3, download=False, train_size=25)
    assert b.val is None and torch.equal(a.train.images, b.train.images)
    c = build_datasets("fashion-mnist", tmp_path, seed=4, download=False, train_size=25)
    assert not torch.equal(a.train.images, c.train.images)
    train_set = {img.numpy().tobytes() for img in a.train.images}
    assert not train_set & {img.numpy().tobytes() for img in a.val.images}
    with pytest.raises(ValueError, match="--train-size 80 must be between 1 and 70"):
        build_datasets("fashion-mnist", tmp_path, val_split=30, download=False, train_size=80)


def test_subset_unlike_train_size_shrinks_the_test_split_too(tmp_path):
    make_fashion_mnist(tmp_path, n_train=100, n_test=40)
    data = build_datasets("fashion-mnist", tmp_path, subset=20, download=False)
    assert len(data.train) == 20 and len(data.test) == 20


def test_an_explicit_data_dir_without_the_files_says_which_copy_is_read(tmp_path):
    import warnings

    from training.data import FASHION_MNIST_SYSTEM_DIR, load_fashion_mnist

    if not (FASHION_MNIST_SYSTEM_DIR / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("no system copy of Fashion-MNIST to fall back on")
    with pytest.warns(UserWarning, match="holds no Fashion-MNIST idx files; reading the system copy"):
        *_, directory = load_fashion_mnist(tmp_path / "empty", download=False)
    assert directory == FASHION_MNIST_SYSTEM_DIR
    with warnings.catch_warnings():  # pointed at the system copy itself: nothing to say
        warnings.simplefilter("error")
        load_fashion_mnist(FASHION_MNIST_SYSTEM_DIR, download=False)
