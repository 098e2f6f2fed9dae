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

EMPTY = "empty"
NOT_IMAGE = "not_image"
CORRUPT = "corrupt"
TOO_LARGE = "too_large"
ERROR_STATUSES = (EMPTY, NOT_IMAGE, CORRUPT, TOO_LARGE)

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
            raise ImageError(CORRUPT, f"unreadable header: {exc}") from exc
        raise ImageError(NOT_IMAGE, f"not a {'/'.join(FORMATS)} image") from exc
    width, height = img.size
    if max_pixels and width * height > max_pixels:
        raise ImageError(TOO_LARGE, f"{width}x{height} pixels > max_pixels {max_pixels}")
    if width < 1 or height < 1:
        raise ImageError(CORRUPT, f"empty canvas {width}x{height}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white, as viewers show it."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "F":
        values = np.asarray(img).astype(np.float64)
        # "I;16*" is 16-bit by definition; "I" (older Pillow's 16-bit PNG) only when it says so.
        if img.mode.startswith("I;16") or (img.mode == "I" and values.max() > 255):
            values = values / 257
        return Image.fromarray(values.clip(0, 255).round().astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _orient(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation; broken EXIF leaves the pixels as stored rather than failing."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


def decode(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    decoder: str = DEFAULT_DECODER,
    draft_size: int = 0,
) -> torch.Tensor:
    """Bytes to an upright RGB ``uint8`` tensor (C, H, W), or :class:`ImageError`.

    JPEGs go through ``decoder``: ``torchvision`` (libjpeg-turbo via ``decode_jpeg``), ``pil``,
    or ``pil_draft`` (PIL decoding at 1/2, 1/4 or 1/8 scale in the DCT while both sides stay
    >= ``draft_size``, which is what makes 12-megapixel photos cheap). Other formats use PIL.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, not {decoder!r}")
    img = open_image(data, max_bytes, max_pixels)
    try:
        if img.format in JPEG_FORMATS and decoder == "torchvision":
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return decode_jpeg(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        if img.format in JPEG_FORMATS and decoder == "pil_draft" and draft_size:
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        return F.pil_to_tensor(to_rgb(_orient(img)))
    except Exception as exc:  # every decoder failure on untrusted bytes is the input's fault
        raise ImageError(CORRUPT, f"{img.format} does not decode: {exc}") from exc


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
