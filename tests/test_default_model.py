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
from PIL import Image

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

    files = {
        k: next(iter(sorted(FMNIST_DIR.glob(f"{stem}*"))), None)
        for k, stem in (("images", "t10k-images-idx3-ubyte"), ("labels", "t10k-labels-idx1-ubyte"))
    }
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
    if manifest.evaluation.split != "test":
        pytest.skip("the manifest's accuracy is not from the test split")
    images, labels = _test_images(IMAGES)
    spec = manifest.input
    x = images.astype(np.float32)[:, None] / 255.0  # the same preprocessing the manifest describes
    x = (x - np.array(spec.mean, np.float32)[:, None, None]) / np.array(spec.std, np.float32)[:, None, None]
    x = x.astype(np.float32)
    io = manifest.io
    spot = manifest.evaluation.spot_check
    for e in manifest.exits:
        session = ort.InferenceSession(str(MODEL_DIR / e.path), providers=["CPUExecutionProvider"])
        logits = np.concatenate(
            [session.run([io.logits_output], {io.image_input: x[i : i + 250]})[0] for i in range(0, len(x), 250)]
        )
        accuracy = float((logits.argmax(1) == labels).mean())
        assert e.accuracy is not None, f"exit {e.exit} has no accuracy in the manifest"
        if spot is not None and spot.images == IMAGES:  # the exporter measured these very images: agree to 2 images
            assert abs(accuracy - spot.accuracy[e.exit - 1]) <= 2 / IMAGES, (
                f"exit {e.exit}: {100 * accuracy:.2f}% on {IMAGES} sampled test images, but "
                f"{100 * spot.accuracy[e.exit - 1]:.2f}% when exported: preprocessing or graphs changed"
            )
        assert abs(accuracy - e.accuracy) * 100 <= TOLERANCE_POINTS, (
            f"exit {e.exit}: {100 * accuracy:.2f}% on {IMAGES} test images, manifest says {100 * e.accuracy:.2f}%"
        )


def test_server_reproduces_every_calibrated_policy(tmp_path):
    """``policy=NAME`` on the real server, over real test images sent as PNG, answers as the
    manifest's calibration says: per image exactly as the shared cascade rule on the same
    graphs' logits, and in aggregate (exit shares, mean GFLOPs, accuracy) as recorded."""
    import asyncio

    import httpx
    import onnxruntime as ort
    from serving_model import ServerProcess, encode

    from serving import cascade
    from serving.policy import calibrated_policies

    manifest = load_manifest(MODEL_DIR, verify=False)
    policies = calibrated_policies(manifest.thresholds, manifest.num_exits)
    if manifest.dataset != "fashion-mnist" or not policies:
        pytest.skip("the shipped model is not a Fashion-MNIST model with calibrated policies")
    n = 400
    images, labels = _test_images(n)
    spec, io = manifest.input, manifest.io
    x = images.astype(np.float32)[:, None] / 255.0
    x = (x - np.array(spec.mean, np.float32)[:, None, None]) / np.array(spec.std, np.float32)[:, None, None]
    logits = []
    for e in manifest.exits:
        session = ort.InferenceSession(str(MODEL_DIR / e.path), providers=["CPUExecutionProvider"])
        logits.append(session.run([io.logits_output], {io.image_input: x.astype(np.float32)})[0])
    conf = np.stack([cascade.top_probability(z) for z in logits], 1)
    pred = np.stack([z.argmax(1) for z in logits], 1)
    pngs = [encode(Image.fromarray(img), "PNG") for img in images]

    async def ask(url, policy):
        async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
            sem = asyncio.Semaphore(8)

            async def one(data):
                async with sem:
                    r = await ac.post(
                        "/classify", content=data, headers={"Content-Type": "image/png"}, params={"policy": policy}
                    )
                    assert r.status_code == 200, r.text
                    return r.json()

            return await asyncio.gather(*(one(d) for d in pngs))

    with ServerProcess(MODEL_DIR, tmp_dir=tmp_path) as srv:
        for name, thresholds in policies.items():
            answers = asyncio.run(ask(srv.url, name))
            served_exit = np.array([a["exit"] for a in answers])
            served_label = np.array([a["label"] for a in answers])
            offline = cascade.simulate(conf, pred, thresholds, [e.stage_gflops for e in manifest.exits])
            # Per image: the same rule on the same graphs (a batch may shift a logit in the last bits).
            assert (served_exit != offline.exit).sum() <= 2, name
            assert (served_label != offline.prediction).sum() <= 2, name
            assert np.mean([a["gflops"] for a in answers]) == pytest.approx(offline.mean_gflops(), rel=0.01)
            # In aggregate: what the manifest recorded on the whole test split, within sampling error.
            recorded = manifest.thresholds.policies[name].test
            fractions = np.bincount(served_exit, minlength=manifest.num_exits + 1)[1:] / n
            for got, want in zip(fractions, recorded.exit_fractions):
                assert abs(got - want) <= 4 * np.sqrt(want * (1 - want) / n) + 0.01, (name, fractions.tolist())
            accuracy = float((served_label == labels).mean())
            assert abs(accuracy - recorded.accuracy) <= 4 * np.sqrt(0.1 / n) + 0.01, (name, accuracy)
            assert np.mean([a["gflops"] for a in answers]) == pytest.approx(recorded.mean_gflops, rel=0.1)


