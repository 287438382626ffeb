"""The shipped default model folder: intact files and the accuracy its manifest claims.

The folder is ``$EED_DEFAULT_MODEL`` if set, else ``exported/fmnist-resnet18-eed``, else
the single folder under ``exported/`` holding a manifest.json; the tests skip (saying
why) until one exists. Accuracy is measured with ONNX Runtime alone, as the server runs
the model, on 1,000 Fashion-MNIST test images from the Debian package's files.
"""

import os
from pathlib import Path

import numpy as np
import pytest

from serving.manifest import load_manifest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_NAME = "fmnist-resnet18-eed"
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGES = 1000
TOLERANCE_POINTS = 1.5


def find_model_dir() -> Path | None:
    if os.environ.get("EED_DEFAULT_MODEL"):
        return Path(os.environ["EED_DEFAULT_MODEL"])
    if (ROOT / "exported" / DEFAULT_NAME / "manifest.json").is_file():
        return ROOT / "exported" / DEFAULT_NAME
    found = sorted(p.parent for p in (ROOT / "exported").glob("*/manifest.json"))
    return found[0] if len(found) == 1 else None


MODEL_DIR = find_model_dir()
pytestmark = pytest.mark.skipif(
    MODEL_DIR is None,
    reason=f"no shipped model: exported/{DEFAULT_NAME}/manifest.json does not exist yet "
    "(build it with `make default-model`, or set EED_DEFAULT_MODEL=DIR)",
)


def test_files_match_their_checksums():
    manifest = load_manifest(MODEL_DIR, verify=True)  # raises on any missing or altered file
    listed = {f for e in manifest.exits for f in (e.path, e.stage)}
    assert listed <= set(manifest.files)
    size = sum((MODEL_DIR / f).stat().st_size for f in manifest.files)
    assert size <= 50e6, f"the shipped model is {size / 1e6:.1f} MB; keep it under 50 MB"


def _test_images(n: int):
    """A systematic sample spanning the whole test split: every (10000 / n)-th image.

    Not the first n: the split is not shuffled and its first 1,000 images are markedly
    easier than the rest, so they would not estimate the manifest's full-split accuracy.
    """
    from training.data import read_idx

    files = {k: next(iter(sorted(FMNIST_DIR.glob(f"{stem}*"))), None)
             for k, stem in (("images", "t10k-images-idx3-ubyte"), ("labels", "t10k-labels-idx1-ubyte"))}  # fmt: skip
    if not all(files.values()):
        pytest.skip(f"Fashion-MNIST test files not found in {FMNIST_DIR} (apt-get install dataset-fashion-mnist)")
    images, labels = read_idx(files["images"]), read_idx(files["labels"]).astype(np.int64)
    stride = len(labels) // n
    return images[: stride * n : stride], labels[: stride * n : stride]


def test_accuracy_on_1000_test_images_matches_manifest():
    import onnxruntime as ort

    manifest = load_manifest(MODEL_DIR, verify=False)
    if manifest.dataset != "fashion-mnist":
        pytest.skip(f"the shipped model is trained on {manifest.dataset}, not Fashion-MNIST")
    if manifest.evaluation.get("split") != "test":
        pytest.skip("the manifest's accuracy is not from the test split")
    images, labels = _test_images(IMAGES)
    spec = manifest.input
    x = images.astype(np.float32)[:, None] / 255.0  # the same preprocessing the manifest describes
    x = ((x - np.array(spec.mean, np.float32)[:, None, None]) / np.array(spec.std, np.float32)[:, None, None])
    x = x.astype(np.float32)
    io = manifest.io
    spot = manifest.evaluation.get("spot_check") or {}
    for e in manifest.exits:
        session = ort.InferenceSession(str(MODEL_DIR / e.path), providers=["CPUExecutionProvider"])
        logits = np.concatenate([session.run([io.logits_output], {io.image_input: x[i : i + 250]})[0]
                                 for i in range(0, len(x), 250)])  # fmt: skip
        accuracy = float((logits.argmax(1) == labels).mean())
        assert e.accuracy is not None, f"exit {e.exit} has no accuracy in the manifest"
        if spot.get("images") == IMAGES:  # the exporter measured these very images: agree to 2 images
            assert abs(accuracy - spot["accuracy"][e.exit - 1]) <= 2 / IMAGES, (
                f"exit {e.exit}: {100 * accuracy:.2f}% on {IMAGES} sampled test images, but "
                f"{100 * spot['accuracy'][e.exit - 1]:.2f}% when exported: preprocessing or graphs changed"
            )
        assert abs(accuracy - e.accuracy) * 100 <= TOLERANCE_POINTS, (
            f"exit {e.exit}: {100 * accuracy:.2f}% on {IMAGES} test images, manifest says {100 * e.accuracy:.2f}%"
        )
