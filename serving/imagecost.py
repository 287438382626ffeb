"""Image files whose structure would make Pillow spend far more CPU than their size, refused first.

Decoding costs about 0.005-0.05 s of CPU per MB of an ordinary file. Some structures cost one
Python step per piece, however small the piece, and a 20 MiB body holds millions of them; each
was measured with Pillow 13 (review scripts): a million empty JPEG comments before the image data
took 1.3 s, 330,000 empty PNG chunks 1.3-1.6 s, 800,000 GIF comments 0.65 s, 100,000 strips of an
uncompressed TIFF 0.63 s (a million: 5.9 s and +353 MiB), 40,000 TIFF directory entries 0.38 s,
an 8 MB run-length BMP 2.1 s, 5,000 copies of one progressive JPEG scan 6 s. Encoders write tens
of each, so the limits below leave every ordinary file alone; every walk that checks them stops at
its limit (at most ~10,000 steps, a few ms).

:func:`refusal` reads the structure with a few struct reads and bounded walks, before Pillow opens
the file, and names the format and what is wrong; ``None`` leaves the file to Pillow, which decides whether it is an
image at all (a structure cut short is Pillow's to word).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

from .imageheader import STANDALONE_JPEG_MARKERS, is_run_length_bmp, jpeg_markers
from .pngfast import SIGNATURE, chunk_count

# PNG chunks, JPEG segments before the first scan, GIF extension blocks and sub-blocks before the
# first image: Pillow handles each in Python. One PNG image-data chunk per row of a 4096-row image
# is 4,096. No such piece is under 2 bytes, so bodies of up to twice this many bytes are not walked.
MAX_CONTAINER_BLOCKS = 10_000
MAX_JPEG_SCANS = 100  # libjpeg decodes every scan of a progressive JPEG; encoders write about 10
# Bytes between a JPEG's header segments that are none (junk, fill bytes, escaped 0xFF): Pillow steps
# over them one Python step each, ~0.1 µs a byte (SOI and 20 MiB of zeros: 2.1 s holding the GIL), so
# at most ~7 ms. Encoders write none; a damaged file, a few.
MAX_JPEG_SKIPPED_BYTES = 65_536
# What Pillow skips before a marker: a non-0xFF byte, an 0xFF followed by another (fill), 0xFF 0x00.
_JPEG_SKIPPED = re.compile(rb"(?:[^\xff]|\xff(?=\xff)|\xff\x00)+")
MAX_TIFF_ENTRIES = 1_000  # entries of the first directory (tags): files hold tens to a few hundred
MAX_TIFF_PIECES = 16_384  # strips or tiles (one Python tile and decoder each): a strip per row of 4096 rows
MAX_RLE_BMP_BYTES = 512 * 1024  # Pillow's BMP run-length decoder reads a byte per Python call (~0.25 s/MB)


# The first four bytes of a TIFF as Pillow accepts them (TiffImagePlugin.PREFIXES): either byte
# order, 42 or 43 in either order of its bytes.
_TIFF_PREFIXES = (b"MM\x00*", b"II*\x00", b"MM*\x00", b"II\x00*", b"MM\x00+", b"II+\x00")


def refusal(data: bytes) -> tuple[str, str] | None:
    """(the format, why Pillow should not be given ``data``), or ``None``."""
    try:
        if data.startswith(SIGNATURE):
            return _named("PNG", _png(data))
        if data[:2] == b"\xff\xd8":
            return _named("JPEG", _jpeg(data))
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return _named("GIF", _blocks(data, "GIF", "extension blocks before its image", _gif_blocks))
        if data[:4] in _TIFF_PREFIXES:
            return _named("TIFF", _tiff(data))
        if data[:2] == b"BM":
            return _named("BMP", _bmp(data))
    except (struct.error, IndexError, OverflowError):  # a structure cut short or absurd: Pillow's to word
        return None
    return None


def _named(kind: str, problem: str | None) -> tuple[str, str] | None:
    return None if problem is None else (kind, problem)


def _png(data: bytes) -> str | None:
    too_many = _blocks(data, "PNG", "chunks", lambda d, n: chunk_count(d, enough=n))
    if too_many:
        return too_many
    # Pillow inflates every iCCP chunk (up to 1 MB each) while it opens the file: 900 of them in 949 kB
    # took 2.2 s of CPU. The walk is bounded (past the chunk limit the file was refused above) and cheaper
    # than a search of a large file for the name (224 chunks of a 14.5 MB PNG: 0.08 ms against 8 ms).
    walked = len(data) > 2 * MAX_CONTAINER_BLOCKS  # a small file is searched first, in C
    if (walked or data.count(b"iCCP") > 1) and chunk_count(data, b"iCCP", enough=2) > 1:
        return "the PNG has more than one iCCP (colour profile) chunk; the PNG specification allows one"
    return None


def _jpeg(data: bytes) -> str | None:
    if len(data) > 2 * MAX_CONTAINER_BLOCKS:  # smaller files hold fewer pieces and skipped bytes than allowed
        segments, skipped = _jpeg_header(data)
        if segments > MAX_CONTAINER_BLOCKS:
            return (
                f"the JPEG has more than {MAX_CONTAINER_BLOCKS} marker segments before its image data; at most "
                f"{MAX_CONTAINER_BLOCKS} are accepted (encoders write tens)"
            )
        if skipped > MAX_JPEG_SKIPPED_BYTES:
            return (
                f"the JPEG has more than {MAX_JPEG_SKIPPED_BYTES} bytes of padding or junk between its header "
                "segments; encoders write none"
            )
    # An SOS marker cannot occur inside entropy-coded data (0xFF is followed by 0x00 or a restart
    # marker there), so a count in C first; the walk, which stops at the image's end (a motion
    # photo's appended video holds FF DA by chance about once per 64 kB), only above the limit.
    return _jpeg_walk(data) if data.count(b"\xff\xda") > MAX_JPEG_SCANS else None


def _blocks(data: bytes, kind: str, what: str, count: Callable[[bytes, int], int]) -> str | None:
    if len(data) <= 2 * MAX_CONTAINER_BLOCKS or count(data, MAX_CONTAINER_BLOCKS + 1) <= MAX_CONTAINER_BLOCKS:
        return None
    return (
        f"the {kind} has more than {MAX_CONTAINER_BLOCKS} {what}; at most {MAX_CONTAINER_BLOCKS} are "
        "accepted (encoders write tens)"
    )


def _jpeg_header(data: bytes) -> tuple[int, int]:
    """(marker segments, bytes that are none) before the first scan, as Pillow reads them (libjpeg reads
    the rest in C): each counted a little past its limit, the skipped bytes crossed in C."""
    pos, end = 2, len(data)  # after SOI
    segments = skipped = 0
    while pos + 1 < end and segments <= MAX_CONTAINER_BLOCKS and skipped <= MAX_JPEG_SKIPPED_BYTES:
        # Up to a byte past the limit, and never less than the two bytes a marker or a pair takes
        run = _JPEG_SKIPPED.match(data, pos, pos + MAX_JPEG_SKIPPED_BYTES + 2 - skipped)
        if run is not None:
            skipped += run.end() - pos
            pos = run.end()
            continue
        marker = data[pos + 1]  # data[pos] is 0xFF and this is neither 0xFF nor 0x00
        if marker == 0xDA:
            break
        segments += 1
        if marker in STANDALONE_JPEG_MARKERS:
            pos += 2
        elif pos + 4 <= end:
            pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
        else:
            break
    return segments, skipped


def _jpeg_walk(data: bytes) -> str | None:
    """The scans before the end-of-image marker, more than MAX_JPEG_SCANS refused; the walk also stops
    at MAX_CONTAINER_BLOCKS other markers (libjpeg reads those in C, but this walk would not: two
    million comments after the scan took it 0.64 s)."""
    scans = 0
    for seen, (marker, _) in enumerate(jpeg_markers(data)):
        scans += marker == 0xDA
        if scans > MAX_JPEG_SCANS:
            limit = MAX_JPEG_SCANS
            return f"the JPEG has more than {limit} scans; at most {limit} are accepted (encoders write about 10)"
        if seen - scans >= MAX_CONTAINER_BLOCKS:
            return (
                f"the JPEG has more than {MAX_CONTAINER_BLOCKS} marker segments; at most {MAX_CONTAINER_BLOCKS} "
                "are accepted (encoders write tens)"
            )
    return None


def _gif_blocks(data: bytes, enough: int) -> int:
    """Extension blocks and their sub-blocks before the first image, counted up to ``enough``."""
    pos, end, count = 13, len(data), 0
    if data[10] & 0x80:  # a global colour table follows the screen descriptor
        pos += 3 << ((data[10] & 7) + 1)
    while pos + 1 < end and data[pos] == 0x21 and count < enough:  # an extension, not yet an image
        pos += 2  # introducer and label
        count += 1
        while pos < end and data[pos] and count < enough:  # sub-blocks: a size byte, then the bytes
            pos += 1 + data[pos]
            count += 1
        pos += 1  # the terminating empty sub-block
    return count


def _tiff(data: bytes) -> str | None:
    """The first directory's entry count (Pillow reads every entry in Python, several times) and its
    strip or tile count (Pillow makes a Python tile and a decoder for each when uncompressed). The
    header is read as Pillow reads it: byte order from the first two bytes, BigTIFF (64-bit offsets
    and counts) only where the third byte is 43, 32-bit otherwise."""
    order = "<" if data[:2] == b"II" else ">"
    if data[2] == 43:
        (offset,) = struct.unpack_from(order + "Q", data, 8)
        count_format, entry_size, value_format = "Q", 20, "Q"
    else:
        (offset,) = struct.unpack_from(order + "I", data, 4)
        count_format, entry_size, value_format = "H", 12, "I"
    (entries,) = struct.unpack_from(order + count_format, data, offset)
    if entries > MAX_TIFF_ENTRIES:
        return (
            f"the TIFF's first directory has {entries} entries; at most {MAX_TIFF_ENTRIES} are accepted "
            "(files hold tens)"
        )
    pos = offset + struct.calcsize(count_format)
    pieces = 0
    for _ in range(entries):
        (tag,) = struct.unpack_from(order + "H", data, pos)
        if tag in (273, 324):  # StripOffsets, TileOffsets: one value per strip or tile
            (count,) = struct.unpack_from(order + value_format, data, pos + 4)
            pieces = max(pieces, count)
        pos += entry_size
    if pieces > MAX_TIFF_PIECES:
        return (
            f"the TIFF's image is stored in {pieces} strips or tiles; at most {MAX_TIFF_PIECES} are accepted "
            "(files hold one to a few thousand)"
        )
    return None


def _bmp(data: bytes) -> str | None:
    if is_run_length_bmp(data) and len(data) > MAX_RLE_BMP_BYTES:
        return (
            f"the BMP is run-length encoded and {len(data)} bytes long; at most {MAX_RLE_BMP_BYTES} bytes "
            "are accepted for RLE BMPs (send it uncompressed or as PNG)"
        )
    return None
