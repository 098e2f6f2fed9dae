"""Model bundles: a trained head on a frozen base model, versioned by content, swapped by pointer.

    from pipeline.model import bundles
    ref = bundles.resolve("gs://my-bucket/models/flowers", settings)   # location → current
    bundle = bundles.load(ref.uri, settings)                          # checked, or BundleError
    bundles.promote("gs://my-bucket/models/flowers", "3f9c2a1b7d4e", settings)

A **bundle** is a directory (local or ``gs://``) holding ``bundle.json`` (base model, its
preprocessing, the labels in order, version, validation figures, dataset summary) and
``head.safetensors`` (the linear head's ``weight`` and ``bias``): nothing needs pickle to load.
Its **version** is a hash of what decides its predictions (base, preprocessing, labels, head
bytes), so a version never changes once written and executors may cache it by URI. A bundle is
data from storage, not code: ``load`` recomputes the version from the content and refuses a
manifest that claims another (labels or preprocessing edited under the old id), bounds the
preprocessing, and takes file and version names only as plain names, never paths.

A **location** is a directory of versions plus a ``CURRENT`` file naming one of them::

    LOCATION/CURRENT                   # "3f9c2a1b7d4e\\n"
    LOCATION/3f9c2a1b7d4e/bundle.json
    LOCATION/3f9c2a1b7d4e/head.safetensors
    LOCATION/0a1b2c3d4e5f/...          # older versions stay beside it

``train --out LOCATION`` adds a version; ``models promote`` rewrites ``CURRENT`` (one small
object write, atomic on GCS and by rename locally); a stream given the location notices the
new pointer between micro-batches (:class:`Watcher`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import UserError
from pipeline.names import printable, split_gs

if TYPE_CHECKING:
    import torch

    from pipeline.config import Settings
    from pipeline.model.images import Preprocess

log = logging.getLogger("bucketlens.bundles")

FORMAT = "bucketlens.bundle/1"
MANIFEST = "bundle.json"
HEAD_FILE = "head.safetensors"
POINTER = "CURRENT"
VERSION_ID = re.compile(r"[0-9a-f]{12}")  # content_version's form: what CURRENT may name
FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")  # a plain name: no "/", no ".."
POINTER_BYTES = 1024  # CURRENT holds one version id
MANIFEST_BYTES = 64 * 1024 * 1024  # a 1,000-class validation confusion matrix is ~10 MB
# Preprocessing bounds. torchvision's largest evaluation size is 600 (EfficientNet-B7); each
# image becomes at most MAX_SIDE x images.MAX_ASPECT * MAX_SIDE pixels before the crop.
MAX_SIDE = 1024
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")  # what tensors resize with
MIN_STD = 0.001  # mean and std are of pixel values in [0, 1]; a tiny std blows values up
# (the smallest a torchvision model uses is 1/255: VGG16_Weights.IMAGENET1K_FEATURES)
MAX_LABELS = 100_000
MAX_LABEL_CHARS = 1024


class BundleError(UserError):
    """A bundle or location that cannot be used; the message is one sentence."""


# --------------------------------------------------------------------------- storage edge


def is_reference(model: str) -> bool:
    """Whether ``model`` names a bundle or location (a path or URI) rather than a model name."""
    return model.startswith("gs://") or os.sep in model or model.startswith(".") or \
        Path(model).exists()


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _gs(uri: str, settings: Settings):
    from pipeline.clients import storage_client

    bucket, name = split_gs(uri, object_name=True)
    return storage_client(settings).bucket(bucket).blob(name)


def read_bytes(uri: str, settings: Settings, limit: int | None = None) -> bytes | None:
    """The object or file at ``uri``; ``None`` when there is none. With a ``limit``, at most
    ``limit + 1`` bytes are read, and a longer one is refused."""
    if uri.startswith("gs://"):
        from google.api_core.exceptions import NotFound, RequestRangeNotSatisfiable

        try:  # ``end`` is inclusive: one byte past the limit tells "too long" from "exactly"
            data = _gs(uri, settings).download_as_bytes(
                **({"start": 0, "end": limit} if limit is not None else {}))
        except NotFound:
            return None
        except RequestRangeNotSatisfiable:  # a range of a zero-byte object (HTTP 416)
            data = b""
    else:
        path = Path(uri)
        if not path.is_file():
            return None
        with path.open("rb") as f:
            data = f.read(-1 if limit is None else limit + 1)
    if limit is not None and len(data) > limit:
        raise BundleError(f"{printable(uri)} is larger than {limit:,} bytes, too large to be "
                          "what it is named for.")
    return data


def write_bytes(uri: str, data: bytes, settings: Settings) -> None:
    """Write whole: a GCS object write is atomic; locally a rename makes it so."""
    if uri.startswith("gs://"):
        _gs(uri, settings).upload_from_string(data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, prefix=".tmp-") as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)


def list_versions(location: str, settings: Settings) -> list[str]:
    """Version directories under ``location`` that hold a manifest, sorted by name."""
    if location.startswith("gs://"):
        from pipeline.clients import storage_client

        bucket, prefix = split_gs(location)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        blobs = storage_client(settings).list_blobs(bucket, prefix=prefix)
        return sorted({b.name[len(prefix):].split("/")[0] for b in blobs
                       if b.name.endswith("/" + MANIFEST) and b.name.count("/") == prefix.count("/") + 1})
    root = Path(location)
    return sorted(p.parent.name for p in root.glob(f"*/{MANIFEST}")) if root.is_dir() else []


# --------------------------------------------------------------------------- the bundle


@dataclass(frozen=True)
class Bundle:
    """A loaded, checked bundle: what a handler needs to classify with it."""

    uri: str
    manifest: Mapping[str, Any]
    weight: torch.Tensor  # (len(labels), embedding_dim)
    bias: torch.Tensor  # (len(labels),)

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.manifest["labels"])

    @property
    def base_model(self) -> str:
        return str(self.manifest["base"]["model"])

    @property
    def base_weights(self) -> str:
        return str(self.manifest["base"].get("weights", ""))

    @property
    def preprocess(self) -> Preprocess:
        return preprocess_from_json(self.manifest["preprocess"])


def preprocess_to_json(p: Preprocess) -> dict[str, Any]:
    return {"resize": p.resize, "crop": p.crop, "mean": list(p.mean), "std": list(p.std),
            "interpolation": p.interpolation.value}


class ManifestError(ValueError):
    """What is wrong with a manifest's content, as the end of a sentence."""


