"""Open Inference Protocol v2, driven by the real ``tritonclient[http]`` against a real server.

Answers are checked against ``/classify`` on the same images (same graphs, same
policies), and against what the fixture model implies (tests/serving_model.py).
"""

from __future__ import annotations

import base64
import json
import os
import re
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from serving_model import (
    MEAN,
    NUM_CLASSES,
    ROOT,
    STD,
    ServerProcess,
    build_model_folder,
    cascade_exit,
    encode,
    expected_label,
    gray_for_bin,
    uniform_image,
    with_calibrated_policy,
)
from tritonclient.utils import InferenceServerException

from serving.oip import OUTPUTS

MODEL = "tiny-test"
BINS = list(range(10))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = with_calibrated_policy(build_model_folder(tmp_path_factory.mktemp("model"), name=MODEL))
    # A generous batching wait, so that the samples of one call visibly share a batch.
    with ServerProcess(
        model, "--intra-op-threads", "1", "--max-wait-ms", "30", tmp_dir=tmp_path_factory.mktemp("srv")
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60.0)
    yield c
    c.close()


def pngs(bins=BINS) -> list[bytes]:
    return [encode(uniform_image(c), "PNG") for c in bins]


def image_input(images: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    else:  # JSON BYTES inputs are base64 strings
        tensor.set_data_from_numpy(np.array([base64.b64encode(i) for i in images], dtype=np.object_), binary_data=False)
    return tensor


def preprocessed(bins=BINS) -> np.ndarray:
    """What the manifest's preprocessing makes of uniform images of these bins, computed here."""
    values = [(gray_for_bin(c) / 255.0 - MEAN) / STD for c in bins]
    return np.stack([np.full((1, 28, 28), v, dtype=np.float32) for v in values])


def fp32_input(x: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def classify_all(url: str, images: list[bytes], params: dict) -> list[dict]:
    with httpx.Client(base_url=url, timeout=60) as http:
        out = []
        for data in images:
            r = http.post(
                "/classify",
                content=data,
                headers={"Content-Type": "image/png"},
                params={**params, "top_k": NUM_CLASSES},
            )
            assert r.status_code == 200, r.text
            out.append(r.json())
        return out


def assert_same_answers(result, answers: list[dict]) -> None:
    """An OIP result equals /classify's answers, sample by sample."""
    probs = result.as_numpy("probabilities")
    assert probs.shape == (len(answers), NUM_CLASSES) and probs.dtype == np.float32
    assert result.as_numpy("label").dtype == np.int64 and result.as_numpy("exit").dtype == np.int32
    for i, answer in enumerate(answers):
        assert result.as_numpy("label")[i] == answer["label"]
        assert result.as_numpy("exit")[i] == answer["exit"]
        assert result.as_numpy("gflops")[i] == pytest.approx(answer["gflops"], rel=1e-6)
        by_class = {t["label"]: t["probability"] for t in answer["top_k"]}
        np.testing.assert_allclose(probs[i], [by_class[c] for c in range(NUM_CLASSES)], rtol=1e-5, atol=1e-7)


def metric_sum(url: str, name: str, **labels) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


# --- health and metadata -------------------------------------------------------------------


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and not client.is_model_ready("another-model")
    server = client.get_server_metadata()
    assert server["name"] == "eed-anytime" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["versions"]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "input": ("FP32", [-1, 1, 28, 28]),
        "image": ("BYTES", [-1]),
    }
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    assert outputs["probabilities"] == ("FP32", [-1, NUM_CLASSES])
    assert outputs["label"] == ("INT64", [-1]) and outputs["exit"] == ("INT32", [-1])
    assert outputs["gflops"] == ("FP32", [-1])
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("another-model")
    assert err.value.status() == "404" and MODEL in err.value.message()


def test_model_configuration_as_triton_writes_it(client):
    config = client.get_model_config(MODEL)
    assert config["name"] == MODEL and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] >= 1  # the most samples one call may carry
    inputs = {i["name"]: i for i in config["input"]}
    assert inputs["input"]["data_type"] == "TYPE_FP32" and inputs["input"]["dims"] == [1, 28, 28]
    assert inputs["image"]["data_type"] == "TYPE_STRING" and inputs["image"]["reshape"] == {"shape": []}
    outputs = {o["name"]: (o["data_type"], o["dims"]) for o in config["output"]}
    assert outputs["probabilities"] == ("TYPE_FP32", [NUM_CLASSES])
    assert outputs["label"] == ("TYPE_INT64", [1]) and outputs["feedback_id"] == ("TYPE_STRING", [1])
    assert client.get_model_config(MODEL, "1") == config
    assert "model_configuration" in client.get_server_metadata()["extensions"]
    for name, version in (("another-model", ""), (MODEL, "2")):
        with pytest.raises(InferenceServerException) as err:
            client.get_model_config(name, version)
        assert err.value.status() == "404"


