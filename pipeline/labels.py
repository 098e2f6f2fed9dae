"""Which model produced a row, and which of its own labels a true label names.

A class folder ``acoustic_guitar`` names the ImageNet label "acoustic guitar", and a folder
``Daisy`` a bundle's "daisy": matching ignores case, ``_`` versus space and repeated spaces,
so such labels are scored directly; ``schemas/class_mapping.json`` is only for datasets whose
names differ from the model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

IMAGENET = "imagenet-1k"  # label_set of a model whose outputs are ImageNet-1k's classes
OWN_LABELS = "own"  # label_set of a bundle: the labels it was trained on


def normalize_label(label: str) -> str:
    return " ".join(label.replace("_", " ").split()).casefold()


@dataclass(frozen=True)
class ModelInfo:
    """What every row records about its model: name, version, label set."""

    name: str
    version: str
    label_set: str
    labels: Sequence[str] = ()
    _by_norm: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for label in reversed(self.labels):  # the first of equal names wins
            self._by_norm[normalize_label(label)] = label

    def own_label(self, true_label: str | None) -> str | None:
        """The model's label that ``true_label`` names, or None."""
        return self._by_norm.get(normalize_label(true_label)) if true_label else None
