"""Hostile image objects as data, shared by the unit table (test_hostile) and the run through the
real stack (test_hostile_stream). Every builder is deterministic and small: the cost these
objects cause is declared in headers, repeated in scans or chunks, or compressed away.

``STREAM_UPLOADS``: (object name, object bytes, extra ``Blob`` attributes for the upload, the
status its row must get). An attribute such as ``content_encoding="gzip"`` is set on the blob
before ``upload_from_string``, which then stores the bytes as given (already gzip-compressed).
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from functools import cache

# --------------------------------------------------------------------------- JPEG


def _segment(marker: int, payload: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload


_DQT = _segment(0xDB, b"\x00" + bytes([1] * 64))
# One Huffman code (length 1, symbol 0) per table: every coefficient decodes to "zero".
_DHT = _segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00") + _segment(
    0xC4, b"\x10" + bytes([1] + [0] * 15) + b"\x00")


def _sof(width: int, height: int, marker: int, components: int = 3) -> bytes:
    return _segment(marker, struct.pack(">BHHB", 8, height, width, components)
                    + b"".join(bytes([i + 1, 0x11, 0]) for i in range(components)))


def _dc_scan(components: int = 3) -> bytes:
    """An interleaved DC-first scan header with no entropy-coded data after it."""
    return _segment(0xDA, bytes([components]) + b"".join(bytes([i + 1, 0]) for i in range(components))
                    + b"\x00\x00\x00")


def progressive_jpeg(width: int, height: int, scans: int) -> bytes:
    """A progressive (SOF2) JPEG of ``scans`` empty scans: libjpeg passes over a full-size
    coefficient buffer (width x height x 3 x 2 bytes) once per scan. 15 bytes a scan."""
    return (b"\xff\xd8" + _DQT + _sof(width, height, 0xC2) + _DHT + _dc_scan() * scans
            + b"\xff\xd9")


def multiscan_jpeg(width: int, height: int) -> bytes:
    """A sequential (SOF0) JPEG whose three components come in three scans: libjpeg keeps the
    same whole-image coefficient buffer as for a progressive one."""
    scans = b"".join(_segment(0xDA, bytes([1, i + 1, 0]) + b"\x00\x3f\x00") for i in range(3))
    return b"\xff\xd8" + _DQT + _sof(width, height, 0xC0) + _DHT + scans + b"\xff\xd9"


def marker_flood_jpeg(markers: int) -> bytes:
    """A 16 x 16 baseline JPEG behind ``markers`` empty comment segments (4 bytes each), which
    PIL parses one by one in Python (about 0.2 s a MB)."""
    return (b"\xff\xd8" + _segment(0xFE, b"") * markers + _DQT + _sof(16, 16, 0xC0) + _DHT
            + _dc_scan() + b"\x00" * 8 + b"\xff\xd9")


@cache
def small_jpeg() -> bytes:
    """A real 64 x 48 photo-like JPEG that classifies ``ok``."""
    from PIL import Image

    img = Image.radial_gradient("L").resize((64, 48)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


# --------------------------------------------------------------------------- PNG


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def chunk_flood_png(chunks: int, kind: bytes = b"zzZz", width: int = 16, height: int = 16
                    ) -> bytes:
    """A small grey PNG with ``chunks`` empty ``kind`` chunks (12 bytes each) before its image
    data: PIL walks them in Python (about 0.25 s a MB for ancillary chunks). ``kind=b"IDAT"``
    floods the image data itself with empty chunks after the real one."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = _chunk(b"IDAT", zlib.compress((b"\x00" + b"\x80" * width) * height))
    flood = _chunk(kind, b"") * chunks
    body = idat + flood if kind == b"IDAT" else flood + idat
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + body + _chunk(b"IEND", b"")


# --------------------------------------------------------------------------- GIF


def extension_flood_gif(extensions: int) -> bytes:
    """A small GIF with ``extensions`` one-byte comment extensions (5 bytes each) before its
    first image: PIL reads each in Python (about 0.1 s a MB)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("P", (16, 16), 1).save(buf, "GIF")
    data = buf.getvalue()
    flags = data[10]
    start = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    return data[:start] + b"\x21\xfe\x01a\x00" * extensions + data[start:]


# --------------------------------------------------------------------------- transcoding


def gzip_expanding(expanded: int) -> bytes:
    """A valid JPEG padded with zeros to ``expanded`` bytes, gzip-compressed (about 1/1000 of
    that). Stored with ``Content-Encoding: gzip``, fake-gcs-server (as GCS) notifies the stored
    size (``"size"``, with ``"contentEncoding": "gzip"``) and serves a plain download
    decompressed; it decodes ``ok`` unless the download stops at the notified size."""
    data = small_jpeg()
    return gzip.compress(data + b"\x00" * (expanded - len(data)), compresslevel=9, mtime=0)


MiB = 1024 * 1024

STREAM_UPLOADS: list[tuple[str, bytes, dict, str]] = [
    ("hostile/progressive-300-scans.jpg", progressive_jpeg(3000, 3000, 300), {}, "too_large"),
    ("hostile/progressive-8000x8000.jpg", progressive_jpeg(8000, 8000, 1), {}, "too_large"),
    ("hostile/multiscan-6000x6000.jpg", multiscan_jpeg(6000, 6000), {}, "too_large"),
    ("hostile/comment-flood.jpg", marker_flood_jpeg(10_001), {}, "too_large"),  # 40 KB
    ("hostile/chunk-flood.png", chunk_flood_png(10_001), {}, "too_large"),  # 120 KB
    ("hostile/extension-flood.gif", extension_flood_gif(10_001), {}, "too_large"),  # 50 KB
    # a gzip object is charged max_bytes (32 MiB): one that expands past it stops there
    ("hostile/gzip-40MiB.jpg", gzip_expanding(40 * MiB), {"content_encoding": "gzip"},
     "too_large"),
]
