"""Decoding untrusted bytes: every supported format to upright RGB, every bad kind to a status."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline.model import images
from tests.helpers.hostile_images import (
    chunk_flood_png,
    extension_flood_gif,
    marker_flood_jpeg,
    progressive_jpeg,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
LIMITS = {"max_bytes": 32 * 1024 * 1024, "max_pixels": 64_000_000}
SPEC = images.Preprocess(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)


# --------------------------------------------------------------------------- builders


def two_tone(top: tuple[int, ...] = RED, bottom: tuple[int, ...] = BLUE, mode: str = "RGB"):
    """A 48 x 64 (w x h) picture: top half one colour, bottom half another."""
    img = Image.new(mode, (48, 64), top)
    img.paste(Image.new(mode, (48, 32), bottom), (0, 32))
    return img


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    """A PNG assembled by hand, to declare sizes and depths PIL will not write."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def rgb16_png() -> bytes:
    """16-bit-per-channel RGB: top rows full red, bottom rows full blue."""
    red, blue = struct.pack(">3H", 65535, 0, 0), struct.pack(">3H", 0, 0, 65535)
    rows = [b"\x00" + (red if y < 32 else blue) * 48 for y in range(64)]
    return png(48, 64, 16, 2, zlib.compress(b"".join(rows)))


def gray16_png() -> bytes:
    values = np.full((64, 48), 65535, dtype=np.uint16)
    values[32:] = 32768
    return encode(Image.fromarray(values), "PNG")


def animated_gif() -> bytes:
    frames = [two_tone(), Image.new("RGB", (48, 64), (0, 255, 0))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def transparent_top_png(mode: str) -> bytes:
    img = two_tone((0, 0, 0, 0), (*BLUE, 255), "RGBA")
    return encode(img if mode == "RGBA" else img.convert(mode), "PNG")


def palette_with_transparency() -> bytes:
    img = two_tone().convert("P")
    top_index = img.getpixel((0, 0))
    return encode(img, "PNG", transparency=top_index)


def photo_jpeg(scale: int = 1) -> bytes:
    import skimage.data

    img = Image.fromarray(skimage.data.chelsea())
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.BICUBIC)
    return encode(img, "JPEG", quality=92)


def bomb_png(side: int) -> bytes:
    """A huge declared canvas in a few bytes: the header alone must get it rejected."""
    return png(side, side, 8, 0, zlib.compress(b"\x00" * 1024))


