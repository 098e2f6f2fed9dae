"""Model bundles: a trained head on a frozen base model, versioned by content, swapped by pointer.

    from pipeline import bundles
    ref = bundles.resolve("gs://my-bucket/models/flowers", settings)   # location → current
    bundle = bundles.load(ref.uri, settings)                          # checked, or BundleError
    bundles.promote("gs://my-bucket/models/flowers", "3f9c2a1b7d4e", settings)

A **bundle** is a directory (local or ``gs://``) holding ``bundle.json`` (base model, its
preprocessing, the labels in order, version, validation figures, dataset summary) and
``head.safetensors`` (the linear head's ``weight`` and ``bias``): nothing needs pickle to load.
Its **version** is a hash of what decides its predictions (base, preprocessing, labels, head
bytes), so a version never changes once written and executors may cache it by URI.

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
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import UserError

if TYPE_CHECKING:
    import torch

    from pipeline.config import Settings
    from pipeline.images import Preprocess

log = logging.getLogger("bucketlens.bundles")

FORMAT = "bucketlens.bundle/1"
MANIFEST = "bundle.json"
HEAD_FILE = "head.safetensors"
POINTER = "CURRENT"


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

    bucket, _, name = uri.removeprefix("gs://").partition("/")
    return storage_client(settings).bucket(bucket).blob(name)


def read_bytes(uri: str, settings: Settings) -> bytes | None:
    """The object or file at ``uri``; ``None`` when there is none."""
    if uri.startswith("gs://"):
        from google.api_core.exceptions import NotFound

        try:
            return _gs(uri, settings).download_as_bytes()
        except NotFound:
            return None
    path = Path(uri)
    return path.read_bytes() if path.is_file() else None


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

        bucket, _, prefix = location.removeprefix("gs://").partition("/")
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


def preprocess_from_json(raw: Mapping[str, Any]) -> Preprocess:
    from torchvision.transforms import InterpolationMode

    from pipeline.images import Preprocess

    return Preprocess(resize=int(raw["resize"]), crop=int(raw["crop"]),
                      mean=tuple(float(x) for x in raw["mean"]),
                      std=tuple(float(x) for x in raw["std"]),
                      interpolation=InterpolationMode(raw.get("interpolation", "bilinear")))


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

    raw = read_bytes(join(uri, MANIFEST), settings)
    if raw is None:
        raise BundleError(f"{uri} is not a model bundle: it has no {MANIFEST}.")
    try:
        manifest = json.loads(raw)
        labels, base = manifest["labels"], manifest["base"]["model"]
        head_name, digest = manifest["head"]["file"], manifest["head"]["sha256"]
        preprocess_from_json(manifest["preprocess"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{join(uri, MANIFEST)} is not a valid bundle manifest "
                          f"({type(exc).__name__}: {exc}).") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{uri} has bundle format {manifest.get('format')!r}; this bucketlens "
                          f"reads {FORMAT!r}.")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise BundleError(f"{uri}: labels must be a list of at least two strings.")
    head = read_bytes(join(uri, head_name), settings)
    if head is None:
        raise BundleError(f"{uri} is missing its head weights ({head_name}).")
    if hashlib.sha256(head).hexdigest() != digest:
        raise BundleError(f"{join(uri, head_name)} does not match the checksum in {MANIFEST} "
                          "(corrupt or replaced weights).")
    try:
        tensors = load_tensors(head)
        weight, bias = tensors["weight"], tensors["bias"]
    except (SafetensorError, KeyError, ValueError) as exc:
        raise BundleError(f"{join(uri, head_name)} is not a weight/bias safetensors file "
                          f"({type(exc).__name__}).") from None
    if weight.ndim != 2 or weight.shape[0] != len(labels) or tuple(bias.shape) != (len(labels),):
        raise BundleError(f"{uri}: the head has {weight.shape[0] if weight.ndim else 0} outputs "
                          f"but the bundle lists {len(labels)} labels.")
    log.debug("loaded bundle %s (%s, %d labels, base %s)", uri, manifest.get("version"),
              len(labels), base)
    return Bundle(uri, manifest, weight, bias)


# --------------------------------------------------------------------------- locations


def current_version(location: str, settings: Settings) -> str | None:
    raw = read_bytes(join(location, POINTER), settings)
    return (raw.decode().strip() or None) if raw is not None else None


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
    if read_bytes(join(model, MANIFEST), settings) is not None:
        return Reference(model, None)
    raise BundleError(f"{model} is neither a model bundle ({MANIFEST}) nor a model location "
                      f"({POINTER} naming a version); train one with `bucketlens train`.")


def promote(location: str, version: str, settings: Settings) -> Bundle:
    """Point ``location`` at ``version`` after checking the bundle loads."""
    bundle = load(join(location.rstrip("/"), version), settings)
    write_bytes(join(location.rstrip("/"), POINTER), f"{version}\n".encode(), settings)
    return bundle


@dataclass
class Watcher:
    """The driver's view of a model location: re-reads ``CURRENT`` at most every ``interval``
    seconds, between micro-batches; a broken new version is refused with one log line.

    ``check`` (loading the bundle and its base) runs before a version is accepted, so an
    executor never sees a bundle the driver could not load.
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
