"""The HTTP API end to end: a real server (``python -m serving``, torch blocked) on 127.0.0.1,
real PNG/JPEG-encoded images, answers checked against what the fixture model implies."""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import time

import httpx
import pytest
from PIL import Image
from serving_model import (
    NUM_EXITS,
    ServerProcess,
    build_model_folder,
    cascade_exit,
    confident,
    encode,
    expected_label,
    top_probability,
    uniform_image,
)

DESIGN_KEYS = {
    "id",
    "exit",
    "label",
    "class_name",
    "probability",
    "top_k",
    "gflops",
    "exits_evaluated",
    "policy",
    "latency_ms",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    # A generous max wait so that concurrent test requests are visibly batched; cascades stage
    # by stage (not left to `auto`'s timing), so per-stage batching is what these tests see
    # (tests/test_serving_fused.py covers the fused graph).
    with ServerProcess(
        model_dir,
        "--cascade-graph",
        "stages",
        "--max-wait-ms",
        "30",
        "--max-batch-size",
        "16",
        "--intra-op-threads",
        "1",
        "--feedback-capacity",
        "1000",
        tmp_dir=tmp_path_factory.mktemp("srv"),
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def manifest(client):
    return client.get("/v1/model").json()["manifest"]


def classify(client, image_bytes, content_type="image/png", **params):
    return client.post("/classify", content=image_bytes, headers={"Content-Type": content_type}, params=params)


def png(c: int) -> bytes:
    return encode(uniform_image(c), "PNG")


def metric_values(client, name: str) -> dict[str, float]:
    """{label-string: value} of one metric family from /metrics."""
    text = client.get("/metrics").text
    values = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            values[m.group(1) or ""] = float(m.group(2))
    return values


# --- liveness, readiness, documents -----------------------------------------------------


def test_health_ready_docs(client):
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["provider"] == "CPUExecutionProvider"
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/classify", "/feedback", "/v1/model", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    assert (
        "image/png" in spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    )  # exactness: test_serving_openapi


def test_model_endpoint_has_manifest_provider_and_live_estimates(client):
    info = client.get("/v1/model").json()
    assert info["provider"] == "CPUExecutionProvider"
    assert len(info["manifest"]["exits"]) == NUM_EXITS
    for entry in info["manifest"]["exits"]:
        assert entry["latency_estimate_ms"] > 0 and entry["cascade_latency_estimate_ms"] > 0
    assert max(info["stage_chain_max_abs_diff"].values()) < 1e-5
    # How cascades run, and why (this server is configured for the stage path).
    assert info["cascade_graph"] == {"setting": "stages", "runs": "stage by stage (configured)"}
    # What a request alone on the server runs on (this server sets its thread count).
    assert info["lone_requests"].startswith("the same sessions as batches (thread count configured")
    # Which of them run on the event loop when alone (short graphs: all of this tiny model's).
    graphs = [f"exit{e}" for e in range(1, NUM_EXITS + 1)] + [f"stage{e}" for e in range(1, NUM_EXITS + 1)]
    assert info["batching"]["lone_on_event_loop"] == graphs and info["batching"]["inline_max_ms"] == 10.0
    assert info["batching"]["padded_to"] is None  # CPU: batches run at their own size
    # CPU: a batch waits for the clients just answered (serving.batching.Settle).
    assert info["batching"]["settle_ms"] == 2.0


def test_unknown_route_is_json_404(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


# --- policies -----------------------------------------------------------------------------


def test_default_policy_answers_from_the_main_output_with_design_keys(client, manifest):
    r = classify(client, png(3))
    assert r.status_code == 200, r.text
    body = r.json()
    assert DESIGN_KEYS <= set(body)
    assert body["exit"] == NUM_EXITS and body["exits_evaluated"] == [NUM_EXITS]
    assert body["label"] == expected_label(3, NUM_EXITS) and body["class_name"] == manifest["classes"][body["label"]]
    assert math.isclose(body["probability"], top_probability(3, NUM_EXITS), rel_tol=1e-3)
    assert math.isclose(body["gflops"], manifest["exits"][-1]["gflops"])
    assert len(body["top_k"]) == 5 and body["top_k"][0]["label"] == body["label"]
    probs = [t["probability"] for t in body["top_k"]]
    assert probs == sorted(probs, reverse=True)
    assert r.headers["X-Request-ID"]  # the correlation id (tests/test_serving_requestlog.py); "id" is the signed one


@pytest.mark.parametrize("number", range(1, NUM_EXITS + 1))
def test_exit_parameter_answers_from_that_exit(client, manifest, number):
    body = classify(client, png(5), exit=number, top_k=2).json()
    assert (body["exit"], body["exits_evaluated"], body["policy"]) == (number, [number], "exit")
    assert body["label"] == expected_label(5, number) and len(body["top_k"]) == 2
    assert math.isclose(body["gflops"], manifest["exits"][number - 1]["gflops"])


def test_budget_gflops_picks_the_deepest_exit_the_manifest_allows(client, manifest):
    costs = [e["gflops"] for e in manifest["exits"]]
    for budget in [*costs, *(c * 1.01 for c in costs), *(c * 0.99 for c in costs[1:]), 1e6]:
        expected = max(i for i, c in enumerate(costs, start=1) if c <= budget)
        body = classify(client, png(1), budget_gflops=budget).json()
        assert body["exit"] == expected, (budget, body)
        assert body["policy"] == "budget_gflops" and body["gflops"] <= budget
        assert body["label"] == expected_label(1, expected)


def test_budget_below_cheapest_exit_is_422_naming_the_cheapest_cost(client, manifest):
    cheapest = manifest["exits"][0]["gflops"]
    r = classify(client, png(1), budget_gflops=cheapest / 2)
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "impossible_budget" and body["cheapest_gflops"] == cheapest
    assert f"{cheapest:g}" in body["detail"]


def test_deadline_met_agrees_with_the_answers_own_latency(client):
    """deadline_met says whether the answer was ready within budget_ms of arrival, which latency_ms
    measures: it was judged when the model finished, so answers late by their own ranking, signing
    and JSON said met with a latency past the budget."""
    typical = sorted(classify(client, png(2), exit=1).json()["latency_ms"] for _ in range(20))[10]
    for i in range(60):
        budget = typical * (0.9 + 0.2 * (i % 3) / 2)  # around the usual latency: some met, some missed
        r = classify(client, png(2), budget_ms=budget)
        if r.status_code == 422:  # below exit 1's idle service time
            continue
        body = r.json()
        # latency_ms is rounded to the µs: met means within the budget, missed past it, up to that rounding
        # (0.36081 ms against a 0.3608 ms budget is missed and reads 0.361)
        if body["deadline_met"]:
            assert body["latency_ms"] <= budget + 5e-4, (budget, body)
        else:
            assert body["latency_ms"] >= budget - 5e-4, (budget, body)
    # A budget far past any latency: the "met" side is checked whatever the host's speed (the "missed"
    # side needs an answer later than its budget, which the budgets around the usual latency give on
    # most runs but no budget can force).
    body = classify(client, png(2), budget_ms=10_000).json()
    assert body["deadline_met"] is True and body["latency_ms"] <= 10_000


def test_budget_ms_is_a_deadline_answered_with_deadline_met(client):
    body = classify(client, png(1), budget_ms=60_000).json()
    assert body["exit"] == NUM_EXITS and body["deadline_met"] is True and body["policy"] == "budget_ms"
    # Alone on the server and far from its deadline: the main exit's own graph, one run, its GFLOPs.
    assert body["exits_evaluated"] == [NUM_EXITS]
    assert body["gflops"] == pytest.approx(classify(client, png(1), exit=NUM_EXITS).json()["gflops"])
    assert "deadline_met" not in classify(client, png(1)).json()  # no deadline, no such key
    r = classify(client, png(1), budget_ms=1e-6)  # below exit 1's service time on any machine
    assert r.status_code == 422 and r.json()["error"] == "impossible_budget"
    floor = r.json()["idle_exit1_ms"]  # exit 1's calibrated idle service time: fixed for the process
    assert 1e-6 < floor < 1000
    # Just above that floor but far too short for HTTP and decoding: still an answer, late.
    r = classify(client, png(1), budget_ms=floor * 1.01)
    assert r.status_code == 200, r.text
    assert (r.json()["exit"], r.json()["deadline_met"]) == (1, False)


@pytest.mark.parametrize("c", range(10))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_cascade_answers_from_the_first_confident_exit(client, manifest, c, fmt):
    body = classify(client, encode(uniform_image(c), fmt), content_type=f"image/{fmt.lower()}", confidence=0.9).json()
    answering = cascade_exit(c, 0.9)
    assert body["exit"] == answering and body["exits_evaluated"] == list(range(1, answering + 1))
    assert body["label"] == expected_label(c, answering) and body["policy"] == "confidence"
    assert (body["probability"] >= 0.9) == confident(c, answering)
    spent = sum(e["stage_gflops"] for e in manifest["exits"][:answering])
    assert math.isclose(body["gflops"], spent, rel_tol=1e-9)


def test_cascade_never_goes_deeper_than_its_budget(client, manifest):
    to_exit_2 = sum(e["stage_gflops"] for e in manifest["exits"][:2])
    body = classify(client, png(0), confidence=0.9, budget_gflops=to_exit_2).json()
    # Bin 0 is confident nowhere before the main output; the budget stops the cascade at exit 2.
    assert body["exit"] == 2 and body["exits_evaluated"] == [1, 2] and body["gflops"] <= to_exit_2
    body = classify(client, png(0), confidence=0.9, budget_gflops=to_exit_2 * 0.999).json()
    assert body["exits_evaluated"] == [1]


def test_cascade_threshold_extremes(client, manifest):
    assert classify(client, png(0), confidence=0).json()["exits_evaluated"] == [1]
    body = classify(client, png(9), confidence=1).json()
    assert body["exits_evaluated"] == [1, 2, 3]
    assert math.isclose(body["gflops"], sum(e["stage_gflops"] for e in manifest["exits"]))


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"exit": 1, "confidence": 0.5}, "cannot be combined"),
        ({"exit": 0}, "1..3"),
        ({"exit": "first"}, "'last'"),
        ({"confidence": 2}, "[0, 1]"),
        ({"budget_gflops": -1}, "positive"),
        ({"budget_gflops": "lots"}, "budget_gflops"),
        ({"top_k": 0}, "top_k"),
        ({"budget": 1}, "unknown query parameter"),
        ({"top_k": "abc"}, "top_k: Input should be a valid integer"),
        ({"budget_gflops": "inf"}, "must be a finite number"),  # named no cheapest cost before
        ({"exit": ["abc", "2"]}, "exit (2 times)"),  # was exit 2's answer, the first value never read
        ({"top_k": ["1", "1"]}, "top_k (2 times)"),
        ({"exit": "２"}, "not an exit number"),  # full-width digits: int() reads them, the schema does not
        ({"confidence": "０.５"}, "confidence"),
        # Digit separators: Python and pydantic read '0_5' as 5, which would run another exit.
        ({"budget_gflops": "0_5"}, "budget_gflops: Input should be a valid number"),
        ({"budget_ms": "1_0"}, "(got '1_0')"),
        ({"top_k": "1_0"}, "top_k: Input should be a valid integer"),
        ({"exit": "1_0"}, "not an exit number"),
        ({"confidence": "0_9"}, "not a number"),
        # A long value is quoted, not echoed: enough to recognise, with its length.
        ({"confidence": "9" * 5000}, "… (5002 characters)"),
        ({"x" * 3000: 1}, "… (3000 characters)"),
        # A crowded query is refused before it is parsed; unknown names: ten listed, the rest counted.
        ({f"u{i}": 1 for i in range(40)}, "the query has 40 parameters; /classify takes 6"),
        ({f"u{i:02}": 1 for i in range(20)}, "u09 and 10 more; accepted:"),
    ],
)
def test_bad_parameters_are_422_with_a_clear_detail(client, params, fragment):
    before = metric_values(client, "eed_requests_total").get('{exit="none",policy="none",status="422"}', 0)
    for _ in range(2):  # parsed queries are remembered: only valid ones, so the second is refused too
        r = classify(client, png(1), **params)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["error"] == "invalid_parameters" and fragment in body["detail"], body
        # DESIGN §4: a 422 names the cheapest cost; every refusal is counted (a value not of its type was not).
        assert body["cheapest_exit"] == 1 and body["cheapest_gflops"] > 0, body
    assert metric_values(client, "eed_requests_total")['{exit="none",policy="none",status="422"}'] == before + 2


