"""Image bytes → model input tensor, with the same preprocessing as training.

Accepted formats: PNG, JPEG (incl. MPO), WebP, BMP, GIF (first frame), TIFF (first
page). Any mode is brought to the manifest's channels:

* EXIF (or XMP) orientation is applied first (:func:`upright`).
* Transparency (RGBA, LA, palette with a transparent index) is composited onto a
  uniform background of gray level ``input.background`` from the manifest (default
  255, white). Datasets of bright objects on black (MNIST-like) set it to 0.
* Palette, 1-bit, CMYK, YCbCr, LAB, HSV → RGB (or L) via Pillow.
* 16-bit (``I;16*``) and 32-bit integer (``I``) images are scaled from 0..65535;
  32-bit float (``F``) images are taken as 0..1. They are resized in float, never
  clipped to 8 bits first.
* RGB → L uses ITU-R 601-2 luma (as torchvision's Grayscale); L → RGB replicates.

Then resize (``resize``: whole image to height×width; ``resize_center_crop``: short
side to ``resize_size`` then a centre crop, torchvision's rounding), scale to [0, 1],
normalize with mean/std, and lay out as float32 C×H×W.

Decompression bombs: the pixel count is read from the header and checked against
``max_pixels`` before any pixel data is decoded.

Plain 8-bit gray or RGB PNGs (the usual request) are decoded by libspng in one call
(:mod:`serving.pngfast`), giving Pillow's exact pixels; every other image, and every
error, goes through Pillow.
"""

from __future__ import annotations

import asyncio
import functools
import io
import re
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import numpy as np
from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from . import imagecost, pngfast
from .cpus import usable_cpus
from .errors import ImageTooLarge, InvalidImage, UnsupportedMediaType

# Pillow format names we open (multi-picture JPEGs open through "JPEG" as MPO).
# Restricting the set keeps plugins that shell out or parse risky containers
# (EPS → Ghostscript, ...) out of reach of client bytes.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
# Pillow inflates every compressed PNG text chunk (zTXt, iTXt) while it opens the file, up to 1 MiB
# each and 64 MiB an image: 62 chunks of 1 KB deflating to 1 MiB each, a 64 kB file decoded on the
# event loop, took 0.23 s of CPU (256 of them in one v2 call: about a minute, estimated). The server reads no text;
# two of the largest chunks Pillow takes are allowed, more is Pillow's "too much memory" error, a 400.
PngImagePlugin.MAX_TEXT_MEMORY = 2 * PngImagePlugin.MAX_TEXT_CHUNK
# Images are decoded on the event loop only when small in bytes *and* in the pixels their header
# declares (serving.imageheader; a 702-byte WebP can declare 4096x4096): decoding those is faster
# than a thread hop. Anything else — a camera-sized JPEG takes tens of ms — goes to a worker thread,
# at most one per usable CPU at a time: decoding is CPU-bound, and each large decode holds several
# full-size copies of the image (six 81 kB images declaring 4096x4096 at once took the process
# from 0.66 to 1.86 GiB).
INLINE_DECODE_BYTES = 64 * 1024
INLINE_DECODE_PIXELS = 512 * 512
# Usable CPUs, not the node's cores: a container's CPU limit caps them (serving/cpus.py).
_DECODE_THREADS = max(2, usable_cpus())
ACCEPTED_CONTENT_TYPES = (
    "image/png",
    "image/jpeg",
    "image/webp",
    "image/bmp",
    "image/gif",
    "image/tiff",
)
ACCEPTED_DESCRIPTION = "PNG, JPEG, WebP, BMP, GIF (first frame) or TIFF (first page)"

# Common formats we refuse, recognised by magic bytes so the error can name them.
_OTHER_FORMATS = (
    (b"%PDF", "PDF"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML/SVG"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"%!PS", "PostScript"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL", "JPEG XL"),
    (b"PK\x03\x04", "ZIP"),
    (b"\x1f\x8b", "gzip"),
)
_NETPBM = re.compile(rb"P[1-7]\s")  # Pillow reads these; only its ACCEPTED_FORMATS are opened
_FTYP_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}

