"""A C-only decode for the PNGs a classifier is usually sent: 8-bit gray or RGB, nothing else.

Pillow's PNG path runs ~100 Python calls per image (chunk parsing, the decoder's tile loop,
EXIF lookup); in a server whose ORT runs fill both cores, that code starts cold after every
run and costs ~5x its hot time. libspng (``pyspng``) decodes the same pixels in one call.

It is used only where it gives exactly Pillow's pixels and no decision of Pillow's is skipped:
an 8-bit grayscale or truecolour image (no palette, no alpha, no ``tRNS``) whose chunks are all
on :data:`_PLAIN_CHUNKS` — none that carries an orientation (``eXIf``, XMP or a raw EXIF
profile in a text chunk), transparency or animation — with every checksum Pillow verifies
intact and the pixel count within the limit. Anything else (and any error libspng reports)
returns ``None`` and the caller takes Pillow's path, which also words the errors.

libspng is laxer than Pillow in places, checked here first so that Pillow refuses what it
refuses: a short ``pHYs``/``cHRM``/``gAMA``/``sRGB`` chunk ("Truncated pHYs chunk"; libspng
ignores it) and an ``iCCP`` chunk Pillow raises on (no compression-method byte, a method other
than 0, a profile beyond ``PngImagePlugin.MAX_TEXT_CHUNK`` inflated; a profile that does not
inflate Pillow drops and decodes the image, so that keeps this path). libspng stops after the
last row, before the zlib stream's Adler-32, where Pillow says "broken data stream"; checking it
would inflate the image data a second time (+20–90 % of this path's time, by a review script),
so the image data's chunk CRCs are checked instead, which catch a file damaged on the way. A
file written with a wrong Adler-32 and right CRCs is the one difference left.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

try:
    import pyspng
except ImportError:  # a platform without a wheel: every PNG takes Pillow's path
    pyspng = None

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks that do not change the pixels Pillow returns (colour-space and physical metadata
# Pillow only stores in ``info``), besides the image data itself.
_PLAIN_CHUNKS = frozenset((b"IDAT", b"IEND", b"sRGB", b"gAMA", b"cHRM", b"iCCP", b"pHYs", b"sBIT", b"tIME"))
_GRAY, _TRUECOLOUR = 0, 2
# Below these lengths Pillow refuses the chunk as truncated; longer ones it reads.
_MIN_LENGTH = {b"pHYs": 9, b"cHRM": 32, b"gAMA": 4, b"sRGB": 1}
_CHUNK_HEAD = struct.Struct(">I4s")
_IHDR = struct.Struct(">IIBBBBB")


def decode(data: bytes, max_pixels: int, max_chunks: int) -> np.ndarray | None:
    """The pixels of a plain 8-bit gray (H, W) or RGB (H, W, 3) PNG as uint8, else ``None`` — also for a
    PNG of more than ``max_chunks`` chunks, which this walk (a Python step per chunk: 1.7 million empty
    image-data chunks took 2.3 s) leaves to serving.imagecost to refuse."""
    if pyspng is None or not data.startswith(SIGNATURE) or not _plain(data, max_pixels, max_chunks):
        return None
    try:
        return pyspng.load(data)
    except Exception:  # libspng refused it: Pillow decides, and words the error
        return None


def _plain(data: bytes, max_pixels: int, max_chunks: int) -> bool:
    """Whether the chunk list is one :func:`decode` may take (see the module docstring)."""
    end = len(data)
    pos = len(SIGNATURE)
    if end < pos + 25:
        return False
    length, kind = _CHUNK_HEAD.unpack_from(data, pos)
    if kind != b"IHDR" or length != 13 or not _crc_ok(data, pos, length):
        return False
    width, height, depth, colour, compression, filtering, interlace = _IHDR.unpack_from(data, pos + 8)
    if depth != 8 or colour not in (_GRAY, _TRUECOLOUR) or compression or filtering or interlace > 1:
        return False
    if not 0 < width * height <= max_pixels:
        return False
    pos += 25
    profiles = 0
    for _ in range(max_chunks):
        if pos + 12 > end:
            return False  # truncated before IEND
        length, kind = _CHUNK_HEAD.unpack_from(data, pos)
        if kind not in _PLAIN_CHUNKS or pos + 12 + length > end:
            return False
        # Pillow checks every chunk's CRC but the image data's, whose zlib Adler-32 it checks instead;
        # libspng checks neither, so the image data's CRCs are checked here: a file damaged on the
        # way decoded to wrong pixels without a word (1977 of 2000 single-bit flips in a noise
        # image's data, by a throwaway script). A file whose only fault is that CRC goes to Pillow,
        # which decodes it as before.
        if not _crc_ok(data, pos, length):
            return False
        if kind != b"IDAT":
            if length < _MIN_LENGTH.get(kind, 0):
                return False
            if kind == b"iCCP":  # one allowed; a second goes to serving.images, which refuses it
                if profiles or not _profile_ok(data[pos + 8 : pos + 8 + length]):
                    return False
                profiles += 1
        if kind == b"IEND":
            return True
        pos += 12 + length
    return False  # more chunks than max_chunks


def _profile_ok(body: bytes) -> bool:
    """Whether Pillow's ``chunk_iCCP`` reads this chunk body without raising."""
    from PIL import PngImagePlugin  # the limit as Pillow reads it now (a module setting)

    i = body.find(b"\0")  # -1 without a name: Pillow then reads the method from body[0]
    if len(body) < i + 2 or body[i + 1] != 0:
        return False  # IndexError, or "Unknown compression method"
    inflate = zlib.decompressobj()
    try:
        inflate.decompress(body[i + 2 :], PngImagePlugin.MAX_TEXT_CHUNK)
    except zlib.error:
        return True  # Pillow drops a profile it cannot inflate and decodes the image
    return not inflate.unconsumed_tail  # "Decompressed data too large for … MAX_TEXT_CHUNK"


def chunk_count(data: bytes, kind: bytes | None = None, enough: int | None = None) -> int:
    """How many chunks of ``kind`` (None: of any kind) the PNG in ``data`` holds in its first frame —
    its chunk headers walked to IEND, or in an animated PNG to the second frame's control chunk, where
    Pillow stops reading for the first frame; the walk stops once ``enough`` are counted."""
    count, pos, end = 0, len(SIGNATURE), len(data)
    animated = image_seen = False
    while pos + 8 <= end and count != enough:
        length, name = _CHUNK_HEAD.unpack_from(data, pos)
        if name == b"fcTL" and animated and image_seen:
            break
        animated |= name == b"acTL"
        image_seen |= name == b"IDAT"
        count += kind is None or name == kind
        if name == b"IEND":
            break
        pos += 12 + length
    return count


def _crc_ok(data: bytes, pos: int, length: int) -> bool:
    stored = int.from_bytes(data[pos + 8 + length : pos + 12 + length], "big")
    # A large chunk's bytes are read in place (a copy of 150 kB took ~20 µs); a small one is copied,
    # cheaper than making a view.
    span = data[pos + 4 : pos + 8 + length] if length < 4096 else memoryview(data)[pos + 4 : pos + 8 + length]
    return zlib.crc32(span) == stored
