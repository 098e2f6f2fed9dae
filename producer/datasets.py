"""Where the images come from: class-folder discovery, the bundled sample set, the flowers download.

Every source ends up as the same thing, a directory laid out ``<root>/<class>/<file>``, so the
replay never needs to know which one it got. Downloads and generated sets live in one cache
directory and are built atomically (temporary name, then rename), so an interrupted run never
leaves a half-built dataset that a later run would trust.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pipeline.model.classfolders import DatasetError
from pipeline.names import describe

FLOWERS_URL = (
    "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
)
# From tensorflow/datasets url_checksums/tf_flowers.txt; checked only for this exact URL, since
# a mirror or a test server (BUCKETLENS_FLOWERS_URL) serves other bytes.
FLOWERS_SIZE = 228_813_984
FLOWERS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"
FLOWERS_CLASSES = ("daisy", "dandelion", "roses", "sunflowers", "tulips")
FLOWERS_DIR = "flower_photos"

CACHE_ENV = "BUCKETLENS_CACHE"
FLOWERS_URL_ENV = "BUCKETLENS_FLOWERS_URL"

# Bounds on what a download may make us store: a mirror or BUCKETLENS_FLOWERS_URL serves any
# bytes. The real archive is 229 MB and expands about 1:1 (JPEGs) into 3,670 photos.
MAX_DOWNLOAD_BYTES = 1024 * 1024 * 1024
MAX_MEMBERS = 20_000
MAX_EXTRACTED_BYTES = 2 * 1024 * 1024 * 1024
MAX_EXPANSION = 4  # extracted bytes per archive byte: a tar bomb expands ~1000:1
MIN_EXTRACTED_BYTES = 64 * 1024 * 1024  # small archives of tiny files may expand more


def cache_dir() -> Path:
    """``$BUCKETLENS_CACHE``, else the XDG cache (``~/.cache/bucketlens``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "bucketlens"


# --- the flowers download -------------------------------------------------------------------


def download_flowers(
    cache: Path | None = None,
    url: str | None = None,
    *,
    timeout: float = 30.0,
    log: Callable[[str], None] | None = None,
) -> Path:
    """The TF flower_photos set (5 classes, 3,670 photos), downloaded once and then reused.

    ``url`` defaults to ``$BUCKETLENS_FLOWERS_URL``, then the TensorFlow URL. Returns the
    class-folder directory.
    """
    cache = cache or cache_dir()
    url = url or os.environ.get(FLOWERS_URL_ENV) or FLOWERS_URL
    dest = cache / FLOWERS_DIR
    if dest.is_dir():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".flowers-") as tmp:
        archive = Path(tmp) / "flower_photos.tgz"
        if log:
            log(f"downloading {url} into {cache}")
        size, digest = _fetch(url, archive, timeout)
        if url == FLOWERS_URL and (size, digest) != (FLOWERS_SIZE, FLOWERS_SHA256):
            raise DatasetError(
                f"The download from {url} is corrupt ({size} bytes, sha256 {digest}, expected "
                f"{FLOWERS_SIZE} bytes, sha256 {FLOWERS_SHA256}); run the command again."
            )
        extracted = _extract_flowers(archive, Path(tmp) / "x", url)
        extracted.rename(dest)
    return dest


def _fetch(url: str, dest: Path, timeout: float,
           max_bytes: int | None = None) -> tuple[int, str]:
    """Stream ``url`` into ``dest``, refusing more than ``max_bytes``; returns size and sha256."""
    limit = MAX_DOWNLOAD_BYTES if max_bytes is None else max_bytes
    sha, size = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, dest.open("wb") as out:
            declared = resp.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limit:
                raise _too_big(url, f"{declared} bytes", limit)
            while chunk := resp.read(1 << 20):
                sha.update(chunk)
                size += len(chunk)
                if size > limit:
                    raise _too_big(url, f"more than {limit} bytes", limit)
                out.write(chunk)
    except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DatasetError(
            f"Could not download the flowers dataset from {url} ({reason}); without internet, "
            "replay a local class-folder directory with --dataset DIR or the bundled sample "
            "photos with --sample."
        ) from exc
    return size, sha.hexdigest()


def _too_big(url: str, what: str, limit: int) -> DatasetError:
    return DatasetError(f"The download from {url} is {what}, over the {limit}-byte limit; "
                        "replay a local class-folder directory with --dataset DIR instead.")


def extraction_limit(archive_size: int) -> int:
    """Bytes an archive of ``archive_size`` bytes may extract to (pure)."""
    return min(MAX_EXTRACTED_BYTES, max(MIN_EXTRACTED_BYTES, MAX_EXPANSION * archive_size))


def check_members(members: Iterable[tarfile.TarInfo], limit: int,
                  max_members: int = MAX_MEMBERS) -> list[tarfile.TarInfo]:
    """The members, once their count and declared sizes are within bounds (reads headers only)."""
    kept, total = [], 0
    for member in members:
        kept.append(member)
        total += max(member.size, 0)
        if len(kept) > max_members:
            raise DatasetError(f"The archive has more than {max_members} files; refusing to "
                               "extract it.")
        if total > limit:
            raise DatasetError(f"The archive expands to more than {limit} bytes; refusing to "
                               "extract it.")
    return kept


