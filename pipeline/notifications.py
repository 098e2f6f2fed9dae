"""GCS → Pub/Sub notifications: parse, key, filter and de-duplicate (pure functions).

A notification names one object *generation*; (bucket, name, generation) is the key every
later stage uses, so redeliveries, replays and overwrites all land on the right row.

    n = parse("msg-1", {"eventType": "OBJECT_FINALIZE", "bucketId": "b",
                        "objectId": "flowers/daisy/1.jpg", "objectGeneration": "7"}, b"{}")
    assert n.key == ObjectKey("b", "flowers/daisy/1.jpg", 7) and n.true_label == "daisy"
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from pipeline.names import printable
from pipeline.times import EARLIEST, LATEST, iso_time, parse_time, utc

FINALIZE = "OBJECT_FINALIZE"
EVENT_TYPES = frozenset({FINALIZE, "OBJECT_DELETE", "OBJECT_ARCHIVE", "OBJECT_METADATA_UPDATE"})
# Not a GCS event type: what a DELETE / ARCHIVE carrying ``overwrittenByGeneration`` is recorded
# as, since that generation was replaced by an upload rather than removed.
OVERWRITE = "OBJECT_OVERWRITE"
INT64_MAX = 2**63 - 1
# An event cannot happen after Pub/Sub published it; clocks may differ a little, not by this.
CLOCK_SKEW = timedelta(hours=1)
_DECIMAL = re.compile(r"[0-9]+", re.ASCII)  # not int(): it takes " 7 ", "1_000" and "٧"


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
    metageneration: int | None = None  # METADATA_UPDATEs of one generation differ only here
    # payload timeCreated: the same in every copy of one generation's notification, so the
    # predictions table is partitioned on it (pipeline.bigquery.catalog); None without a JSON payload
    created: datetime | None = None
    # payload contentEncoding: a "gzip" object is stored (and its size notified) compressed,
    # but served decompressed, so its notified size says nothing about the download's
    content_encoding: str | None = None

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
    # fine - coarse, not coarse + 1 s: that overflows at 9999-12-31T23:59:59
    if fine is not None and coarse.microsecond == 0 and timedelta(0) <= fine - coarse < timedelta(seconds=1):
        return fine
    return coarse


def _int(value: object, field: str, minimum: int = 0) -> int:
    """A JSON integer or a string of ASCII digits, within [minimum, INT64_MAX]; else poison.

    Floats (``1e400`` parses as ``inf``), booleans and everything ``int()`` tolerates beyond
    plain digits are refused: BigQuery's INT64 is the range every later stage must hold.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and (value.startswith("-") and _DECIMAL.fullmatch(value[1:])
                                     or _DECIMAL.fullmatch(value)):
        number = int(value)
    else:
        raise PoisonMessage(f"{field} is not an integer: {_show(value)}")
    if not minimum <= number <= INT64_MAX:
        raise PoisonMessage(f"{field} {_show(value)} is outside {minimum}..2^63-1")
    return number


