"""What a model is, known without its weights: its name, labels, preprocessing and version.

torchvision's weight enums carry each entry's metadata (categories, transforms) in code, so
everything here is read without a download or a state-dict load; ``weights`` reads the
parameters and ``handler`` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torchvision

from pipeline.model import images

DEFAULT_MODEL = "mobilenet_v2"
EFFICIENTNET_LITE0 = "efficientnet_lite0"
# EfficientNet-Lite was trained with inputs scaled to [-1, 1]; resize/crop as the package says.
_LITE0_PREPROCESS = images.Preprocess(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)
ALTERNATIVES = (
    "use --model efficientnet_lite0 (bundled offline weights) "
    "or --weights PATH|gs://... (a state dict)"
)


class ModelUnavailableError(RuntimeError):
    """The model or its weights cannot be had; the message is one sentence naming the way out."""


@dataclass(frozen=True)
class WeightsSource:
    """Where weights come from: ``default``/``named`` torchvision enum, a ``file``, or ``gcs``."""

    kind: Literal["default", "named", "file", "gcs"]
    value: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a model except its parameters: known without downloading anything."""

    name: str
    labels: tuple[str, ...]
    preprocess: images.Preprocess


def parse_weights(weights: str) -> WeightsSource:
    """``""`` → default, ``gs://b/o`` → gcs, an enum member name (``IMAGENET1K_V1``) → named,
    anything else → a local state-dict file."""
    weights = weights.strip()
    if not weights:
        return WeightsSource("default")
    if weights.startswith("gs://"):
        return WeightsSource("gcs", weights)
    if weights.replace("_", "").isalnum() and weights.isupper():
        return WeightsSource("named", weights)
    return WeightsSource("file", weights)


def available_models() -> list[str]:
    """Every torchvision classifier plus the offline EfficientNet-Lite0."""
    names = torchvision.models.list_models(module=torchvision.models)
    return sorted({*names, EFFICIENTNET_LITE0})


def imagenet_labels() -> tuple[str, ...]:
    """The 1,000 ImageNet class names, from torchvision's metadata (no download)."""
    return tuple(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def weights_enum(name: str, source: WeightsSource) -> torchvision.models.WeightsEnum:
    """The torchvision weights entry whose metadata (and, unless overridden, file) we use."""
    if name not in available_models():
        raise ModelUnavailableError(
            f"Unknown classification model {name!r}; choose one of available_models(), "
            f"e.g. {DEFAULT_MODEL} or {EFFICIENTNET_LITE0}."
        )
    enum = torchvision.models.get_model_weights(name)
    member = source.value if source.kind == "named" else "DEFAULT"
    try:
        return enum[member]
    except KeyError as exc:
        choices = ", ".join(enum.__members__)
        raise ModelUnavailableError(
            f"{name} has no weights {member!r}; choose one of {choices}, or {ALTERNATIVES}."
        ) from exc


def model_spec(name: str, source: WeightsSource) -> ModelSpec:
    """Labels and preprocessing for ``name``; file/gs weights reuse the default entry's."""
    if name == EFFICIENTNET_LITE0:
        if source.kind == "named":
            raise ModelUnavailableError(
                f"{EFFICIENTNET_LITE0} has only its bundled weights or --weights PATH|gs://..."
            )
        return ModelSpec(name, imagenet_labels(), _LITE0_PREPROCESS)
    weights = weights_enum(name, source)
    preprocess = images.Preprocess.from_transforms(weights.transforms())
    return ModelSpec(name, tuple(weights.meta["categories"]), preprocess)


def weights_version(name: str, source: WeightsSource) -> str:
    """What a row records as the version of a model that is not a bundle: the weights."""
    if source.kind in ("file", "gcs"):
        return source.value
    if name == EFFICIENTNET_LITE0:
        return "bundled"
    return weights_enum(name, source).name