# --- answers equal /classify's -----------------------------------------------------------

POLICIES = [
    {},
    {"exit": 1},
    {"exit": 2},
    {"exit": "last"},
    {"confidence": 0.9},
    {"confidence": "0.99,0.5"},  # one threshold per early exit
    {"budget_gflops": 0.0008},
    {"policy": "half"},  # a calibrated policy of the manifest
    {"policy": "half", "budget_ms": 60_000},
    {"confidence": 0.9, "budget_gflops": 0.0008},
]


@pytest.mark.parametrize("params", POLICIES, ids=[json.dumps(p) for p in POLICIES])
def test_images_as_binary_bytes_answer_as_classify_does(client, server, params):
    images = pngs()
    result = client.infer(MODEL, [image_input(images)], parameters=params)
    assert_same_answers(result, classify_all(server.url, images, params))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_images_shaped_as_the_model_configuration_says_answer_in_the_same_shape(client, binary):
    # /config gives the image dims [1] reshaped to []: Triton's clients (perf_analyzer, code built on
    # get_model_config) send [N, 1] for it, and Triton answers such per-sample scalars as [N, 1].
    images = pngs([1, 4, 8])
    flat = client.infer(MODEL, [image_input(images)], parameters={"exit": 2})
    tensor = triton.InferInput("image", [len(images), 1], "BYTES")
    column = np.array(images if binary else [base64.b64encode(i) for i in images], dtype=np.object_)
    tensor.set_data_from_numpy(column.reshape(-1, 1), binary_data=binary)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in OUTPUTS]
    result = client.infer(MODEL, [tensor], outputs=outputs, parameters={"exit": 2})
    shapes = {o["name"]: o["shape"] for o in result.get_response()["outputs"]}
    assert shapes == {
        "probabilities": [3, NUM_CLASSES],
        "label": [3, 1],
        "exit": [3, 1],
        "gflops": [3, 1],
        "feedback_id": [3, 1],
    }
    for name in ("probabilities", "label", "exit", "gflops"):
        np.testing.assert_array_equal(result.as_numpy(name).reshape(flat.as_numpy(name).shape), flat.as_numpy(name))
    assert result.as_numpy("feedback_id").shape == (3, 1)
    with pytest.raises(InferenceServerException) as err:  # other shapes stay refused
        wide = triton.InferInput("image", [1, 3], "BYTES")
        wide.set_data_from_numpy(np.array([images], dtype=np.object_))
        client.infer(MODEL, [wide])
    assert err.value.status() == "400" and "must have shape [N] or [N, 1]" in err.value.message()


def test_a_call_over_the_body_limit_is_told_how_to_send_less(server):
    from serving.settings import ServerSettings

    limit = ServerSettings.model_fields["max_body_bytes"].default
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=b" " * (limit + 1), timeout=60)
    assert r.status_code == 413, r.text
    message = r.json()["error"]
    assert (
        f"limit of {limit} bytes" in message and "fewer images per call" in message and "smaller image" not in message
    )


