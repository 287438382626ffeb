"""Open Inference Protocol v2 tensors: JSON and the binary tensor data extension.

An inference request is a JSON object; with the binary extension (what ``tritonclient``
sends by default) the body is that JSON — its length in the
``Inference-Header-Content-Length`` header — followed by the raw bytes of every input
whose ``parameters.binary_data_size`` is set, in input order. Fixed-size types are
little-endian, row-major; BYTES elements are each a 4-byte little-endian length and
the bytes. Responses mirror that: an output is binary when its request asked
``binary_data: true`` (or the request set ``binary_data_output: true``), and then the
response carries the header too.

In JSON, BYTES elements are strings; since encoded image files are not text, this
server takes BYTES *inputs* given in JSON as base64 strings.

Pure functions over bytes and numpy arrays; every malformed request raises
:class:`~serving.errors.BadRequest` with what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import BadRequest, shown

HEADER_LENGTH = "Inference-Header-Content-Length"

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
BYTES = "BYTES"
# A request may hold at most this many elements per tensor: bounds what a tiny JSON body
# like {"shape": [1e9]} could make the server allocate (the body limit bounds the rest).
MAX_ELEMENTS = 1 << 28
# numpy refuses arrays of more than 64 dimensions (a 500 before this limit); no model input has 16.
MAX_DIMENSIONS = 16
# Tensors per request: a model takes a few. 250,000 inputs were parsed one by one on the event loop
# and their names listed in the error.
MAX_TENSORS = 64


@dataclass
class InputTensor:
    """One decoded input: a numpy array for fixed-size types, a list of bytes for BYTES."""

    name: str
    datatype: str
    shape: list[int]
    data: Any


@dataclass
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: every output
    binary_default: bool = False


def _fail(message: str) -> BadRequest:
    return BadRequest(message)


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _shape(raw: Any, where: str) -> list[int]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in raw):
        raise _fail(f"{where}: 'shape' must be a list of integers, got {shown(raw)}")
    if len(raw) > MAX_DIMENSIONS:
        raise _fail(f"{where}: 'shape' has {len(raw)} dimensions; at most {MAX_DIMENSIONS} are accepted")
    if any(d < 0 for d in raw):
        raise _fail(f"{where}: 'shape' {raw} has a negative dimension")
    if any(d > MAX_ELEMENTS for d in raw):  # [2**63, 0] has 0 elements but no array can have that shape
        raise _fail(f"{where}: 'shape' {raw} has a dimension above {MAX_ELEMENTS}")
    if math.prod(raw) > MAX_ELEMENTS:
        raise _fail(f"{where}: 'shape' {raw} has more than {MAX_ELEMENTS} elements")
    return raw


def _flatten(data: Any, shape: list[int], where: str) -> list:
    """Row-major elements of a flat JSON list, or of nested lists that match ``shape`` exactly.

    Nested data is the shape spelled out; lists of uneven length ([[1, 2, 3], [4]] for [2, 2])
    or of another depth are refused rather than read as the flat list they happen to hold.
    """
    if not isinstance(data, list):
        raise _fail(f"{where}: 'data' must be a JSON list")
    if not any(isinstance(item, list) for item in data):
        return data
    out: list = []
    innermost = len(shape) - 1

    def walk(node: Any, depth: int, path: str) -> None:
        if not isinstance(node, list) or depth > innermost or len(node) != shape[depth]:
            found = f"{len(node)} elements" if isinstance(node, list) else "a scalar"
            wanted = f"{shape[depth]} elements" if depth <= innermost else "a scalar"
            raise _fail(
                f"{where}: nested 'data' does not match shape {shape}: data{path} is {found}, the shape "
                f"says {wanted} (nest it exactly as the shape, or send it flat in row-major order)"
            )
        if depth == innermost:
            if any(isinstance(item, list) for item in node):
                raise _fail(f"{where}: nested 'data' is deeper than shape {shape} at data{path}")
            out.extend(node)
            return
        for i, child in enumerate(node):
            walk(child, depth + 1, f"{path}[{i}]")

    walk(data, 0, "")
    return out


def _split_bytes(raw: bytes, count: int, where: str) -> list[bytes]:
    """BYTES binary layout: each element is a 4-byte little-endian length and the bytes."""
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if len(items) == count:  # more than the shape says: no need to split millions of them first
            raise _fail(f"{where}: shape has {count} elements but the BYTES data holds more")
        if offset + 4 > len(raw):
            raise _fail(f"{where}: BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise _fail(f"{where}: a BYTES element says {length} bytes but only {len(raw) - offset} remain")
        items.append(raw[offset : offset + length])
        offset += length
    if len(items) != count:
        raise _fail(f"{where}: shape has {count} elements but the BYTES data holds {len(items)}")
    return items


def _json_bytes(elements: list, where: str) -> list[bytes]:
    items = []
    for i, element in enumerate(elements):
        if not isinstance(element, str):
            raise _fail(f"{where}: BYTES element {i} must be a base64 string in JSON, got {type(element).__name__}")
        try:
            items.append(
                base64.b64decode(element, altchars=b"-_" if ("-" in element or "_" in element) else None, validate=True)
            )
        except (binascii.Error, ValueError):
            raise _fail(
                f"{where}: BYTES element {i} is not valid base64 (JSON BYTES inputs are base64-encoded; "
                "or send them as binary data)"
            ) from None
    return items


def _optional(raw: dict, key: str, kind: type, where: str) -> Any:
    """``raw[key]`` when present and of ``kind``; None when absent or JSON null (clients built on
    pydantic models, MLServer's among them, send null for what they leave unset); a 400 otherwise —
    ``parameters: []`` or ``0`` was read as no parameters."""
    value = raw.get(key)
    if value is not None and not isinstance(value, kind):
        what = {"dict": "an object", "list": "a list", "str": "a string"}[kind.__name__]
        raise _fail(f"{where} must be {what} (or null), got {type(value).__name__}")
    return value


def _decode_input(
    raw: Any, index: int, binary: memoryview, offset: int, max_batch: int | None, datatypes: Mapping[str, str]
) -> tuple[InputTensor, int]:
    raw = _object(raw, f"inputs[{index}]")
    name = raw.get("name")
    where = f"input {shown(name)}" if isinstance(name, str) else f"inputs[{index}]"
    if not isinstance(name, str) or not name:
        raise _fail(f"{where}: 'name' must be a non-empty string")
    datatype = raw.get("datatype")
    if datatype != BYTES and datatype not in DTYPES:
        raise _fail(f"{where}: datatype {shown(datatype)} is not one of {', '.join([*DTYPES, BYTES])}")
    if name in datatypes and datatype != datatypes[name]:  # the input's own fault first, then its size
        raise _fail(f"{where} must be {datatypes[name]}, got {datatype}")
    shape = _shape(raw.get("shape"), where)
    count = math.prod(shape)
    # Refused before millions of elements are read. A BYTES element is one encoded image, split (binary)
    # or checked (JSON) a Python step each, so all of them count: a [1, 5000000] tensor of empty elements
    # passed a check of the first dimension alone and took 4.8 s.
    samples = count if datatype == BYTES else shape[0] if shape else 0
    if max_batch is not None and samples > max_batch:
        held = f"shape {shape} holds {count} BYTES elements (one image each); " if datatype == BYTES else ""
        raise _fail(f"{where}: {held}{batch_refusal(samples, max_batch)}")
    params = _optional(raw, "parameters", dict, f"{where}: 'parameters'") or {}
    if "shared_memory_region" in params:
        raise _fail(f"{where}: shared memory is not supported by this server; send the data in the request")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in raw:
            raise _fail(f"{where}: give either 'data' or parameters.binary_data_size, not both")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _fail(f"{where}: binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise _fail(
                f"{where}: binary_data_size {size} runs past the end of the body "
                f"({len(binary) - offset} binary bytes left)"
            )
        chunk = bytes(binary[offset : offset + size])
        offset += size
        if datatype == BYTES:
            data: Any = _split_bytes(chunk, count, where)
        else:
            dtype = DTYPES[datatype]
            if size != count * dtype.itemsize:
                raise _fail(
                    f"{where}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes, "
                    f"binary_data_size is {size}"
                )
            data = np.frombuffer(chunk, dtype=dtype).reshape(shape)
    else:
        if "data" not in raw:
            raise _fail(f"{where}: no 'data' and no parameters.binary_data_size")
        elements = _flatten(raw["data"], shape, where)
        if len(elements) != count:
            raise _fail(f"{where}: shape {shape} has {count} elements, 'data' has {len(elements)}")
        if datatype == BYTES:
            data = _json_bytes(elements, where)
        else:
            data = _json_numbers(elements, datatype, where).reshape(shape)
    return InputTensor(name, datatype, shape, data), offset


def _json_numbers(elements: list, datatype: str, where: str) -> np.ndarray:
    if datatype == "BOOL":
        if not all(isinstance(e, bool) for e in elements):
            raise _fail(f"{where}: BOOL data must be true/false")
        return np.asarray(elements, dtype=np.bool_)
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in elements):
        raise _fail(f"{where}: {datatype} data must be numbers")
    dtype = DTYPES[datatype]
    if dtype.kind in "iu":
        if not all(isinstance(e, int) for e in elements):
            raise _fail(f"{where}: {datatype} data must be integers")
        info = np.iinfo(dtype)
        if elements and (min(elements) < info.min or max(elements) > info.max):
            raise _fail(f"{where}: a value is outside the range of {datatype}")
        return np.asarray(elements, dtype=dtype)
    try:
        with np.errstate(over="ignore"):
            array = np.asarray(elements, dtype=dtype)
    except OverflowError:  # a JSON integer beyond any float (10**400): as a non-finite value
        raise _fail(f"{where}: a value is beyond the range of {datatype} (not finite once converted)") from None
    if not np.all(np.isfinite(array)):
        if not all(math.isfinite(e) for e in elements):  # NaN, Infinity: tokens Python's JSON reader takes
            raise _fail(f"{where}: {datatype} data holds NaN or Infinity; send finite numbers")
        raise _fail(f"{where}: a value is beyond the range of {datatype} (not finite once converted)")
    return array


def batch_refusal(batch: int, max_batch: int) -> str:
    """The words for a batch above what the server admits at once (EED_QUEUE_SIZE)."""
    return (
        f"a batch of {batch} is more than this server admits at once ({max_batch}, EED_QUEUE_SIZE); "
        "send smaller batches"
    )


def decode_request(
    body: bytes,
    header_length: str | None,
    max_batch: int | None = None,
    max_values: int | None = None,
    datatypes: Mapping[str, str] | None = None,
) -> InferRequest:
    """Parse an infer request body (JSON, or JSON + binary tensors when ``header_length`` is given).

    ``datatypes``: input name → the datatype the model takes there, checked before anything else
    about that input.

    ``max_batch``: an input whose first dimension is larger is refused before its data is read.
    ``max_values``: JSON holding more values than that (counted by its commas, in C) is refused
    before it is parsed: ``json.loads`` holds the GIL throughout, so even off the event loop a
    20 MiB body of 5 million numbers stopped every request for 2 s, and took 30x its size in memory.
    """
    if header_length is not None:
        # Digits only, as the OpenAPI pattern says (int() also reads '+10', ' 10' and '1_0').
        if not (header_length.isascii() and header_length.isdigit()):
            raise _fail(f"{HEADER_LENGTH} {shown(header_length)} is not a plain decimal integer")
        length = int(header_length)
        if not 0 < length <= len(body):
            raise _fail(f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes")
        head, binary = body[:length], memoryview(body)[length:]
    else:
        head, binary = body, memoryview(b"")
    if max_values is not None and head.count(b",") >= max_values:
        raise _fail(
            f"the request's JSON holds more than {max_values} values, more than a batch of {max_batch} inputs "
            "needs; send smaller batches, or the tensors as binary data"
        )
    # Lists and objects hold no comma when empty or of one item: 20 MiB of nested empty lists is 10
    # million of them for json.loads (holding the GIL, ~1 GB) and for the nested-data walk. A tensor's
    # nesting has one list per row of values, far fewer than its values.
    if max_values is not None and head.count(b"[") + head.count(b"{") >= max_values:
        raise _fail(
            f"the request's JSON holds more than {max_values} lists and objects, more than a batch of "
            f"{max_batch} inputs needs; send the data flat, in smaller batches, or as binary data"
        )
    try:
        raw = json.loads(head)
    # ValueError: also an integer of more than 4,300 digits (int_max_str_digits), a 500 before
    except (ValueError, RecursionError) as exc:
        hint = f" (binary tensors need the {HEADER_LENGTH} header)" if header_length is None else ""
        raise _fail(f"the inference request is not valid JSON: {exc}{hint}") from None
    raw = _object(raw, "the inference request")
    request_id = _optional(raw, "id", str, "'id'")
    parameters = _optional(raw, "parameters", dict, "'parameters'") or {}
    binary_default = parameters.pop("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise _fail("parameters.binary_data_output must be true or false")
    inputs_raw = raw.get("inputs")
    if not isinstance(inputs_raw, list) or not inputs_raw:
        raise _fail("'inputs' must be a non-empty list of tensors")
    if len(inputs_raw) > MAX_TENSORS:
        raise _fail(f"'inputs' holds {len(inputs_raw)} tensors; at most {MAX_TENSORS} are accepted")
    inputs, offset = [], 0
    for i, item in enumerate(inputs_raw):
        tensor, offset = _decode_input(item, i, binary, offset, max_batch, datatypes or {})
        inputs.append(tensor)
    if offset != len(binary):
        raise _fail(f"the body has {len(binary) - offset} binary bytes that no input's binary_data_size accounts for")
    names = [t.name for t in inputs]
    if len(set(names)) != len(names):
        raise _fail(f"input names must be unique, got {shown(names)}")
    outputs = None
    # An empty list names no output: all of them, as when it is absent (the protocol: "if not
    # specified all outputs produced by the model will be returned"; Triton does the same).
    if _optional(raw, "outputs", list, "'outputs'"):
        if len(raw["outputs"]) > MAX_TENSORS:
            raise _fail(f"'outputs' requests {len(raw['outputs'])} tensors; at most {MAX_TENSORS} are accepted")
        outputs = []
        for i, item in enumerate(raw["outputs"]):
            item = _object(item, f"outputs[{i}]")
            name = item.get("name")
            if not isinstance(name, str):
                raise _fail(f"outputs[{i}]: 'name' must be a string")
            params = _optional(item, "parameters", dict, f"output {shown(name)}: 'parameters'") or {}
            if params.get("classification"):
                raise _fail(
                    f"output {shown(name)}: the classification extension is not supported; request "
                    "'probabilities' and 'label' instead"
                )
            if "shared_memory_region" in params:
                raise _fail(f"output {shown(name)}: shared memory is not supported by this server")
            binary_flag = params.get("binary_data", binary_default)
            if not isinstance(binary_flag, bool):
                raise _fail(f"output {shown(name)}: binary_data must be true or false")
            outputs.append(RequestedOutput(name, binary_flag))
    return InferRequest(request_id, parameters, inputs, outputs, binary_default)


def encode_response(
    header: dict[str, Any], outputs: list[tuple[str, str, np.ndarray | list[bytes]]], binary: dict[str, bool]
) -> tuple[bytes, dict[str, str]]:
    """Body and headers for ``header`` (model_name, id, ...) plus ``outputs`` as (name, datatype, values).

    ``binary[name]`` says which outputs go as binary data; JSON ones get flat ``data``.
    """
    entries, chunks = [], []
    for name, datatype, values in outputs:
        if datatype == BYTES:
            if isinstance(values, np.ndarray):  # an object array: its shape, elements row-major
                shape, values = list(values.shape), values.ravel().tolist()
            else:
                shape = [len(values)]
            if binary[name]:
                raw = b"".join(struct.pack("<I", len(v)) + v for v in values)
            else:
                data: Any = [v.decode("utf-8") for v in values]
        else:
            array = np.ascontiguousarray(values, dtype=DTYPES[datatype])
            shape = list(array.shape)
            if binary[name]:
                raw = array.tobytes()
            else:
                data = array.ravel().tolist()
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary[name]:
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = data
        entries.append(entry)
    # allow_nan=False: a bare NaN token is not JSON; the route refuses non-finite outputs first
    head = json.dumps({**header, "outputs": entries}, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(chunks), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
