"""Typed errors of the serving API and their HTTP mapping.

Every failure a client can cause is one of these classes, each carrying its HTTP
status, a stable machine-readable ``code`` and a ``detail`` sentence that says what
was wrong and what would be accepted. The app turns them into JSON bodies of the
form ``{"error": code, "detail": "...", **extra}``; nothing a client sends should
ever surface as a 500.
"""

from __future__ import annotations

import heapq
import json
import reprlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# How much of a value a client sent an error message quotes: enough to recognise it, not an echo of
# a 60 kB query value or a million-element shape back into the response and the log.
SHOWN_CHARS = 80


# A list or object from a JSON body is summarised, never repr'd whole (5 million numbers: 0.7 s).
_SUMMARY = reprlib.Repr()
_SUMMARY.maxlevel, _SUMMARY.maxlist, _SUMMARY.maxtuple, _SUMMARY.maxdict = 2, 4, 4, 4
_SUMMARY.maxstring = _SUMMARY.maxlong = _SUMMARY.maxother = 20


def shown(value: Any, *, bare: bool = False) -> str:
    """``repr(value)`` (``bare``: a string as it is) for an error message, cut to SHOWN_CHARS with
    the length of what was cut; a list or dict as its first few items and its length."""
    if isinstance(value, (list, tuple, dict)):
        summary = _SUMMARY.repr(value)
        summary = summary if len(summary) <= SHOWN_CHARS else summary[:SHOWN_CHARS] + "…"
        return summary if len(value) <= 4 else f"{summary} ({len(value)} items)"
    text = value if bare and isinstance(value, str) else repr(value)
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[:SHOWN_CHARS]}… ({len(text)} characters)"


def listed(names: Sequence[str], most: int = 10) -> str:
    """Names for an error message: the alphabetically first ``most`` of them, then how many more."""
    head = ", ".join(shown(n, bare=True) for n in heapq.nsmallest(most, names))
    return head if len(names) <= most else f"{head} and {len(names) - most} more"


# The options of Starlette's JSONResponse, which the app's exception handlers send: every JSON body
# the server writes itself (answers on the fast path, protocol errors) is encoded the same way.
JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))

# The Open Inference Protocol's routes: their errors have the protocol's body (ServingError.oip_body).
OIP_PREFIX = "/v2"


def is_oip_target(target: bytes) -> bool:
    """Whether a request target (the path and query as received) is one of the protocol's routes."""
    path = target.partition(b"?")[0]
    return path == OIP_PREFIX.encode() or path.startswith(OIP_PREFIX.encode() + b"/")


# The body of a 500: what the client may know of an unexpected failure (the traceback is logged).
INTERNAL_ERROR_BODY = {"error": "internal_error", "detail": "the server failed on this request; see the server log"}


class ServingError(Exception):
    """Base class: an error with an HTTP status, a code and a human-readable detail."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """The JSON body sent to the client."""
        return {"error": self.code, "detail": self.detail, **self.extra}

    def oip_body(self) -> dict[str, str]:
        """The Open Inference Protocol's error body (routes under :data:`OIP_PREFIX`): the message alone."""
        return {"error": self.detail}

    def encoded_body(self, *, oip: bool = False) -> bytes:
        """:meth:`body` (``oip``: :meth:`oip_body`) as the bytes the app's exception handlers send."""
        return JSON_ENCODER.encode(self.oip_body() if oip else self.body()).encode()


class BadRequest(ServingError):
    """The request is malformed in a way not covered by a more specific class."""

    status_code = 400
    code = "bad_request"


class BodyTimeout(ServingError):
    """The request body did not arrive completely within the read deadline."""

    status_code = 408
    code = "body_timeout"


class HeaderTimeout(ServingError):
    """The request line and headers did not arrive within the header deadline (sent by the HTTP
    protocol itself, serving/keepalive.py: no route has seen the request)."""

    status_code = 408
    code = "header_timeout"


class HeadersTooLarge(ServingError):
    """The request line and headers passed the server's limit (sent by the HTTP protocol itself,
    serving/keepalive.py: no route has seen the request)."""

    status_code = 431
    code = "headers_too_large"


class ClientDisconnected(ServingError):
    """The client closed its connection before the request was complete. Nobody reads the answer:
    the status is nginx's 499, for the access log and ``eed_requests_total``."""

    status_code = 499
    code = "client_disconnected"


class InvalidImage(ServingError):
    """The body is not a decodable image (corrupt, truncated, empty, not an image)."""

    status_code = 400
    code = "invalid_image"


class UnsupportedMediaType(ServingError):
    """The content type or the detected image format is not one the server accepts."""

    status_code = 415
    code = "unsupported_media_type"


class PayloadTooLarge(ServingError):
    """The request body exceeds ``max_body_bytes``."""

    status_code = 413
    code = "payload_too_large"


class ImageTooLarge(ServingError):
    """The image's pixel count exceeds ``max_pixels`` (decompression-bomb guard)."""

    status_code = 413
    code = "image_too_large"


class InvalidParameters(ServingError):
    """Query or JSON parameters are out of range or contradict each other."""

    status_code = 422
    code = "invalid_parameters"


def describe_validation_errors(errors: Iterable[Mapping[str, Any]]) -> str:
    """Pydantic's error list as one line a client can act on: ``top_k: Input should be a valid
    integer, unable to parse string as an integer (got 'abc')``."""
    problems = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
        got = f" (got {shown(err['input'])})" if "input" in err and not isinstance(err["input"], (dict, list)) else ""
        problems.append(f"{where or 'request'}: {err.get('msg', 'invalid')}{got}")
    return "; ".join(problems)


class ImpossibleBudget(ServingError):
    """A budget below the cheapest exit; the body names the cheapest cost."""

    status_code = 422
    code = "impossible_budget"


class UnknownRequestId(ServingError):
    """Feedback for a genuine id of an answer this server cannot score (another model)."""

    status_code = 404
    code = "unknown_request_id"


class UnknownModel(ServingError):
    """An Open Inference Protocol route names a model this server does not serve."""

    status_code = 404
    code = "unknown_model"


class ForgedFeedbackId(ServingError):
    """Feedback for an id whose signature does not verify (altered, made up, or another secret)."""

    status_code = 403
    code = "invalid_feedback_id"


class ExpiredFeedbackId(ServingError):
    """Feedback for a genuine id older than ``feedback_max_age_s``."""

    status_code = 410
    code = "feedback_id_expired"


class FeedbackConflict(ServingError):
    """Feedback for a request that already received feedback."""

    status_code = 409
    code = "feedback_already_recorded"


class Overloaded(ServingError):
    """The admission queue is full; the client should retry after ``Retry-After`` seconds."""

    status_code = 503
    code = "overloaded"

    def __init__(self, detail: str, *, retry_after_s: int = 1, **extra: Any) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, int(retry_after_s)))}, **extra)


class NotReady(ServingError):
    """The model is still loading or warming up (or failed to load)."""

    status_code = 503
    code = "not_ready"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail, headers={"Retry-After": "1"}, **extra)


def shut_down() -> NotReady:
    """What a request still unfinished when uvicorn's graceful shutdown gives up on it (cancels its
    task: a body still arriving) is answered with, on every path, instead of uvicorn's bare 500."""
    error = NotReady("the server shut down before this request was complete; send it to another replica")
    error.headers["Connection"] = "close"
    return error


class ModelLoadError(RuntimeError):
    """The model folder cannot be served (bad graphs, provider fallback not allowed, ...).

    Not a client error: raised at start-up and reported by ``/readyz`` and the process exit.
    """