def test_versioned_paths(client):
    assert client.is_model_ready(MODEL, "1") and not client.is_model_ready(MODEL, "2")
    assert client.get_model_metadata(MODEL, "1")["name"] == MODEL
    result = client.infer(MODEL, [image_input(pngs([7]))], model_version="1", parameters={"exit": 1})
    assert result.as_numpy("label")[0] == expected_label(7, 1)
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [image_input(pngs([7]))], model_version="2")
    assert err.value.status() == "404" and "version" in err.value.message()


def test_the_cascade_answers_from_the_first_confident_exit(client):
    result = client.infer(MODEL, [image_input(pngs())], parameters={"confidence": 0.9})
    assert list(result.as_numpy("exit")) == [cascade_exit(c, 0.9) for c in BINS]
    assert list(result.as_numpy("label")) == [expected_label(c, cascade_exit(c, 0.9)) for c in BINS]
    assert result.get_response()["parameters"]["policy"] == "confidence"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_preprocessed_fp32_input_in_both_encodings(client, server, binary):
    x = preprocessed()
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label", "exit", "gflops")]
    result = client.infer(MODEL, [fp32_input(x, binary)], outputs=outputs, parameters={"exit": 2})
    assert list(result.as_numpy("label")) == [expected_label(c, 2) for c in BINS]
    assert_same_answers(result, classify_all(server.url, pngs(), {"exit": 2}))
    encoded = [o.get("parameters", {}).get("binary_data_size") is not None for o in result.get_response()["outputs"]]
    assert encoded == [binary] * 4


def test_images_as_json_base64_bytes(client, server):
    images = pngs([0, 5, 9])
    result = client.infer(MODEL, [image_input(images, binary=False)], parameters={"exit": 3})
    assert_same_answers(result, classify_all(server.url, images, {"exit": 3}))


def test_requested_outputs_only_each_in_its_encoding(client):
    outputs = [
        triton.InferRequestedOutput("label", binary_data=False),
        triton.InferRequestedOutput("probabilities", binary_data=True),
    ]
    result = client.infer(MODEL, [image_input(pngs([3, 8]))], outputs=outputs, parameters={"exit": 1})
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["label", "probabilities"]
    label, probs = response["outputs"]
    assert label["data"] == [expected_label(3, 1), expected_label(8, 1)]
    assert probs["parameters"]["binary_data_size"] == 2 * NUM_CLASSES * 4
    assert result.as_numpy("probabilities").shape == (2, NUM_CLASSES) and result.as_numpy("exit") is None


def test_a_plain_json_client_with_nested_data(server):
    x = preprocessed([6])
    body = {
        "id": "call-1",
        "parameters": {"exit": 1},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": x.tolist()}],
        "outputs": [{"name": "label"}, {"name": "exit"}],
    }
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    answer = r.json()
    assert answer["id"] == "call-1" and answer["model_name"] == MODEL
    assert {o["name"]: o["data"] for o in answer["outputs"]} == {"label": [expected_label(6, 1)], "exit": [1]}


def test_nested_data_must_match_the_shape(server):
    """Nested 'data' spells out the shape: ragged rows holding the right total are not a tensor."""
    rows = preprocessed([6])[0, 0].tolist()  # 28 rows of 28
    ragged = [rows[0] + rows[1][:1], rows[1][1:], *rows[2:]]  # 29 + 27 + 26 * 28 = 784 values

    def infer(data, shape=(1, 1, 28, 28)):
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(shape), "data": data}]}
        return httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=60)

    r = infer([[ragged]])
    assert r.status_code == 400
    assert r.json()["error"] == (
        "input 'input': nested 'data' does not match shape [1, 1, 28, 28]: data[0][0][0] is 29 "
        "elements, the shape says 28 elements (nest it exactly as the shape, or send it flat in "
        "row-major order)"
    )
    assert infer([rows]).status_code == 400  # a level short
    assert "data[0][0][27] is a scalar" in infer([[[*rows[:-1], 0.0]]]).json()["error"]
    assert infer([[rows]]).status_code == 200  # nested exactly
    assert infer([v for row in rows for v in row]).status_code == 200  # flat


