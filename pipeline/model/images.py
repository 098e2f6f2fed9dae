"""Robust image decoding and model preprocessing: untrusted bytes in, a tensor or a status out.

Objects land in the bucket from anywhere, so every failure mode of a decoder is data, not a
crash: each is reported as an :class:`ImageError` whose ``status`` ends up in the results
table. Everything here is pure (bytes in, tensor out) so it is tested without a model.
"""

from __future__ import annotations

import io
import re
import struct
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline.names import describe
from pipeline.status import DECODE_ERRORS

EMPTY, NOT_IMAGE, CORRUPT, TOO_LARGE = DECODE_ERRORS

# What PIL may open. An allow-list keeps PIL's exotic (and ghostscript-backed) plugins away
# from untrusted bytes. The JPEG opener also yields "MPO", PIL's name for the multi-picture
# JPEGs many phones write.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
JPEG_FORMATS = frozenset({"JPEG", "MPO"})

# Magic numbers of the supported formats: bytes that start like an image but do not decode
# are "corrupt", anything else "not_image".
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")

DECODERS = ("torchvision", "pil", "pil_draft")
DEFAULT_DECODER = "pil_draft"  # fastest on camera-sized JPEGs (bench/classify_bench.py)

# Longest side allowed relative to the shortest before resizing: a 1 x 60M-pixel strip passes
# the pixel guard but would become a 256 x 15G-pixel tensor once its short side is resized.
MAX_ASPECT = 4

# Headers more elongated than this are refused before decoding: no photo, panorama (~12:1) or
# long screenshot (~20:1) comes near it, and the strips beyond are decompression tricks.
MAX_HEADER_ASPECT = 50

# The memory budget of one decode, checked against the header before any pixel is read. Every
# image becomes an RGB bitmap, which PIL keeps in 4 bytes per pixel, so the budget is on
# width x height x 4 of what will actually be decoded (a JPEG's size after draft scaling).
# Decoding then holds about twice that (the bitmap plus its 3-byte-per-pixel tensor copy;
# transparency and 16-bit input add a temporary bitmap): 96 MiB admits 25 MP, i.e. a
# 6000 x 4000 PNG, and keeps one decode under ~250 MB. A 48 MP JPEG passes with the default
# pil_draft decoder (decoded at 1/8 scale) but not with torchvision, which decodes it whole.
MAX_DECODED_BYTES = 96 * 1024 * 1024
_BYTES_PER_PIXEL = 4

# What a decode may cost beyond its bitmap: the caps above bound pixels and bytes, but the work
# of a decode is also driven by how the file is cut up. Three shapes of it, each bounded here:
#
# - JPEG scans. A progressive (or multi-scan) JPEG makes libjpeg keep a whole-image DCT
#   coefficient buffer (2 bytes a coefficient, jdcoefct.c) and pass over it once per scan, even
#   an empty one: a 221-byte 8000 x 8000 header held 371 MB, 300 empty scans took 3.5 s. The
#   buffer must fit MAX_DECODED_BYTES too (pil_draft's 1/8 scale shrinks only the bitmap: the
#   coefficients are full size); it is freed before the tensor copy is made, so a decode still
#   holds at most two budget-sized buffers at once. Scans are counted before decoding: real
#   encoders write about 10 (libjpeg's default progression), rarely 20.
# - Structure parsed one unit at a time in Python: PIL walks JPEG marker segments, PNG chunks
#   and GIF extension sub-blocks in Python (0.1-0.25 s a MB of empty ones, so 3-8 s for a
#   max_bytes object). They are counted by a walk that stops at the limit before PIL sees them.
# - Anything else, as a backstop: a decode may use MAX_DECODE_CPU_SECONDS of its thread's CPU
#   time (see ``_Metered``).
MAX_JPEG_SCANS = 100
MAX_BLOCKS = 10_000
# about 4x the slowest admitted decode measured (0.7 s: a 24 MP progressive JPEG, whole)
MAX_DECODE_CPU_SECONDS = 3.0

# max_pixels is checked against every header before decoding, which makes PIL's own warning
# (at 89 M pixels) noise; its hard DecompressionBombError (at 179 M) still maps to TOO_LARGE.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_WHITE = (255, 255, 255, 255)
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


class ImageError(Exception):
    """Bad input, carried as a status so one bad object never fails a batch."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side, centre-crop, normalise: the ImageNet evaluation recipe."""

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: InterpolationMode = InterpolationMode.BILINEAR

    @classmethod
    def from_transforms(cls, transforms: Any) -> Preprocess:
        """Read torchvision's ``weights.transforms()`` (``ImageClassification``) metadata."""
        crop = _first(transforms.crop_size)
        resize = _first(getattr(transforms, "resize_size", None) or crop)
        return cls(
            resize=resize,
            crop=crop,
            mean=tuple(transforms.mean),
            std=tuple(transforms.std),
            interpolation=transforms.interpolation,
        )


