"""Dataset discovery/download and steady-rate shuffled replay into a bucket."""

import pipeline  # noqa: F401  (sets gRPC fork safety before any client import)
from producer.datasets import DatasetError, Item, discover, download_flowers, sample_dataset
from producer.replay import Result, Summary, TokenBucket, preview, replay

__all__ = [
    "DatasetError",
    "Item",
    "Result",
    "Summary",
    "TokenBucket",
    "discover",
    "download_flowers",
    "preview",
    "replay",
    "sample_dataset",
]