def test_requests_beyond_the_limits_are_refused_before_the_work(server):
    """Each of these was parsed or decoded in full first: a 500 from numpy, seconds of the event loop,
    or minutes decoding images the batch limit then refused."""
    from serving.settings import ServerSettings

    url = f"{server.url}/v2/models/{MODEL}/infer"

    def infer(body):
        return httpx.post(url, json=body, timeout=60)

    # numpy's 64-dimension limit was a 500
    r = infer({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1] * 65, "data": [0.5]}]})
    assert r.status_code == 400 and "at most 16 are accepted" in r.json()["error"], r.text
    # a batch above the admission limit: refused without decoding its images (these are not images)
    limit = ServerSettings.model_fields["queue_size"].default
    junk = base64.b64encode(b"not an image").decode()
    r = infer({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [limit + 1], "data": [junk] * (limit + 1)}]})
    assert r.status_code == 400 and f"a batch of {limit + 1} is more than this server admits" in r.json()["error"]
    # thousands of inputs: refused by count, not parsed one by one and listed by name
    many = [{"name": f"x{i}", "datatype": "FP32", "shape": [1], "data": [0.0]} for i in range(5000)]
    r = infer({"inputs": many})
    assert r.status_code == 400 and r.json()["error"] == "'inputs' holds 5000 tensors; at most 64 are accepted"
    # A batch above the limit is refused at its shape, before millions of elements are walked (5 million
    # nested [0] took 6.4 s of CPU and 600 MiB; as many empty BYTES elements in binary, 2.8 s).
    r = infer({"inputs": [{"name": "input", "datatype": "FP32", "shape": [200_000, 1], "data": [[0]] * 200_000}]})
    assert r.status_code == 400 and "input 'input': a batch of 200000 is more than" in r.json()["error"], r.text
    # More JSON values than the largest admitted batch holds: refused by a count of commas before
    # json.loads, which holds the GIL (and so the event loop) even in a worker thread.
    flat = b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [' + b"0," * 300_000
    r = httpx.post(url, content=flat + b"0]}]}", headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "JSON holds more than" in r.json()["error"], r.text
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [junk]}
    # A threshold list is counted before it is read (10 million took 4 s of the event loop).
    r = infer({"inputs": [image], "parameters": {"confidence": ",".join(["0.5"] * 100_000)}})
    assert r.status_code == 400 and "confidence has 100000 values" in r.json()["error"], r.text
    # A list where one value belongs is summarised in the error, not printed whole.
    r = infer({"inputs": [image], "parameters": {"exit": [1] * 100_000}})
    assert (
        r.status_code == 400
        and r.json()["error"] == "exit=[1, 1, 1, 1, ...] (100000 items) must be a string or an integer"
    )
    # Unknown parameters: ten named, the rest counted.
    r = infer({"inputs": [image], "parameters": {f"p{i:05}": 1 for i in range(1000)}})
    assert r.status_code == 400 and "p00009 and 990 more; accepted:" in r.json()["error"], r.text
    # An integer of more than 4,300 digits (Python's int_max_str_digits) anywhere in the JSON was a 500.
    r = httpx.post(url, content=b'{"id": ' + b"9" * 5000 + b', "inputs": []}', timeout=60)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"], r.text


def test_feedback_ids_from_oip_answers_are_accepted(client, server):
    result = client.infer(MODEL, [image_input(pngs([2]))], parameters={"exit": 1})
    (feedback_id,) = result.as_numpy("feedback_id")
    r = httpx.post(
        server.url + "/feedback", json={"id": feedback_id.decode(), "label": expected_label(2, 1)}, timeout=30
    )
    assert r.status_code == 200 and r.json()["correct"] is True and r.json()["exit"] == 1


def test_samples_of_one_call_share_the_batcher_and_the_metrics(client, server):
    n = 8
    requests_before = metric_sum(server.url, "eed_requests_total", exit="1", policy="exit", status="200")
    items_before = metric_sum(server.url, "eed_batch_size_sum", exit="1", graph="exit")
    batches_before = metric_sum(server.url, "eed_batch_size_count", exit="1", graph="exit")
    client.infer(MODEL, [image_input(pngs(range(n)))], parameters={"exit": 1})
    assert metric_sum(server.url, "eed_requests_total", exit="1", policy="exit", status="200") == requests_before + n
    assert metric_sum(server.url, "eed_batch_size_sum", exit="1", graph="exit") == items_before + n
    assert metric_sum(server.url, "eed_batch_size_count", exit="1", graph="exit") - batches_before < n
    # A call of n images refused after they were read counts n too, so error ratios weigh it as its
    # successes would (it counted once).
    failed_before = metric_sum(server.url, "eed_requests_total", exit="none", status="400")
    overflow = np.full((n, 1, 28, 28), 3e38, np.float32)  # finite input the network overflows on: a 400
    infer_error(client, [fp32_input(overflow, True)], parameters={"exit": 1})
    assert metric_sum(server.url, "eed_requests_total", exit="none", status="400") == failed_before + n


# --- errors ----------------------------------------------------------------------------------


def infer_error(client, inputs, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, inputs, **kwargs)
    return err.value


def test_bad_requests_are_400_with_the_reason(client):
    image = image_input(pngs([1]))
    cases = [
        (dict(inputs=[image], parameters={"exit": 7}), "1..3"),
        (dict(inputs=[image], parameters={"exit": 1, "confidence": 0.5}), "cannot be combined"),
        (dict(inputs=[image], parameters={"budget_gflops": 1e-9}), "cheapest"),
        (dict(inputs=[image], parameters={"budget": 1}), "unknown request parameter"),
        (dict(inputs=[image], parameters={"confidence": "high"}), "confidence"),
        (dict(inputs=[image], parameters={"budget_gflops": "0_5"}), "budget_gflops='0_5' is not a number"),
        (dict(inputs=[image], parameters={"exit": "1_0"}), "not an exit number"),
        (dict(inputs=[image], parameters={"budget_ms": "９"}), "not a number"),
        (dict(inputs=[image], parameters={"y" * 4000: 1}), "… (4000 characters)"),
        (dict(inputs=[fp32_input(np.zeros((2, 1, 14, 14), np.float32), True)]), "[N, 1, 28, 28]"),
        (dict(inputs=[fp32_input(np.zeros((2, 1, 28, 27), np.float32), False)]), "[N, 1, 28, 28]"),
        (dict(inputs=[image], outputs=[triton.InferRequestedOutput("logits")]), "unknown output"),
        (dict(inputs=[image_input([pngs([1])[0], b"not an image"])]), "image 1:"),
        # finite input that overflows inside the network: a bare NaN in the answer is not JSON
        (dict(inputs=[fp32_input(np.full((2, 1, 28, 28), 3e38, np.float32), False)]), "row(s) [0, 1] is not finite"),
    ]
    for kwargs, fragment in cases:
        err = infer_error(client, **kwargs)
        assert err.status() == "400" and fragment in err.message(), (kwargs, err)
    wrong_type = triton.InferInput("input", [1, 1, 28, 28], "FP64")
    wrong_type.set_data_from_numpy(np.zeros((1, 1, 28, 28)))
    err = infer_error(client, [wrong_type])
    assert err.status() == "400" and "FP32" in err.message()
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("another-model", [image])
    assert unknown.value.status() == "404"


def test_protocol_paths_answer_errors_in_the_protocols_shape(server):
    """A wrong method or path under /v2 answers {"error": "<message>"}, as every other error there."""
    r = httpx.get(f"{server.url}/v2/models/{MODEL}/infer", timeout=10)
    assert r.status_code == 405 and "POST" in r.headers["allow"] and list(r.json()) == ["error"], r.text
    assert "Method Not Allowed" in r.json()["error"]
    r = httpx.get(f"{server.url}/v2/nothing", timeout=10)
    assert r.status_code == 404 and r.json() == {"error": "no route GET /v2/nothing; see /docs for the API"}


@pytest.mark.parametrize(
    "body, headers, fragment",
    [
        (b"{not json", {}, "not valid JSON"),
        (b"[]", {}, "JSON object"),
        (json.dumps({"inputs": []}).encode(), {}, "non-empty"),
        (
            json.dumps(
                {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0]}]}
            ).encode(),
            {},
            "784 elements",
        ),
        (
            json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}).encode(),
            {},
            "base64",
        ),
        (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "input",
                            "datatype": "FP32",
                            "shape": [1, 1, 28, 28],
                            "parameters": {"binary_data_size": 3136},
                        }
                    ]
                }
            ).encode(),
            {"Inference-Header-Content-Length": "x"},
            "not a plain decimal integer",
        ),
        (  # int() reads '+10' as 10; the OpenAPI pattern (and the README) say digits
            json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [0]}]}).encode(),
            {"Inference-Header-Content-Length": "+10"},
            "not a plain decimal integer",
        ),
        # Not an object where the schema says object: read as no parameters before.
        (
            json.dumps({"parameters": [], "inputs": [{"name": "image", "datatype": "BYTES", "shape": [0]}]}).encode(),
            {},
            "'parameters' must be an object",
        ),
        (
            json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [0], "parameters": 0}]}).encode(),
            {},
            "'parameters' must be an object",
        ),
        # The input's own fault before its size: it was 'a batch of 394 is more than this server admits'.
        (
            json.dumps(
                {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [394], "data": [0] * 394}]}
            ).encode(),
            {},
            "input 'image' must be BYTES, got UINT8",
        ),
        (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "input",
                            "datatype": "FP32",
                            "shape": [1, 1, 28, 28],
                            "parameters": {"binary_data_size": 3136},
                        }
                    ]
                }
            ).encode()
            + b"\0" * 10,
            {"Inference-Header-Content-Length": "LEN"},
            "runs past the end",
        ),
        (
            json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}).encode(),
            {},
            "expected exactly one input",
        ),
        # No elements, but a shape no array can have: it was a 500 from numpy's reshape.
        (
            json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2**63, 0], "data": []}]}).encode(),
            {},
            "has a dimension above",
        ),
        # A JSON integer beyond any float: a 500 (OverflowError) before the non-finite check.
        (
            b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [1'
            + b"0" * 400
            + b", "
            + b", ".join([b"0"] * 783)
            + b"]}]}",
            {},
            "not finite",
        ),
    ],
)
def test_malformed_bodies_are_400_json_errors(server, body, headers, fragment):
    headers = {k: (str(len(body) - 10) if v == "LEN" else v) for k, v in headers.items()}
    r = httpx.post(
        f"{server.url}/v2/models/{MODEL}/infer",
        content=body,
        timeout=30,
        headers={"Content-Type": "application/json", **headers},
    )
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"} and fragment in r.json()["error"]