def _show(value: object) -> str:
    """A short, log-safe rendering of an untrusted JSON value (never a whole nested object)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict | list):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    text = json.dumps(value if not isinstance(value, str) else value[:40], ensure_ascii=True)
    return text if len(text) <= 42 else text[:40] + "…"


def _str(value: object, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise PoisonMessage(f"{field} is not a string: {type(value).__name__}")


def _time(value: object, field: str, published: datetime | None = None) -> datetime | None:
    """A time field the pipeline reads, None when absent; else poison, saying why.

    An RFC 3339 string (the publish time may also be a datetime or epoch microseconds, as the
    source carries it), between the Unix epoch and ``LATEST`` (``pipeline.times``), and — for
    times of the event itself — not after the message was published (+ CLOCK_SKEW): a forged
    year 9999 or 0005 would otherwise reach the sink's partition arithmetic and BigQuery.
    """
    if value is None or value == "":
        return None
    range_ = f"outside {EARLIEST:%Y}..{LATEST.year - 1}"
    if not isinstance(value, str) and field != "publish_time":
        raise PoisonMessage(f"{field} is not a string: {type(value).__name__}")
    try:
        t = iso_time(value) if isinstance(value, str) else utc(value)  # type: ignore[arg-type]
    except OverflowError:  # "0001-01-01T00:00:00+01:00" is before year 1 in UTC
        raise PoisonMessage(f"{field} {_show(value)} is {range_}") from None
    except (ValueError, TypeError):
        raise PoisonMessage(f"{field} is not an RFC 3339 time: {_show(value)}") from None
    if published is not None and t > published + CLOCK_SKEW:
        raise PoisonMessage(f"{field} {t.isoformat()} is after the message was published")
    if not EARLIEST <= t < LATEST:
        raise PoisonMessage(f"{field} {t.isoformat()} is {range_}")
    return t


def _metadata(value: object) -> dict[str, str] | None:
    """Custom metadata: a JSON object of strings (GCS allows nothing else)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise PoisonMessage(f"metadata is not an object: {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(v, str):
            raise PoisonMessage(f"metadata.{printable(k, 40)} is not a string: {type(v).__name__}")
    return value


def _load(data: bytes) -> dict:
    try:
        payload = json.loads(data)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an int over 4300 digits
        raise PoisonMessage(f"data is not JSON: {exc}") from exc
    except RecursionError as exc:  # json's C scanner recurses per nesting level
        raise PoisonMessage("data is not JSON: nested too deeply") from exc
    if not isinstance(payload, dict):
        raise PoisonMessage(f"data is JSON but not an object: {type(payload).__name__}")
    return payload


def parse(message_id: str, attributes: Mapping[str, str], data: bytes | None,
          publish_time: datetime | int | None = None) -> Notification:
    """Turn one Pub/Sub message into a Notification, or raise PoisonMessage saying why.

    Attributes are authoritative (they are always set by GCS); the JSON_API_V1 payload adds
    size, content type and custom metadata, and stands in for missing attributes. Every value
    is checked for type and range here, so no later stage meets a float, an object where a
    string belongs, a number BigQuery cannot hold or a time outside ``_time``'s range.
    ``publish_time``: an aware datetime (naive = UTC) or epoch microseconds, as the source
    carries it (``pipeline.stream.source.SCHEMA``).
    """
    published = _time(publish_time, "publish_time")
    payload = _load(data) if data else {}
    event_type = attributes.get("eventType") or ""
    if event_type not in EVENT_TYPES:
        raise PoisonMessage(f"not a GCS notification: eventType={_show(event_type)}")
    bucket = _str(attributes.get("bucketId") or payload.get("bucket"), "bucket")
    name = _str(attributes.get("objectId") or payload.get("name"), "name")
    generation = attributes.get("objectGeneration") or payload.get("generation")
    missing = [f for f, v in (("bucket", bucket), ("name", name), ("generation", generation))
               if v in (None, "")]
    if missing:
        raise PoisonMessage(f"notification lacks {', '.join(missing)}")
    overwritten = attributes.get("overwrittenByGeneration") or payload.get("overwrittenByGeneration")
    if overwritten not in (None, "") and event_type in ("OBJECT_DELETE", "OBJECT_ARCHIVE"):
        _int(overwritten, "overwrittenByGeneration", minimum=1)
        event_type = OVERWRITE
    size, metageneration = payload.get("size"), payload.get("metageneration")
    # every time read below, checked first: event_time() picks among them
    for field, value in (("eventTime", attributes.get("eventTime")),
                         ("updated", payload.get("updated"))):
        _time(value, field, published)
    created = _time(payload.get("timeCreated"), "timeCreated", published)
    return Notification(
        key=ObjectKey(str(bucket), str(name), _int(generation, "generation", minimum=1)),
        event_type=event_type,
        message_id=message_id,
        event_time=event_time(attributes, payload),
        publish_time=published,
        size=_int(size, "size") if size not in (None, "") else None,
        content_type=_str(payload.get("contentType"), "contentType"),
        content_encoding=_str(payload.get("contentEncoding"), "contentEncoding"),
        metadata=_metadata(payload.get("metadata")),
        metageneration=(_int(metageneration, "metageneration", minimum=1)
                        if metageneration not in (None, "") else None),
        created=created,
    )


def wanted(n: Notification, prefix: str = "", max_bytes: int | None = None,
           bucket: str | None = None) -> str | None:
    """Why a parsed notification is *not* classified, or None when it should be.

    ``bucket``: the one the job watches. A topic may carry several buckets' notifications, and
    a message naming another bucket must never make the job read (or record) that bucket.
    """
    if bucket is not None and n.key.bucket != bucket:
        return f"bucket {printable(n.key.bucket, 80)} is not the watched bucket {bucket}"
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
