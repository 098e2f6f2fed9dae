"""Google client factories: the one place that knows about emulators and endpoints.

Every emulator comes from ``Settings``: ``storage_emulator_host`` and ``pubsub_emulator_host``
(``Settings.from_env`` also reads Google's own ``STORAGE_EMULATOR_HOST`` /
``PUBSUB_EMULATOR_HOST``), ``bq_endpoint`` (REST) and ``bq_storage_endpoint`` (the Storage
Write API, gRPC). A host set there wins over the process environment, which nothing here reads.
Imports are local so that pure modules importing this one stay cheap.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from pipeline.config import Settings

if TYPE_CHECKING:
    from google.cloud import bigquery, pubsub_v1, storage
    from google.cloud.bigquery_storage_v1 import BigQueryWriteClient


def _anonymous():
    from google.auth.credentials import AnonymousCredentials

    return AnonymousCredentials()


@functools.lru_cache(maxsize=8)
def _shared_storage(project: str, emulator: str) -> storage.Client:
    return storage_client(Settings(project=project, storage_emulator_host=emulator))


def shared_storage_client(settings: Settings) -> storage.Client:
    """One client per process (per Spark worker, like the model): building one may look up
    credentials on the metadata server, which must not happen per task."""
    return _shared_storage(settings.project, settings.storage_emulator_host)


def storage_client(settings: Settings) -> storage.Client:
    """With ``storage_emulator_host``: that endpoint and anonymous credentials (the emulator
    set-up google-cloud-storage documents); else Cloud Storage with the environment's
    credentials."""
    from google.cloud import storage

    if settings.storage_emulator_host:
        return storage.Client(project=settings.project, credentials=_anonymous(),
                              client_options={"api_endpoint": settings.storage_emulator_host})
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


def _pubsub_emulator(settings: Settings | None, transport_class: type) -> dict[str, Any]:
    """The client arguments that reach ``settings.pubsub_emulator_host``; none for Pub/Sub.

    The emulator speaks plaintext gRPC without credentials: python-pubsub's own emulator
    support (keyed on ``PUBSUB_EMULATOR_HOST``) hands the transport an insecure channel to it,
    and so does this, so the emulator that ``settings`` names is used whatever the process
    environment says.
    """
    host = settings.pubsub_emulator_host if settings is not None else ""
    if not host:
        return {}
    import grpc

    # no message-size caps, as the library's own channels have (Pub/Sub messages reach 10 MB,
    # a pull carries many; gRPC's default receive cap is 4 MiB)
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    return {"transport": transport_class(host=host,
                                         channel=grpc.insecure_channel(host, options=options))}


def subscriber_client(settings: Settings | None = None) -> pubsub_v1.SubscriberClient:
    """Pub/Sub's subscriber API, or the emulator ``settings.pubsub_emulator_host`` names.
    Without settings the library's own defaults apply."""
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    return pubsub_v1.SubscriberClient(**_pubsub_emulator(settings, SubscriberGrpcTransport))


def publisher_client(settings: Settings | None = None) -> pubsub_v1.PublisherClient:
    """Pub/Sub's publisher API, or the emulator ``settings.pubsub_emulator_host`` names.
    Without settings the library's own defaults apply."""
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

    return pubsub_v1.PublisherClient(**_pubsub_emulator(settings, PublisherGrpcTransport))