def test_what_clients_send_for_what_they_leave_unset_is_accepted(client, server):
    """Triton's client sends timeout/priority from its own arguments (hints a server may ignore: they
    were a 400 for every call); pydantic-built clients send null for unset fields; an empty
    'outputs' names none, so all are returned, as when it is absent."""
    image = image_input(pngs([1]))
    result = client.infer(MODEL, [image], parameters={"exit": 1}, timeout=5_000_000, priority=1)
    assert result.as_numpy("label")[0] == expected_label(1, 1)
    err = infer_error(client, [image], sequence_id=5)
    assert err.status() == "400" and "stateless" in err.message()
    pixels = np.zeros((1, 1, 28, 28), np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": pixels.ravel().tolist()}]}
    for extra in ({"id": None, "parameters": None, "outputs": None}, {"outputs": []}):
        r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json={**body, **extra}, timeout=30)
        assert r.status_code == 200, r.text
        assert [o["name"] for o in r.json()["outputs"]] == list(OUTPUTS)


def test_the_server_keeps_answering_after_bad_requests(client, server):
    test_bad_requests_are_400_with_the_reason(client)
    assert client.is_server_ready()
    result = client.infer(MODEL, [image_input(pngs([4]))], parameters={"exit": 2})
    assert result.as_numpy("label")[0] == expected_label(4, 2)
    assert metric_sum(server.url, "eed_requests_total", status="500") == 0


