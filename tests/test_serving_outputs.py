"""serving.outputs: probabilities and ranked classes of an answer."""

from __future__ import annotations

import math

import numpy as np

from serving.outputs import softmax, top_k


def test_softmax_is_stable_and_normalised():
    p = softmax(np.array([1000.0, 1000.0, -1000.0], dtype=np.float32))
    assert np.allclose(p, [0.5, 0.5, 0.0]) and math.isclose(p.sum(), 1.0)


def test_top_k_orders_by_probability_with_deterministic_ties():
    probs = np.array([0.1, 0.4, 0.1, 0.4])
    assert top_k(probs, 3) == [(1, 0.4), (3, 0.4), (0, 0.1)]
    assert len(top_k(probs, 99)) == 4  # capped at the number of classes
    # The top class alone (the common request) comes from a shortcut: the same tie rule, plain types.
    assert top_k(probs, 1) == [(1, 0.4)] == top_k(probs, 2)[:1]
    assert all(type(i) is int and type(p) is float for i, p in top_k(probs, 1) + top_k(probs, 3))
    assert top_k(probs, 0) == [(1, 0.4)]  # at least one
