"""Image decoding and preprocessing (serving.images) on real encoded bytes."""

from __future__ import annotations

import io
import itertools
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from serving.errors import ImageTooLarge, InvalidImage, UnsupportedMediaType
from serving.images import Preprocessor, decode_image

GRAY = Preprocessor(channels=1, height=28, width=28, mean=(0.0,), std=(1.0,))
RGB = Preprocessor(channels=3, height=28, width=28, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height but carries almost no data (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "fmt, kw",
    [("PNG", {}), ("JPEG", {"quality": 95}), ("WEBP", {"lossless": True}), ("BMP", {}), ("GIF", {}), ("TIFF", {})],
)
def test_every_accepted_format_decodes_to_the_same_tensor(fmt, kw):
    x = GRAY(encode(Image.new("L", (28, 28), 102), fmt, **kw))
    assert x.shape == (1, 28, 28) and x.dtype == np.float32
    assert np.allclose(x, 102 / 255, atol=1.5 / 255)


def test_normalisation_uses_manifest_mean_and_std():
    pre = Preprocessor(channels=3, height=4, width=4, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    x = pre(encode(Image.new("RGB", (4, 4), (255, 0, 51)), "PNG"))
    assert np.allclose(x[:, 0, 0], [(1 - 0.5) / 0.5, (0 - 0.25) / 0.25, (0.2 - 0) / 2.0], atol=1e-6)


def test_rgb_to_gray_uses_itu_601_luma_and_gray_to_rgb_replicates():
    x = GRAY(encode(Image.new("RGB", (28, 28), (255, 0, 0)), "PNG"))
    assert np.allclose(x, round(0.299 * 255) / 255, atol=1 / 255)
    y = RGB(encode(Image.new("L", (28, 28), 200), "PNG"))
    assert y.shape == (3, 28, 28) and np.allclose(y, 200 / 255)


@pytest.mark.parametrize("background, expected", [(255, 1.0), (0, 0.0)])
def test_transparent_pixels_are_composited_on_the_manifest_background(background, expected):
    pre = Preprocessor(channels=1, height=2, width=2, mean=(0.0,), std=(1.0,), background=background)
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (100, 100, 100, 255))
    x = pre(encode(rgba, "PNG"))
    assert np.isclose(x[0, 0, 0], 100 / 255, atol=1 / 255) and np.isclose(x[0, 1, 1], expected)
    la = Image.new("LA", (2, 2), (10, 0))
    assert np.allclose(pre(encode(la, "PNG")), expected)


@pytest.mark.parametrize("depth", [8, 16])
def test_a_gray_png_transparency_key_is_composited_at_any_bit_depth(depth):
    """tRNS names one gray value as transparent; at 16 bits it was ignored (the same picture gave
    white where its 8-bit twin gave the background)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    pixels = np.full((2, 2), 100, np.uint8)
    pixels[:, 0] = 255  # the key: transparent
    top = 255 if depth == 8 else 65535
    rows = pixels.astype(np.uint16) * 257 if depth == 16 else pixels
    data = b"".join(b"\x00" + row.astype(">u2" if depth == 16 else "u1").tobytes() for row in rows)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, depth, 0, 0, 0, 0))
        + chunk(b"tRNS", struct.pack(">H", top))
        + chunk(b"IDAT", zlib.compress(data))
        + chunk(b"IEND", b"")
    )
    pre = Preprocessor(channels=1, height=2, width=2, mean=(0.0,), std=(1.0,), background=0)
    x = pre(png)
    assert np.allclose(x[0, :, 0], 0.0), x  # the background
    assert np.allclose(x[0, :, 1], 100 / 255, atol=1 / 255), x


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_a_low_depth_gray_png_transparency_key_names_the_gray_it_stores(depth):
    """At 1 bit the key was dropped with the conversion to 8 bits (white stayed white); at 2 and 4
    bits Pillow scales the pixels to 0..255 but not the key, which then named another gray."""
    top = (1 << depth) - 1
    samples = [0, top, 0, top, 0, top, 0, top]  # the key: the brightest sample, transparent
    bits = "".join(format(v, f"0{depth}b") for v in samples)
    bits += "0" * (-len(bits) % 8)
    row = bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))
    png = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", len(samples), 1, depth, 0, 0, 0, 0))
        + _chunk(b"tRNS", struct.pack(">H", top))
        + _chunk(b"IDAT", zlib.compress(b"\x00" + row))
        + _chunk(b"IEND", b"")
    )
    pre = Preprocessor(channels=1, height=1, width=len(samples), mean=(0.0,), std=(1.0,), background=128)
    assert (pre(png)[0, 0] * 255).round().tolist() == [0, 128] * 4


def _white_is_zero_tiff(mode: str, values: np.ndarray) -> bytes:
    """A TIFF of ``values`` whose PhotometricInterpretation says 0 is white (Pillow writes 1)."""
    data = bytearray(encode(Image.frombytes(mode, values.shape[::-1], values.tobytes()), "TIFF"))
    assert data[:2] == b"II"
    ifd = int.from_bytes(data[4:8], "little")
    for k in range(int.from_bytes(data[ifd : ifd + 2], "little")):
        entry = ifd + 2 + 12 * k
        if int.from_bytes(data[entry : entry + 2], "little") == 262:
            data[entry + 8 : entry + 10] = (0).to_bytes(2, "little")
    return bytes(data)


@pytest.mark.parametrize("mode, values", [("L", [0, 255]), ("I;16", [0, 65535])])
def test_a_white_is_zero_tiff_reads_0_as_white_at_any_depth(mode, values):
    # Pillow inverts 8-bit WhiteIsZero ('L;I') but keeps 16-bit samples as stored: it came out inverted.
    png = _white_is_zero_tiff(mode, np.array([values], dtype="<u2" if mode == "I;16" else np.uint8))
    pre = Preprocessor(channels=1, height=1, width=2, mean=(0.0,), std=(1.0,))
    assert (pre(png)[0, 0] * 255).round().tolist() == [255, 0]


def test_palette_images_with_and_without_transparency():
    p = Image.new("P", (28, 28), 1)
    p.putpalette([0, 0, 0, 60, 60, 60] + [0] * 762)
    assert np.allclose(GRAY(encode(p, "PNG")), 60 / 255, atol=1 / 255)
    assert np.allclose(GRAY(encode(p, "GIF", transparency=1)), 1.0)  # transparent index → white
    assert np.allclose(GRAY(encode(p, "BMP")), 60 / 255, atol=1 / 255)


def test_one_bit_images():
    assert np.allclose(GRAY(encode(Image.new("1", (28, 28), 1), "PNG")), 1.0)


def test_cmyk_jpeg_and_tiff():
    cmyk = Image.new("CMYK", (28, 28), (0, 0, 0, 0))  # no ink: white
    assert np.allclose(RGB(encode(cmyk, "JPEG", quality=95)), 1.0, atol=2 / 255)
    assert np.allclose(RGB(encode(cmyk, "TIFF")), 1.0)


def test_sixteen_bit_images_are_scaled_not_clipped():
    value = int(0.4 * 65535)
    im16 = Image.fromarray(np.full((28, 28), value, dtype=np.uint16))
    assert im16.mode == "I;16"
    for fmt in ("PNG", "TIFF"):
        assert np.allclose(GRAY(encode(im16, fmt)), 0.4, atol=1e-3), fmt
    assert np.allclose(RGB(encode(im16, "PNG")), 0.4, atol=1e-3)


def test_32_bit_integer_and_float_tiffs():
    i32 = Image.fromarray(np.full((28, 28), 65535 // 2, dtype=np.int32))
    assert np.allclose(GRAY(encode(i32, "TIFF")), 0.5, atol=1e-3)
    f32 = Image.fromarray(np.full((28, 28), 0.25, dtype=np.float32))
    assert np.allclose(GRAY(encode(f32, "TIFF")), 0.25, atol=1e-3)


def test_exif_orientation_is_applied():
    # Stored 20 wide × 10 high, left half black; Orientation 6 means "rotate 90° CW to view".
    stored = Image.new("L", (20, 10), 255)
    stored.paste(0, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    shown = decode_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()), max_pixels=10_000)
    assert shown.size == (10, 20)
    pixels = np.asarray(shown)
    assert pixels[:10].mean() < 30 and pixels[10:].mean() > 225  # black half now on top


def test_gif_first_frame_and_tiff_first_page():
    frames = [Image.new("L", (28, 28), g) for g in (30, 200, 120)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    tiff = encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    for data in (gif, tiff):
        assert np.allclose(GRAY(data), 30 / 255, atol=2 / 255)


def test_any_size_is_resized_to_the_model_input():
    for size in ((1, 1), (300, 17), (28, 28), (1000, 1000)):
        assert GRAY(encode(Image.new("L", size, 77), "PNG")).shape == (1, 28, 28)


def test_large_jpeg_decodes_reduced_but_same_result():
    big = Image.new("L", (2000, 1500), 140)
    x = GRAY(encode(big, "JPEG", quality=95))
    assert np.allclose(x, 140 / 255, atol=2 / 255)


def test_resize_center_crop_follows_torchvision_semantics():
    pre = Preprocessor(
        channels=1,
        height=4,
        width=4,
        mean=(0.0,),
        std=(1.0,),
        resize="resize_center_crop",
        resize_size=4,
        interpolation="nearest",
    )
    # 16 wide × 4 high: the short side is already 4; the crop keeps the middle 4 columns.
    row = np.repeat(np.arange(16, dtype=np.uint8) * 10, 1)[None].repeat(4, axis=0)
    x = pre(encode(Image.fromarray(row), "PNG"))
    assert np.allclose(x[0, 0] * 255, [60, 70, 80, 90])


def test_a_center_crop_larger_than_the_resized_image_pads_as_torchvision():
    # Resize(25) then CenterCrop(28): torchvision pads floor(3 / 2) = 1 pixel before, 2 after;
    # round(-1.5) padded 2 before (every pixel a row and a column off).
    pre = Preprocessor(
        channels=1, height=28, width=28, mean=(0.0,), std=(1.0,), resize="resize_center_crop", resize_size=25
    )
    x = pre(encode(Image.new("L", (25, 25), 200), "PNG"))[0] * 255
    inside = np.zeros((28, 28), bool)
    inside[1:26, 1:26] = True
    assert np.allclose(x[inside], 200) and np.allclose(x[~inside], 0)


def test_a_turned_jpeg_is_drafted_for_its_upright_size():
    # Stored 1600 x 208 with orientation 6 (upright 208 x 1600) for a 128-wide, 16-high model: the
    # reduced decode was chosen for the stored sides and left the upright image 26 pixels wide,
    # upscaled to 128 where 208 were there to read.
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.new("RGB", (1600, 208), (90, 90, 90)), "JPEG", exif=exif.tobytes(), quality=90)
    pre = Preprocessor(channels=3, height=16, width=128, mean=(0.0,) * 3, std=(1.0,) * 3)
    image = decode_image(data, 10**8, draft_size=pre._draft_size())
    assert image.size[0] >= 128 and image.size[1] >= 16, image.size


def test_resize_center_crop_scales_short_side_first():
    pre = Preprocessor(
        channels=1, height=8, width=8, mean=(0.0,), std=(1.0,), resize="resize_center_crop", resize_size=10
    )
    assert pre(encode(Image.new("L", (50, 30), 9), "PNG")).shape == (1, 8, 8)


def test_bomb_header_is_refused_before_decoding():
    data = png_header_only(100_000, 100_000)
    t0 = time.perf_counter()
    with pytest.raises(ImageTooLarge) as info:
        GRAY(data)
    assert time.perf_counter() - t0 < 1.0
    assert info.value.status_code == 413 and "pixels" in info.value.detail


def test_pixel_limit_is_configurable():
    small = Preprocessor(channels=1, height=28, width=28, mean=(0.0,), std=(1.0,), max_pixels=100 * 100)
    small(encode(Image.new("L", (100, 100)), "PNG"))
    with pytest.raises(ImageTooLarge):
        small(encode(Image.new("L", (101, 100)), "PNG"))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP"])
def test_truncated_files_are_invalid_images(fmt):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    with pytest.raises(InvalidImage) as info:
        GRAY(data[: len(data) // 2])
    assert info.value.status_code == 400


@pytest.mark.parametrize("data", [b"", b"hello world", bytes(range(256)) * 4, b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_garbage_is_an_invalid_image(data):
    with pytest.raises(InvalidImage):
        GRAY(data)


@pytest.mark.parametrize(
    "data, name",
    [
        (b"%PDF-1.7\n...", "PDF"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "PostScript"),
        (b"\x00\x00\x00\x1cftypheic" + b"\x00" * 20, "HEIC"),
    ],
)
def test_known_but_refused_formats_are_415(data, name):
    with pytest.raises(UnsupportedMediaType) as info:
        GRAY(data)
    assert name in info.value.detail and info.value.status_code == 415


def test_refused_pillow_format_is_not_opened():
    # PPM is a format Pillow reads, but not one we accept: named and refused, never decoded.
    ppm = encode(Image.new("L", (28, 28), 5), "PPM")
    with pytest.raises(UnsupportedMediaType, match="Netpbm .* not accepted; send PNG"):
        GRAY(ppm)
    # Text that merely starts with a P is still not an image at all.
    with pytest.raises(InvalidImage, match="not a decodable image"):
        GRAY(b"Plain text, not pixels")
    with pytest.raises(UnsupportedMediaType):
        GRAY(ppm, content_type="image/x-portable-graymap")


# --- what a body costs to decode, known before decoding it


@pytest.mark.parametrize(
    "fmt, kw",
    [
        ("PNG", {}),
        ("BMP", {}),
        ("JPEG", {}),
        ("JPEG", {"progressive": True}),
        ("WEBP", {"lossless": True}),
        ("WEBP", {"quality": 80}),
        ("WEBP", {"lossless": True, "exif": b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x00"}),  # VP8X
    ],
)
def test_the_header_declares_the_pixel_count(fmt, kw):
    from serving.imageheader import declared_pixels

    buf = io.BytesIO()
    Image.new("RGB", (37, 23), (90, 20, 200)).save(buf, fmt, **kw)
    data = buf.getvalue()
    assert declared_pixels(data) == 37 * 23
    assert declared_pixels(data[:8]) is None  # cut short: not known, so not decoded on the event loop


def test_sizes_not_to_trust_are_not_known():
    """A GIF's screen size is not its image's (Pillow grows the image to its first frame: a 1x1 screen
    with a 4096x4096 frame decoded on the event loop); a BMP's signed width of -2**31 summed over an OIP
    batch cancelled another image's 16.7 million pixels."""
    from serving.imageheader import declared_pixels

    buf = io.BytesIO()
    Image.new("RGB", (37, 23)).save(buf, "GIF")
    assert declared_pixels(buf.getvalue()) is None
    buf = io.BytesIO()
    Image.new("RGB", (37, 23)).save(buf, "BMP")
    negative = bytearray(buf.getvalue())
    negative[18:22] = struct.pack("<i", -(2**31))
    assert declared_pixels(bytes(negative)) is None


def test_a_small_body_declaring_a_huge_image_is_decoded_off_the_event_loop():
    """A 702-byte lossless WebP of 4096x4096 took 0.42 s and 450 MiB to decode, on the event loop,
    because it was small in bytes. What decides is what the header declares."""
    import asyncio
    import threading

    from serving.imageheader import declared_pixels
    from serving.images import INLINE_DECODE_BYTES, decode_off_loop

    def encoded(size):
        buf = io.BytesIO()
        Image.new("RGB", size, (7, 7, 7)).save(buf, "WEBP", lossless=True)
        return buf.getvalue()

    async def decoding_thread(data) -> int:
        return await decode_off_loop(len(data), threading.get_ident, declared_pixels(data))

    small, huge = encoded((28, 28)), encoded((2048, 2048))
    assert len(huge) < INLINE_DECODE_BYTES
    main = threading.get_ident()
    assert asyncio.run(decoding_thread(small)) == main
    assert asyncio.run(decoding_thread(huge)) != main
    assert asyncio.run(decoding_thread(b"\x00" * 100)) != main  # nothing declared: not trusted either


def test_a_jpeg_with_hundreds_of_scans_is_refused_before_decoding():
    # libjpeg decodes every scan: 5,000 copies of one scan took 6 s of CPU for a 264 kB file
    buf = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buf, "JPEG", progressive=True)
    good = buf.getvalue()
    assert 1 < good.count(b"\xff\xda") <= 100
    RGB(good)  # an ordinary progressive JPEG decodes
    last_scan = good[good.rindex(b"\xff\xda") : -2]
    many = good[:-2] + last_scan * 150 + good[-2:]
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match=r"scans; at most 100 are accepted"):
        RGB(many)
    assert time.perf_counter() - started < 0.5
    # what follows the image's end is not the image's: a motion photo appends a video, where FF DA
    # occurs by chance about once per 64 kB
    trailer = good + (b"\x00\xff\xda\x10" * 150)
    assert trailer.count(b"\xff\xda") > 100
    assert np.array_equal(RGB(trailer), RGB(good))