@pytest.mark.parametrize("name", ["budget_gflops", "budget_ms"])
def test_the_floor_a_422_quotes_is_accepted_when_sent_back(client, name):
    """The figure after "accepted: NAME >=" is one a client can copy: rounded up, never down (the cost
    0.020651008 was quoted as 0.020651, itself refused)."""
    r = classify(client, png(1), **{name: 1e-9})
    assert r.status_code == 422 and r.json()["error"] == "impossible_budget", r.text
    quoted = re.search(rf"accepted: {name} >= ([0-9.e+-]+)", r.json()["detail"]).group(1)
    r = classify(client, png(1), **{name: quoted})
    assert r.status_code == 200, (quoted, r.text)
    if name == "budget_gflops":
        assert float(quoted) >= r.json()["gflops"]


def test_a_repeated_query_gets_the_same_answer_as_the_first_time(client, manifest):
    first = classify(client, png(3), budget_gflops=manifest["exits"][1]["gflops"], top_k=2).json()
    again = classify(client, png(3), budget_gflops=manifest["exits"][1]["gflops"], top_k=2).json()
    other = classify(client, png(3), budget_gflops=manifest["exits"][0]["gflops"], top_k=1).json()
    assert (first["exit"], len(first["top_k"]), first["policy"]) == (2, 2, "budget_gflops")
    assert {k: again[k] for k in ("exit", "label", "top_k", "gflops", "policy")} == {
        k: first[k] for k in ("exit", "label", "top_k", "gflops", "policy")
    }
    assert (other["exit"], len(other["top_k"])) == (1, 1)


