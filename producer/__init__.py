"""Dataset discovery/download and steady-rate shuffled replay into a bucket.

The names below load on first use, so the ``bucketlens`` parser (which registers ``produce``)
stays free of the Google clients until a command runs.
"""

import importlib
from typing import Any

import pipeline  # noqa: F401  (sets gRPC fork safety before any client import)

_EXPORTS = {
    "DatasetError": "producer.datasets", "Item": "producer.datasets",
    "discover": "producer.datasets", "download_flowers": "producer.datasets",
    "sample_dataset": "producer.datasets",
    "Result": "producer.replay", "Summary": "producer.replay", "TokenBucket": "producer.replay",
    "preview": "producer.replay", "replay": "producer.replay",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'producer' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