_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _center_box(w: int, h: int, crop_w: int, crop_h: int) -> tuple[int, int, int, int]:
    """torchvision's CenterCrop as a Pillow crop box: a side shorter than the crop is padded (with 0,
    as Pillow's crop beyond the image fills) by floor(difference / 2) before it, a longer one cut at
    round(difference / 2). round() of a negative odd half padded a pixel more than torchvision."""
    left = -((crop_w - w) // 2) if w < crop_w else int(round((w - crop_w) / 2.0))
    top = -((crop_h - h) // 2) if h < crop_h else int(round((h - crop_h) / 2.0))
    return left, top, left + crop_w, top + crop_h


@dataclass(frozen=True)
class Preprocessor:
    """Preprocessing for one model input spec; build once, call per image.

    ``input_spec`` is :class:`serving.manifest.InputSpec` (or anything with the same
    attributes).
    """

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "resize"
    resize_size: int | None = None
    interpolation: str = "bilinear"
    background: int = 255
    max_pixels: int = 4096 * 4096

    @classmethod
    def from_spec(cls, input_spec, max_pixels: int) -> Preprocessor:
        """Build from a manifest ``input`` section."""
        background = getattr(input_spec, "background", 255)
        return cls(
            channels=input_spec.channels,
            height=input_spec.height,
            width=input_spec.width,
            mean=tuple(input_spec.mean),
            std=tuple(input_spec.std),
            resize=input_spec.resize,
            resize_size=input_spec.resize_size,
            interpolation=input_spec.interpolation,
            background=int(background),
            max_pixels=max_pixels,
        )

    def __call__(self, data: bytes, content_type: str | None = None) -> np.ndarray:
        """Decode ``data`` and return the model input, float32 of shape (C, H, W)."""
        pixels = pngfast.decode(data, self._fast_png_pixels, imagecost.MAX_CONTAINER_BLOCKS)
        if pixels is not None:
            return self._pixels_to_tensor(pixels)
        image = decode_image(data, self.max_pixels, content_type, draft_size=self._draft_size())
        return self.to_tensor(image)

    def _pixels_to_tensor(self, pixels: np.ndarray) -> np.ndarray:
        """The model input from decoded 8-bit gray (H, W) or RGB (H, W, 3) pixels."""
        height, width = pixels.shape[:2]
        if pixels.ndim == (2 if self.channels == 1 else 3) and (height, width) == (self.height, self.width):
            return self._normalize(pixels)
        # Another channel count or size: Pillow's conversion and resampling, as for any image.
        return self.to_tensor(Image.fromarray(pixels, "L" if pixels.ndim == 2 else "RGB"))

    def to_tensor(self, image: Image.Image) -> np.ndarray:
        """Bring a decoded Pillow image to the model input, float32 (C, H, W)."""
        target = "L" if self.channels == 1 else "RGB"
        if image.mode in _HIGH_DEPTH_MODES:
            array = self._high_depth(image, target)
        else:
            image = to_mode(image, target, self.background)
            image = self._geometry(image)
            array = np.asarray(image, dtype=np.float32)
        return self._normalize(array)

    def _normalize(self, array: np.ndarray) -> np.ndarray:
        """(H, W[, C]) pixel values 0..255 → normalised float32 (C, H, W)."""
        if array.ndim == 2:
            array = array[:, :, None]
        # (x / 255 - mean) / std fused into one multiply-add per pixel, written straight into the
        # (C, H, W) result: two ufunc passes and no temporaries (three passes before, the same
        # values). Each numpy routine starts cold after an ORT run: 50 vs 65 µs there, 6 vs 19 µs hot.
        scale, offset = self._affine
        out = np.empty((array.shape[2], *array.shape[:2]), dtype=np.float32)
        np.multiply(array.transpose(2, 0, 1), scale, out=out)
        np.add(out, offset, out=out)
        return out

    @functools.cached_property
    def _fast_png_pixels(self) -> int:
        """Pixel limit for :mod:`serving.pngfast`: ours, and never above the size Pillow refuses."""
        pillow_refuses = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else self.max_pixels
        return min(self.max_pixels, pillow_refuses)

    @functools.cached_property
    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, offset) per channel of the normalisation, computed once per model, not per image."""
        std = np.asarray(self.std, dtype=np.float32)
        scale, offset = 1.0 / (255.0 * std), -np.asarray(self.mean, dtype=np.float32) / std
        return scale.reshape(-1, 1, 1), offset.reshape(-1, 1, 1)  # broadcast over (C, H, W)

    def _high_depth(self, image: Image.Image, target: str) -> np.ndarray:
        """16/32-bit single-channel images: scale to 0..255 in float, resize in float."""
        values = np.asarray(image, dtype=np.float32)
        if image.info.get(WHITE_IS_ZERO):  # see decode_image: Pillow keeps such samples as stored
            values = (1.0 - values) if image.mode == "F" else (65535.0 - np.clip(values, 0, 65535))
        key = image.info.get("transparency")
        # A 16-bit gray PNG's tRNS names one sample value as transparent: composited onto the
        # background like every other transparency (to_mode does it for 8-bit images).
        transparent = values == key if isinstance(key, int) and image.mode != "F" else None
        if image.mode == "F":
            values = np.clip(np.nan_to_num(values), 0.0, 1.0) * 255.0
        else:
            values = np.clip(values, 0, 65535) * (255.0 / 65535.0)
        if transparent is not None:
            values[transparent] = float(self.background)
        gray = self._geometry(Image.fromarray(values.astype(np.float32), mode="F"))
        array = np.asarray(gray, dtype=np.float32)
        if target == "RGB":
            array = np.repeat(array[:, :, None], 3, axis=2)
        return array

    def _geometry(self, image: Image.Image) -> Image.Image:
        """Resize (and crop) to (height, width) as the manifest says."""
        resample = _RESAMPLE[self.interpolation]
        w, h = image.size
        if self.resize == "resize":
            if (w, h) != (self.width, self.height):
                image = image.resize((self.width, self.height), resample)
            return image
        # resize_center_crop, torchvision semantics: Resize(int) then CenterCrop((H, W)).
        short = self.resize_size or max(self.height, self.width)
        if w <= h:
            new_w, new_h = short, int(short * h / w)
        else:
            new_w, new_h = int(short * w / h), short
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample)
        return image.crop(_center_box(new_w, new_h, self.width, self.height))

    def _draft_size(self) -> tuple[int, int]:
        """Smallest decoded size that still covers the resize target (for JPEG draft)."""
        if self.resize == "resize":
            return (self.width, self.height)
        short = self.resize_size or max(self.height, self.width)
        return (short, short)


def decode_image(
    data: bytes,
    max_pixels: int,
    content_type: str | None = None,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode the first frame of an accepted image format, fully loaded and EXIF-rotated.

    Raises :class:`InvalidImage` (400) for empty/corrupt/truncated data,
    :class:`UnsupportedMediaType` (415) for a recognised but refused format, and
    :class:`ImageTooLarge` (413) when width × height exceeds ``max_pixels`` — checked
    from the header, before pixel data is decoded.
    """
    if not data:
        raise InvalidImage(f"empty body; send the image bytes ({ACCEPTED_DESCRIPTION})")
    refused = imagecost.refusal(data)  # structures that would cost Pillow far more than their size
    if refused is not None:
        kind, problem = refused
        raise InvalidImage(problem, format=kind)
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies; Pillow's warning would only add log noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image rejected as a decompression bomb: {exc}", max_pixels=max_pixels) from None
    except UnidentifiedImageError:
        raise _unidentified(data, content_type) from None
    except Exception as exc:  # Pillow raises many types on hostile headers
        raise InvalidImage(f"cannot read image header: {_describe(exc)}") from None

    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels",
            max_pixels=max_pixels,
            width=width,
            height=height,
        )
    try:
        if draft_size and image.format in ("JPEG", "MPO"):
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is much smaller:
            # far less work and memory for camera-sized inputs. The target is the upright image's:
            # an orientation of 5-8 turns the stored one a quarter, so its sides swap.
            if image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):
                draft_size = (draft_size[1], draft_size[0])
            image.draft(image.mode, draft_size)
        image.load()
        _fix_pillow_metadata(image, data)
        image = upright(image)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image rejected as a decompression bomb: {exc}", max_pixels=max_pixels) from None
    except Exception as exc:
        raise InvalidImage(
            f"corrupt or truncated {image.format or 'image'} data: {_describe(exc)}",
            format=image.format,
        ) from None
    return image


