"""The confidence cascade fused into one ONNX Runtime call (serving.fused) answers exactly as the
stage-by-stage path does: the same exit, label, probability, exits evaluated and GFLOPs."""

from __future__ import annotations

import asyncio
import sys

import httpx
import numpy as np
import pytest
from serving_model import (
    NUM_EXITS,
    ServerProcess,
    build_model_folder,
    cascade_exit,
    encode,
    expected_label,
    uniform_image,
)

from serving import cascade
from serving.errors import ModelLoadError
from serving.fused import attach_fused_cascade, cap_thresholds
from serving.runtime import ModelRuntime, SessionOptions

OPTIONS = SessionOptions(providers="cpu", intra_op_threads=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def fused_runtime(model_dir):
    runtime = ModelRuntime.load(model_dir, OPTIONS)
    reason = attach_fused_cascade(runtime, "fused", OPTIONS, max_batch_size=8)
    assert runtime.fused is not None and "one ONNX Runtime call" in reason
    return runtime


def _stage_chain(runtime, x):
    conf, logits, feats = [], [], x
    for stage in runtime.stages:
        outputs = stage.run(feats)
        conf.append(cascade.top_probability(outputs[0]))
        logits.append(outputs[0])
        feats = outputs[-1]
    return np.stack(conf, 1), logits


def test_each_sample_stops_by_its_own_thresholds_in_one_batch(fused_runtime):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 1, 28, 28)).astype(np.float32) * 2
    conf, logits = _stage_chain(fused_runtime, x)
    rows = np.stack(
        [
            [0.0, 0.0],
            [cascade.NEVER] * 2,
            [0.5, 0.5],
            list(np.median(conf[:, :2], 0)),
            cap_thresholds([cascade.NEVER] * 2, 2),
            cap_thresholds([cascade.NEVER] * 2, 1),
        ]
        * 4
    )
    got_logits, got_exit = fused_runtime.fused.run((x, rows))
    want_exit = np.array([cascade.exits_taken(conf[j : j + 1], rows[j])[0] for j in range(len(x))])
    assert np.array_equal(got_exit, want_exit)
    assert set(want_exit) == {1, 2, 3}  # the batch really mixes exits
    want_logits = np.stack([logits[e - 1][j] for j, e in enumerate(want_exit)])
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-5)


def test_a_batch_where_no_sample_goes_on_and_one_where_all_do(fused_runtime):
    x = fused_runtime.example_input(5, seed=1)
    _, exits = fused_runtime.fused.run((x, np.zeros((5, NUM_EXITS - 1))))
    assert exits.tolist() == [1] * 5
    _, exits = fused_runtime.fused.run((x, fused_runtime.fused.full_depth(5)))
    assert exits.tolist() == [NUM_EXITS] * 5


def test_the_fused_graph_is_timed_with_the_others(fused_runtime):
    assert fused_runtime.graphs[-1] is fused_runtime.fused
    timings = fused_runtime.calibrate(runs=2, batch_sizes=(1, 4))
    assert [b for b, _ in timings["cascade"]] == [1, 1, 4, 4]


def test_stages_mode_keeps_the_stage_path(model_dir):
    runtime = ModelRuntime.load(model_dir, OPTIONS)
    assert "configured" in attach_fused_cascade(runtime, "stages", OPTIONS)
    assert runtime.fused is None and [g.kind for g in runtime.graphs].count("cascade") == 0


def test_cap_thresholds_stops_every_sample_at_the_deepest_exit_allowed():
    assert cap_thresholds([0.9, 0.8, 0.7], 2).tolist() == [cascade.reach(0.9), 0.0, 0.0]
    assert cap_thresholds([0.9, 0.8, 0.7], 4).tolist() == cascade.reach([0.9, 0.8, 0.7]).tolist()


def test_a_score_sent_back_as_its_threshold_stops_on_both_paths(fused_runtime):
    # A client that sends back the probability an answer reported, and a calibrated threshold
    # that is a validation image's own score: ONNX Runtime's Exp/ReduceSum and numpy differ in
    # the last bits, so without the tie slack the fused graph let some of these run on.
    x = np.random.default_rng(3).standard_normal((256, 1, 28, 28)).astype(np.float32) * 2
    conf, _ = _stage_chain(fused_runtime, x)
    rows = np.stack([cap_thresholds([conf[j, 0], cascade.NEVER], NUM_EXITS) for j in range(len(x))])
    _, got_exit = fused_runtime.fused.run((x, rows))
    assert got_exit.tolist() == [1] * len(x)
    assert all(cascade.stops_at(float(conf[j, 0]), np.array([conf[j, 0], cascade.NEVER]), 1) for j in range(len(x)))


def test_a_non_finite_score_never_runs_past_the_plans_deepest_exit(fused_runtime):
    # Finite FP32 input that overflows inside the network (OIP takes such tensors): the score is
    # NaN, which no threshold comparison reaches; a budget-capped row must still stop at its cap.
    x = np.full((4, 1, 28, 28), 3e38, dtype=np.float32)
    conf, _ = _stage_chain(fused_runtime, x)
    assert np.isnan(conf).all()
    _, got_exit = fused_runtime.fused.run((x, np.stack([cap_thresholds([0.5, 0.5], 1)] * 4)))
    assert got_exit.tolist() == [1] * 4
    assert cascade.stops_at(float("nan"), np.array([0.5, 0.5]), 1)


