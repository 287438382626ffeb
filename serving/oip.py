"""Open Inference Protocol v2 (KServe / Triton REST) on the same app as ``/classify``.

Routes: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}``,
``/v2/models/{name}/ready``, ``/v2/models/{name}/config`` (Triton's model configuration
extension), ``POST /v2/models/{name}/infer``; ``{name}`` is the
manifest's ``name``; the model routes also under ``/v2/models/{name}/versions/1/...``.
An infer call carries a batch of N samples as one input:

* ``input`` — FP32 ``[N, C, H, W]``, already preprocessed as the manifest's ``input`` says;
* ``image`` — BYTES ``[N]``, encoded image files (base64 strings when sent as JSON).

Request ``parameters`` carry the policy, with the same names and meaning as the query
parameters of ``/classify`` (``budget_gflops``, ``budget_ms``, ``confidence``, ``exit``,
``policy``), parsed by the same function. Each sample is one request of the inference
service: admitted, batched with everything else in flight (``/classify`` included),
counted in the same metrics. Outputs: ``probabilities`` FP32 ``[N, classes]``,
``label`` INT64 ``[N]``, ``exit`` INT32 ``[N]``, ``gflops`` FP32 ``[N]`` and
``feedback_id`` BYTES ``[N]`` (the signed ids ``POST /feedback`` takes). Errors are
``{"error": "..."}`` as the protocol says.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from . import buildinfo
from .body import read_limited, within
from .errors import (
    OIP_PREFIX,
    BadRequest,
    InvalidParameters,
    NotReady,
    ServingError,
    UnknownModel,
    listed,
    shown,
    shut_down,
)
from .imageheader import declared_pixels
from .images import decode_off_loop
from .policy import POLICY_KEYS, effective_params, params_from_request
from .service import InferenceService
from .state import AppState, State, arrived_at, state_of
from .tensors import BYTES, HEADER_LENGTH, InferRequest, batch_refusal, decode_request, encode_response

SERVER_NAME = "eed-anytime"
EXTENSIONS = ["binary_tensor_data", "parameters", "model_configuration"]
MODEL_VERSION = "1"
FP32_INPUT, IMAGE_INPUT = "input", "image"
INPUT_DATATYPES = {FP32_INPUT: "FP32", IMAGE_INPUT: BYTES}  # preprocessed pixels, encoded image files
OUTPUTS: dict[str, tuple[str, list[int | str]]] = {  # name → (datatype, shape: -1 the batch, "K" the classes)
    "probabilities": ("FP32", [-1, "K"]),
    "label": ("INT64", [-1]),
    "exit": ("INT32", [-1]),
    "gflops": ("FP32", [-1]),
    "feedback_id": (BYTES, [-1]),
}
router = APIRouter(prefix=OIP_PREFIX, tags=["Open Inference Protocol v2"])


def oip_error(exc: ServingError) -> JSONResponse:
    """The protocol's error body: ``{"error": "..."}``. Client errors the protocol has no
    code for (415, 422) are 400; 404, 408, 413 and 503 keep theirs."""
    status = exc.status_code if exc.status_code in (404, 408, 413, 503) or exc.status_code >= 500 else 400
    return JSONResponse(exc.oip_body(), status_code=status, headers=exc.headers)


def served_names(manifest_name: str, alias: str | None) -> list[str]:
    """The names the ``/v2/models/{name}`` routes answer to: the manifest's, and EED_MODEL_NAME's
    (KServe's clients address the InferenceService's name)."""
    return [manifest_name] if alias in (None, manifest_name) else [manifest_name, alias]


def _served(state: AppState, name: str) -> InferenceService:
    """The service, if ``name`` is a name of the model served and it is ready. Answers name the model
    as the request did."""
    service = state.require_service()
    names = served_names(service.runtime.manifest.name, state.settings.model_name)
    if name not in names:
        raise UnknownModel(f"no model named {shown(name)}; this server serves {' or '.join(map(repr, names))}")
    return service


def _ready_or_raise(state: AppState) -> None:
    if state.draining:
        raise NotReady("the server is draining before it shuts down")


def _not_ready(exc: ServingError) -> JSONResponse:
    """A readiness answer of false: the protocol's health calls say true with 200 and false with a
    4xx (Triton's 400), where every other route's NotReady is a 503."""
    if isinstance(exc, NotReady):
        return JSONResponse(exc.oip_body(), status_code=400)
    return oip_error(exc)


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": buildinfo.package_version(), "extensions": EXTENSIONS}


@router.get("/health/live", summary="Server liveness")
async def server_live() -> dict[str, Any]:
    return {"live": True}


@router.get("/health/ready", summary="Server readiness: the model is loaded and warm, no drain under way")
async def server_ready(state: State) -> Response:
    try:
        _ready_or_raise(state)
        state.require_service()
    except ServingError as exc:
        return _not_ready(exc)
    return JSONResponse({"ready": True})


@router.get("/models/{name}", summary="Model metadata")
async def model_metadata(name: str, state: State) -> Response:
    try:
        service = _served(state, name)
    except ServingError as exc:
        return oip_error(exc)
    manifest = service.runtime.manifest
    spec = manifest.input
    classes = len(manifest.classes)
    outputs = [
        {"name": n, "datatype": dt, "shape": [classes if d == "K" else d for d in shape]}
        for n, (dt, shape) in OUTPUTS.items()
    ]
    return JSONResponse(
        {
            "name": name,
            "versions": [MODEL_VERSION],
            "platform": "onnxruntime_onnx",
            "inputs": [
                {"name": FP32_INPUT, "datatype": "FP32", "shape": [-1, spec.channels, spec.height, spec.width]},
                {"name": IMAGE_INPUT, "datatype": BYTES, "shape": [-1]},
            ],
            "outputs": outputs,
        }
    )


# Triton's data types for the protocol's (model configuration extension).
TRITON_TYPES = {"FP32": "TYPE_FP32", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", BYTES: "TYPE_STRING"}


@router.get("/models/{name}/config", summary="Model configuration (Triton's model configuration extension)")
async def model_config(name: str, state: State) -> Response:
    """The model as a Triton model configuration: what ``tritonclient``'s ``get_model_config``
    and tools built on it (perf_analyzer, model analyzer) read. Per-sample tensors: the batch
    axis is implied by ``max_batch_size`` (the most samples one call may carry, EED_QUEUE_SIZE);
    per-sample scalars have ``dims [1]`` reshaped to ``[]``, as Triton writes them: an ``image``
    sent as ``[N, 1]`` (what such a config asks of a client) is answered with per-sample outputs
    of ``[N, 1]``, one sent as ``[N]`` (the metadata's form) with ``[N]``."""
    try:
        service = _served(state, name)
    except ServingError as exc:
        return oip_error(exc)
    manifest, settings = service.runtime.manifest, state.settings
    spec = manifest.input
    scalar = {"dims": [1], "reshape": {"shape": []}}
    outputs = [
        {"name": n, "data_type": TRITON_TYPES[dt], **({"dims": [len(manifest.classes)]} if "K" in shape else scalar)}
        for n, (dt, shape) in OUTPUTS.items()
    ]
    return JSONResponse(
        {
            "name": name,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "version_policy": {"specific": {"versions": [MODEL_VERSION]}},
            "max_batch_size": settings.queue_size,
            "input": [
                {
                    "name": FP32_INPUT,
                    "data_type": "TYPE_FP32",
                    "format": "FORMAT_NCHW",
                    "dims": [spec.channels, spec.height, spec.width],
                    "optional": True,
                },
                {"name": IMAGE_INPUT, "data_type": "TYPE_STRING", **scalar, "optional": True},
            ],
            "output": outputs,
            "dynamic_batching": {
                "preferred_batch_size": [settings.max_batch_size],
                "max_queue_delay_microseconds": round(settings.max_wait_ms * 1000),
            },
            "parameters": {
                "exits": {"string_value": str(manifest.num_exits)},
                "classes": {"string_value": ",".join(manifest.classes)},
            },
        }
    )


@router.get("/models/{name}/ready", summary="Model readiness")
async def model_ready(name: str, state: State) -> Response:
    try:
        _served(state, name)  # an unknown model is a 404 while draining too
        _ready_or_raise(state)
    except ServingError as exc:
        return _not_ready(exc)
    return JSONResponse({"name": name, "ready": True})


@router.post("/models/{name}/infer", summary="Inference on a batch of N images or preprocessed inputs")
async def infer(name: str, request: Request) -> Response:
    arrived = arrived_at(request)
    state = state_of(request)  # not a dependency: the hot path skips FastAPI's solving (serving/state.py)
    metrics = state.metrics
    # Counted per image, answered or not, so that error ratios over eed_requests_total weigh a
    # failed call of N images as N (successes were counted N times, failures once); a call that
    # fails before its images are read counts once.
    policy_label, status, exits, images = "none", 500, [], 1
    try:
        service = _served(state, name)
        settings = state.settings
        body = await _read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        header_length = request.headers.get(HEADER_LENGTH)
        # A large body is parsed off the event loop (9 MB of JSON numbers held it for 1.5 s).
        spec = service.runtime.manifest.input
        # Every value of the largest batch admitted, and room for the rest of the request.
        max_values = service.queue_size * spec.channels * spec.height * spec.width + 4096
        req = await decode_off_loop(
            len(body), lambda: decode_request(body, header_length, service.queue_size, max_values, INPUT_DATATYPES)
        )
        params = effective_params(_policy_params(req.parameters), state.default_params, settings.default_budget_ms)
        plan = service.plan(params)
        policy_label = params.name  # once valid: a refused policy name must not become a label value
        requested = _requested_outputs(req)
        _, preprocess = state.require_model()
        xs = await _samples(req, preprocess, service.runtime.manifest.input, service.queue_size)
        images = len(xs)
        deadline = None if plan.budget_ms is None else arrived + plan.budget_ms / 1e3
        with contextlib.ExitStack() as stack:
            tickets = [stack.enter_context(service.admit()) for _ in xs]
            runs = [asyncio.ensure_future(service.run(x, plan, t, deadline)) for x, t in zip(xs, tickets)]
            try:
                outcomes = await asyncio.gather(*runs)
            except BaseException:
                # gather raises the first failure and leaves the other images running: their slots
                # would be released below while they still queue and run (a failed call of N images
                # let N - 1 more requests in than EED_QUEUE_SIZE). Stop them before the slots go.
                for run in runs:
                    run.cancel()
                await asyncio.gather(*runs, return_exceptions=True)
                raise
        elapsed = time.perf_counter() - arrived
        for outcome in outcomes:  # late by the call's own work (the other samples, decoding)
            outcome.answered_at(arrived + elapsed, deadline)
        overflowed = [i for i, o in enumerate(outcomes) if not np.all(np.isfinite(o.logits))]
        if overflowed:  # only FP32 input can do this: decoded images lie in the training range
            raise BadRequest(
                f"the model's output for input row(s) {overflowed} is not finite (NaN or infinity): "
                f"its values overflow float32 inside the network; send {FP32_INPUT!r} preprocessed "
                "like the training images (pixels scaled to [0, 1], then normalized with the "
                "manifest's mean and std)"
            )
        manifest = service.runtime.manifest
        labels = [int(np.argmax(o.probs)) for o in outcomes]
        values: dict[str, np.ndarray | list[bytes]] = {
            "probabilities": np.stack([o.probs for o in outcomes]).astype(np.float32),
            "label": np.asarray(labels, dtype=np.int64),
            "exit": np.asarray([o.exit for o in outcomes], dtype=np.int32),
            "gflops": np.asarray([o.gflops for o in outcomes], dtype=np.float32),
            "feedback_id": [
                state.signer.issue(manifest.name, o.exit, label).encode() for o, label in zip(outcomes, labels)
            ],
        }
        if req.inputs[0].name == IMAGE_INPUT and req.inputs[0].shape[1:] == [1]:
            # Triton's form of per-sample scalars (/config: dims [1] reshaped to []) in, the same out.
            for n, (datatype, shape) in OUTPUTS.items():
                if shape == [-1]:  # a BYTES list becomes an object array, which keeps its shape
                    values[n] = np.asarray(values[n], dtype=object if datatype == BYTES else None).reshape(-1, 1)
        for outcome in outcomes:
            metrics.record_answer(outcome, policy_label, elapsed)
        status, exits = 200, [o.exit for o in outcomes]
        header: dict[str, Any] = {
            "model_name": name,
            "model_version": MODEL_VERSION,
            "parameters": {"policy": policy_label},
        }
        if req.id is not None:
            header["id"] = req.id
        deadlines = [o.deadline_met for o in outcomes if o.deadline_met is not None]
        if deadlines:
            header["parameters"]["deadline_met"] = all(deadlines)
        content, headers = encode_response(header, [(n, OUTPUTS[n][0], values[n]) for n in requested], requested)
        return Response(content, headers=headers)
    except ServingError as exc:
        status = exc.status_code
        return oip_error(exc)
    except asyncio.CancelledError:  # the graceful shutdown gave up on it: a 503, not uvicorn's bare 500
        error = shut_down()
        status = error.status_code
        return oip_error(error)
    finally:
        if exits:
            for number in exits:
                metrics.count_request(str(number), policy_label, str(status))
        else:
            metrics.count_request("none", policy_label, str(status), images)
        request.state.policy = policy_label
        request.state.exit = ",".join(map(str, exits)) if exits else "none"


# The protocol's versioned paths (what a client sends when it names a model version): this
# server has one version of its one model, MODEL_VERSION.


def _wrong_version(version: str) -> Response | None:
    """The protocol's 404 for a version other than MODEL_VERSION; None for the served one."""
    if version == MODEL_VERSION:
        return None
    return oip_error(UnknownModel(f"no version {shown(version)} of this model; the one served is {MODEL_VERSION!r}"))


@router.get("/models/{name}/versions/{version}", summary="Model metadata (versioned path)")
async def model_version_metadata(name: str, version: str, state: State) -> Response:
    return _wrong_version(version) or await model_metadata(name, state)


@router.get("/models/{name}/versions/{version}/config", summary="Model configuration (versioned path)")
async def model_version_config(name: str, version: str, state: State) -> Response:
    return _wrong_version(version) or await model_config(name, state)


@router.get("/models/{name}/versions/{version}/ready", summary="Model readiness (versioned path)")
async def model_version_ready(name: str, version: str, state: State) -> Response:
    return _wrong_version(version) or await model_ready(name, state)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference (versioned path)")
async def model_version_infer(name: str, version: str, request: Request) -> Response:
    return _wrong_version(version) or await infer(name, request)


async def _read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body within the read deadline, before anything is admitted (as /classify)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise BadRequest(f"Content-Encoding {encoding} is not supported; send the request uncompressed")
    advice = (
        "send fewer images per call, or the images encoded (BYTES 'image') or as binary tensor data "
        "rather than JSON numbers"
    )
    return await within(read_limited(request, max_bytes, advice), timeout_s)


# Request parameters Triton's clients set from their own arguments (tritonclient's ``infer(...,
# timeout=, priority=, sequence_id=, ...)``), reserved by Triton's schedule-policy and sequence
# extensions. A timeout and a priority are hints a server may ignore: this one schedules first come
# first served, and a deadline is ``budget_ms``. A sequence only makes sense for a stateful model.
IGNORED_TRITON_PARAMETERS = ("timeout", "priority")
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


def _policy_params(parameters: dict[str, Any]):
    parameters = {k: v for k, v in parameters.items() if k not in IGNORED_TRITON_PARAMETERS}
    for key in SEQUENCE_PARAMETERS:
        value = parameters.pop(key, None)
        if value not in (None, 0, False, ""):
            raise InvalidParameters(
                f"parameter {key}={shown(value)}: this model is stateless (no sequence batching); "
                "send requests without a sequence"
            )
    unknown = [key for key in parameters if key not in POLICY_KEYS]
    if unknown:
        names = listed(unknown)
        raise InvalidParameters(
            f"unknown request parameter(s) {names}; accepted: {', '.join(POLICY_KEYS)}, binary_data_output "
            f"(and Triton's {', '.join(IGNORED_TRITON_PARAMETERS)}, ignored)"
        )
    for key, value in parameters.items():
        if isinstance(value, (bool, dict)) or value is None:
            raise InvalidParameters(f"parameter {key}={shown(value)}: expected a number or a string")
    return params_from_request(parameters)


def _requested_outputs(req: InferRequest) -> dict[str, bool]:
    """Output name → binary?, in the order the client asked (all outputs when it named none)."""
    if req.outputs is None:
        return {name: req.binary_default for name in OUTPUTS}
    requested: dict[str, bool] = {}
    for out in req.outputs:
        if out.name not in OUTPUTS:
            raise BadRequest(f"unknown output {shown(out.name)}; this model has {', '.join(OUTPUTS)}")
        requested[out.name] = out.binary
    return requested


async def _samples(req: InferRequest, preprocess, spec, max_batch: int) -> list[np.ndarray]:
    """The N model inputs (C, H, W) of the request; N above ``max_batch`` is refused before any
    image is decoded (300 small images that each decode to 4096² ran for minutes first)."""
    if len(req.inputs) != 1 or req.inputs[0].name not in (FP32_INPUT, IMAGE_INPUT):
        names = shown([t.name for t in req.inputs])
        raise BadRequest(
            f"expected exactly one input, {FP32_INPUT!r} (FP32 [N, C, H, W], preprocessed) or "
            f"{IMAGE_INPUT!r} (BYTES [N], encoded images); got {names}"
        )
    tensor = req.inputs[0]
    if tensor.shape and tensor.shape[0] > max_batch:  # decode_request refuses it too, before the data
        raise BadRequest(batch_refusal(tensor.shape[0], max_batch))
    # Its datatype is INPUT_DATATYPES' (decode_request refused any other, before the data).
    if tensor.name == FP32_INPUT:
        expected = [spec.channels, spec.height, spec.width]
        if len(tensor.shape) != 4 or tensor.shape[1:] != expected or tensor.shape[0] < 1:
            raise BadRequest(
                f"input {FP32_INPUT!r} must have shape [N, {', '.join(map(str, expected))}] with "
                f"N >= 1, got {tensor.shape}"
            )
        if not np.all(np.isfinite(tensor.data)):
            raise BadRequest(f"input {FP32_INPUT!r} holds NaN or infinite values")
        return [np.ascontiguousarray(x, dtype=np.float32) for x in tensor.data]
    # [N] as the metadata says, or [N, 1] as /config's dims [1] (reshaped to []) tell Triton's clients.
    if tensor.shape[1:] not in ([], [1]) or not tensor.shape or tensor.shape[0] < 1:
        raise BadRequest(f"input {IMAGE_INPUT!r} must have shape [N] or [N, 1] with N >= 1, got {tensor.shape}")
    images: list[bytes] = tensor.data

    def decode_all() -> list[np.ndarray]:
        return [_decode_one(preprocess, i, data) for i, data in enumerate(images)]

    declared = [declared_pixels(d) for d in images]
    pixels = None if None in declared else sum(p or 0 for p in declared)
    return await decode_off_loop(sum(len(d) for d in images), decode_all, pixels)


def _decode_one(preprocess, index: int, data: bytes) -> np.ndarray:
    try:
        return preprocess(data, None)
    except ServingError as exc:  # say which image of the batch was wrong
        exc.detail = f"image {index}: {exc.detail}"
        raise
