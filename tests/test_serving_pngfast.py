"""The libspng PNG path (serving.pngfast): taken only where it gives Pillow's exact tensor."""

from __future__ import annotations

import importlib
import io
import struct
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from serving import pngfast
from serving.errors import ImageTooLarge, InvalidImage
from serving.imagecost import MAX_CONTAINER_BLOCKS
from serving.images import Preprocessor, decode_image

GRAY = Preprocessor(channels=1, height=28, width=28, mean=(0.5,), std=(0.25,))
RGB = Preprocessor(channels=3, height=32, width=32, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
LIMIT = 4096 * 4096
CHUNKS = MAX_CONTAINER_BLOCKS


def png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def noise(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], len(mode))
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def pillow_tensor(pre: Preprocessor, data: bytes) -> np.ndarray:
    return pre.to_tensor(decode_image(data, pre.max_pixels))


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        out.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def build(parts: list[tuple[bytes, bytes]]) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + b"".join(chunk(kind, body) for kind, body in parts)


PLAIN = [
    ("gray noise, exact size", GRAY, noise("L", (28, 28)), {}),
    ("gray, uncompressed", GRAY, noise("L", (28, 28), 1), {"compress_level": 0}),
    ("gray, best compression", GRAY, noise("L", (28, 28), 2), {"compress_level": 9}),
    ("rgb noise, exact size", RGB, noise("RGB", (32, 32)), {}),
    ("rgb with dpi and an ICC profile", RGB, noise("RGB", (32, 32), 3), {"dpi": (72, 72), "icc_profile": b"x" * 200}),
    ("rgb to a gray model", GRAY, noise("RGB", (28, 28), 4), {}),
    ("gray to an rgb model", RGB, noise("L", (32, 32), 5), {}),
    ("rgb, another size", RGB, noise("RGB", (50, 41), 6), {}),
    ("gray, another size", GRAY, noise("L", (17, 90), 7), {}),
]


@pytest.mark.parametrize("name, pre, image, kw", PLAIN, ids=[p[0] for p in PLAIN])
def test_plain_pngs_take_the_fast_path_and_give_pillows_tensor(name, pre, image, kw):
    data = png(image, **kw)
    assert pngfast.decode(data, LIMIT, CHUNKS) is not None, "a plain 8-bit PNG should not need Pillow"
    fast = pre(data)
    assert fast.dtype == np.float32 and fast.flags.c_contiguous
    assert np.array_equal(fast, pillow_tensor(pre, data))


def test_fast_pixels_are_pillows_pixels():
    for mode in ("L", "RGB"):
        image = noise(mode, (33, 19), 8)
        assert np.array_equal(pngfast.decode(png(image), LIMIT, CHUNKS), np.asarray(image))


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    return png(noise("L", (28, 20), 9), exif=exif.tobytes())


def _text_info(key: str, value: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(key, value)
    return info


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Pixels composited onto the preprocessor's background (255), computed here in floats."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return rgb.astype(np.float64) * a + 255.0 * (1.0 - a)


def _rgba(seed: int) -> tuple[bytes, np.ndarray]:
    image = noise("RGBA", (32, 32), seed)
    pixels = np.asarray(image)
    return png(image), over_white(pixels[..., :3], pixels[..., 3])


def _gray_alpha(seed: int) -> tuple[bytes, np.ndarray]:
    image = noise("LA", (32, 32), seed)
    pixels = np.asarray(image)
    return png(image), np.repeat(over_white(pixels[..., :1], pixels[..., 1]), 3, axis=2)


def _transparent_colour(seed: int) -> tuple[bytes, np.ndarray]:
    pixels = np.asarray(noise("RGB", (32, 32), seed)).copy()
    pixels[:4] = 0  # rows of the transparent colour: the background shows through
    expected = pixels.astype(np.float64)
    expected[:4] = 255.0
    return png(Image.fromarray(pixels), transparency=(0, 0, 0)), expected


def _same(image: Image.Image, **kw) -> tuple[bytes, np.ndarray]:
    """An image whose pixels, as RGB, are what any decoder must give (``kw``: how it is saved)."""
    return png(image, **kw), np.asarray(image.convert("RGB"), dtype=np.float64)


_palette = noise("RGB", (32, 32), 11).convert("P")
_one_bit = noise("L", (32, 32), 15).convert("1")
# Each kind Pillow decodes, with the pixels it must give, computed from the image before it was
# encoded (not by the decoder under test): compositing onto the background, 16 bits scaled to 0..255.
OTHERS = {
    "palette": _same(_palette),
    "rgba": _rgba(12),
    "gray + alpha": _gray_alpha(13),
    "rgb with a transparent colour (tRNS)": _transparent_colour(14),
    "16-bit gray": (
        png(Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16))),
        np.full((32, 32, 3), 40000 * 255.0 / 65535.0),
    ),
    "1-bit": (png(_one_bit), np.repeat(np.asarray(_one_bit, dtype=np.float64)[..., None] * 255.0, 3, axis=2)),
    "text chunk (could be an EXIF or XMP profile)": _same(
        noise("RGB", (32, 32), 10), pnginfo=_text_info("Raw profile type exif", "exif\n 0\n")
    ),
    "animated (acTL)": _same(
        noise("RGB", (32, 32), 16), save_all=True, append_images=[noise("RGB", (32, 32), 17)], duration=10
    ),  # the first frame
}


