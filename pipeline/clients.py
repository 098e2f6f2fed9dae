"""Google client factories: the one place that knows about emulators and endpoints.

The storage and Pub/Sub clients honour ``STORAGE_EMULATOR_HOST`` / ``PUBSUB_EMULATOR_HOST``
themselves; BigQuery has no such variable, so ``Settings.bq_endpoint`` selects an emulator
(REST) and ``Settings.bq_storage_endpoint`` its Storage Write API (gRPC).
Imports are local so that pure modules importing this one stay cheap.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

from pipeline.config import Settings

if TYPE_CHECKING:
    from google.cloud import bigquery, pubsub_v1, storage
    from google.cloud.bigquery_storage_v1 import BigQueryWriteClient


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


def bigquery_write_client(settings: Settings) -> BigQueryWriteClient:
    """The Storage Write API client: plaintext gRPC to ``bq_storage_endpoint`` (an emulator)
    when set, else Google's endpoint with the environment's credentials. An emulator's REST
    endpoint alone is refused: the writes would go to real BigQuery under a fake project."""
    from google.cloud.bigquery_storage_v1 import BigQueryWriteClient

    if settings.bq_storage_endpoint:
        import grpc
        from google.cloud.bigquery_storage_v1.services.big_query_write.transports import (
            BigQueryWriteGrpcTransport,
        )

        channel = grpc.insecure_channel(settings.bq_storage_endpoint)
        return BigQueryWriteClient(transport=BigQueryWriteGrpcTransport(channel=channel))
    if settings.bq_endpoint:
        raise ValueError("BUCKETLENS_BQ_ENDPOINT is set but BUCKETLENS_BQ_STORAGE_ENDPOINT is not:"
                         " set it to the emulator's gRPC host:port, or use sink_mode=merge")
    return BigQueryWriteClient()


def subscriber_client() -> pubsub_v1.SubscriberClient:
    from google.cloud import pubsub_v1

    return pubsub_v1.SubscriberClient()


def publisher_client() -> pubsub_v1.PublisherClient:
    from google.cloud import pubsub_v1

    return pubsub_v1.PublisherClient()