def test_a_second_name_as_kserve_clients_address_the_model(tmp_path):
    """EED_MODEL_NAME (KServe's runtime passes the InferenceService's name): the v2 routes answer to
    it and to the manifest's name, answers name the model as the request did, and feedback ids from
    either are accepted (they carry the manifest's name)."""
    model = build_model_folder(tmp_path / "model", name=MODEL)
    with ServerProcess(model, "--intra-op-threads", "1", "--model-name", "my-isvc", tmp_dir=tmp_path / "srv") as srv:
        c = triton.InferenceServerClient(srv.url.removeprefix("http://"), network_timeout=60.0)
        try:
            assert c.is_model_ready("my-isvc") and c.is_model_ready(MODEL) and not c.is_model_ready("other")
            assert c.get_model_metadata("my-isvc")["name"] == "my-isvc"
            assert c.get_model_config("my-isvc")["name"] == "my-isvc"
            for name in ("my-isvc", MODEL):
                result = c.infer(name, [image_input(pngs([3]))], parameters={"exit": 2})
                assert result.get_response()["model_name"] == name
                assert result.as_numpy("label").tolist() == [expected_label(3, 2)]
                (feedback_id,) = result.as_numpy("feedback_id")
                r = httpx.post(
                    srv.url + "/feedback", json={"id": feedback_id.decode(), "label": expected_label(3, 2)}, timeout=30
                )
                assert r.status_code == 200 and r.json()["correct"] is True
            with pytest.raises(InferenceServerException) as err:
                c.get_model_metadata("other")
            assert err.value.status() == "404" and "my-isvc" in err.value.message() and MODEL in err.value.message()
        finally:
            c.close()
        spec = httpx.get(srv.url + "/openapi.json", timeout=30).json()
        (name_param,) = [
            p for p in spec["paths"]["/v2/models/{name}/infer"]["post"]["parameters"] if p["name"] == "name"
        ]
        assert name_param["schema"]["enum"] == [MODEL, "my-isvc"]


