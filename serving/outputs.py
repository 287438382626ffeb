"""From a graph's logits to an answer's numbers: class probabilities and the ranked classes.

Shared by the HTTP answers (``serving.routes``: :func:`ranked`; ``serving.oip``: :func:`softmax`
through ``Outcome.probs``). The cascade's stopping score is ``serving.cascade.top_probability``,
which equals ``softmax(z).max()`` without forming it.
"""

from __future__ import annotations

import math

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, in float64."""
    # In place on one float64 copy: the same operations and values, two temporaries fewer.
    z = np.array(logits, dtype=np.float64)
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


# Up to this many classes an answer is ranked in plain Python (below); above it numpy's routines
# win even when they start cold: hot, 100 classes 17.6 µs in Python against 9.0 µs with numpy,
# 1,000 classes 163 µs against 22 µs.
PLAIN_PYTHON_MAX_CLASSES = 128


def ranked(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most probable classes of one sample's logits as (index, softmax probability), most
    probable first; ties keep the lower class index first, so answers are deterministic.

    The ranking of a stable sort of :func:`softmax`'s probabilities, and those probabilities to within a
    few ulp. For heads of up to :data:`PLAIN_PYTHON_MAX_CLASSES` classes in plain Python: an answer is
    ranked on the event loop right after an ORT run, which leaves the caches flushed, and there every
    distinct numpy routine starts cold while the interpreter's own code is shared with the rest of the
    request. After a batch-1 run of the full-width main exit (45 MB of weights), 100 classes took 70 µs
    this way against 128 µs for ``softmax`` and a stable ``argsort`` (docs/request-path-profile.md,
    tenth session).
    """
    n = logits.shape[-1]
    k = max(1, min(int(k), n))
    if n > PLAIN_PYTHON_MAX_CLASSES:
        probabilities = softmax(logits)
        if k == 1:  # argmax takes the first of equal maxima, as the stable sort does
            best = int(probabilities.argmax())
            return [(best, float(probabilities[best]))]
        top_k = np.argsort(-probabilities, kind="stable")[:k]
        return list(zip(top_k.tolist(), probabilities[top_k].tolist()))
    values = logits.tolist()
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    if k == 1:
        # The most probable class is the first of the largest logits (index() takes the first of
        # equal maxima, as the stable sort below does), and its exp is exp(0.0) = 1.0 exactly, so
        # its probability is 1 / total, the same float as below: no list of every probability
        # (hot, 100 classes: 14.8 -> 9.6 us of the event loop's work per top-1 answer). Only two
        # logits closer than 1e-16 (float32 ones below ~1e-9) could round to equal probabilities
        # and rank in index order below while this takes the larger.
        return [(values.index(top), 1.0 / total)]
    probs = [e / total for e in exps]
    # Python's sort is stable, and reverse=True keeps equal items in their original order.
    order = sorted(range(n), key=probs.__getitem__, reverse=True)[:k]
    return [(i, probs[i]) for i in order]
