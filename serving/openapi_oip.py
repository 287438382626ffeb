"""The Open Inference Protocol v2 routes in the OpenAPI document (:mod:`serving.openapi` builds the rest).

What KServe's and Triton's clients send and get back on ``/v2``: server and model metadata,
readiness, the Triton model configuration, inference requests and responses in JSON or with the
binary tensor extension, every versioned path answering as its plain one.
"""

from __future__ import annotations

import copy
from typing import Any

from .oip import (
    FP32_INPUT,
    IGNORED_TRITON_PARAMETERS,
    IMAGE_INPUT,
    INPUT_DATATYPES,
    MODEL_VERSION,
    OUTPUTS,
    SEQUENCE_PARAMETERS,
    served_names,
)
from .policy import POLICY_KEYS
from .tensors import HEADER_LENGTH


def describe_oip(paths: dict, schemas: dict, service, alias: str | None = None) -> None:
    """State the ``/v2`` operations in ``paths`` and add their ``Oip*`` schemas to ``schemas``.

    The routes parse their bodies themselves (JSON or the binary tensor extension), so
    FastAPI's schema knows nothing of them; ``service`` (None until the model is loaded)
    pins the model's names (the manifest's and ``alias``, EED_MODEL_NAME).
    """
    name_schema: dict[str, Any] = {"type": "string"}
    if service is not None:
        name_schema = {"type": "string", "enum": served_names(service.runtime.manifest.name, alias)}
    for path, item in paths.items():
        if not path.startswith("/v2/models/"):
            continue
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "name":
                    parameter["schema"] = {**name_schema, "description": "the manifest's model name, or EED_MODEL_NAME"}
                elif parameter["name"] == "version":
                    parameter["schema"] = {
                        "type": "string",
                        "enum": [MODEL_VERSION],
                        "description": "the one version served",
                    }

    def json_200(path: str, method: str, ref: str) -> None:
        paths[path][method]["responses"]["200"]["content"] = {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}
        }

    schemas["OipServerMetadata"] = {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
    }
    schemas["OipLive"] = {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}}
    schemas["OipReady"] = {
        "type": "object",
        "required": ["ready"],
        "properties": {"ready": {"type": "boolean"}, "name": {"type": "string"}},
    }
    tensor_meta = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    }
    schemas["OipModelMetadata"] = {
        "type": "object",
        "required": ["name", "versions", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": tensor_meta},
            "outputs": {"type": "array", "items": tensor_meta},
        },
    }
    config_tensor = {
        "type": "object",
        "required": ["name", "data_type", "dims"],
        "properties": {
            "name": {"type": "string"},
            "data_type": {"type": "string"},
            "format": {"type": "string"},
            "dims": {"type": "array", "items": {"type": "integer"}},
            "reshape": {"type": "object", "properties": {"shape": {"type": "array", "items": {"type": "integer"}}}},
            "optional": {"type": "boolean"},
        },
    }
    schemas["OipModelConfig"] = {
        "type": "object",
        "description": "a Triton model configuration (JSON form of model_config.proto)",
        "required": ["name", "platform", "max_batch_size", "input", "output"],
        "properties": {
            "name": {"type": "string"},
            "platform": {"type": "string"},
            "backend": {"type": "string"},
            "version_policy": {"type": "object"},
            "max_batch_size": {"type": "integer", "minimum": 1},
            "input": {"type": "array", "items": config_tensor},
            "output": {"type": "array", "items": config_tensor},
            "dynamic_batching": {"type": "object"},
            "parameters": {"type": "object"},
        },
    }
    datatypes = sorted(set(INPUT_DATATYPES.values()))  # the inputs' own: any other is refused
    schemas["OipRequestInput"] = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string", "enum": [FP32_INPUT, IMAGE_INPUT]},
            "datatype": {"type": "string", "enum": datatypes},
            # N >= 1 first; the rest is per input (oneOf below)
            "shape": {
                "type": "array",
                "minItems": 1,
                "prefixItems": [{"type": "integer", "minimum": 1}],
                "items": {"type": "integer", "minimum": 0},
            },
            "parameters": {
                "type": ["object", "null"],
                "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
            },
            "data": {
                "type": "array",
                "description": "flat in row-major order, or nested exactly as the shape; BYTES as base64 strings",
            },
        },
        # Each input with its own datatype and rank (the two enums alone allowed 'input' as BYTES).
        "oneOf": [
            {
                "properties": {
                    "name": {"const": FP32_INPUT},
                    "datatype": {"const": INPUT_DATATYPES[FP32_INPUT]},
                    "shape": {"minItems": 4, "maxItems": 4},
                }
            },
            {
                "properties": {
                    "name": {"const": IMAGE_INPUT},
                    "datatype": {"const": INPUT_DATATYPES[IMAGE_INPUT]},
                    "shape": {"maxItems": 2, "prefixItems": [{}, {"const": 1}]},
                }
            },
        ],
        "description": f"'{FP32_INPUT}': FP32 [N, C, H, W] preprocessed as the manifest says; '{IMAGE_INPUT}': "
        "BYTES [N] (or [N, 1], as /config's dims [1] reshaped to [] say; per-sample outputs then come "
        "as [N, 1] too) encoded image files. Data as JSON 'data' or binary (binary_data_size).",
    }
    schemas["OipRequestOutput"] = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "enum": list(OUTPUTS)},
            "parameters": {"type": ["object", "null"], "properties": {"binary_data": {"type": "boolean"}}},
        },
    }
    schemas["OipInferenceRequest"] = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": ["string", "null"], "description": "echoed in the response; null: none"},
            "parameters": {
                "type": ["object", "null"],
                "description": "budget_gflops, budget_ms, confidence, exit, policy "
                "(as the /classify query parameters) and binary_data_output; Triton's timeout and priority "
                "are accepted and ignored, a sequence refused (the model is stateless); null: none",
                "properties": {
                    **{key: {"type": ["number", "string"]} for key in POLICY_KEYS},
                    **{key: {} for key in (*IGNORED_TRITON_PARAMETERS, *SEQUENCE_PARAMETERS)},
                    "binary_data_output": {"type": "boolean"},
                },
                "additionalProperties": False,  # any other key is refused (a typo would run another policy)
            },
            "inputs": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1,
                "items": {"$ref": "#/components/schemas/OipRequestInput"},
            },
            "outputs": {
                "type": ["array", "null"],
                "items": {"$ref": "#/components/schemas/OipRequestOutput"},
                "description": "the outputs to return; absent, null or empty: all of them",
            },
        },
    }
    output_tensor = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string", "enum": list(OUTPUTS)},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "data": {"type": "array"},
            "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer"}}},
        },
    }
    schemas["OipInferenceResponse"] = {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": {"type": "object"},
            "outputs": {"type": "array", "items": output_tensor},
        },
    }

    json_200("/v2", "get", "OipServerMetadata")
    json_200("/v2/health/live", "get", "OipLive")
    json_200("/v2/health/ready", "get", "OipReady")
    json_200("/v2/models/{name}", "get", "OipModelMetadata")
    json_200("/v2/models/{name}/ready", "get", "OipReady")
    json_200("/v2/models/{name}/config", "get", "OipModelConfig")
    infer = paths["/v2/models/{name}/infer"]["post"]
    json_200("/v2/models/{name}/infer", "post", "OipInferenceResponse")
    infer["responses"]["200"]["content"]["application/octet-stream"] = {
        "schema": {
            "type": "string",
            "format": "binary",
            "description": f"binary tensor extension: JSON header ({HEADER_LENGTH} bytes) + output data",
        }
    }
    infer["requestBody"] = {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/OipInferenceRequest"}},
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": f"binary tensor extension: the JSON request "
                    f"({HEADER_LENGTH} header) followed by the tensors' bytes",
                }
            },
        },
    }
    infer.setdefault("parameters", []).append(
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "required": False,
            "description": "length of the JSON part of a binary-extension body",
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
    )
    # The versioned paths answer as the plain ones.
    for suffix, method in (("", "get"), ("/ready", "get"), ("/config", "get"), ("/infer", "post")):
        plain = paths["/v2/models/{name}" + suffix][method]
        versioned = paths["/v2/models/{name}/versions/{version}" + suffix][method]
        versioned["responses"]["200"] = copy.deepcopy(plain["responses"]["200"])
        if "requestBody" in plain:
            versioned["requestBody"] = copy.deepcopy(plain["requestBody"])
            versioned["parameters"].extend(p for p in plain["parameters"] if p["in"] == "header")