def test_a_jpeg_with_thousands_of_header_segments_is_refused_before_pillow_reads_them():
    # Pillow reads the segments before the first scan in Python: a million empty comments took 1.3 s
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 90)).save(buf, "JPEG")
    good = buf.getvalue()

    def comments(n):
        return good[:2] + b"\xff\xfe\x00\x02" * n + good[2:]

    assert np.array_equal(RGB(comments(9_900)), RGB(good))  # a few thousand comments are still an image
    started = time.process_time()
    with pytest.raises(InvalidImage, match=r"more than 10000 marker segments before its image data"):
        RGB(comments(1_000_000))
    assert time.process_time() - started < 0.1
    # After the scan libjpeg reads them in C, but the scan count's walk is bounded too: comments whose
    # bodies hold FF DA (no scan) made it walk two million markers (0.64 s)
    after_scan = good[:-2] + b"\xff\xfe\x00\x04\xff\xda" * 200_000 + good[-2:]
    started = time.process_time()
    with pytest.raises(InvalidImage, match=r"more than 10000 marker segments; at most 10000"):
        RGB(after_scan)
    assert time.process_time() - started < 0.1


def test_runs_of_bytes_between_jpeg_markers_cost_no_python_step_each():
    """Fill bytes, junk and escaped 0xFF are stepped over in C by every walk, and Pillow (which steps
    over them one Python call each, ~0.1 µs a byte) is not given more than 64 kB of them: SOI and 20 MiB
    of 0xFF held the event loop for 2.5 s in the header read, 20 MiB of zeros a decode thread for 2.1 s."""
    from serving.imageheader import declared_pixels

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 90)).save(buf, "JPEG")
    good = buf.getvalue()
    app0_end = 4 + int.from_bytes(good[4:6], "big")  # SOI, then the APP0 segment Pillow writes
    assert good[2:4] == b"\xff\xe0" and good[app0_end] == 0xFF

    def between(run):
        return good[:app0_end] + run + good[app0_end:]

    # A few of each are a damaged but decodable file: the same image.
    for run in (b"\xff" * 100, b"\x00" * 100, b"\xff\x00" * 50):
        assert declared_pixels(between(run)) in (40 * 30, None)
        assert np.array_equal(RGB(between(run)), RGB(good))
    for run in (b"\xff" * (20 << 20), b"\x00" * (20 << 20), b"\xff\x00" * (10 << 20)):
        hostile = between(run)
        started = time.process_time()
        assert declared_pixels(hostile) in (40 * 30, None)  # on the event loop
        with pytest.raises(InvalidImage, match=r"more than 65536 bytes of padding or junk between its header"):
            RGB(hostile)
        assert time.process_time() - started < 0.3, run[:2]
    # After a scan header: megabytes of escaped 0xFF, then more scans than allowed (the walk that
    # counts them found each FF 00 pair with a Python step: 16 MiB took 2.5 s)
    scan = good[good.index(b"\xff\xda") : -2]
    stuffed = good[:-2] + b"\xff\x00" * (8 << 20) + scan * 101 + good[-2:]
    started = time.process_time()
    with pytest.raises(InvalidImage, match=r"scans; at most 100 are accepted"):
        RGB(stuffed)
    assert time.process_time() - started < 0.3


