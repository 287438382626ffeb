"""serving.outputs: probabilities and ranked classes of an answer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from serving.outputs import ranked, softmax


def test_softmax_is_stable_and_normalised():
    p = softmax(np.array([1000.0, 1000.0, -1000.0], dtype=np.float32))
    assert np.allclose(p, [0.5, 0.5, 0.0]) and math.isclose(p.sum(), 1.0)


def test_ranked_orders_by_probability_with_deterministic_ties():
    logits = np.log(np.array([0.1, 0.4, 0.1, 0.4], dtype=np.float32))
    top3 = ranked(logits, 3)
    assert [i for i, _ in top3] == [1, 3, 0]
    assert np.allclose([p for _, p in top3], [0.4, 0.4, 0.1])
    assert len(ranked(logits, 99)) == 4  # capped at the number of classes
    # The top class alone (the common request) comes from a shortcut: the same tie rule, plain types.
    assert ranked(logits, 1) == ranked(logits, 2)[:1] == [top3[0]]
    assert all(type(i) is int and type(p) is float for i, p in ranked(logits, 1) + top3)
    assert ranked(logits, 0) == ranked(logits, 1)  # at least one


@pytest.mark.parametrize("classes", [10, 100, 1000])  # plain Python up to 128 classes, numpy above
def test_ranked_gives_softmax_probabilities_in_the_order_of_a_stable_sort(classes):
    rng = np.random.default_rng(0)
    for scale in (0.1, 3.0, 40.0):  # near-uniform to saturated (probabilities that underflow to 0)
        logits = (rng.standard_normal(classes) * scale).astype(np.float32)
        logits[[7, classes - 1]] = logits.max() + 1  # a tie at the top
        probs = softmax(logits)
        expected = np.argsort(-probs, kind="stable")[:10]
        got = ranked(logits, 10)
        assert [i for i, _ in got] == expected.tolist()
        assert np.allclose([p for _, p in got], probs[expected], rtol=1e-12, atol=0)
        assert got[0][0] == 7 and got[1][0] == classes - 1
        assert ranked(logits, 1) == got[:1]
