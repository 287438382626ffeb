"""The pixel count an image file declares in its header, read without decoding anything.

The server decodes small bodies on the event loop (a thread hop costs more than decoding a
28×28 PNG), but a body's size says little about its decode cost: a 702-byte lossless WebP
declaring 4096×4096 took 0.42 s and 450 MiB to decode, with every other request waiting. So
whether a body may be decoded inline is decided by what it declares: PNG, WebP, BMP and JPEG
headers are read here in a few struct reads (JPEG: a walk over the markers before its frame
header). ``None`` means "not known" — another format (GIF too: Pillow grows the image to its
first frame, which may exceed the screen size the header states; a run-length BMP, which Pillow
decodes a byte per Python call), a header cut short, a size
of zero or below — and such a body is decoded off the event loop; Pillow still decides whether
it is an image.

:func:`jpeg_markers` (the walk over a JPEG's markers) also serves :mod:`serving.imagecost`.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator

from .pngfast import SIGNATURE

# JPEG start-of-frame markers: 0xC0-0xCF except DHT (C4), JPG (C8) and DAC (CC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0-7, SOI, EOI.
STANDALONE_JPEG_MARKERS = frozenset((0x01, *range(0xD0, 0xDA)))
_JPEG_WALK_LIMIT = 64  # segments before the frame header (APPn, DQT, DHT, COM, ...)
# Runs of bytes a walk steps over are crossed in C, never a byte per Python step: fill bytes before a
# marker (SOI followed by 20 MiB of 0xFF held the event loop for 2.5 s), and the entropy-coded data
# after a scan header, where 0xFF is followed by 0x00 (stuffing), a restart marker or another 0xFF
# (fill), and the first 0xFF followed by anything else is the next marker (16 MiB of FF 00 pairs took
# 2.5 s a step each, 0.06 s in one search).
_FILL = re.compile(rb"\xff+")
_MARKER_AFTER_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def declared_pixels(data: bytes) -> int | None:
    """Width × height as the header states it, or ``None`` if not read here."""
    try:
        if data.startswith(SIGNATURE) and data[12:16] == b"IHDR":
            width, height = struct.unpack_from(">II", data, 16)
        elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp(data)
        elif data[:2] == b"BM":
            if is_run_length_bmp(data):  # decoded a byte per Python call: never on the event loop
                return None
            width, height = struct.unpack_from("<ii", data, 18)
            height = abs(height)  # negative: stored top-down
        elif data[:2] == b"\xff\xd8":
            return _jpeg(data)
        else:
            return None
    except struct.error:  # shorter than its header
        return None
    return _area(width, height)


def is_run_length_bmp(data: bytes) -> bool:
    """A BMP whose pixels are RLE8 or RLE4 (BITMAPINFOHEADER or later: compression 1 or 2)."""
    return (
        data[:2] == b"BM"
        and len(data) >= 34
        and data[14] >= 40
        and data[15:18] == b"\0\0\0"
        and data[30] in (1, 2)
        and data[31:34] == b"\0\0\0"
    )


def _area(width: int, height: int) -> int | None:
    # A zero or negative size (a BMP's fields are signed) is not a size to trust, nor to add up.
    return width * height if width > 0 and height > 0 else None


def _webp(data: bytes) -> int | None:
    kind = data[12:16]
    if kind == b"VP8X":  # extended: canvas size, 24 bits each, minus one
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return _area(width, height)
    if kind == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:  # lossless: 14 bits each, minus one
        bits = int.from_bytes(data[21:25], "little")
        return _area((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if kind == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":  # lossy key frame
        width, height = struct.unpack_from("<HH", data, 26)
        return _area(width & 0x3FFF, height & 0x3FFF)
    return None


def _jpeg(data: bytes) -> int | None:
    for count, (marker, pos) in enumerate(jpeg_markers(data)):
        if count == _JPEG_WALK_LIMIT:
            return None
        if marker in _SOF:
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return _area(width, height)  # height 0: defined later (DNL)
        if marker == 0xDA:  # scan data before any frame header: not a JPEG to guess about
            return None
    return None


def jpeg_markers(data: bytes) -> Iterator[tuple[int, int]]:
    """(marker, position) of each marker of the JPEG in ``data`` after SOI, in order, up to and
    including EOI; it stops at anything that is not a marker. Entropy-coded data follows each scan
    header; a 0xFF inside it is followed by 0x00 (stuffing) or a restart marker, so the next other
    marker ends it."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill bytes: to the last 0xFF of the run
            pos = _FILL.match(data, pos).end() - 1  # type: ignore[union-attr]  # data[pos] is 0xFF
            continue
        yield marker, pos
        if marker == 0xD9:  # end of image
            return
        if marker in STANDALONE_JPEG_MARKERS:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        pos += 2 + length
        if marker == 0xDA:  # past the scan's entropy-coded data, to the next marker (its last 0xFF)
            found = _MARKER_AFTER_SCAN.search(data, pos)
            if found is None:
                return
            pos = found.start()
