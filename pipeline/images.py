"""Robust image decoding and model preprocessing: untrusted bytes in, a tensor or a status out.

Objects land in the bucket from anywhere, so every failure mode of a decoder is data, not a
crash: each is reported as an :class:`ImageError` whose ``status`` ends up in the results
table. Everything here is pure (bytes in, tensor out) so it is tested without a model.
"""

from __future__ import annotations

import io
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


def open_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """Identify ``data`` and check its header-declared size; nothing is decoded yet."""
    check_size(data, max_bytes)
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
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
    return img


def check_budget(size: tuple[int, int], max_decoded_bytes: int = MAX_DECODED_BYTES) -> None:
    """Refuse a decode whose RGB bitmap would exceed ``max_decoded_bytes`` (0: no budget)."""
    width, height = size
    needed = width * height * _BYTES_PER_PIXEL
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
) -> torch.Tensor:
    """Bytes to an upright RGB ``uint8`` tensor (C, H, W), or :class:`ImageError`.

    JPEGs go through ``decoder``: ``torchvision`` (libjpeg-turbo via ``decode_jpeg``), ``pil``,
    or ``pil_draft`` (PIL decoding at 1/2, 1/4 or 1/8 scale in the DCT while both sides stay
    >= ``draft_size``, which is what makes 12-megapixel photos cheap). Other formats use PIL.
    Memory is bounded before decoding: see ``MAX_DECODED_BYTES``.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, not {decoder!r}")
    img = open_image(data, max_bytes, max_pixels)
    try:
        if img.format in JPEG_FORMATS and decoder == "pil_draft" and draft_size:
            img.draft("RGB", (draft_size, draft_size))  # header-only: sets the decoded size
    except Exception as exc:
        raise ImageError(CORRUPT, f"{img.format} does not decode: {describe(exc)}") from exc
    check_budget(img.size, max_decoded_bytes)
    try:
        if img.format in JPEG_FORMATS and decoder == "torchvision":
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return decode_jpeg(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        img.load()
        return F.pil_to_tensor(to_rgb(_orient(img)))
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
) -> torch.Tensor:
    """Decode and preprocess one object: the model's input tensor or :class:`ImageError`."""
    image = decode(
        data, max_bytes=max_bytes, max_pixels=max_pixels, decoder=decoder, draft_size=spec.resize
    )
    return transform(image, spec)