def halves(image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean colour of the top and bottom quarters (away from the edge between halves)."""
    h = image.shape[1]
    as_float = image.float()
    return (
        as_float[:, : h // 4].mean(dim=(1, 2)).numpy(),
        as_float[:, 3 * h // 4 :].mean(dim=(1, 2)).numpy(),
    )


# --------------------------------------------------------------------------- valid inputs

VALID: dict[str, tuple[Callable[[], bytes], tuple[int, ...], tuple[int, ...]]] = {
    "jpeg": (lambda: encode(two_tone(), "JPEG", quality=95), RED, BLUE),
    "png": (lambda: encode(two_tone(), "PNG"), RED, BLUE),
    "webp-lossless": (lambda: encode(two_tone(), "WEBP", lossless=True), RED, BLUE),
    "webp-lossy": (lambda: encode(two_tone(), "WEBP", quality=90), RED, BLUE),
    "gif-first-frame": (animated_gif, RED, BLUE),
    "bmp": (lambda: encode(two_tone(), "BMP"), RED, BLUE),
    "bmp-1bit": (lambda: encode(two_tone((255,), (0,), "1"), "BMP"), WHITE, (0, 0, 0)),
    "cmyk-jpeg": (lambda: encode(two_tone().convert("CMYK"), "JPEG", quality=95), RED, BLUE),
    "gray-jpeg": (lambda: encode(two_tone((200,), (50,), "L"), "JPEG"), (200,) * 3, (50,) * 3),
    "rgba-png": (lambda: transparent_top_png("RGBA"), WHITE, BLUE),
    "la-png": (lambda: transparent_top_png("LA"), WHITE, (29,) * 3),  # L of pure blue is 29
    "palette-transparent-png": (palette_with_transparency, WHITE, BLUE),
    "gray16-png": (gray16_png, WHITE, (128,) * 3),
    "rgb16-png": (rgb16_png, RED, BLUE),
}


@pytest.mark.parametrize("kind", VALID)
@pytest.mark.parametrize("decoder", images.DECODERS)
def test_valid_formats_decode_to_rgb(kind: str, decoder: str) -> None:
    make, top, bottom = VALID[kind]
    image = images.decode(make(), decoder=decoder, **LIMITS)
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 64, 48)
    got_top, got_bottom = halves(image)
    np.testing.assert_allclose(got_top, top, atol=12)
    np.testing.assert_allclose(got_bottom, bottom, atol=12)


@pytest.mark.parametrize("decoder", images.DECODERS)
def test_exif_orientation_is_applied(decoder: str) -> None:
    upright = two_tone()  # 48 wide, 64 tall, red on top
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a sideways camera writes it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    image = images.decode(data, decoder=decoder, **LIMITS)
    assert tuple(image.shape) == (3, 64, 48)
    got_top, got_bottom = halves(image)
    np.testing.assert_allclose(got_top, RED, atol=12)
    np.testing.assert_allclose(got_bottom, BLUE, atol=12)


def test_elongated_image_is_bounded_and_beyond_the_header_limit_refused() -> None:
    side = 40 * images.MAX_HEADER_ASPECT  # exactly at the limit: decoded, then cropped to 4:1
    strip = png(side, 40, 8, 0, zlib.compress((b"\x00" + b"\x80" * side) * 40))
    assert tuple(images.load(strip, SPEC, **LIMITS).shape) == (3, 224, 224)
    longer = png(side + 1, 40, 8, 0, zlib.compress((b"\x00" + b"\x80" * (side + 1)) * 40))
    with pytest.raises(images.ImageError, match="aspect ratio") as caught:
        images.load(longer, SPEC, **LIMITS)
    assert caught.value.status == images.TOO_LARGE
    assert tuple(images.bound_aspect(torch.zeros(3, 2, 100)).shape) == (3, 2, 8)
    assert tuple(images.bound_aspect(torch.zeros(3, 30, 40)).shape) == (3, 30, 40)


# --------------------------------------------------------------------------- bad inputs

BAD: dict[str, tuple[Callable[[], bytes], str]] = {
    "zero-bytes": (lambda: b"", images.EMPTY),
    "text": (lambda: b"just some text, not a picture\n" * 20, images.NOT_IMAGE),
    "pdf": (lambda: b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", images.NOT_IMAGE),
    "random": (lambda: np.random.default_rng(7).bytes(4096), images.NOT_IMAGE),
    "tiff-not-allowed": (lambda: encode(two_tone(), "TIFF"), images.NOT_IMAGE),
    "truncated-jpeg": (lambda: photo_jpeg()[:15_000], images.CORRUPT),
    "jpeg-magic-then-garbage": (
        lambda: b"\xff\xd8\xff" + np.random.default_rng(1).bytes(2048),
        images.CORRUPT,
    ),
    "truncated-png": (lambda: encode(two_tone(), "PNG")[:60], images.CORRUPT),
    "png-bad-idat": (lambda: png(48, 64, 8, 2, b"not zlib at all"), images.CORRUPT),
    "bomb-over-max-pixels": (lambda: bomb_png(10_000), images.TOO_LARGE),
    "bomb-over-pil-limit": (lambda: bomb_png(100_000), images.TOO_LARGE),
    "over-max-bytes": (lambda: b"\xff\xd8\xff" + b"\x00" * LIMITS["max_bytes"], images.TOO_LARGE),
}


@pytest.mark.parametrize("kind", BAD)
@pytest.mark.parametrize("decoder", images.DECODERS)
def test_bad_input_becomes_its_status(kind: str, decoder: str) -> None:
    make, status = BAD[kind]
    with pytest.raises(images.ImageError) as caught:
        images.load(make(), SPEC, decoder=decoder, **LIMITS)
    assert caught.value.status == status
    assert caught.value.reason


def test_max_pixels_applies_to_ordinary_images() -> None:
    data = encode(two_tone(), "PNG")
    assert images.decode(data, max_bytes=0, max_pixels=48 * 64).shape[1:] == (64, 48)
    with pytest.raises(images.ImageError, match="max_pixels") as caught:
        images.decode(data, max_bytes=0, max_pixels=48 * 64 - 1)
    assert caught.value.status == images.TOO_LARGE


# --------------------------------------------------------------------------- preprocessing


def test_transform_matches_torchvision_weights_transforms() -> None:
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2
    spec = images.Preprocess.from_transforms(weights.transforms())
    assert (spec.resize, spec.crop) == (232, 224)
    image = images.decode(photo_jpeg(), decoder="pil", **LIMITS)
    one_level = 1.01 / 255 / min(spec.std)  # torchvision's v1 resize rounds uint8 differently
    torch.testing.assert_close(
        images.transform(image, spec), weights.transforms()(image), atol=one_level, rtol=0
    )


def test_jpeg_decoders_agree_and_draft_shrinks_big_photos() -> None:
    small, big = photo_jpeg(), photo_jpeg(scale=4)  # 451 x 300 and 1804 x 1200
    full = images.decode(small, decoder="torchvision", **LIMITS).int()
    assert (full - images.decode(small, decoder="pil", **LIMITS).int()).abs().float().mean() < 1

    drafted = images.decode(big, decoder="pil_draft", draft_size=SPEC.resize, **LIMITS)
    assert tuple(drafted.shape) == (3, 300, 451)  # decoded at 1/4 scale, short side >= 256
    reference = images.load(big, SPEC, decoder="torchvision", **LIMITS)
    fast = images.load(big, SPEC, decoder="pil_draft", **LIMITS)
    assert (reference - fast).abs().mean() < 0.05  # normalised units span about [-1, 1]


def test_unknown_decoder_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="decoder"):
        images.decode(encode(two_tone(), "PNG"), decoder="magick", **LIMITS)


def test_decode_budget_counts_the_bitmap_actually_decoded() -> None:
    big = photo_jpeg(scale=4)  # 1804 x 1200: 8.7 MB as a full RGB bitmap, 541 KB drafted to 1/4
    budget = 600_000
    drafted = images.decode(big, decoder="pil_draft", draft_size=SPEC.resize,
                            max_decoded_bytes=budget, **LIMITS)
    assert tuple(drafted.shape) == (3, 300, 451)
    for decoder in ("pil", "torchvision"):  # these decode every pixel, so the header says no
        with pytest.raises(images.ImageError, match="decode budget") as caught:
            images.decode(big, decoder=decoder, max_decoded_bytes=budget, **LIMITS)
        assert caught.value.status == images.TOO_LARGE
    assert images.MAX_DECODED_BYTES >= 6000 * 4000 * 4  # a 24 MP PNG still decodes


# --------------------------------------------------------------------------- decode work


def test_jpeg_layout_reads_scans_sampling_and_the_coefficient_buffer() -> None:
    photo = Image.fromarray(np.asarray(Image.open(io.BytesIO(photo_jpeg()))))  # 451 x 300
    baseline = images.jpeg_layout(encode(photo, "JPEG", quality=90))
    assert (baseline.size, baseline.scans, baseline.multi_scan) == ((451, 300), 1, False)
    assert baseline.coefficient_bytes == 0  # libjpeg keeps one MCU row, not the image
    progressive = images.jpeg_layout(encode(photo, "JPEG", quality=90, progressive=True))
    assert progressive.progressive and 5 <= progressive.scans <= 20
    assert progressive.sampling == ((2, 2), (1, 1), (1, 1))  # 4:2:0
    # 451 x 300 in 16 x 16 MCUs: luma 58 x 38 blocks, chroma 29 x 19 each, 128 bytes a block
    assert progressive.coefficient_bytes == (58 * 38 + 2 * 29 * 19) * 128


@pytest.mark.parametrize("decoder", images.DECODERS)
def test_a_real_progressive_jpeg_decodes_with_every_decoder(decoder: str) -> None:
    data = encode(Image.open(io.BytesIO(photo_jpeg())), "JPEG", quality=90, progressive=True)
    assert images.jpeg_layout(data).multi_scan  # torchvision's turn goes through PIL
    image = images.decode(data, decoder=decoder, **LIMITS)
    reference = images.decode(photo_jpeg(), decoder="pil", **LIMITS)
    assert image.shape == reference.shape == (3, 300, 451)
    assert (image.int() - reference.int()).abs().float().mean() < 3


@pytest.mark.parametrize(("walk", "data", "says"), [
    (lambda d: images.jpeg_layout(d, max_scans=4), progressive_jpeg(64, 64, 5), "4 scans"),
    (lambda d: images.jpeg_layout(d, max_blocks=30), marker_flood_jpeg(30), "30 marker"),
    (lambda d: images.check_png_chunks(d, max_blocks=20), chunk_flood_png(20), "20 chunks"),
    (lambda d: images.check_png_chunks(d, max_blocks=20), chunk_flood_png(20, b"IDAT"),
     "20 chunks"),
    (lambda d: images.check_gif_blocks(d, max_blocks=20), extension_flood_gif(11), "20 ext"),
], ids=["jpeg scans", "jpeg markers", "png chunks", "png empty IDATs", "gif extensions"])
def test_structure_walks_stop_at_their_limit(walk, data: bytes, says: str) -> None:
    with pytest.raises(images.ImageError, match=says) as caught:
        walk(data)
    assert caught.value.status == images.TOO_LARGE


def test_structure_walks_pass_what_encoders_write() -> None:
    assert images.check_structure(encode(two_tone(), "JPEG", progressive=True)) is not None
    for data in (encode(two_tone(), "PNG"), animated_gif(), encode(two_tone(), "GIF", comment=b"x" * 9000),
                 extension_flood_gif(4_000), chunk_flood_png(9_000)):
        assert images.check_structure(data) is None


class TickingClock:
    """``time`` for pipeline.model.images whose thread CPU clock moves 10 ms at every look."""

    def __init__(self) -> None:
        self.now = 0.0

    def thread_time(self) -> float:
        self.now += 0.01
        return self.now


def test_cpu_time_limit_stops_the_decoder_part_way(monkeypatch) -> None:
    noisy = np.random.default_rng(3).integers(0, 256, (900, 900, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noisy), "PNG")  # 2.4 MB: about 37 of PIL's 64 KB reads
    reads: list[int] = []
    original = images._Metered.read

    def counted(self, size=-1):  # type: ignore[no-untyped-def]
        reads.append(self.tell())
        return original(self, size)

    monkeypatch.setattr(images, "time", TickingClock())
    monkeypatch.setattr(images._Metered, "read", counted)
    with pytest.raises(images.ImageError, match="more than 0.1 s of CPU time") as caught:
        images.decode(data, max_seconds=0.1, **LIMITS)
    assert caught.value.status == images.TOO_LARGE
    assert max(reads) < len(data) // 2  # stopped where it was, not after the whole image
    reads.clear()
    assert images.decode(data, max_seconds=10, **LIMITS).shape == (3, 900, 900)
    assert max(reads) > len(data) // 2