def _extract_flowers(archive: Path, into: Path, url: str) -> Path:
    """Extract safely — no absolute paths, links out or devices, and bounded in file count and
    bytes before anything is written — then check the 5 class folders."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = check_members(tar, extraction_limit(archive.stat().st_size))
            tar.extractall(into, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DatasetError(
            f"The download from {url} is not a valid .tgz archive ({describe(exc)}).") from exc
    root = into / FLOWERS_DIR
    missing = [c for c in FLOWERS_CLASSES
               if not (root / c).is_dir() or not any((root / c).iterdir())]
    if missing:
        raise DatasetError(
            f"The archive from {url} lacks the flower class folders {', '.join(missing)} "
            f"under {FLOWERS_DIR}/."
        )
    return root


# --- the bundled sample set -----------------------------------------------------------------


def _skimage(name: str) -> Callable[[], Any]:
    def load() -> Any:
        from skimage import data

        img = getattr(data, name)()
        return img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disp)

    return load


def _sklearn(name: str) -> Callable[[], Any]:
    def load() -> Any:
        # The photo is package data; finding it without importing scikit-learn saves ~3 s.
        spec = importlib.util.find_spec("sklearn")
        if spec is None or spec.origin is None:
            raise ImportError("scikit-learn is not installed")
        return Path(spec.origin).parent / "datasets" / "images" / name

    return load


def _matplotlib(name: str) -> Callable[[], Any]:
    def load() -> Any:
        from matplotlib import cbook

        return cbook.get_sample_data(name, asfileobj=False)

    return load


# (class, file stem, loader) — real photos that installed packages ship (the `samples` extra).
SAMPLE_SOURCES: tuple[tuple[str, str, Callable[[], Any]], ...] = (
    ("cat", "chelsea", _skimage("chelsea")),
    ("coffee", "coffee", _skimage("coffee")),
    ("astronaut", "astronaut", _skimage("astronaut")),
    ("rocket", "rocket", _skimage("rocket")),
    ("motorcycle", "motorcycle", _skimage("stereo_motorcycle")),
    ("camera", "cameraman", _skimage("camera")),
    ("coins", "coins", _skimage("coins")),
    ("daisy", "flower", _sklearn("flower.jpg")),
    ("palace", "china", _sklearn("china.jpg")),
    ("person", "grace_hopper", _matplotlib("grace_hopper.jpg")),
)


def sample_dataset(dest: Path | None = None) -> Path:
    """A small class-folder set of real photos, written as RGB JPEGs; idempotent.

    Works offline: the photos come from scikit-image, scikit-learn and matplotlib. Sources whose
    package is missing are left out; none at all is an error.
    """
    from PIL import Image

    dest = dest or cache_dir() / "sample"
    written = 0
    for class_name, stem, load in SAMPLE_SOURCES:
        target = dest / class_name / f"{stem}.jpg"
        if target.is_file():
            written += 1
            continue
        try:
            source = load()
            img = Image.open(source) if isinstance(source, str | Path) else Image.fromarray(source)
        except (ImportError, FileNotFoundError):  # that package (or its photo) is absent
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        img.convert("RGB").save(tmp, format="JPEG", quality=92)
        tmp.replace(target)
        written += 1
    if not written:
        raise DatasetError(
            "No sample photos are available: install bucketlens with the `samples` extra "
            "(scikit-image, scikit-learn, matplotlib) or replay a directory with --dataset DIR."
        )
    return dest


# Pixels a side. Bicubic scaling gives the strokes the smooth edges of a photo; measured with
# EfficientNet-Lite0 features and the trained head, top-1 is 0.93–0.95 over three splits,
# against 0.89–0.91 for blocky pixel replication.
DIGITS_SIZE = 64


def digits_dataset(dest: Path | None = None) -> Path:
    """scikit-learn's 1,797 real handwritten digit scans (8×8, 17 grey levels) as
    ``<dest>/<digit>/digit_NNNN.png``, scaled to 64×64; idempotent, offline.

    A labelled set that ships with an installed package, so training and accuracy can be
    checked end to end without the network (the `samples` extra).
    """
    from PIL import Image

    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetError("The digits set needs scikit-learn: install bucketlens with the "
                           "`samples` extra.") from exc
    dest = dest or cache_dir() / f"digits-{DIGITS_SIZE}-bicubic"  # a rendering change: new set
    digits = load_digits()
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        path = dest / str(int(target)) / f"digit_{index:04d}.png"
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray((pixels * (255 / 16)).round().astype("uint8"))  # 2-D uint8: "L"
        tmp = path.with_name(f".{path.name}.tmp")
        grey.resize((DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BICUBIC).save(tmp, format="PNG")
        tmp.replace(path)
    return dest