WHITE_IS_ZERO = "eed_white_is_zero"  # info key: a 16/32-bit image whose 0 is white (TIFF photometric 0)


def _fix_pillow_metadata(image: Image.Image, data: bytes) -> None:
    """Where Pillow's decoded pixels and its metadata disagree, make the metadata match the pixels.

    * A 2- or 4-bit gray PNG's pixels are scaled to 0..255, its tRNS key is not (key 3 of a 2-bit
      image names gray 255): the key is scaled as the pixels were.
    * A 16/32-bit TIFF whose photometric interpretation is WhiteIsZero is kept as stored (8-bit ones
      are inverted, mode 'L;I'): marked, so the high-depth path inverts it.
    """
    key = image.info.get("transparency")
    if image.format == "PNG" and image.mode == "L" and isinstance(key, int) and data[25:26] == b"\x00":
        depth = data[24]  # IHDR: 8 signature + 8 chunk header + width + height, then bit depth, colour type
        if depth in (2, 4):
            image.info["transparency"] = key * 255 // ((1 << depth) - 1)
    if image.format == "TIFF" and image.mode in _HIGH_DEPTH_MODES:
        if getattr(image, "tag_v2", {}).get(262) == 0:
            image.info[WHITE_IS_ZERO] = True


# EXIF orientation → the transposition that makes the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation (or XMP's ``tiff:Orientation``) says; itself when
    there is nothing to turn. Only the orientation tag is read: ``ImageOps.exif_transpose`` would also
    re-encode every other tag to drop it from the EXIF it keeps, a ``Fraction`` per rational value —
    a 65 kB JPEG whose directories share one block of rationals took 0.85 s of CPU, on the event
    loop (small bodies are decoded there), and a 5 MB PNG eXIf chunk 6.4 s and 195 MiB. The EXIF of
    the image returned still says the original orientation: turn an image once."""
    method = _UPRIGHT.get(image.getexif().get(ExifTags.Base.Orientation, 1))
    return image if method is None else image.transpose(method)


def to_mode(image: Image.Image, target: str, background: int = 255) -> Image.Image:
    """Convert an 8-bit-per-channel image of any mode to ``target`` ('L' or 'RGB').

    Transparent pixels are composited onto a uniform ``background`` gray level.
    """
    mode = image.mode
    if mode == "1":  # as 'L' (0 / 255); convert drops a transparency key, kept here as the gray it names
        key = image.info.get("transparency")
        image = image.convert("L")
        if key is not None:
            image.info["transparency"] = 255 if key else 0
        mode = "L"
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    elif mode == "L" and "transparency" in image.info:
        image = image.convert("LA")
    elif mode == "RGB" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("LA", "La", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (background, background, background, 255))
        image = Image.alpha_composite(base, rgba).convert("RGB")
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...
    if image.mode != target:
        image = image.convert(target)
    return image


def _unidentified(data: bytes, content_type: str | None) -> Exception:
    """Pick 415 (a real but refused format) or 400 (not an image at all)."""
    head = data[:32]
    for magic, name in _OTHER_FORMATS:
        if head.lstrip().startswith(magic):
            return UnsupportedMediaType(
                f"{name} data is not accepted; send {ACCEPTED_DESCRIPTION}",
                accepted=list(ACCEPTED_CONTENT_TYPES),
            )
    if _NETPBM.match(head):
        return UnsupportedMediaType(
            f"Netpbm (PBM/PGM/PPM/PAM) data is not accepted; send {ACCEPTED_DESCRIPTION}",
            accepted=list(ACCEPTED_CONTENT_TYPES),
        )
    if head[4:8] == b"ftyp" and head[8:12] in _FTYP_BRANDS:
        return UnsupportedMediaType(
            f"{_FTYP_BRANDS[head[8:12]]} images are not accepted; send {ACCEPTED_DESCRIPTION}",
            accepted=list(ACCEPTED_CONTENT_TYPES),
        )
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared.startswith("image/") and declared not in ACCEPTED_CONTENT_TYPES and declared != "image/jpg":
        return UnsupportedMediaType(
            f"{declared} is not accepted; send {ACCEPTED_DESCRIPTION}", accepted=list(ACCEPTED_CONTENT_TYPES)
        )
    return InvalidImage(f"body is not a decodable image; send {ACCEPTED_DESCRIPTION} (first bytes: {head[:8]!r})")


def _describe(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    if text.startswith("Too much memory used in text chunks"):  # MAX_TEXT_MEMORY, above
        limit = PngImagePlugin.MAX_TEXT_MEMORY >> 20
        return f"the PNG's text chunks inflate to more than {limit} MiB; at most {limit} MiB of text is accepted"
    return text[:200]


T = TypeVar("T")


# One per event loop (a limiter's waiters belong to the loop that made them; tests run several).
_decode_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = (
    weakref.WeakKeyDictionary()
)


async def decode_off_loop(nbytes: int, decode: Callable[[], T], pixels: int | None = 0) -> T:
    """Run ``decode`` (of ``nbytes`` of data, images declaring ``pixels`` in all; ``None``: not
    known) inline when small on both counts, else in a worker thread (see INLINE_DECODE_BYTES)."""
    if nbytes <= INLINE_DECODE_BYTES and pixels is not None and pixels <= INLINE_DECODE_PIXELS:
        return decode()
    loop = asyncio.get_running_loop()
    limiter = _decode_limiters.get(loop)
    if limiter is None:
        limiter = _decode_limiters[loop] = anyio.CapacityLimiter(_DECODE_THREADS)
    return await anyio.to_thread.run_sync(decode, limiter=limiter)
