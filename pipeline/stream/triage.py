"""Triage: which of a micro-batch's messages get classified, and what becomes of the rest.

    t = triage(rows, settings)   # rows: (message_id, publish_time, attributes, data, ...)
    t.todo, t.dead_letters, t.events, t.ignored, t.duplicates

Pure, so it runs where the messages are: on the executors, inside the micro-batch's one Spark
job, to pick the objects to fetch and classify; and again on the driver over the same rows, to
dead-letter, record events and de-duplicate across partitions before the sink write. The same
rows give the same answer on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.config import RESULTS_PREFIX, Settings
from pipeline.names import GS, describe, split_gs
from pipeline.notifications import Notification, PoisonMessage, dedupe, parse, wanted


def own_prefixes(settings: Settings) -> tuple[str, ...]:
    """Where bucketlens writes into the watched bucket itself: never input to classify."""
    prefixes = [f"{RESULTS_PREFIX}/"]
    if settings.jsonl_uri.startswith(GS):
        bucket, prefix = split_gs(settings.jsonl_uri, "jsonl_uri")
        if bucket == settings.bucket and prefix.strip("/"):
            prefixes.append(prefix.strip("/") + "/")
    return tuple(prefixes)


@dataclass(frozen=True)
class Triage:
    """The split of one batch's messages."""

    todo: list[Notification]
    dead_letters: list[tuple[tuple, str]]  # (message row, reason)
    events: list[Notification]  # DELETE / ARCHIVE / METADATA_UPDATE: recorded, not classified
    ignored: list[tuple[Notification, str]]
    duplicates: int


def triage(rows: Sequence[tuple], settings: Settings) -> Triage:
    """Parse, filter and de-duplicate message rows (message_id, publish_time, attributes, data)."""
    parsed, dead, ignored, events = [], [], [], []
    own = own_prefixes(settings)
    for row in rows:
        message_id, publish_time, attributes, data = row[0], row[1], row[2] or {}, row[3]
        try:  # whatever a message does to parsing, it is that message's dead letter
            n = parse(message_id, attributes, data, publish_time)
            # another bucket's notification is ignored; oversize objects get a too_large row
            why = wanted(n, settings.prefix, bucket=settings.bucket)
        except Exception as exc:  # noqa: BLE001
            dead.append((row, str(exc) if isinstance(exc, PoisonMessage) else describe(exc)))
            continue
        if why is None and n.key.name.startswith(own):
            why = "bucketlens's own output"
        if not n.is_finalize and n.key.bucket == settings.bucket and not n.key.name.startswith(own):
            events.append(n)
        elif why:
            ignored.append((n, why))
        else:
            parsed.append(n)
    todo = dedupe(parsed)
    return Triage(todo, dead, events, ignored, len(parsed) - len(todo))
