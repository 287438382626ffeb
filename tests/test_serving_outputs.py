"""serving.outputs and the /classify answer: probabilities, ranked classes and the answer's bytes."""

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
        # Computed here another way than either of ranked()'s branches: exact sums, a sort by key.
        values = [float(v) for v in logits]
        exps = [math.exp(v - max(values)) for v in values]
        total = math.fsum(exps)
        probs = [e / total for e in exps]
        expected = sorted(range(classes), key=lambda i: (-probs[i], i))[:10]
        got = ranked(logits, 10)
        assert [i for i, _ in got] == expected
        assert np.allclose([p for _, p in got], [probs[i] for i in expected], rtol=1e-12, atol=0)
        assert np.allclose(softmax(logits), probs, rtol=1e-12, atol=1e-300)
        assert got[0][0] == 7 and got[1][0] == classes - 1
        assert ranked(logits, 1) == got[:1]


def _expected(request_id, outcome, ranked_classes, classes, policy, elapsed_s):
    """The body as a dict, in ClassifyResponse's key order: what the answer's bytes must encode."""
    label, probability = ranked_classes[0]
    body = {
        "id": request_id,
        "exit": outcome.exit,
        "label": label,
        "class_name": classes[label],
        "probability": probability,
        "top_k": [{"label": i, "class_name": classes[i], "probability": p} for i, p in ranked_classes],
        "gflops": outcome.gflops,
        "exits_evaluated": outcome.exits_evaluated,
        "policy": policy,
        "latency_ms": round(elapsed_s * 1e3, 3),
        "inference_ms": round(outcome.seconds * 1e3, 3),
    }
    if outcome.deadline_met is not None:
        body["deadline_met"] = outcome.deadline_met
    return body


@pytest.mark.parametrize("deadline_met", [None, True, False])
def test_the_answer_bytes_are_what_the_json_encoder_gives_for_the_body(deadline_met):
    from serving.routes import JSON_ENCODER, ClassifyResponse, answer_json
    from serving.service import Outcome

    classes = ['a "quoted" name', "back\\slash", "été — ünïcode", "tab\there", "ctrl\x01", "plain"]
    logits = np.array([0.3, 2.0, -1.0, 2.0, 0.0, 1e-3], dtype=np.float32)
    outcome = Outcome(
        exit=3,
        logits=logits,
        exits_evaluated=[1, 2, 3],
        gflops=np.float64(0.123456789),  # the cost table may hand back numpy floats
        seconds=0.0061234,
        deadline_met=deadline_met,
    )
    ranked_classes = ranked(logits, 4)
    request_id = "v1.eyJtIjoibSJ9.AbC-_d"
    policy = 'budget_"0.75x"'
    got = answer_json(request_id, outcome, ranked_classes, classes, policy, 0.0071239)
    expected = _expected(request_id, outcome, ranked_classes, classes, policy, 0.0071239)
    assert got == JSON_ENCODER.encode(expected).encode("utf-8")
    ClassifyResponse.model_validate_json(got)  # and the documented schema reads it


def test_an_answer_with_a_non_finite_number_is_refused_as_the_json_encoder_refuses_it():
    from serving.routes import answer_json
    from serving.service import Outcome

    outcome = Outcome(exit=1, logits=np.zeros(2, np.float32), exits_evaluated=[1], gflops=0.1, seconds=0.001)
    with pytest.raises(ValueError, match="not JSON compliant"):
        answer_json("v1.x.y", outcome, [(0, float("nan")), (1, 0.5)], ["a", "b"], "exit", 0.002)