def test_a_second_name_must_be_one_path_segment():
    from pydantic import ValidationError

    from serving.settings import ServerSettings

    for bad in ("a/b", "", "has space", "..", "."):  # not a path segment of its own
        with pytest.raises(ValidationError, match="model_name"):
            ServerSettings(model_dir=".", model_name=bad)


def test_a_bytes_tensor_of_millions_of_empty_elements_is_refused_before_they_are_split():
    """The batch check reads the first dimension only: shape [1, 5000000] of empty binary elements
    passed it and was split a Python step per element (4.8 s holding the GIL) before a 400."""
    import time

    from serving.errors import BadRequest
    from serving.tensors import decode_request

    n = 5_000_000
    head = json.dumps(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, n], "parameters": {"binary_data_size": 4 * n}}]}
    ).encode()
    started = time.process_time()
    with pytest.raises(BadRequest, match=r"shape \[1, 5000000\] holds 5000000 BYTES elements .*a batch of 5000000"):
        decode_request(head + bytes(4 * n), str(len(head)), 256, 256 * 784 + 4096, {"image": "BYTES"})
    assert time.process_time() - started < 0.2
    # in JSON too, before its elements are walked
    flat = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2, 150], "data": [""] * 300}]})
    with pytest.raises(BadRequest, match="holds 300 BYTES elements"):
        decode_request(flat.encode(), None, 256, 256 * 784 + 4096, {"image": "BYTES"})


def test_nested_empty_lists_are_refused_before_json_reads_them():
    """Empty and one-item lists hold no comma: 20 MiB of them is 10 million lists for json.loads."""
    import time

    from serving.errors import BadRequest
    from serving.tensors import decode_request

    nested = b"[" * 500 + b"]" * 500
    body = b'{"inputs": [], "x": [' + b",".join([nested] * 450) + b"]}"
    started = time.process_time()
    with pytest.raises(BadRequest, match=r"more than 204800 lists and objects"):
        decode_request(body, None, 256, 256 * 784 + 4096, {"image": "BYTES"})
    assert time.process_time() - started < 0.1
    # a full batch of nested data is not refused for its lists (one per row of values)
    rows = [[[[0.5] * 28] * 28] for _ in range(256)]
    full = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [256, 1, 28, 28], "data": rows}]})
    assert decode_request(full.encode(), None, 256, 256 * 784 + 4096, {"input": "FP32"}).inputs[0].data.shape[0] == 256