def test_png_text_that_inflates_to_megabytes_is_refused_after_two():
    """Pillow inflates compressed text chunks as it opens a PNG (up to 64 MiB an image by its own
    limit): 62 chunks of 1 kB, each 1 MiB inflated, took 0.23 s in a 64 kB file decoded on the loop."""
    import struct
    import zlib

    def chunk(kind, body=b""):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    good = encode(Image.new("L", (1, 1), 77), "PNG")
    megabyte = zlib.compress(b"A" * ((1 << 20) - 1), 9)

    def with_text(n):
        return good[:33] + b"".join(chunk(b"zTXt", b"note%d\x00\x00" % i + megabyte) for i in range(n)) + good[33:]

    assert np.array_equal(GRAY(with_text(2)), GRAY(good))  # as much text as two of Pillow's largest chunks
    bomb = with_text(60)
    assert len(bomb) <= 64 * 1024  # small enough to be decoded on the event loop
    started = time.process_time()
    with pytest.raises(InvalidImage, match=r"text chunks inflate to more than 2 MiB; at most 2 MiB of text"):
        GRAY(bomb)
    assert time.process_time() - started < 0.1


def test_an_animated_png_counts_only_the_chunks_pillow_reads_for_its_first_frame():
    frames = [Image.new("L", (4, 4), 10), Image.new("L", (4, 4), 200)]
    two = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    second = two.index(b"fcTL", two.index(b"IDAT")) - 4  # the second frame's control chunk
    later = two[second : two.index(b"IEND") - 4]  # its control and data chunks
    many_frames = two[:second] + later * 6_000 + two[second:]  # 12,000 chunks Pillow never reads
    assert np.allclose(GRAY(many_frames), 10 / 255, atol=1e-6)