def _integer(raw: Any, where: str, low: int, high: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
        raise ManifestError(f"{where} must be an integer from {low} to {high}, not "
                            f"{printable(json.dumps(raw), 40)}")
    return raw


def _numbers(raw: Any, where: str, low: float, high: float) -> tuple[float, ...]:
    ok = (isinstance(raw, list) and len(raw) == 3
          and all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                  and low <= x <= high for x in raw))
    if not ok:
        raise ManifestError(f"{where} must be 3 numbers (R, G, B) from {low:g} to {high:g}, not "
                            f"{printable(json.dumps(raw), 60)}")
    return tuple(float(x) for x in raw)


def preprocess_from_json(raw: Mapping[str, Any]) -> Preprocess:
    """The manifest's preprocessing, bounded: the manifest is data, and ``resize`` decides how
    much memory every image takes. Raises :class:`ManifestError`."""
    from torchvision.transforms import InterpolationMode

    from pipeline.model.images import Preprocess

    if not isinstance(raw, Mapping):
        raise ManifestError("preprocess must be an object")
    resize = _integer(raw.get("resize"), "preprocess.resize", 1, MAX_SIDE)
    crop = _integer(raw.get("crop"), "preprocess.crop", 1, resize)
    interpolation = raw.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS:
        raise ManifestError(f"preprocess.interpolation must be one of {', '.join(INTERPOLATIONS)}"
                            f", not {printable(json.dumps(interpolation), 40)}")
    return Preprocess(resize=resize, crop=crop,
                      mean=_numbers(raw.get("mean"), "preprocess.mean", 0.0, 1.0),
                      std=_numbers(raw.get("std"), "preprocess.std", MIN_STD, 1.0),
                      interpolation=InterpolationMode(interpolation))


def _text(raw: Any, where: str, limit: int = 200) -> str:
    if not isinstance(raw, str) or not 1 <= len(raw) <= limit:
        raise ManifestError(f"{where} must be a string of 1 to {limit} characters")
    return raw