def _first(size: int | Sequence[int]) -> int:
    return size if isinstance(size, int) else int(size[0])


def looks_like_image(data: bytes) -> bool:
    """Whether ``data`` starts with the signature of a supported format."""
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def check_size(data: bytes, max_bytes: int) -> None:
    """Reject empty and oversized payloads before any decoder sees them."""
    if not data:
        raise ImageError(EMPTY, "zero bytes")
    if max_bytes and len(data) > max_bytes:
        raise ImageError(TOO_LARGE, f"{len(data)} bytes > max_bytes {max_bytes}")


# --------------------------------------------------------------------------- structure

_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_MARKER = re.compile(rb"\xff+(.)", re.DOTALL)  # fill bytes, then the marker code
# Where an entropy-coded segment ends: 0xFF not followed by a stuffed 0, a restart marker or
# another fill byte. Searched in C, so a 32 MB scan costs milliseconds.
_ENTROPY_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


@dataclass(frozen=True)
class JpegLayout:
    """What a JPEG's markers say about the work of decoding it."""

    size: tuple[int, int]
    sampling: tuple[tuple[int, int], ...]  # (horizontal, vertical) factor per component
    progressive: bool
    scans: int

    @property
    def multi_scan(self) -> bool:
        return self.progressive or self.scans > 1

    @property
    def coefficient_bytes(self) -> int:
        """libjpeg's whole-image coefficient buffer, allocated only for a multi-scan image: per
        component its blocks, padded to whole MCUs, x 64 coefficients x 2 bytes (jdcoefct.c)."""
        if not self.multi_scan or not self.sampling:
            return 0
        width, height = self.size
        hmax = max(h for h, _ in self.sampling)
        vmax = max(v for _, v in self.sampling)
        total = 0
        for h, v in self.sampling:
            across = -(-width * h // (hmax * 8))
            down = -(-height * v // (vmax * 8))
            total += -(-across // h) * h * (-(-down // v) * v) * 64 * 2
        return total


def jpeg_layout(data: bytes, max_scans: int = MAX_JPEG_SCANS,
                max_blocks: int = MAX_BLOCKS) -> JpegLayout:
    """Walk a JPEG's markers up to the first EOI, refusing more than ``max_scans`` scans or
    ``max_blocks`` marker segments as TOO_LARGE (pure, bounded by those limits). Anything it
    cannot follow ends the walk: the decoder reports broken files better."""
    pos, segments, scans = 2, 0, 0
    size: tuple[int, int] = (0, 0)
    sampling: tuple[tuple[int, int], ...] = ()
    progressive = False
    while (found := _MARKER.match(data, pos)) is not None:
        marker, pos = found.group(1)[0], found.end()
        if marker == 0xD9:
            break
        segments += 1
        if segments > max_blocks:
            raise ImageError(TOO_LARGE, f"JPEG has more than {max_blocks} marker segments")
        if marker in _STANDALONE:
            continue
        if pos + 2 > len(data):
            break
        length = int.from_bytes(data[pos:pos + 2])
        body = data[pos + 2:pos + length]
        pos += length
        if length < 2 or pos > len(data):
            break
        if marker in _SOF_MARKERS and len(body) >= 6:
            _, height, width, count = struct.unpack_from(">BHHB", body)
            size, progressive = (width, height), marker in _PROGRESSIVE_SOF
            sampling = tuple((max(1, b >> 4), max(1, b & 15))
                             for b in body[7:6 + 3 * count:3])
        elif marker == 0xDA:
            scans += 1
            if scans > max_scans:
                raise ImageError(TOO_LARGE, f"JPEG has more than {max_scans} scans, each a "
                                            "pass over the whole image")
            end = _ENTROPY_END.search(data, pos)
            if end is None:
                break
            pos = end.start()
    return JpegLayout(size, sampling, progressive, scans)


def check_png_chunks(data: bytes, max_blocks: int = MAX_BLOCKS) -> None:
    """Refuse a PNG of more than ``max_blocks`` chunks up to its end (or, animated, up to its
    second frame, where PIL stops reading when it loads the first)."""
    pos, count, seen_data = 8, 0, False
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        count += 1
        if count > max_blocks:
            raise ImageError(TOO_LARGE, f"PNG has more than {max_blocks} chunks")
        if kind == b"IEND" or (kind == b"fcTL" and seen_data):
            return
        seen_data = seen_data or kind == b"IDAT"
        pos += 12 + length


def check_gif_blocks(data: bytes, max_blocks: int = MAX_BLOCKS) -> None:
    """Refuse a GIF with more than ``max_blocks`` extension sub-blocks before its first image
    (those PIL reads in Python before decoding anything; the image data is read in C)."""
    if len(data) < 13:
        return
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    count = 0
    while pos + 1 < len(data) and data[pos] == 0x21:  # an extension: label, then sub-blocks
        pos += 2
        while pos < len(data):
            count += 1
            if count > max_blocks:
                raise ImageError(TOO_LARGE, f"GIF has more than {max_blocks} extension blocks "
                                            "before its first image")
            length = data[pos]
            pos += 1 + length
            if length == 0:
                break


def check_structure(data: bytes) -> JpegLayout | None:
    """The structural limits of ``data``'s format (see MAX_BLOCKS); a JPEG's layout."""
    if data.startswith(b"\xff\xd8"):
        return jpeg_layout(data)
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        check_png_chunks(data)
    elif data.startswith((b"GIF87a", b"GIF89a")):
        check_gif_blocks(data)
    return None


class _OverTime(Exception):
    """The decode used up its CPU time (the limit in seconds is its argument)."""

    def image_error(self) -> ImageError:
        return ImageError(TOO_LARGE, f"decoding used more than {self.args[0]:g} s of CPU time")


class _Metered(io.BytesIO):
    """The bytes PIL decodes from, which stop it once its thread has used ``seconds`` of CPU.

    Why this stops work in-process: PIL never decodes from a buffer it holds whole; it reads
    its file object piece by piece (headers a few bytes at a time, pixel data in
    ``decodermaxblock`` pieces) and hands each piece to the C decoder, which suspends when it
    runs out. Every read is therefore a point where Python runs again, so raising here aborts
    the decode with its work bounded by one piece (and, for JPEG, by the scan limit). A signal
    or a timer thread could not: neither runs while the C decoder holds the thread, and
    ``torchvision.io.decode_jpeg`` is one C call with no such point, so only single-scan JPEGs
    (work linear in bytes and pixels, both capped) go to it. CPU time, not wall time, so that
    a loaded machine does not refuse what an idle one decodes.
    """

    def __init__(self, data: bytes, seconds: float) -> None:
        super().__init__(data)
        self.seconds = seconds
        self.deadline = time.thread_time() + seconds if seconds > 0 else float("inf")

    def read(self, size: int | None = -1) -> bytes:
        if time.thread_time() > self.deadline:
            raise _OverTime(self.seconds)
        return super().read(size)


def open_image(data: bytes, max_bytes: int, max_pixels: int,
               max_seconds: float = MAX_DECODE_CPU_SECONDS) -> Image.Image:
    """Identify ``data`` and check its header-declared size and structure; nothing is decoded
    yet. The image reads through :class:`_Metered`, so its decode has ``max_seconds`` of CPU."""
    return _open(data, max_bytes, max_pixels, max_seconds)[0]


def _open(data: bytes, max_bytes: int, max_pixels: int, max_seconds: float
          ) -> tuple[Image.Image, JpegLayout | None]:
    check_size(data, max_bytes)
    layout = check_structure(data)
    try:
        img = Image.open(_Metered(data, max_seconds), formats=FORMATS)
    except _OverTime as exc:
        raise exc.image_error() from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(TOO_LARGE, str(exc)) from exc
    except Exception as exc:  # PIL raises many types for bad headers
        if looks_like_image(data):
            raise ImageError(CORRUPT, f"unreadable header: {describe(exc)}") from exc
        raise ImageError(NOT_IMAGE, f"not a {'/'.join(FORMATS)} image") from exc
    width, height = img.size
    if max_pixels and width * height > max_pixels:
        raise ImageError(TOO_LARGE, f"{width}x{height} pixels > max_pixels {max_pixels}")
    if width < 1 or height < 1:
        raise ImageError(CORRUPT, f"empty canvas {width}x{height}")
    if max(width, height) > MAX_HEADER_ASPECT * min(width, height):
        raise ImageError(TOO_LARGE, f"{width}x{height} pixels: aspect ratio over "
                                    f"{MAX_HEADER_ASPECT}:1")
    return img, layout


def check_budget(size: tuple[int, int], max_decoded_bytes: int = MAX_DECODED_BYTES,
                 coefficient_bytes: int = 0) -> None:
    """Refuse a decode whose RGB bitmap, or the coefficient buffer a multi-scan JPEG holds
    while it decodes, would exceed ``max_decoded_bytes`` (0: no budget)."""
    width, height = size
    needed = width * height * _BYTES_PER_PIXEL
    if max_decoded_bytes and coefficient_bytes > max_decoded_bytes:
        raise ImageError(TOO_LARGE, f"a multi-scan JPEG holds {coefficient_bytes} bytes of DCT "
                                    "coefficients while it decodes, over the "
                                    f"{max_decoded_bytes}-byte decode budget")
    if max_decoded_bytes and needed > max_decoded_bytes:
        raise ImageError(TOO_LARGE, f"{width}x{height} pixels decode to {needed} bytes, over "
                                    f"the {max_decoded_bytes}-byte decode budget")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white, as viewers show it."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "F":
        values = np.asarray(img, dtype=np.float32)  # one working copy, changed in place
        # "I;16*" is 16-bit by definition; "I" (older Pillow's 16-bit PNG) only when it says so.
        if img.mode.startswith("I;16") or (img.mode == "I" and values.max() > 255):
            values /= 257
        np.rint(np.clip(values, 0, 255, out=values), out=values)
        return Image.fromarray(values.astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        white = Image.new("RGB", rgba.size, _WHITE[:3])
        white.paste(rgba, mask=rgba.getchannel("A"))  # "over" white, without RGBA temporaries
        return white
    return img if img.mode == "RGB" else img.convert("RGB")


def _orient(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation; broken EXIF leaves the pixels as stored rather than failing.

    In place: without an orientation tag ``exif_transpose`` would copy the whole bitmap.
    """
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:
        pass
    return img


def decode(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    decoder: str = DEFAULT_DECODER,
    draft_size: int = 0,
    max_decoded_bytes: int = MAX_DECODED_BYTES,
    max_seconds: float = MAX_DECODE_CPU_SECONDS,
) -> torch.Tensor:
    """Bytes to an upright RGB ``uint8`` tensor (C, H, W), or :class:`ImageError`.

    JPEGs go through ``decoder``: ``torchvision`` (libjpeg-turbo via ``decode_jpeg``), ``pil``,
    or ``pil_draft`` (PIL decoding at 1/2, 1/4 or 1/8 scale in the DCT while both sides stay
    >= ``draft_size``, which is what makes 12-megapixel photos cheap). Other formats use PIL.
    Memory is bounded before decoding (``MAX_DECODED_BYTES``), and so is work: scans and
    structure from the header, the rest by ``max_seconds`` of CPU (see ``_Metered``; a
    multi-scan JPEG therefore decodes through PIL whatever ``decoder`` says).
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, not {decoder!r}")
    img, layout = _open(data, max_bytes, max_pixels, max_seconds)
    try:
        if img.format in JPEG_FORMATS and decoder == "pil_draft" and draft_size:
            img.draft("RGB", (draft_size, draft_size))  # header-only: sets the decoded size
    except Exception as exc:
        raise ImageError(CORRUPT, f"{img.format} does not decode: {describe(exc)}") from exc
    check_budget(img.size, max_decoded_bytes, layout.coefficient_bytes if layout else 0)
    try:
        if (img.format in JPEG_FORMATS and decoder == "torchvision"
                and not (layout and layout.multi_scan)):
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return decode_jpeg(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        img.load()
        return F.pil_to_tensor(to_rgb(_orient(img)))
    except _OverTime as exc:
        raise exc.image_error() from exc
    except Exception as exc:  # every decoder failure on untrusted bytes is the input's fault
        raise ImageError(CORRUPT, f"{img.format} does not decode: {describe(exc)}") from exc


def bound_aspect(image: torch.Tensor, max_aspect: int = MAX_ASPECT) -> torch.Tensor:
    """Centre-crop the long side to ``max_aspect`` x the short one (a no-op for photos)."""
    height, width = image.shape[-2:]
    short = min(height, width)
    limit = short * max_aspect
    if max(height, width) <= limit:
        return image
    return F.center_crop(image, [min(height, limit), min(width, limit)])


def transform(image: torch.Tensor, spec: Preprocess) -> torch.Tensor:
    """``uint8`` (3, H, W) to the normalised float (3, crop, crop) the model expects."""
    image = F.resize(bound_aspect(image), [spec.resize], spec.interpolation, antialias=True)
    image = F.center_crop(image, [spec.crop, spec.crop])
    image = F.to_dtype(image, torch.float32, scale=True)
    return F.normalize(image, list(spec.mean), list(spec.std))


def load(
    data: bytes,
    spec: Preprocess,
    *,
    max_bytes: int,
    max_pixels: int,
    decoder: str = DEFAULT_DECODER,
    max_seconds: float = MAX_DECODE_CPU_SECONDS,
) -> torch.Tensor:
    """Decode and preprocess one object: the model's input tensor or :class:`ImageError`."""
    image = decode(data, max_bytes=max_bytes, max_pixels=max_pixels, decoder=decoder,
                   draft_size=spec.resize, max_seconds=max_seconds)
    return transform(image, spec)
