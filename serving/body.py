"""Reading the image out of a request: raw body or multipart field ``file``, size-limited.

The body is read incrementally and refused with 413 as soon as it passes the limit
(or at once, when Content-Length already says so), so an oversized upload never
sits in memory whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from .errors import BadRequest, BodyTimeout, ClientDisconnected, PayloadTooLarge, UnsupportedMediaType, shown
from .images import ACCEPTED_CONTENT_TYPES, ACCEPTED_DESCRIPTION

MULTIPART = "multipart/form-data"
RAW_TYPES = ("application/octet-stream",)
T = TypeVar("T")
_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+


def media_type(content_type: str | None) -> str:
    """The bare media type of a Content-Type header, lower-cased ('' if absent)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


async def within(read: Awaitable[T], timeout_s: float) -> T:
    """Await a body read under the read deadline: 408 (:class:`BodyTimeout`) when it takes longer."""
    try:
        if _timeout is None:  # Python 3.10
            return await asyncio.wait_for(read, timeout_s)
        # A timer on this task, where wait_for would wrap the read in a task of its own: every
        # request reads its body, so the difference is event-loop CPU per answer.
        async with _timeout(timeout_s):
            return await read
    except asyncio.TimeoutError:
        raise BodyTimeout(
            f"the request body did not arrive within {timeout_s:g} s; send it at once (the limit is "
            "the server's body_timeout_s)",
            timeout_s=timeout_s,
            headers={"Connection": "close"},  # the rest of the body may still be on its way
        ) from None


async def read_body_within(request: Request, max_bytes: int, timeout_s: float) -> tuple[bytes, str | None]:
    """:func:`read_image_body` under a read deadline: 408 when the body takes longer."""
    return await within(read_image_body(request, max_bytes), timeout_s)


async def read_image_body(request: Request, max_bytes: int) -> tuple[bytes, str | None]:
    """Return (image bytes, declared content type) from a /classify request.

    Accepts a raw body typed ``image/*`` or ``application/octet-stream`` (or
    untyped), or ``multipart/form-data`` with the image in field ``file``.
    """
    declared = media_type(request.headers.get("content-type"))
    if declared and declared != MULTIPART and not declared.startswith("image/") and declared not in RAW_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {declared} is not accepted; send the image bytes as the body with its image "
            f"type (e.g. -H 'Content-Type: image/png'), or multipart/form-data with the image in field 'file'",
            accepted=[*ACCEPTED_CONTENT_TYPES, *RAW_TYPES, MULTIPART],
        )
    body = await read_limited(request, max_bytes)
    if declared != MULTIPART:
        return body, declared or None
    return await _multipart_file(request, body, max_bytes)


async def read_limited(
    request: Request, max_bytes: int, advice: str = "send a smaller image (the model resizes it anyway)"
) -> bytes:
    """The raw body, refused with 413 as soon as it passes ``max_bytes`` (the 413 says ``advice``)."""

    def too_large() -> PayloadTooLarge:  # made only when raised: every request passes here
        return PayloadTooLarge(
            f"request body is larger than the limit of {max_bytes} bytes; {advice}", max_bytes=max_bytes
        )

    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > max_bytes:
                raise too_large()
        except ValueError:
            raise BadRequest(f"Content-Length {shown(length)} is not a number") from None
    # The server's ASGI messages as they come, not Starlette's stream generator: a small upload
    # has usually arrived whole when the handler runs, and then one receive() returns all of it,
    # with no generator to step through and no copy.
    chunks: bytearray | None = None
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("client disconnected before the body was complete")
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        if chunks is None:
            if not more:
                if len(chunk) > max_bytes:
                    raise too_large()
                return bytes(chunk)  # the same object when it is bytes already
            chunks = bytearray()
        chunks += chunk
        if len(chunks) > max_bytes:
            raise too_large()
        if not more:
            return bytes(chunks)


_MAX_FILES, _MAX_FIELDS = 4, 16


def _boundary(content_type: str | None) -> bytes | None:
    """The multipart boundary as Starlette's parser reads it from the Content-Type (None if none)."""
    from python_multipart.multipart import parse_options_header

    _, params = parse_options_header(content_type or "")
    return params.get(b"boundary") or None


async def _multipart_file(request: Request, body: bytes, max_bytes: int) -> tuple[bytes, str | None]:
    async def stream():
        yield body
        yield b""

    # python-multipart takes a slow path, in Python, at every near-boundary ("\r\n--BOUNDARY-x"):
    # 19 MiB of them held the event loop 1.5 s. Each one holds the delimiter (CRLF, "--", the
    # boundary), which a body of at most MAX_FILES + MAX_FIELDS parts holds once per part and once
    # to close, and a part's content never holds (RFC 2046): counted in C first.
    boundary = _boundary(request.headers.get("content-type"))
    if boundary is not None:
        delimiters = body.count(b"\r\n--" + boundary) + body.startswith(b"--" + boundary)
        if delimiters > _MAX_FILES + _MAX_FIELDS + 1:
            raise BadRequest(
                f"malformed multipart body: its boundary delimiter occurs {delimiters} times; at most "
                f"{_MAX_FILES + _MAX_FIELDS} parts are accepted"
            )
    parser = MultiPartParser(
        request.headers, stream(), max_files=_MAX_FILES, max_fields=_MAX_FIELDS, max_part_size=max_bytes
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadRequest(f"malformed multipart body: {exc.message}") from None
    except Exception as exc:  # python-multipart raises its own errors on garbage
        raise BadRequest(f"malformed multipart body: {exc}") from None
    try:
        parts = form.getlist("file")
        if len(parts) > 1:
            raise BadRequest(
                f"multipart body has {len(parts)} fields named 'file'; /classify answers one image per request "
                "(send several at once to POST /v2/models/NAME/infer as BYTES input 'image')"
            )
        part = parts[0] if parts else None
        if part is None:
            fields = sorted(form.keys())
            raise BadRequest(
                f"multipart body has no field named 'file' (fields: {fields or 'none'}); "
                f"send the image as field 'file' ({ACCEPTED_DESCRIPTION})"
            )
        if isinstance(part, UploadFile):
            return await part.read(), media_type(part.content_type) or None
        return part.encode(), None  # a plain text field: decoding will say it is not an image
    finally:
        await form.close()
