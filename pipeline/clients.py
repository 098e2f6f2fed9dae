"""Google client factories: the one place that knows about emulators and endpoints.

The storage and Pub/Sub clients honour ``STORAGE_EMULATOR_HOST`` / ``PUBSUB_EMULATOR_HOST``
themselves; BigQuery has no such variable, so ``Settings.bq_endpoint`` selects an emulator.
Imports are local so that pure modules importing this one stay cheap.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

from pipeline.config import Settings

if TYPE_CHECKING:
    from google.cloud import bigquery, pubsub_v1, storage


def _anonymous():
    from google.auth.credentials import AnonymousCredentials

    return AnonymousCredentials()


@functools.lru_cache(maxsize=8)
def _shared_storage(project: str, emulator: str) -> storage.Client:
    return storage_client(Settings(project=project))


def shared_storage_client(settings: Settings) -> storage.Client:
    """One client per process (per Spark worker, like the model): building one may look up
    credentials on the metadata server, which must not happen per task."""
    return _shared_storage(settings.project, os.environ.get("STORAGE_EMULATOR_HOST", ""))


def storage_client(settings: Settings) -> storage.Client:
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client(project=settings.project, credentials=_anonymous())
    return storage.Client(project=settings.project)


def bigquery_client(settings: Settings) -> bigquery.Client:
    from google.cloud import bigquery

    if settings.bq_endpoint:
        return bigquery.Client(
            project=settings.project,
            credentials=_anonymous(),
            client_options={"api_endpoint": settings.bq_endpoint},
        )
    return bigquery.Client(project=settings.project, location=settings.bq_location)


def subscriber_client() -> pubsub_v1.SubscriberClient:
    from google.cloud import pubsub_v1

    return pubsub_v1.SubscriberClient()


def publisher_client() -> pubsub_v1.PublisherClient:
    from google.cloud import pubsub_v1

    return pubsub_v1.PublisherClient()
