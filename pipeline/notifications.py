"""GCS → Pub/Sub notifications: parse, key, filter and de-duplicate (pure functions).

A notification names one object *generation*; (bucket, name, generation) is the key every
later stage uses, so redeliveries, replays and overwrites all land on the right row.

    n = parse("msg-1", {"eventType": "OBJECT_FINALIZE", "bucketId": "b",
                        "objectId": "flowers/daisy/1.jpg", "objectGeneration": "7"}, b"{}")
    assert n.key == ObjectKey("b", "flowers/daisy/1.jpg", 7) and n.true_label == "daisy"
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

FINALIZE = "OBJECT_FINALIZE"
EVENT_TYPES = frozenset({FINALIZE, "OBJECT_DELETE", "OBJECT_ARCHIVE", "OBJECT_METADATA_UPDATE"})


class PoisonMessage(ValueError):
    """A message that can never be processed; ``reason`` goes into the dead-letter record."""


@dataclass(frozen=True, order=True)
class ObjectKey:
    bucket: str
    name: str
    generation: int


@dataclass(frozen=True)
class Notification:
    key: ObjectKey
    event_type: str
    message_id: str = ""
    event_time: datetime | None = None
    publish_time: datetime | None = None
    size: int | None = None
    content_type: str | None = None
    metadata: Mapping[str, str] | None = None

    @property
    def is_finalize(self) -> bool:
        return self.event_type == FINALIZE

    @property
    def true_label(self) -> str | None:
        """The class folder: ``[prefix/]<class>/<file>`` → ``<class>``; metadata wins."""
        if self.metadata and self.metadata.get("true_label"):
            return self.metadata["true_label"]
        return true_label_from_name(self.key.name)


def true_label_from_name(name: str) -> str | None:
    parts = [p for p in name.split("/") if p]
    return parts[-2] if len(parts) >= 2 else None


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def event_time(attributes: Mapping[str, str], payload: Mapping[str, object]) -> datetime | None:
    """When the event happened, as precisely as the message says.

    The ``eventTime`` attribute is authoritative, but fake-gcs-server writes it in whole seconds
    (real GCS: microseconds), which would add up to a second to every latency a view reports.
    When it has no fraction and the payload's ``updated`` (or ``timeCreated``) lies inside that
    same second, the payload's finer time is the same instant, so it is used instead.
    """
    coarse = parse_time(attributes.get("eventTime"))
    stamp = payload.get("updated") or payload.get("timeCreated")
    fine = parse_time(stamp) if isinstance(stamp, str) else None
    if coarse is None:
        return fine
    if fine is not None and coarse.microsecond == 0 and coarse <= fine < coarse + timedelta(seconds=1):
        return fine
    return coarse


def _int(value: object, field: str) -> int:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise PoisonMessage(f"{field} is not an integer: {value!r}") from exc


def parse(message_id: str, attributes: Mapping[str, str], data: bytes | None,
          publish_time: datetime | None = None) -> Notification:
    """Turn one Pub/Sub message into a Notification, or raise PoisonMessage saying why.

    Attributes are authoritative (they are always set by GCS); the JSON_API_V1 payload adds
    size, content type and custom metadata, and stands in for missing attributes.
    """
    payload: dict = {}
    if data:
        try:
            payload = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PoisonMessage(f"data is not JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise PoisonMessage(f"data is JSON but not an object: {type(payload).__name__}")
    event_type = attributes.get("eventType") or ""
    if event_type not in EVENT_TYPES:
        raise PoisonMessage(f"not a GCS notification: eventType={event_type!r}")
    bucket = attributes.get("bucketId") or payload.get("bucket")
    name = attributes.get("objectId") or payload.get("name")
    generation = attributes.get("objectGeneration") or payload.get("generation")
    missing = [f for f, v in (("bucket", bucket), ("name", name), ("generation", generation))
               if not v]
    if missing:
        raise PoisonMessage(f"notification lacks {', '.join(missing)}")
    size = payload.get("size")
    metadata = payload.get("metadata")
    return Notification(
        key=ObjectKey(str(bucket), str(name), _int(generation, "generation")),
        event_type=event_type,
        message_id=message_id,
        event_time=event_time(attributes, payload),
        publish_time=publish_time,
        size=_int(size, "size") if size not in (None, "") else None,
        content_type=payload.get("contentType"),
        metadata=metadata if isinstance(metadata, dict) else None,
    )


def wanted(n: Notification, prefix: str = "", max_bytes: int | None = None) -> str | None:
    """Why a parsed notification is *not* classified, or None when it should be."""
    if not n.is_finalize:
        return f"event {n.event_type} is recorded, not classified"
    if prefix and not n.key.name.startswith(prefix):
        return f"outside prefix {prefix!r}"
    if n.key.name.endswith("/"):
        return "folder placeholder"
    if max_bytes is not None and n.size is not None and n.size > max_bytes:
        return f"object is {n.size} bytes, over the {max_bytes}-byte limit"
    return None


def dedupe(notifications: Iterable[Notification]) -> list[Notification]:
    """One notification per key, first occurrence wins (redeliveries inside one batch)."""
    seen: dict[ObjectKey, Notification] = {}
    for n in notifications:
        seen.setdefault(n.key, n)
    return list(seen.values())