@pytest.mark.parametrize("name", list(OTHERS))
def test_other_pngs_go_to_pillow_and_decode_to_their_pixels(name):
    data, pixels = OTHERS[name]
    assert pngfast.decode(data, LIMIT, CHUNKS) is None
    scale, offset = RGB._affine
    expected = pixels.transpose(2, 0, 1) * scale + offset  # (x / 255 - mean) / std
    # One gray level of rounding in compositing (Pillow's integer alpha blend) and none elsewhere.
    np.testing.assert_allclose(RGB(data), expected, rtol=0, atol=1.01 * float(scale.max()))


def test_exif_orientation_still_applies():
    # Stored 28 wide and 20 high; orientation 6 displays it 20 wide and 28 high.
    upright = Preprocessor(channels=1, height=28, width=20, mean=(0.5,), std=(0.25,))
    assert pngfast.decode(exif_rotated(), LIMIT, CHUNKS) is None  # Pillow's, which reads the orientation
    x = upright(exif_rotated())
    stored = np.asarray(noise("L", (28, 20), 9), dtype=np.float32)
    assert np.array_equal(x[0], upright._normalize(np.rot90(stored, k=-1))[0])


def test_corrupt_pngs_fall_back_to_pillows_errors():
    good = png(noise("RGB", (32, 32), 18))
    parts = chunks(good)
    # A damaged header checksum: Pillow refuses the file, so the fast path must not accept it.
    bad_crc = bytearray(good)
    bad_crc[8 + 4 + 4 + 13] ^= 0xFF
    # Image data that is not a zlib stream, with a correct checksum: libspng fails, Pillow words it.
    bad_idat = build([(k, b"not zlib at all" if k == b"IDAT" else v) for k, v in parts])
    # Too few rows in the image data.
    short = build([(k, zlib.compress(zlib.decompress(v)[:500]) if k == b"IDAT" else v) for k, v in parts])
    for data in (bytes(bad_crc), bad_idat, short, good[: len(good) // 2]):
        assert pngfast.decode(data, LIMIT, CHUNKS) is None
        with pytest.raises(InvalidImage):
            RGB(data)
    # Without IEND the fast path stops; Pillow accepts such files, and still does.
    assert pngfast.decode(good[:-12], LIMIT, CHUNKS) is None
    assert np.array_equal(RGB(good[:-12]), RGB(good))


def test_pixel_limit_holds_on_the_fast_path():
    data = png(noise("L", (64, 64), 19))
    assert pngfast.decode(data, 64 * 64, CHUNKS) is not None
    assert pngfast.decode(data, 64 * 64 - 1, CHUNKS) is None
    small = Preprocessor(channels=1, height=28, width=28, mean=(0.5,), std=(0.25,), max_pixels=1000)
    with pytest.raises(ImageTooLarge):
        small(data)


def test_without_libspng_every_png_goes_to_pillow(monkeypatch):
    # A platform without a pyspng wheel: the module still imports, and every PNG is served through
    # Pillow with the same tensors.
    data = png(noise("RGB", (32, 32), 20))
    expected = RGB(data)
    monkeypatch.setitem(sys.modules, "pyspng", None)  # `import pyspng` now raises ImportError
    without = importlib.reload(pngfast)
    try:
        assert without.pyspng is None and without.decode(data, LIMIT, CHUNKS) is None
        assert np.array_equal(RGB(data), expected)
    finally:
        monkeypatch.undo()
        importlib.reload(pngfast)
    assert pngfast.decode(data, LIMIT, CHUNKS) is not None


# libspng is laxer than Pillow: what Pillow refuses must reach Pillow.


def with_chunk(data: bytes, kind: bytes, body: bytes, after_idat: bool = False) -> bytes:
    parts = chunks(data)
    at = max(i for i, (k, _) in enumerate(parts) if k == b"IDAT") + 1 if after_idat else 1
    return build(parts[:at] + [(kind, body)] + parts[at:])


SHORT = {"pHYs": 8, "cHRM": 31, "gAMA": 3, "sRGB": 0}


@pytest.mark.parametrize("after_idat", [False, True], ids=["before IDAT", "after IDAT"])
@pytest.mark.parametrize("kind", list(SHORT))
def test_truncated_metadata_chunks_go_to_pillow_which_refuses_them(kind, after_idat):
    # libspng skips a short pHYs/cHRM/gAMA/sRGB; Pillow raises "Truncated pHYs chunk" (400).
    data = with_chunk(png(noise("RGB", (32, 32), 21)), kind.encode(), bytes(range(1, SHORT[kind] + 1)), after_idat)
    assert pngfast.decode(data, LIMIT, CHUNKS) is None
    with pytest.raises(InvalidImage, match=f"Truncated {kind} chunk"):
        RGB(data)


@pytest.mark.parametrize("kind", list(SHORT))
def test_longer_metadata_chunks_keep_the_fast_path(kind):
    # Pillow reads only the first bytes of a longer chunk and decodes the image: so does the fast path.
    good = png(noise("RGB", (32, 32), 22))
    data = with_chunk(good, kind.encode(), bytes(SHORT[kind] + 2))
    assert np.array_equal(pngfast.decode(data, LIMIT, CHUNKS), pngfast.decode(good, LIMIT, CHUNKS))
    assert np.array_equal(RGB(data), RGB(good))


def iccp(body: bytes) -> bytes:
    return with_chunk(png(noise("RGB", (32, 32), 23)), b"iCCP", body)


REFUSED_PROFILES = {
    "compression method 1": b"icc\0\1" + zlib.compress(b"x" * 200),
    "no room for a method": b"icc\0",
    "empty": b"",
    "over MAX_TEXT_CHUNK inflated": b"icc\0\0" + zlib.compress(bytes(2 << 20)),
}


@pytest.mark.parametrize("name", list(REFUSED_PROFILES))
def test_iccp_chunks_pillow_refuses_go_to_pillow(name):
    data = iccp(REFUSED_PROFILES[name])
    assert pngfast.decode(data, LIMIT, CHUNKS) is None
    with pytest.raises(InvalidImage):
        RGB(data)


def test_an_iccp_profile_pillow_cannot_inflate_keeps_the_fast_path():
    # Pillow drops such a profile (info["icc_profile"] is None) and decodes the image.
    data = iccp(b"icc\0\0not zlib at all")
    assert pngfast.decode(data, LIMIT, CHUNKS) is not None
    assert np.array_equal(RGB(data), RGB(png(noise("RGB", (32, 32), 23))))


def test_image_data_damaged_on_the_way_is_refused_not_decoded_to_other_pixels():
    # libspng reads neither the image data's CRC nor the zlib Adler-32: a flipped bit in a
    # noise image's data decoded to wrong pixels. Its CRC no longer matches: Pillow decides, and refuses.
    good = png(noise("RGB", (32, 32), 26))
    at = good.index(b"IDAT") + 4 + 300  # a byte inside the image data; its chunk CRC left as it was
    damaged = good[:at] + bytes([good[at] ^ 0x04]) + good[at + 1 :]
    assert pngfast.decode(damaged, LIMIT, CHUNKS) is None
    with pytest.raises(InvalidImage):
        RGB(damaged)


def test_a_wrong_image_data_crc_alone_goes_to_pillow_which_decodes_it():
    good = png(noise("RGB", (32, 32), 27))
    at = good.index(b"IDAT")
    crc = at + 4 + int.from_bytes(good[at - 4 : at], "big")
    stale = good[:crc] + bytes(b ^ 0xFF for b in good[crc : crc + 4]) + good[crc + 4 :]
    assert pngfast.decode(stale, LIMIT, CHUNKS) is None
    assert np.array_equal(RGB(stale), RGB(good))  # Pillow does not read that CRC (it checks the Adler-32)


def test_a_png_with_more_than_one_colour_profile_is_refused_before_any_is_inflated():
    # Pillow (and the fast path's profile check) inflated every iCCP chunk, up to 1 MB each: 900 of
    # them in 949 kB took 2.2 s of CPU. The PNG specification allows one.
    profile = b"icc\0\0" + zlib.compress(bytes(1 << 20))
    one = iccp(profile)
    assert pngfast.decode(one, LIMIT, CHUNKS) is not None  # one profile: still the fast path
    parts = chunks(one)
    many = build(parts[:2] + [(b"iCCP", profile)] * 200 + parts[2:])
    assert pngfast.decode(many, LIMIT, CHUNKS) is None
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match="more than one iCCP"):
        RGB(many)
    assert time.perf_counter() - started < 0.5
    two = build(parts[:2] + [(b"iCCP", profile)] * 2 + parts[2:])
    assert len(two) < 20_000 < len(many)  # a small file is searched for the name first, a large one walked
    with pytest.raises(InvalidImage, match="more than one iCCP"):
        RGB(two)