def test_an_integer_beyond_a_float_is_a_400_not_a_500(server):
    body = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(pngs([1])[0]).decode()]}
        ],
        "parameters": {"budget_ms": 10**400},
    }
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=json.dumps(body), timeout=60)
    assert r.status_code == 400 and "budget_ms" in r.json()["error"] and "finite" in r.json()["error"], r.text


@pytest.mark.parametrize(
    "value, message",
    [
        ("NaN", "holds NaN or Infinity; send finite numbers"),
        ("-Infinity", "holds NaN or Infinity"),
        ("1e39", "beyond the range of FP32"),
        ("1" + "0" * 400, "beyond the range of FP32"),
    ],
)
def test_non_finite_fp32_input_is_refused_with_what_was_wrong(value, message):
    from serving.errors import BadRequest
    from serving.tensors import decode_request

    body = '{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 1, 2], "data": [0.5, VALUE]}]}'
    body = body.replace("VALUE", value)
    with pytest.raises(BadRequest, match=message):
        decode_request(body.encode(), None, 256, 256 * 784 + 4096, {"input": "FP32"})


FAULTS = """
import os, time
import numpy as np
import onnxruntime

_run = onnxruntime.InferenceSession.run


def run(self, output_names, feeds, *args, **kwargs):
    # Inputs marked by their first value: 7 takes 1 s in "ONNX Runtime", 8 fails there.
    for value in feeds.values():
        mark = float(np.asarray(value).flat[0]) if np.asarray(value).size else 0.0
        if mark in (7.0, 8.0):
            with open(os.environ["EED_TEST_RUN_LOG"], "a") as log:
                log.write(f"{mark:g}\\n")
            if mark == 8.0:
                raise RuntimeError("injected failure")
            time.sleep(1.0)
    return _run(self, output_names, feeds, *args, **kwargs)


onnxruntime.InferenceSession.run = run
"""


def test_a_failed_image_stops_the_rest_of_its_call_before_their_slots_are_released(tmp_path):
    # One image of a call failing in ONNX Runtime failed the call at once while its other images
    # went on queueing and running with their admission slots already released: each such call let
    # up to N - 1 requests more into the model than EED_QUEUE_SIZE. Now the rest are stopped first.
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(FAULTS)
    log = tmp_path / "runs.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), str(ROOT)]), "EED_TEST_RUN_LOG": str(log)}
    model = build_model_folder(tmp_path / "model", name=MODEL)
    args = ("--max-batch-size", "1", "--inline-max-ms", "0", "--intra-op-threads", "1")
    with ServerProcess(model, *args, tmp_dir=tmp_path, env=env, block_torch=False) as srv:
        marks = [7.0, 8.0, 7.0, 7.0]  # one batch each, in this order: slow, failing, two more slow
        data = np.stack([np.full((1, 28, 28), m, dtype=np.float32) for m in marks]).ravel().tolist()
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [4, 1, 28, 28], "data": data}]}
        r = httpx.post(f"{srv.url}/v2/models/{MODEL}/infer", json=body, timeout=60)
        assert r.status_code == 500, r.text
        time.sleep(2.5)  # time for the images after the failure to run, were they still queued
        runs = log.read_text().split()
        # A batch already handed to ONNX Runtime when the failure came finishes (a run cannot be
        # interrupted); the images still queued are dropped: the last one never runs.
        assert runs[:2] == ["7", "8"] and len(runs) <= 3, runs
        text = httpx.get(srv.url + "/metrics", timeout=10).text
        assert re.search(r"^eed_admitted_requests(\{[^}]*\})? 0\.0$", text, re.M), text