def test_a_png_of_a_hundred_thousand_chunks_is_refused_before_pillow_reads_them():
    # Pillow handles each chunk in Python: 330,000 empty ones took 1.3-1.6 s of CPU
    import struct
    import zlib

    def chunk(kind, body=b""):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    buf = io.BytesIO()
    Image.new("L", (20, 12), 77).save(buf, "PNG")
    good = buf.getvalue()
    header_end = 8 + 25  # signature and IHDR
    # One image-data chunk per row, and a few thousand private chunks, are still an image.
    rows = zlib.compress(b"".join(b"\x00" + bytes([77]) * 20 for _ in range(12)))
    per_byte = good[:header_end] + b"".join(chunk(b"IDAT", rows[i : i + 1]) for i in range(len(rows))) + good[-12:]
    assert np.array_equal(RGB(per_byte), RGB(good))
    # Empty image-data chunks keep a PNG plain for the libspng path, whose walk stops at the limit too:
    # 1.7 million of them took it 2.3 s, and then decoded.
    empty = good[:header_end] + chunk(b"IDAT") * 1_700_000 + good[header_end:]
    started = time.process_time()
    with pytest.raises(InvalidImage, match=r"more than 10000 chunks"):
        RGB(empty)
    assert time.process_time() - started < 0.3
    private = good[:header_end] + chunk(b"zzZz", b"12345678") * 9_900 + good[header_end:]
    assert len(private) > 12 * 10_000  # large enough to be counted
    assert np.array_equal(RGB(private), RGB(good))
    for many in (
        good[:header_end] + chunk(b"zzZz") * 330_000 + good[header_end:],  # before the image data
        good[:-12] + chunk(b"zzZz") * 330_000 + good[-12:],  # after it, before the end
    ):
        started = time.process_time()
        with pytest.raises(InvalidImage, match=r"the PNG has more than 10000 chunks; at most 10000 are accepted"):
            RGB(many)
        assert time.process_time() - started < 0.1


