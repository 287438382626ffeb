"""From a graph's logits to an answer's numbers: class probabilities and the ranked classes.

Shared by the stage-by-stage path (``serving.service``), the fused cascade (``serving.fused``)
and the HTTP answer (``serving.routes``). The cascade's stopping score is
``serving.cascade.top_probability``, which equals ``softmax(z).max()`` without forming it.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, in float64."""
    # In place on one float64 copy: the same operations and values, two temporaries fewer
    # (one answer's softmax runs on the event loop, cold after each ORT run).
    z = np.array(logits, dtype=np.float64)
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def top_k(probs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most probable classes as (index, probability), most probable first.

    Ties keep the lower class index first, so answers are deterministic.
    """
    k = max(1, min(int(k), probs.shape[-1]))
    if k == 1:  # argmax takes the first of equal maxima, as the stable sort below does
        best = int(probs.argmax())
        return [(best, float(probs[best]))]
    order = np.argsort(-probs, kind="stable")[:k]
    return list(zip(order.tolist(), probs[order].tolist()))