def test_without_onnx_auto_falls_back_and_fused_is_an_error(model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    runtime = ModelRuntime.load(model_dir, OPTIONS)
    assert "not installed" in attach_fused_cascade(runtime, "auto", OPTIONS) and runtime.fused is None
    with pytest.raises(ModelLoadError, match="needs the onnx package"):
        attach_fused_cascade(runtime, "fused", OPTIONS)


def test_a_fused_graph_that_cannot_be_built_or_run_leaves_auto_on_the_stages(model_dir, monkeypatch):
    """Only loading the session fell back: a failure building, checking or warming the graph stopped
    the server in auto mode, whose promise is the stage path when the fused graph cannot serve."""
    import serving.fused as fused

    runtime = ModelRuntime.load(model_dir, OPTIONS)

    def unbuildable(*args, **kwargs):
        raise AssertionError("a stage graph of an unexpected shape")

    monkeypatch.setattr(fused, "build_fused_cascade", unbuildable)
    reason = attach_fused_cascade(runtime, "auto", OPTIONS)
    assert "stage by stage (the fused cascade cannot be used: a stage graph of an unexpected shape" in reason
    assert runtime.fused is None
    with pytest.raises(ModelLoadError, match="the fused cascade cannot be used"):
        attach_fused_cascade(runtime, "fused", OPTIONS)


# --- through the server: fused and stage-by-stage servers side by side ------------------------


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("srv")
    common = ("--intra-op-threads", "1", "--max-wait-ms", "20", "--max-batch-size", "8")
    # onnx must be importable to build the fused graph, so these servers do not block it.
    with (
        ServerProcess(model_dir, "--cascade-graph", "fused", *common, tmp_dir=tmp, block_torch=False) as fused,
        ServerProcess(model_dir, "--cascade-graph", "stages", *common, tmp_dir=tmp, block_torch=False) as staged,
    ):
        yield fused, staged


def _metric(url: str, name: str, graph: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and f'graph="{graph}"' in line
    )


def _comparable(answer: dict) -> tuple:
    return (
        answer["exit"],
        answer["label"],
        round(answer["probability"], 6),
        answer["exits_evaluated"],
        round(answer["gflops"], 12),
        answer["policy"],
    )


def test_fused_server_answers_as_the_stage_path(servers, model_dir):
    fused, staged = servers
    info = httpx.get(fused.url + "/v1/model").json()
    cascade2 = info["manifest"]["exits"][1]["cascade_gflops"]
    queries = [
        {"confidence": "0.9"},
        {"confidence": "1,0.9"},
        {"confidence": "0.9", "budget_gflops": cascade2},
        {"confidence": "0.3"},
    ]
    before = _metric(fused.url, "eed_batch_size_count", "cascade")
    for c in range(10):
        body = encode(uniform_image(c), "PNG")
        for q in queries:
            answers = [
                httpx.post(
                    s.url + "/classify", content=body, params=q, headers={"Content-Type": "image/png"}, timeout=30
                )
                for s in servers
            ]
            assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
            got, want = (a.json() for a in answers)
            assert _comparable(got) == _comparable(want), (c, q)
        assert httpx.post(
            fused.url + "/classify", content=body, params={"confidence": "0.9"}, headers={"Content-Type": "image/png"}
        ).json()["label"] == expected_label(c, cascade_exit(c, 0.9))
    assert _metric(fused.url, "eed_batch_size_count", "cascade") - before == 10 * len(queries) + 10
    assert _metric(staged.url, "eed_batch_size_count", "cascade") == 0


def test_concurrent_mixed_policies_batch_together_and_stay_exact(servers):
    fused, _ = servers
    jobs = [(c, q) for c in range(10) for q in ({"confidence": "0.9"}, {"confidence": "1,1"}, {"confidence": "0"})]

    async def main():
        async with httpx.AsyncClient(base_url=fused.url, timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/classify",
                        content=encode(uniform_image(c), "PNG"),
                        params=q,
                        headers={"Content-Type": "image/png"},
                    )
                    for c, q in jobs
                )
            )

    before_batches = _metric(fused.url, "eed_batch_size_count", "cascade")
    before_items = _metric(fused.url, "eed_batch_size_sum", "cascade")
    answers = asyncio.run(main())
    for (c, q), r in zip(jobs, answers):
        assert r.status_code == 200, r.text
        threshold = float(q["confidence"].split(",")[0])
        want = 1 if threshold == 0 else NUM_EXITS if threshold == 1 else cascade_exit(c, 0.9)
        assert (r.json()["exit"], r.json()["label"]) == (want, expected_label(c, want)), (c, q)
        assert r.json()["exits_evaluated"] == list(range(1, want + 1))
    batches = _metric(fused.url, "eed_batch_size_count", "cascade") - before_batches
    assert _metric(fused.url, "eed_batch_size_sum", "cascade") - before_items == len(jobs)
    assert batches < len(jobs)  # several requests, with different thresholds, shared a run


def test_a_deadline_alone_and_far_runs_the_fused_graph(servers):
    # Alone on the server, with the whole stage chain predicted well inside its deadline, a
    # confidence cascade with a deadline is one ORT call, as without one; the same answer.
    fused, _ = servers
    before = {g: _metric(fused.url, "eed_batch_size_count", g) for g in ("stage", "cascade")}
    r = httpx.post(
        fused.url + "/classify",
        content=encode(uniform_image(2), "PNG"),
        params={"budget_ms": 10_000, "confidence": "0.9"},
        headers={"Content-Type": "image/png"},
    )
    assert r.status_code == 200 and r.json()["deadline_met"] is True and r.json()["exit"] == cascade_exit(2, 0.9)
    assert r.json()["exits_evaluated"] == list(range(1, cascade_exit(2, 0.9) + 1))
    assert _metric(fused.url, "eed_batch_size_count", "cascade") - before["cascade"] == 1
    assert _metric(fused.url, "eed_batch_size_count", "stage") - before["stage"] == 0