def test_a_gif_of_a_million_comment_blocks_is_refused_before_pillow_reads_them():
    # Pillow reads a GIF's extension blocks before its first image in Python: 800,000 took 0.65 s
    buf = io.BytesIO()
    Image.new("L", (30, 20), 90).save(buf, "GIF")
    good = buf.getvalue()
    image_at = good.index(b"\x2c")  # the image descriptor, after the screen descriptor and palette

    def comments(n, size=1):
        return good[:image_at] + (b"\x21\xfe" + bytes([size]) + b"x" * size + b"\x00") * n + good[image_at:]

    assert np.array_equal(RGB(comments(4_000)), RGB(good))  # 8,000 blocks counted, still an image
    assert np.array_equal(RGB(comments(50, size=255)), RGB(good))
    started = time.process_time()
    with pytest.raises(InvalidImage, match=r"more than 10000 extension blocks before its image"):
        RGB(comments(800_000))
    assert time.process_time() - started < 0.1


def tiff_bytes(width: int, height: int, rows_per_strip: int, extra_tags: int = 0) -> bytes:
    """An uncompressed 8-bit gray classic TIFF, value 90, in strips of ``rows_per_strip`` rows, with
    ``extra_tags`` private tags (ASCII "x") in its first directory."""
    strips = -(-height // rows_per_strip)
    pixels = bytes([90]) * (width * height)
    counts = [width * min(rows_per_strip, height - i * rows_per_strip) for i in range(strips)]
    entries = 8 + extra_tags
    ifd_at = 8
    arrays_at = ifd_at + 2 + 12 * entries + 4
    offsets_at, counts_at = arrays_at, arrays_at + 4 * strips
    pixels_at = arrays_at + (8 * strips if strips > 1 else 0)  # one strip's offset and count are inline
    starts = [pixels_at + before for before in itertools.accumulate([0, *counts[:-1]])]

    def entry(tag, kind, count, value):
        return struct.pack("<HHII", tag, kind, count, value)

    tags = [
        entry(256, 4, 1, width),
        entry(257, 4, 1, height),
        entry(258, 3, 1, 8),
        entry(259, 3, 1, 1),  # uncompressed
        entry(262, 3, 1, 1),  # black is zero
        entry(273, 4, strips, offsets_at if strips > 1 else starts[0]),
        entry(278, 4, 1, rows_per_strip),
        entry(279, 4, strips, counts_at if strips > 1 else counts[0]),
    ] + [entry(40000 + i % 25000, 2, 2, ord("x")) for i in range(extra_tags)]
    arrays = struct.pack(f"<{strips}I", *starts) + struct.pack(f"<{strips}I", *counts) if strips > 1 else b""
    head = b"II*\x00" + struct.pack("<I", ifd_at) + struct.pack("<H", entries) + b"".join(tags) + b"\0\0\0\0"
    return head + arrays + pixels


def test_tiffs_of_many_tags_or_strips_are_refused_before_pillow_reads_them():
    # Pillow reads every entry of the first directory in Python several times (40,000 took 0.38 s) and
    # makes a Python tile and decoder per strip of an uncompressed image (a million: 5.9 s, +353 MiB).
    assert np.allclose(GRAY(tiff_bytes(8, 8, 8)), 90 / 255, atol=1e-6)
    assert np.allclose(GRAY(tiff_bytes(4, 4096, 1, extra_tags=200)), 90 / 255, atol=1e-6)  # a strip per row
    strips = tiff_bytes(1, 100_000, 1)
    for data, message in (
        (tiff_bytes(8, 8, 8, extra_tags=40_000), r"first directory has 40008 entries; at most 1000"),
        (strips, r"stored in 100000 strips or tiles; at most 16384"),
        # Pillow also opens 42 written in the other byte order: read as it reads the header
        (b"II\x00*" + strips[4:], r"stored in 100000 strips or tiles"),
    ):
        started = time.process_time()
        with pytest.raises(InvalidImage, match=message):
            GRAY(data)
        assert time.process_time() - started < 0.1
    # A BigTIFF directory offset beyond any file (2**64 - 1) was a 500 (OverflowError): Pillow's to refuse
    with pytest.raises(InvalidImage, match=r"cannot read image header"):
        GRAY(b"II+\x00\x08\x00\x00\x00" + b"\xff" * 8 + bytes(64))


def rle8_bmp(width: int, rows: list[bytes]) -> bytes:
    """An RLE8 BMP (gray palette) from each row's encoded runs, bottom row first."""
    data = b"".join(row + b"\x00\x00" for row in rows) + b"\x00\x01"  # end of line; end of bitmap
    palette = b"".join(bytes([g, g, g, 0]) for g in range(256))
    pixels_at = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, len(rows), 1, 8, 1, len(data), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", pixels_at + len(data), 0, 0, pixels_at) + info + palette + data


def test_run_length_bmps_decode_off_the_event_loop_and_large_ones_are_refused():
    # Pillow's RLE decoder reads a byte per Python call: an 8 MB file of one-pixel runs took 2.1 s
    from serving.imageheader import declared_pixels

    small = rle8_bmp(16, [bytes([16, 60]) for _ in range(16)])  # 16 rows of one run of 16 pixels at 60
    assert np.allclose(GRAY(small), 60 / 255, atol=1e-6)
    assert declared_pixels(small) is None  # not trusted to be cheap: a worker thread decodes it
    single_runs = rle8_bmp(2048, [bytes([1, 60]) * 2048 for _ in range(200)])
    assert len(single_runs) > 512 * 1024
    started = time.process_time()
    with pytest.raises(InvalidImage, match=r"run-length encoded and \d+ bytes long; at most 524288"):
        GRAY(single_runs)
    assert time.process_time() - started < 0.1


def exif_block(orientation: int, rationals: int) -> bytes:
    """Big-endian EXIF: IFD0 with Orientation and a WhitePoint of ``rationals`` values."""
    ifd = struct.pack(">H", 2) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    ifd += struct.pack(">HHII", 0x013E, 5, rationals, 8 + len(ifd) + 12 + 4) + b"\0\0\0\0"
    return b"MM\x00*" + struct.pack(">I", 8) + ifd + struct.pack(">II", 1, 3) * rationals


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_the_image_as_pillow_does(orientation):
    from PIL import ImageOps

    stored = Image.fromarray(np.arange(6 * 10, dtype=np.uint8).reshape(6, 10) * 4)
    data = encode(stored, "PNG", exif=exif_block(orientation, 1))
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert np.array_equal(np.asarray(decode_image(data, max_pixels=10_000)), np.asarray(expected))
    xmp = f'<x:xmpmeta><rdf:Description tiff:Orientation="{orientation}"/></x:xmpmeta>'.encode()
    from_xmp = decode_image(encode(stored, "WEBP", lossless=True, xmp=xmp), max_pixels=10_000)
    assert np.array_equal(np.asarray(from_xmp.convert("L")), np.asarray(expected))  # WebP holds RGB


def test_a_large_exif_block_costs_only_its_orientation():
    # ImageOps.exif_transpose re-encoded every tag, a Fraction per rational: 1 MB of them took 1.25 s
    stored = Image.new("L", (20, 10), 255)
    stored.paste(0, (0, 0, 10, 10))
    data = encode(stored, "PNG", exif=exif_block(6, 131_000))
    assert len(data) > 1_000_000
    started = time.process_time()
    shown = np.asarray(decode_image(data, max_pixels=10_000))
    assert time.process_time() - started < 0.1
    assert shown.shape == (20, 10) and shown[:10].mean() < 30 and shown[10:].mean() > 225
