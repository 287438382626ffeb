"""The pixel count an image file declares in its header, read without decoding anything.

The server decodes small bodies on the event loop (a thread hop costs more than decoding a
28×28 PNG), but a body's size says little about its decode cost: a 702-byte lossless WebP
declaring 4096×4096 took 0.42 s and 450 MiB to decode, with every other request waiting. So
whether a body may be decoded inline is decided by what it declares: PNG, GIF, WebP, BMP and
JPEG headers are read here in a few struct reads (JPEG: a walk over the markers before its
frame header). ``None`` means "not known" — another format, a header cut short, anything odd —
and such a body is decoded off the event loop; Pillow still decides whether it is an image.
"""

from __future__ import annotations

import struct

_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers: 0xC0-0xCF except DHT (C4), JPG (C8) and DAC (CC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE = frozenset((0x01, *range(0xD0, 0xDA)))
_JPEG_WALK_LIMIT = 64  # segments before the frame header (APPn, DQT, DHT, COM, ...)


def declared_pixels(data: bytes) -> int | None:
    """Width × height as the header states it, or ``None`` if not read here."""
    try:
        if data.startswith(_PNG) and data[12:16] == b"IHDR":
            width, height = struct.unpack_from(">II", data, 16)
        elif data[:6] in (b"GIF87a", b"GIF89a"):
            width, height = struct.unpack_from("<HH", data, 6)
        elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp(data)
        elif data[:2] == b"BM":
            width, height = struct.unpack_from("<ii", data, 18)
            height = abs(height)  # negative: stored top-down
        elif data[:2] == b"\xff\xd8":
            return _jpeg(data)
        else:
            return None
    except struct.error:  # shorter than its header
        return None
    return width * height or None


def _webp(data: bytes) -> int | None:
    kind = data[12:16]
    if kind == b"VP8X":  # extended: canvas size, 24 bits each, minus one
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width * height
    if kind == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:  # lossless: 14 bits each, minus one
        bits = int.from_bytes(data[21:25], "little")
        return ((bits & 0x3FFF) + 1) * (((bits >> 14) & 0x3FFF) + 1)
    if kind == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":  # lossy key frame
        width, height = struct.unpack_from("<HH", data, 26)
        return (width & 0x3FFF) * (height & 0x3FFF)
    return None


def _jpeg(data: bytes) -> int | None:
    pos = 2
    for _ in range(_JPEG_WALK_LIMIT):
        if pos + 4 > len(data) or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _SOF:
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return width * height or None  # height 0: defined later (DNL)
        if marker == 0xDA:  # scan data before any frame header: not a JPEG to guess about
            return None
        pos += 2 + length
    return None