def test_unknown_policy_names_do_not_become_metric_labels(client):
    for name in ("no_such_policy_1", "no_such_policy_2"):
        r = classify(client, png(1), policy=name)
        assert r.status_code == 422 and name in r.json()["detail"], r.text
    counts = metric_values(client, "eed_requests_total")
    assert not [labels for labels in counts if "no_such_policy" in labels]
    assert counts['{exit="none",policy="none",status="422"}'] >= 2


# --- bodies --------------------------------------------------------------------------------


def test_multipart_octet_stream_and_untyped_bodies(client):
    data = png(8)
    r = client.post("/classify", files={"file": ("x.png", data, "image/png")}, params={"exit": 1})
    assert r.status_code == 200 and r.json()["label"] == expected_label(8, 1)
    assert classify(client, data, "application/octet-stream", exit=1).json()["label"] == expected_label(8, 1)
    r = client.post("/classify", content=data, params={"exit": 1})
    assert r.status_code == 200


def test_any_size_and_mode(client):
    rgba = Image.new("RGBA", (300, 200), (0, 0, 0, 0))  # fully transparent → the manifest background (white)
    body = classify(client, encode(rgba, "PNG"), exit=1).json()
    assert body["label"] == expected_label(9, 1)
    big_rgb = uniform_image(6, size=(640, 480), mode="RGB")
    assert classify(client, encode(big_rgb, "JPEG", quality=95), "image/jpeg", exit=2).json()[
        "label"
    ] == expected_label(6, 2)


