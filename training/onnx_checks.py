"""Checking exported graphs with ONNX Runtime: parity with PyTorch, and accuracy.

Nothing the exporter writes is trusted: ONNX Runtime is compared with PyTorch on fresh
inputs (batch sizes 1 and 7, and real images when the data set is there), full paths and
chained stage graphs alike, and the manifest's accuracies and calibrated thresholds are
measured on the exported stage graphs themselves — run with the server's own session
factory and stage chain (``serving.sessions``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from serving.manifest import GraphIO
from serving.sessions import open_session, run_chain
from training.evaluate import EvaluationError, analyze
from training.models.multi_exit import MultiExitNetwork
from training.onnx_graphs import ExportError

# A graph passes when max |ORT - PyTorch| <= atol + rtol * max |PyTorch logit| over the batch. The
# relative part matters for deep models or large logits: float32 alone differs from float64 by
# ~5e-7 of the logits' scale on a PyramidNet-110 (logits ~230: 1.1e-4, which an absolute 1e-4
# refused while ORT was closer to float64 than PyTorch was). 1e-5 is twenty times that, and far
# below the 1e-3-of-scale drift a wrong graph shows.
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-5
PARITY_BATCHES = (1, 7)
SPOT_CHECK = 1000


def ort_session(path: Path):
    """A CPU session, built as the server builds its own (parity is checked where the export runs)."""
    return open_session(path)


class OnnxChain:
    """The stage graphs of a model folder run in turn: all exits' logits with the trunk run once."""

    def __init__(self, folder: Path, stage_files: Sequence[str], io_names: GraphIO):
        self.sessions = [ort_session(folder / f) for f in stage_files]
        self.io = io_names

    def __call__(self, images: np.ndarray, upto: int | None = None) -> list[np.ndarray]:
        """Logits of exits 1..upto (default all) for a float32 (N, C, H, W) batch."""
        stages = [
            (
                lambda x, s=session, name=self.io.image_input if i == 0 else self.io.features_input: s.run(
                    None, {name: x}
                )
            )
            for i, session in enumerate(self.sessions[:upto])
        ]
        return [logits for _, logits in run_chain(stages, images)]

    def split_logits(self, loader) -> tuple[np.ndarray, np.ndarray]:
        """(logits (N, k, C), labels (N,)) over a loader of normalized image batches."""
        all_logits, all_labels = [], []
        for images, labels in loader:
            all_logits.append(np.stack(self(images.numpy().astype(np.float32)), 1))
            all_labels.append(labels.numpy())
        return np.concatenate(all_logits), np.concatenate(all_labels)


def check_parity(
    model: MultiExitNetwork,
    folder: Path,
    files: Sequence[tuple[str, str]],
    input_shape,
    io_names: GraphIO,
    atol: float = DEFAULT_ATOL,
    extra_inputs: Sequence[np.ndarray] = (),
    rtol: float = DEFAULT_RTOL,
) -> dict:
    """ONNX Runtime against PyTorch on inputs the tracer never saw; raises ExportError on any gap
    above ``atol + rtol * max |logit|`` (the batch's largest PyTorch logit of that exit).

    For every exit: the full-path graph, and the chain of stage graphs 1..i, against
    ``model.forward_exit``; returns the largest differences seen.
    """
    model.eval()
    rng = np.random.default_rng(20240917)  # not the tracing input (torch seed 0)
    batches = [rng.standard_normal((b, *input_shape)).astype(np.float32) for b in PARITY_BATCHES]
    batches += [np.asarray(x, dtype=np.float32) for x in extra_inputs]
    exits = [ort_session(folder / e) for e, _ in files]
    chain = OnnxChain(folder, [s for _, s in files], io_names)
    worst = {"full_path": 0.0, "stage_chain": 0.0}
    for x in batches:
        with torch.no_grad():
            reference = [model.forward_exit(torch.from_numpy(x), i).numpy() for i in range(1, model.num_exits + 1)]
        chained = chain(x)
        for i, ref in enumerate(reference, start=1):
            full = exits[i - 1].run(None, {io_names.image_input: x})[0]
            scale = float(np.abs(ref).max())
            allowed = atol + rtol * scale
            for kind, got, name in (
                ("full_path", full, files[i - 1][0]),
                ("stage_chain", chained[i - 1], f"stage1..{i}.onnx"),
            ):
                if got.shape != ref.shape:
                    raise ExportError(
                        f"{name}: ONNX Runtime returned shape {got.shape} for a batch of {len(x)}, PyTorch {ref.shape}"
                    )
                diff = float(np.abs(got - ref).max())
                worst[kind] = max(worst[kind], diff)
                if not diff <= allowed:  # also catches NaN
                    raise ExportError(
                        f"exit {i} ({kind.replace('_', ' ')}, {name}): ONNX Runtime differs from PyTorch by "
                        f"{diff:.3g} > {allowed:.3g} (atol {atol:g} + rtol {rtol:g} x max |logit| "
                        f"{scale:.3g}) on a batch of {len(x)}; the exported graph cannot be trusted"
                    )
    return {**worst, "atol": atol, "rtol": rtol, "batch_sizes": sorted({len(x) for x in batches})}


def evaluate_onnx(folder: Path, files, io_names: GraphIO, bundle, split: str, costs, **targets) -> dict:
    """Accuracy and calibrated thresholds measured on the exported graphs themselves."""
    from training.data import make_loader

    data = bundle.test if split == "test" else bundle.val
    if data is None:
        raise EvaluationError(f"the run has no {split} split; use --split test")
    chain = OnnxChain(folder, [s for _, s in files], io_names)
    logits, labels = chain.split_logits(make_loader(data, bundle.spec, 256, train=False))
    val = None
    if bundle.val is not None:
        val_loader = make_loader(bundle.val, bundle.spec, 256, train=False)
        val = (logits, labels) if split == "val" else chain.split_logits(val_loader)
    results = analyze(logits, labels, costs, split, val, **targets)
    # Per-exit accuracy on a systematic sample of SPOT_CHECK images (every len/SPOT_CHECK-th
    # image), so a check that can afford only those images compares exactly, not within
    # sampling noise. A spread sample, not the first images: test sets are not shuffled
    # (Fashion-MNIST's first 1,000 test images are 2.5 points easier than the rest).
    n = min(SPOT_CHECK, len(labels))
    stride = len(labels) // n
    idx = np.arange(0, stride * n, stride)
    results["spot_check"] = {
        "images": n,
        "stride": stride,
        "selection": f"every {stride}th image of the {split} split, from the first",
        "accuracy": (logits[idx].argmax(-1) == labels[idx, None]).mean(0).tolist(),
    }
    return results
