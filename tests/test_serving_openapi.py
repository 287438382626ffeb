"""The OpenAPI document is the contract: schemathesis (all checks) against a real server finds
nothing, and the model-dependent bounds in the schema are exactly where the server's answer flips."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from serving_model import (
    NUM_EXITS,
    ROOT,
    ServerProcess,
    build_model_folder,
    encode,
    uniform_image,
    with_calibrated_policy,
)

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CONFIG = ROOT / "tests" / "schemathesis.toml"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = with_calibrated_policy(build_model_folder(tmp_path_factory.mktemp("model")))
    with ServerProcess(model, "--intra-op-threads", "1", tmp_dir=tmp_path_factory.mktemp("srv")) as srv:
        yield srv


@pytest.fixture(scope="module")
def spec(server):
    return httpx.get(server.url + "/openapi.json", timeout=30).json()


def classify(server, **params) -> httpx.Response:
    return httpx.post(
        server.url + "/classify",
        content=encode(uniform_image(3), "PNG"),
        headers={"Content-Type": "image/png"},
        params=params,
        timeout=30,
    )


def test_schemathesis_with_all_checks_finds_nothing(server, tmp_path):
    # Fixed seed and example count: the same requests every run, well within a minute.
    cmd = [
        str(SCHEMATHESIS),
        "--config-file",
        str(CONFIG),
        "run",
        server.url + "/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        "40",
        "--seed",
        "11",
        "--generation-database",
        "none",
        "--no-color",
        "--suppress-health-check",
        "too_slow",
    ]  # a busy CI machine generates slowly; that is no failure
    r = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_COLOR": "1"}
    )
    assert r.returncode == 0, r.stdout[-20000:] + r.stderr[-5000:]
    assert " passed" in r.stdout, r.stdout[-5000:]


def test_every_get_is_declared_as_head_too_and_answers_so(server, spec):
    gets = {path for path, item in spec["paths"].items() if "get" in item}
    assert gets and gets == {path for path, item in spec["paths"].items() if "head" in item}
    r = httpx.head(server.url + "/v1/model", timeout=30)
    assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0


def test_every_operation_documents_its_statuses_and_the_request_id(spec):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "200" in responses, (method, path)
            for code, response in responses.items():
                assert "X-Request-ID" in response.get("headers", {}), (method, path, code)
                if method == "head":  # the GET's answers without their bodies
                    assert "content" not in response and code in item["get"]["responses"], (path, code)
                elif code != "200":
                    (schema,) = [c["schema"] for c in response["content"].values()]
                    expected = "OipError" if path.startswith("/v2") else "ErrorBody"
                    assert schema == {"$ref": f"#/components/schemas/{expected}"}, (method, path, code)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    oip = {
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/infer",
    }
    assert oip <= set(spec["paths"])
    # Readiness says false with 400 (the protocol's 4xx); an unknown model stays a 404 described as one.
    ready = spec["paths"]["/v2/models/{name}/ready"]["get"]["responses"]
    assert ready["400"]["description"].startswith("not ready") and ready["404"]["description"] == "unknown id or model"


def test_classify_parameters_carry_the_models_bounds(spec, server):
    model = httpx.get(server.url + "/v1/model", timeout=30).json()["manifest"]
    params = spec["components"]["schemas"]["ClassifyParameters"]
    props = params["properties"]
    assert props["exit"]["oneOf"][0]["maximum"] == NUM_EXITS
    cheapest = min(e["gflops"] for e in model["exits"])
    assert props["budget_gflops"]["minimum"] <= cheapest < props["budget_gflops"]["minimum"] * (1 + 1e-6)
    assert params["additionalProperties"] is False
    assert {"required": ["exit", "confidence"]} in params["not"]["anyOf"]
    assert props["policy"]["enum"] == ["half"]
    label = spec["components"]["schemas"]["FeedbackRequest"]["properties"]["label"]["anyOf"]
    assert {"type": "integer", "minimum": 0, "maximum": len(model["classes"]) - 1} in label
    assert {"type": "string", "enum": model["classes"]} in label


@pytest.mark.parametrize("name", ["budget_gflops", "budget_ms"])
def test_the_documented_minimum_budget_is_exactly_where_the_server_stops_refusing(spec, server, name):
    minimum = spec["components"]["schemas"]["ClassifyParameters"]["properties"][name]["minimum"]
    assert minimum > 0
    accepted = classify(server, **{name: repr(minimum)})
    assert accepted.status_code == 200, accepted.text
    below = classify(server, **{name: repr(math.nextafter(minimum, 0))})
    assert below.status_code == 422 and below.json()["error"] == "impossible_budget", below.text


def test_the_per_exit_confidence_pattern_matches_what_the_server_accepts(spec, server):
    import re

    pattern = spec["components"]["schemas"]["ClassifyParameters"]["properties"]["confidence"]["pattern"]
    accepted = ["0.9", "1", "0", ".5", "0.65,0.4", " 0.3 , 1.0 ", "+1", "-0"]
    refused = ["1.5", "-0.1", "0.5,0.5,0.5", "", "a", "0.5,", ",0.5", "nan"]
    for value in accepted:
        assert re.search(pattern, value), value
        assert classify(server, confidence=value).status_code == 200, value
    for value in refused:
        assert not re.search(pattern, value), value
        assert classify(server, confidence=value).status_code == 422, value


@pytest.mark.parametrize(
    "text",
    [
        "0.9",
        ".9",
        "1",
        "1.0",
        "1.",
        "00.5",
        "+0.5",
        "-0",
        " 0.5 ",
        "0",
        "0.65,0.43",
        "0.5,1",
        "1e-1",
        "5E-1",
        "inf",
        "nan",
        "1.5",
        "-0.1",
        "0x1",
        "0_5",
        "0.5,,0.4",
        "",
        "0.5,0.4,0.3",
    ],
)
def test_the_schemas_confidence_pattern_accepts_what_the_server_accepts(text):
    # A client validating requests against the published schema must neither refuse a confidence
    # the server takes ('1e-1' was taken, the pattern refused it) nor send one it refuses.
    from serving.errors import InvalidParameters
    from serving.openapi import _threshold_pattern
    from serving.policy import parse_confidence

    k = 3  # two early exits: one threshold, or one per early exit
    try:
        values = parse_confidence(text)
        server = len(values) in (1, k - 1) and all(0 <= v <= 1 and math.isfinite(v) for v in values)
    except InvalidParameters:
        server = False
    assert (re.fullmatch(_threshold_pattern(k), text) is not None) == server, text


def test_the_oip_request_schema_accepts_what_the_server_serves_and_refuses_what_it_refuses(spec, server):
    # The schema let 'input' be BYTES, a batch of 0 and any request parameter; the server refuses
    # each (400). Every body is sent too: the schema's verdict is the server's.
    import base64

    import jsonschema

    validator = jsonschema.Draft202012Validator({**spec, "$ref": "#/components/schemas/OipInferenceRequest"})
    image = base64.b64encode(encode(uniform_image(3), "PNG")).decode()
    fp32 = {"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}
    served = [
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [image] * 2}]},
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2, 1], "data": [[image]] * 2}]},
        {"inputs": [fp32], "parameters": {"exit": 2, "timeout": 5}},
        {"inputs": [fp32], "parameters": {"confidence": "0.9", "binary_data_output": False}},
    ]
    refused = [
        {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1], "data": [image]}]},
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [0], "data": []}]},
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 2], "data": [image] * 2}]},
        {"inputs": [fp32], "parameters": {"top_k": 2}},
    ]
    url = f"{server.url}/v2/models/tiny-test/infer"  # build_model_folder's name
    for body in served:
        assert validator.is_valid(body), body
        assert httpx.post(url, json=body, timeout=30).status_code == 200, body
    for body in refused:
        assert not validator.is_valid(body), body
        assert httpx.post(url, json=body, timeout=30).status_code == 400, body