def _truncated_png():
    data = encode(Image.effect_noise((64, 64), 50), "PNG")
    return data[: len(data) // 2]


BAD_BODIES = [
    ("empty", b"", "image/png", 400),
    ("text", b"hello, world", "image/png", 400),
    ("truncated png", _truncated_png(), "image/png", 400),
    ("truncated jpeg", encode(Image.effect_noise((64, 64), 50), "JPEG")[:300], "image/jpeg", 400),
    ("pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "application/pdf", 415),
    ("pdf as octet-stream", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "application/octet-stream", 415),
    ("svg", b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "image/svg+xml", 415),
    ("json", b'{"image": "abc"}', "application/json", 415),
    ("png header only", b"\x89PNG\r\n\x1a\n", "image/png", 400),
]


@pytest.mark.parametrize("name, data, content_type, status", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_are_4xx_json(client, name, data, content_type, status):
    r = classify(client, data, content_type)
    assert r.status_code == status, r.text
    assert set(r.json()) >= {"error", "detail"} and r.json()["detail"]


def test_bad_multipart_bodies(client):
    r = client.post("/classify", files={"image": ("x.png", png(1), "image/png")})
    assert r.status_code == 400 and "'file'" in r.json()["detail"]
    r = client.post(
        "/classify", content=b"--xyz\r\ngarbage", headers={"Content-Type": "multipart/form-data; boundary=xyz"}
    )
    assert 400 <= r.status_code < 500
    r = client.post("/classify", data={"file": "not an image"})
    assert r.status_code in (400, 415)
    # Two images in one request: one answer would silently ignore the other (it took the last).
    two = [("file", ("a.png", png(1), "image/png")), ("file", ("b.png", png(2), "image/png"))]
    r = client.post("/classify", files=two)
    assert r.status_code == 400 and "2 fields named 'file'" in r.json()["detail"], r.text
    # Near-boundaries inside a part: python-multipart's slow path at each (19 MiB held the event loop 1.5 s)
    # (the boundary as the parser reads it: the last one given, quotes respected)
    for boundary, header in (
        (b"xyz", "boundary=xyz"),
        (b"a b", 'boundary="a b"'),
        (b"xyz", "boundary=short; boundary=xyz"),
        (b"xyz", 'x="a;boundary=short"; boundary=xyz'),
    ):
        body = (
            b"--"
            + boundary
            + b'\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
            + (b"\r\n--" + boundary + b"-x") * 5000
            + b"\r\n--"
            + boundary
            + b"--\r\n"
        )
        r = client.post("/classify", content=body, headers={"Content-Type": f"multipart/form-data; {header}"})
        assert r.status_code == 400 and "its boundary delimiter occurs 5002 times" in r.json()["detail"], r.text
    # content may hold "--" + the boundary where no line break precedes it (RFC 2046 forbids only that)
    text = b'--x\r\nContent-Disposition: form-data; name="note"\r\n\r\n' + b"a--x " * 30 + b"\r\n"
    image = b'--x\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n' + png(3) + b"\r\n--x--\r\n"
    r = client.post("/classify", content=text + image, headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 200, r.text
    # an ordinary upload with a quoted boundary still works
    r = client.post(
        "/classify",
        content=b'--a b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        + b"Content-Type: image/png\r\n\r\n"
        + png(3)
        + b"\r\n--a b--\r\n",
        headers={"Content-Type": 'multipart/form-data; boundary="a b"'},
    )
    assert r.status_code == 200, r.text


def test_server_stays_healthy_after_bad_input(client):
    for _, data, content_type, _ in BAD_BODIES:
        classify(client, data, content_type)
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    assert classify(client, png(4), exit=2).json()["label"] == expected_label(4, 2)
    failures = {k: v for k, v in metric_values(client, "eed_requests_total").items() if 'status="500"' in k and v}
    assert not failures, failures


# --- batching -------------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(client, server):
    def batched_items():
        counts = metric_values(client, "eed_batch_size_count")
        sums = metric_values(client, "eed_batch_size_sum")
        return sum(sums.values()), sum(counts.values())

    items_before, batches_before = batched_items()

    async def burst():
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as ac:
            jobs = [(i % 10, 1 + i % NUM_EXITS) for i in range(40)]
            responses = await asyncio.gather(
                *(
                    ac.post("/classify", content=png(c), headers={"Content-Type": "image/png"}, params={"exit": e})
                    for c, e in jobs
                )
            )
            return jobs, responses

    jobs, responses = asyncio.run(burst())
    for (c, e), r in zip(jobs, responses):
        assert r.status_code == 200
        assert (r.json()["exit"], r.json()["label"]) == (e, expected_label(c, e))
    assert len({r.json()["id"] for r in responses}) == len(responses)
    items, batches = batched_items()
    assert items - items_before == len(jobs)
    assert (items - items_before) / (batches - batches_before) > 1  # mean batch size above 1
    buckets, counts = metric_values(client, "eed_batch_size_bucket"), metric_values(client, "eed_batch_size_count")
    for labels, count in counts.items():  # the +Inf bucket holds every batch
        assert buckets[labels[:-1] + ',le="+Inf"}'] == count
    # and the burst put some batches above size 1 (le="1.0" counts only the single ones)
    assert sum(count - buckets[labels[:-1] + ',le="1.0"}'] for labels, count in counts.items()) > 0


def test_concurrent_cascades_are_rebatched_per_stage(client, server):
    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=30)) as ac:
            return await asyncio.gather(
                *(
                    ac.post(
                        "/classify", content=png(c), headers={"Content-Type": "image/png"}, params={"confidence": 0.9}
                    )
                    for c in list(range(10)) * 3
                )
            )

    before = metric_values(client, "eed_batch_size_count").get('{exit="2",graph="stage"}', 0)
    responses = asyncio.run(burst())
    for c, r in zip(list(range(10)) * 3, responses):
        assert r.json()["exit"] == cascade_exit(c, 0.9) and r.json()["label"] == expected_label(c, cascade_exit(c))
    stage2 = metric_values(client, "eed_batch_size_count")['{exit="2",graph="stage"}'] - before
    # 21 requests continued to stage 2; they arrive there in far fewer batches.
    assert 0 < stage2 < 21


# --- feedback and metrics ---------------------------------------------------------------------


def test_feedback_updates_live_accuracy(client, manifest):
    right = classify(client, png(2), exit=1).json()
    wrong = classify(client, png(2), exit=1).json()
    r = client.post("/feedback", json={"id": right["id"], "label": expected_label(2, 1)})
    assert r.status_code == 200 and r.json()["correct"] is True and r.json()["live_accuracy"] == 1.0
    r = client.post("/feedback", json={"id": wrong["id"], "label": manifest["classes"][0]})
    assert r.json()["correct"] is False and r.json()["live_accuracy"] == 0.5
    feedback = metric_values(client, "eed_feedback_total")
    assert feedback['{correct="true",exit="1"}'] == 1 and feedback['{correct="false",exit="1"}'] == 1
    live = {e["exit"]: e["live_accuracy"] for e in client.get("/v1/model").json()["manifest"]["exits"]}
    assert live[1] == 0.5

    again = client.post("/feedback", json={"id": right["id"], "label": 2})
    assert again.status_code == 409
    unknown = client.post("/feedback", json={"id": "does-not-exist", "label": 1})
    assert unknown.status_code == 403 and unknown.json()["error"] == "invalid_feedback_id"
    bad = client.post("/feedback", json={"id": wrong["id"], "label": 99})
    assert bad.status_code == 422 and "0..9" in bad.json()["detail"]
    r = client.post("/feedback", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422


def test_metrics_expose_every_documented_series(client, manifest):
    classify(client, png(5), confidence=0.9)
    text = client.get("/metrics").text
    for name in [
        "eed_requests_total",
        "eed_request_latency_seconds_bucket",
        "eed_inference_latency_seconds_bucket",
        "eed_queue_wait_seconds_bucket",
        "eed_gflops_spent_total",
        "eed_request_gflops_bucket",
        "eed_batch_size_bucket",
        "eed_queue_depth",
        "eed_inflight_requests",
        "eed_exit_gflops",
        "eed_exit_stage_gflops",
        "eed_exit_params",
        "eed_exit_accuracy",
        "eed_exit_latency_estimate_seconds",
        "eed_feedback_total",
        "eed_model_info",
        "eed_model_ready",
    ]:
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
    gflops = metric_values(client, "eed_exit_gflops")
    accuracy = metric_values(client, "eed_exit_accuracy")
    for e in manifest["exits"]:
        assert gflops[f'{{exit="{e["exit"]}"}}'] == e["gflops"]
        assert accuracy[f'{{exit="{e["exit"]}"}}'] == e["accuracy"]
    assert metric_values(client, "eed_requests_total")['{exit="2",policy="confidence",status="200"}'] >= 1
    assert metric_values(client, "eed_gflops_spent_total")['{exit="2"}'] > 0


def test_each_exits_cost_is_a_bucket_of_the_per_request_gflops_histogram(client, manifest):
    # So that quantiles of GFLOPs per request tell exits apart instead of interpolating inside one
    # generic bucket (the shipped model's exits 1-3 all fell in (0.01, 0.05]).
    for e in manifest["exits"]:
        assert classify(client, png(5), exit=e["exit"]).status_code == 200
    buckets = metric_values(client, "eed_request_gflops_bucket")
    for e in manifest["exits"]:
        mine = {k: v for k, v in buckets.items() if f'exit="{e["exit"]}"' in k and 'policy="exit"' in k}
        by_bound = {float(re.search(r'le="([^"]+)"', k).group(1)): v for k, v in mine.items()}
        assert by_bound[e["gflops"]] >= 1, e  # the exit's cost is a bound: its answers counted at it
        assert all(v == 0 for bound, v in by_bound.items() if bound < e["gflops"]), (e, by_bound)


def test_a_request_run_at_once_waits_in_the_zero_bucket(client):
    # An idle server's waits are exactly 0: quantiles of them must say 0, not 95 µs.
    classify(client, png(5), exit=1)
    waits = metric_values(client, "eed_queue_wait_seconds_bucket")
    assert sum(v for k, v in waits.items() if 'le="0.0"' in k) >= 1


# --- limits ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server(model_dir, tmp_path_factory):
    with ServerProcess(
        model_dir,
        "--queue-size",
        "1",
        "--max-body-bytes",
        "65536",
        "--max-pixels",
        "10000",
        "--intra-op-threads",
        "1",
        tmp_dir=tmp_path_factory.mktemp("small"),
    ) as srv:
        yield srv


def test_oversized_body_is_413(small_server):
    with httpx.Client(base_url=small_server.url, timeout=30) as c:
        big = b"\0" * 70_000
        r = classify(c, big)
        assert r.status_code == 413 and r.json()["error"] == "payload_too_large"

        def chunks():  # no Content-Length: the limit applies while streaming
            for _ in range(10):
                yield b"\0" * 10_000

        r = c.post("/classify", content=chunks(), headers={"Content-Type": "image/png"})
        assert r.status_code == 413
        assert c.get("/healthz").status_code == 200


def test_an_image_sent_in_pieces_gets_the_same_answer(small_server):
    # Half the body, a pause, then the rest: the server reads it as two ASGI messages and joins
    # them (serving/body.py); a small body sent at once comes as one. The same bytes, the same answer.
    data = png(5)
    with httpx.Client(base_url=small_server.url, timeout=30) as c:
        whole = classify(c, data, exit=2).json()
    port = int(small_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /classify?exit=2 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data[: len(data) // 2]
        )
        time.sleep(0.3)  # the handler is waiting for the rest by now
        sock.sendall(data[len(data) // 2 :])
        sock.settimeout(30)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, reply
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), reply
    answer = json.loads(body)
    assert (answer["label"], answer["probability"]) == (whole["label"], whole["probability"])


def test_too_many_pixels_is_413(small_server):
    with httpx.Client(base_url=small_server.url, timeout=30) as c:
        r = classify(c, encode(Image.new("L", (101, 100)), "PNG"))
        assert r.status_code == 413 and r.json()["error"] == "image_too_large" and "10000" in r.json()["detail"]
        assert classify(c, encode(Image.new("L", (100, 100)), "PNG")).status_code == 200


def test_slow_upload_does_not_take_the_admission_slot(small_server):
    data = png(3)
    port = int(small_server.url.rsplit(":", 1)[1])
    slow = socket.create_connection(("127.0.0.1", port))
    try:  # a body still arriving waits outside admission: the only slot stays free for others
        slow.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data[:10]
        )
        with httpx.Client(base_url=small_server.url, timeout=30) as c:
            for _ in range(5):
                assert classify(c, data).status_code == 200
        slow.sendall(data[10:])
        assert slow.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        slow.close()


def test_full_queue_is_503_with_retry_after(small_server):
    data = encode(Image.effect_noise((100, 100), 64).convert("L"), "PNG")  # decoded in a thread: overlaps

    async def burst():
        async with httpx.AsyncClient(base_url=small_server.url, timeout=30) as ac:
            return await asyncio.gather(*(classify_async(ac, data) for _ in range(24)))

    deadline = time.monotonic() + 20
    while True:  # one slot and 24 requests at once: some are refused (a busy machine only makes it likelier)
        responses = asyncio.run(burst())
        refused = [r for r in responses if r.status_code == 503]
        if refused or time.monotonic() > deadline:
            break
    assert refused, [r.status_code for r in responses]
    assert all(r.status_code in (200, 503) for r in responses)
    assert refused[0].json()["error"] == "overloaded" and int(refused[0].headers["Retry-After"]) >= 1
    with httpx.Client(base_url=small_server.url, timeout=30) as c:
        assert classify(c, data).status_code == 200  # the slot is free again


async def classify_async(ac, data):
    return await ac.post("/classify", content=data, headers={"Content-Type": "image/png"})