def test_shipped_samples_are_the_test_images_their_names_say():
    """``samples/INDEX-LABEL-CLASS.png``: through the server's own decoding and preprocessing,
    each is test image INDEX exactly, whose label is LABEL, named CLASS in the manifest."""
    from serving.images import Preprocessor
    from training.data import read_idx

    manifest = load_manifest(MODEL_DIR, verify=False)
    samples = sorted((MODEL_DIR / "samples").glob("*.png"))
    if manifest.dataset != "fashion-mnist" or not samples:
        pytest.skip("no Fashion-MNIST samples shipped with the default model")
    files = {
        k: next(iter(sorted(FMNIST_DIR.glob(f"{stem}*"))), None)
        for k, stem in (("images", "t10k-images-idx3-ubyte"), ("labels", "t10k-labels-idx1-ubyte"))
    }
    if not all(files.values()):
        pytest.skip(f"Fashion-MNIST test files not found in {FMNIST_DIR} (apt-get install dataset-fashion-mnist)")
    images, labels = read_idx(files["images"]), read_idx(files["labels"])
    preprocess = Preprocessor.from_spec(manifest.input, 4096 * 4096)
    spec = manifest.input
    for path in samples:
        index, label, slug = path.stem.split("-", 2)
        index, label = int(index), int(label)
        assert labels[index] == label, path.name
        expected_slug = "".join(c if c.isalnum() else "-" for c in manifest.classes[label].lower()).strip("-")
        assert slug == expected_slug, path.name
        x = preprocess(path.read_bytes(), "image/png")
        expected = (images[index].astype(np.float32) / 255.0 - spec.mean[0]) / spec.std[0]
        assert x.shape == (1, 28, 28) and np.allclose(x[0], expected, atol=1e-5), path.name


def test_the_cascade_tie_slack_covers_how_far_the_fused_graph_and_the_stages_differ():
    # The fused cascade graph computes the stages' function with other float32 kernels: a probability
    # an answer reported (from one graph), sent back as a threshold, must stop on every path
    # (serving.cascade.TIE_RTOL). Keep the measured spread a tenth of the slack.
    from serving import cascade
    from serving.fused import attach_fused_cascade, cap_thresholds
    from serving.runtime import ModelRuntime, SessionOptions

    images, _ = _test_images(200)
    manifest = load_manifest(MODEL_DIR, verify=False)
    spec = manifest.input
    x = images.astype(np.float32)[:, None] / 255.0
    x = ((x - np.array(spec.mean, np.float32)[:, None, None]) / np.array(spec.std, np.float32)[:, None, None]).astype(
        np.float32
    )
    options = SessionOptions(providers="cpu")
    runtime = ModelRuntime.load(MODEL_DIR, options)
    attach_fused_cascade(runtime, "fused", options, max_batch_size=32)
    k = manifest.num_exits
    spread = 0.0
    for batch in (1, 32):
        for start in range(0, 64, batch):
            xb = x[start : start + batch]
            features = xb
            for number, stage in enumerate(runtime.stages[: k - 1], start=1):
                outputs = stage.run(features)
                features = outputs[-1]
                rows = np.stack([cap_thresholds([cascade.NEVER] * (k - 1), number)] * len(xb))
                fused_logits, _ = runtime.fused.run((xb, rows))
                want = cascade.top_probability(outputs[0])
                spread = max(spread, float(np.max(np.abs(cascade.top_probability(fused_logits) - want) / want)))
    assert spread < cascade.TIE_RTOL / 10, spread


def test_the_recorded_figures_reproduce_exactly_under_the_servers_rule(tmp_path):
    """Every figure the manifest records — per-exit accuracy, each policy's thresholds and its
    validation and test figures, the cascade curve — re-measured on the shipped graphs with the
    rule the server applies: exactly equal. (The shipped model was first calibrated under the
    1e-12 tie slack; one test image of 10,000 then counted an exit later than the server answers.)"""
    import shutil

    from serving import cascade
    from training.calibrate import recalibrate

    if not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no Fashion-MNIST files under {FMNIST_DIR} (apt-get install dataset-fashion-mnist)")
    shipped = load_manifest(MODEL_DIR, verify=False)
    if shipped.dataset != "fashion-mnist" or shipped.thresholds is None:
        pytest.skip("the shipped model is not a Fashion-MNIST model with calibrated policies")
    assert shipped.thresholds.rule == cascade.RULE, "calibrated under another rule: python -m training.calibrate"
    copy = shutil.copytree(MODEL_DIR, tmp_path / "model")
    redone = recalibrate(copy, data_dir=str(FMNIST_DIR), download=False)
    assert redone.thresholds == shipped.thresholds
    assert redone.evaluation == shipped.evaluation
    assert [e.accuracy for e in redone.exits] == [e.accuracy for e in shipped.exits]