def check_manifest(manifest: Any) -> None:
    """Every field a bundle is used by, of the right type and within bounds (pure); else
    :class:`ManifestError` saying which field and why."""
    if not isinstance(manifest, dict):
        raise ManifestError("it is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"its format is {printable(json.dumps(manifest.get('format')), 40)}; "
                            f"this bucketlens reads {FORMAT!r}")
    _text(manifest.get("name"), "name")
    version = manifest.get("version")
    if not isinstance(version, str) or not VERSION_ID.fullmatch(version):
        raise ManifestError("version must be 12 lowercase hex digits")
    base = manifest.get("base")
    if not isinstance(base, dict):
        raise ManifestError("base must be an object")
    _text(base.get("model"), "base.model")
    if not isinstance(base.get("weights", ""), str):
        raise ManifestError("base.weights must be a string")
    preprocess_from_json(manifest.get("preprocess"))
    labels = manifest.get("labels")
    if (not isinstance(labels, list) or not 2 <= len(labels) <= MAX_LABELS
            or not all(isinstance(x, str) and 1 <= len(x) <= MAX_LABEL_CHARS for x in labels)
            or len(set(labels)) != len(labels)):
        raise ManifestError(f"labels must be a list of 2 to {MAX_LABELS:,} distinct strings of 1 "
                            f"to {MAX_LABEL_CHARS} characters")
    head = manifest.get("head")
    if not isinstance(head, dict):
        raise ManifestError("head must be an object")
    if not isinstance(head.get("file"), str) or not FILE_NAME.fullmatch(head["file"]):
        raise ManifestError("head.file must be a plain file name (letters, digits, '.', '_', "
                            "'-'; no '/')")
    if not isinstance(head.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", head["sha256"]):
        raise ManifestError("head.sha256 must be 64 lowercase hex digits")


def content_version(base: Mapping[str, Any], preprocess: Mapping[str, Any],
                    labels: Sequence[str], head: bytes) -> str:
    """The version id: 12 hex digits of a SHA-256 over everything that decides a prediction."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"base": base, "preprocess": preprocess, "labels": list(labels)},
                             sort_keys=True).encode())
    digest.update(head)
    return digest.hexdigest()[:12]


def head_bytes(weight: torch.Tensor, bias: torch.Tensor) -> bytes:
    from safetensors.torch import save

    return save({"weight": weight.detach().float().contiguous().cpu(),
                 "bias": bias.detach().float().contiguous().cpu()})


def build_manifest(*, name: str, base: Mapping[str, Any], preprocess: Mapping[str, Any],
                   labels: Sequence[str], head: bytes, extra: Mapping[str, Any]) -> dict[str, Any]:
    """``bundle.json`` for a head: the version is computed here, never chosen."""
    return {
        "format": FORMAT,
        "name": name,
        "version": content_version(base, preprocess, labels, head),
        "base": dict(base),
        "preprocess": dict(preprocess),
        "labels": list(labels),
        "head": {"file": HEAD_FILE, "sha256": hashlib.sha256(head).hexdigest()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
    }


def save(location: str, manifest: Mapping[str, Any], head: bytes, settings: Settings) -> str:
    """Write the version beside any others in ``location``; returns the version's URI.

    The head goes first and the manifest last, so a reader never sees a manifest whose head is
    missing. ``CURRENT`` is set only when the location has none (the first version).
    """
    uri = join(location, manifest["version"])
    write_bytes(join(uri, HEAD_FILE), head, settings)
    write_bytes(join(uri, MANIFEST), json.dumps(manifest, indent=2).encode(), settings)
    if current_version(location, settings) is None:
        write_bytes(join(location, POINTER), f"{manifest['version']}\n".encode(), settings)
    return uri


def load(uri: str, settings: Settings) -> Bundle:
    """The bundle at ``uri`` (a version directory), every part checked; else one sentence."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_tensors

    shown = printable(uri)
    raw = read_bytes(join(uri, MANIFEST), settings, MANIFEST_BYTES)
    if raw is None:
        raise BundleError(f"{shown} is not a model bundle: it has no {MANIFEST}.")
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than a stack
        reason = "nested too deeply" if isinstance(exc, RecursionError) else printable(str(exc))
        raise BundleError(f"{shown}/{MANIFEST} is not a valid bundle manifest: not JSON "
                          f"({reason}).") from None
    try:
        check_manifest(manifest)
    except ManifestError as exc:
        raise BundleError(f"{shown}/{MANIFEST} is not a valid bundle manifest: {exc}.") from None
    labels, base = manifest["labels"], manifest["base"]["model"]
    head_name, digest = manifest["head"]["file"], manifest["head"]["sha256"]
    directory = uri.rstrip("/").rsplit("/", 1)[-1]
    if VERSION_ID.fullmatch(directory) and directory != manifest["version"]:
        raise BundleError(f"{shown} holds version {manifest['version']}, not the {directory} its "
                          "directory is named for (a copied or renamed version).")
    head = read_bytes(join(uri, head_name), settings)
    if head is None:
        raise BundleError(f"{shown} is missing its head weights ({head_name}).")
    if hashlib.sha256(head).hexdigest() != digest:
        raise BundleError(f"{shown}/{head_name} does not match the checksum in {MANIFEST} "
                          "(corrupt or replaced weights).")
    try:
        tensors = load_tensors(head)
        weight, bias = tensors["weight"], tensors["bias"]
    except (SafetensorError, KeyError, ValueError) as exc:
        raise BundleError(f"{shown}/{head_name} is not a weight/bias safetensors file "
                          f"({type(exc).__name__}).") from None
    if weight.ndim != 2 or weight.shape[0] != len(labels) or tuple(bias.shape) != (len(labels),):
        raise BundleError(f"{shown}: the head has {weight.shape[0] if weight.ndim else 0} outputs "
                          f"but the bundle lists {len(labels)} labels.")
    actual = content_version(manifest["base"], manifest["preprocess"], labels, head)
    if actual != manifest["version"]:
        raise BundleError(f"{shown}: its content is version {actual}, not the "
                          f"{manifest['version']} its manifest claims (base, preprocessing or "
                          "labels changed after it was written).")
    log.debug("loaded bundle %s (%s, %d labels, base %s)", uri, manifest.get("version"),
              len(labels), base)
    return Bundle(uri, manifest, weight, bias)


# --------------------------------------------------------------------------- locations


def check_version(version: str, where: str) -> str:
    """``version`` if it is a plain version id; else one sentence (never a path: ``../..``
    in CURRENT or on a command line must not reach outside the location)."""
    if not VERSION_ID.fullmatch(version):
        raise BundleError(f"{where} names '{printable(version, 80)}', which is not a model "
                          "version (12 lowercase hex digits).")
    return version


def current_version(location: str, settings: Settings) -> str | None:
    """The version ``CURRENT`` names, checked; None when there is no (or an empty) CURRENT."""
    raw = read_bytes(join(location, POINTER), settings, POINTER_BYTES)
    if raw is None:
        return None
    try:
        version = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        version = raw.decode("latin-1").strip()  # shown escaped in the refusal below
    return check_version(version, f"{printable(location)}/{POINTER}") if version else None


@dataclass(frozen=True)
class Reference:
    """What a ``--model`` path resolved to: a fixed version, or a location's current one."""

    uri: str  # the version directory
    location: str | None  # set when the reference follows a location's CURRENT


def resolve(model: str, settings: Settings) -> Reference:
    """A bundle path/URI → its version directory; a location → its current version's."""
    model = model.rstrip("/")
    version = current_version(model, settings)
    if version is not None:
        return Reference(join(model, version), model)
    if read_bytes(join(model, MANIFEST), settings, MANIFEST_BYTES) is not None:
        return Reference(model, None)
    raise BundleError(f"{printable(model)} is neither a model bundle ({MANIFEST}) nor a model location "
                      f"({POINTER} naming a version); train one with `bucketlens train`.")


def load_version(location: str, version: str, settings: Settings) -> Bundle:
    """The bundle of one of ``location``'s versions; ``version`` must be a plain version id."""
    return load(join(location.rstrip("/"), check_version(version, "the version")), settings)


def promote(location: str, version: str, settings: Settings) -> Bundle:
    """Point ``location`` at ``version`` after checking the bundle loads."""
    bundle = load_version(location, version, settings)
    write_bytes(join(location.rstrip("/"), POINTER), f"{version}\n".encode(), settings)
    return bundle


@dataclass
class Watcher:
    """The driver's view of a model location: re-reads ``CURRENT`` at most every ``interval``
    seconds, between micro-batches; a broken new version is refused with one log line.

    ``check`` (loading the bundle's manifest and head, and finding its base's weights) runs
    before a version is accepted, so an executor never sees a bundle the driver refused.
    """

    location: str
    settings: Settings
    interval: float
    check: Callable[[str], object]
    uri: str = ""
    refused: set[str] = field(default_factory=set)  # said once each; checked again each time
    _checked_at: float = float("-inf")
    clock: Callable[[], float] = time.monotonic

    def current(self) -> str:
        """The version URI the next batch uses (the same one until a checked swap)."""
        now = self.clock()
        if self.uri and now - self._checked_at < self.interval:
            return self.uri
        self._checked_at = now
        try:
            version = current_version(self.location, self.settings)
        except BundleError as exc:  # CURRENT names no version: like a broken version
            if not self.uri:
                raise
            if str(exc) not in self.refused:
                self.refused.add(str(exc))
                log.error("refused %s (%s); keeping %s", POINTER, exc, self.uri)
            return self.uri
        except Exception as exc:  # noqa: BLE001 - a storage hiccup keeps the model in use
            log.warning("model location %s unreadable (%s); keeping %s", self.location,
                        type(exc).__name__, self.uri)
            return self.uri
        if version is None:
            if not self.uri:
                raise BundleError(f"{self.location} has no {POINTER} version.")
            return self.uri
        uri = join(self.location, version)
        if uri == self.uri:
            return self.uri
        try:
            self.check(uri)
        except Exception as exc:
            if not self.uri:
                raise
            if uri not in self.refused:
                self.refused.add(uri)
                log.error("refused model version %s (%s); keeping %s", uri, exc, self.uri)
            return self.uri
        if self.uri:
            log.warning("model swapped: %s → %s", self.uri, uri)
        self.uri = uri
        return uri
