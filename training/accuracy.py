"""Top-k accuracy on numpy logits: the one top-k of the project (training's per-epoch
evaluation and the offline analysis both count with it)."""

from __future__ import annotations

import numpy as np


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """How many rows of (N, C) logits have their label among the k highest."""
    k = min(k, logits.shape[-1])
    top = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
    return int((top == labels[:, None]).any(-1).sum())


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows of (N, C) logits whose label is among the k highest."""
    return topk_correct(logits, labels, k) / len(labels) if len(labels) else 0.0
