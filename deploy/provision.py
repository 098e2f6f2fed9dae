"""Idempotent provisioning: one code path for real GCP and for the local emulator stack.

Each resource knows how to look itself up, create itself and delete itself; ``plan`` lists
what is missing without changing anything, ``apply`` creates only what is missing (so running
it twice changes nothing), ``destroy`` deletes in reverse order.

    from deploy import provision
    from pipeline.config import Settings
    for action in provision.apply(Settings.from_env()):
        print(action)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from google.api_core.exceptions import NotFound

from pipeline import clients
from pipeline.config import Settings

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"
MAX_DELIVERY_ATTEMPTS = 5  # then Pub/Sub moves the message to the dead-letter topic


def load_schema(name: str) -> list:
    """A BigQuery schema from ``schemas/<name>.json`` as SchemaField objects."""
    from google.cloud import bigquery

    fields = json.loads((SCHEMAS_DIR / f"{name}.json").read_text())
    return [bigquery.SchemaField.from_api_repr(f) for f in fields]


@dataclass(frozen=True)
class Action:
    verb: str  # "create", "exists", "delete", "absent", "skip"
    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.verb:<7} {self.kind:<13} {self.name}"


@dataclass(frozen=True)
class Resource:
    kind: str
    name: str
    exists: Callable[[], bool]
    create: Callable[[], object]
    delete: Callable[[], object]


class _Clients:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def storage(self):
        return clients.storage_client(self.settings)

    @cached_property
    def publisher(self):
        return clients.publisher_client()

    @cached_property
    def subscriber(self):
        return clients.subscriber_client()

    @cached_property
    def bigquery(self):
        return clients.bigquery_client(self.settings)


def _found(lookup: Callable[[], object]) -> bool:
    try:
        return lookup() is not None
    except NotFound:
        return False


def _ignore_missing(action: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            action()
        except NotFound:
            pass

    return run


def on_emulator() -> bool:
    return bool(os.environ.get("STORAGE_EMULATOR_HOST"))


def resources(settings: Settings, c: _Clients | None = None) -> list[Resource]:
    """Every resource bucketlens needs, in creation order."""
    from google.cloud import bigquery

    c = c or _Clients(settings)
    s = settings
    dlq_sub = f"projects/{s.project}/subscriptions/{s.dead_letter_topic}-sub"

    def topic(path: str) -> Resource:
        return Resource(
            "topic", path,
            exists=lambda: _found(lambda: c.publisher.get_topic(topic=path)),
            create=lambda: c.publisher.create_topic(name=path),
            delete=_ignore_missing(lambda: c.publisher.delete_topic(topic=path)),
        )

    def subscription(path: str, request: dict) -> Resource:
        return Resource(
            "subscription", path,
            exists=lambda: _found(lambda: c.subscriber.get_subscription(subscription=path)),
            create=lambda: c.subscriber.create_subscription(request={"name": path, **request}),
            delete=_ignore_missing(lambda: c.subscriber.delete_subscription(subscription=path)),
        )

    def table(table_id: str, schema: str) -> Resource:
        def create() -> None:
            t = bigquery.Table(table_id, schema=load_schema(schema))
            if not s.bq_endpoint:  # real BigQuery: partition by day, cluster by the key
                t.time_partitioning = bigquery.TimePartitioning(field="processed_at")
                if schema == "predictions":
                    t.clustering_fields = ["bucket", "name"]
            c.bigquery.create_table(t)

        return Resource(
            "table", table_id,
            exists=lambda: _found(lambda: c.bigquery.get_table(table_id)),
            create=create,
            delete=lambda: c.bigquery.delete_table(table_id, not_found_ok=True),
        )

    def create_dataset() -> None:
        ds = bigquery.Dataset(f"{s.project}.{s.dataset}")
        ds.location = s.bq_location
        c.bigquery.create_dataset(ds)

    return [
        Resource(
            "bucket", s.bucket,
            exists=lambda: c.storage.lookup_bucket(s.bucket) is not None,
            create=lambda: c.storage.create_bucket(s.bucket),
            delete=_ignore_missing(lambda: c.storage.bucket(s.bucket).delete(force=True)),
        ),
        topic(s.topic_path),
        topic(s.dead_letter_topic_path),
        subscription(dlq_sub, {"topic": s.dead_letter_topic_path}),
        subscription(s.subscription_path, {
            "topic": s.topic_path,
            "ack_deadline_seconds": s.ack_deadline_seconds,
            "dead_letter_policy": {"dead_letter_topic": s.dead_letter_topic_path,
                                   "max_delivery_attempts": MAX_DELIVERY_ATTEMPTS},
            "retry_policy": {"minimum_backoff": {"seconds": 1},
                             "maximum_backoff": {"seconds": 60}},
            # Applied by real Pub/Sub; the emulator accepts but ignores it, so the stream
            # filters event types in code as well.
            "filter": 'attributes.eventType = "OBJECT_FINALIZE"',
        }),
        Resource(
            "dataset", f"{s.project}.{s.dataset}",
            exists=lambda: _found(lambda: c.bigquery.get_dataset(f"{s.project}.{s.dataset}")),
            create=create_dataset,
            delete=lambda: c.bigquery.delete_dataset(
                f"{s.project}.{s.dataset}", delete_contents=True, not_found_ok=True),
        ),
        table(s.table_id, "predictions"),
        table(s.dead_letter_table_id, "dead_letters"),
    ]


def plan(settings: Settings) -> list[Action]:
    """What ``apply`` would do; changes nothing."""
    return [Action("exists" if r.exists() else "create", r.kind, r.name)
            for r in resources(settings)]


def apply(settings: Settings) -> list[Action]:
    """Create whatever is missing; a second run reports only ``exists``."""
    actions = []
    for r in resources(settings):
        if r.exists():
            actions.append(Action("exists", r.kind, r.name))
        else:
            r.create()
            actions.append(Action("create", r.kind, r.name))
    return actions


def destroy(settings: Settings) -> list[Action]:
    """Delete everything ``apply`` creates, in reverse order."""
    actions = []
    for r in reversed(resources(settings)):
        if r.exists():
            r.delete()
            actions.append(Action("delete", r.kind, r.name))
        else:
            actions.append(Action("absent", r.kind, r.name))
    return actions
