"""Every hostile notification of ``test_hostile``, published through the real local stack into
the same batches as 20 real uploads: 20 prediction rows, one dead letter per poison message
with its reason, the events recorded, another bucket's messages ignored, and a stream that
keeps classifying afterwards."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

from pipeline import stream
from pipeline.config import Settings
from tests.helpers.hostile import ATTRS, BUCKET, NOTIFICATIONS
from tests.helpers.stream import keys, publish, rows_of, upload_samples, wait_rows

pytestmark = [pytest.mark.integration, pytest.mark.spark]


def for_stack(row: tuple, settings: Settings, now: str) -> tuple[bytes, dict[str, str]]:
    """A table row as a message to publish: our bucket for theirs, and a current event time
    (Pub/Sub stamps the real publish time, and an event may not come after it)."""
    attrs = dict(row[2])
    if attrs.get("bucketId") == BUCKET:
        attrs["bucketId"] = settings.bucket
    if attrs.get("eventTime") == ATTRS["eventTime"]:
        attrs["eventTime"] = now
    data = row[3].replace(json.dumps(BUCKET).encode(), json.dumps(settings.bucket).encode())
    return data, attrs


def test_hostile_notifications_among_real_uploads(spark, isolated: Settings) -> None:
    settings = isolated.replace(trigger_seconds=1.0)
    summary = upload_samples(settings, 20)
    uploaded = {(settings.bucket, n, g) for n, g in summary.objects}
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    messages, expected_dead = [], []
    for case, rows, outcomes in NOTIFICATIONS:
        for row, outcome in zip(rows, outcomes, strict=True):
            data, attrs = for_stack(row, settings, now)
            if outcome == "todo":  # a valid notification: name a real upload (a duplicate)
                name, generation = summary.objects[0]
                attrs.update(objectId=name, objectGeneration=str(generation))
            messages.append((data, attrs))
            if outcome.startswith("dead: "):
                expected_dead.append((case, outcome.removeprefix("dead: ")))
    publish(settings, messages)
    time.sleep(2)  # all of it waits in the subscription, so the first batches mix them
    query, processor = stream.start(settings, spark=spark)
    try:
        dead = wait_rows(settings, len(expected_dead), query, table=settings.dead_letter_table)
        rows = wait_rows(settings, 20, query)
        events = wait_rows(settings, 3, query, table=settings.events_table)
        time.sleep(4)  # a wrong extra row would land in the next batch or two
        rows, dead = rows_of(settings), rows_of(settings, settings.dead_letter_table)
        events = rows_of(settings, settings.events_table)

        assert len(rows) == 20 and keys(rows) == uploaded
        assert all(r["status"] in ("ok", "low_confidence") for r in rows)
        assert len(dead) == len(expected_dead), sorted(d["reason"] for d in dead)
        unmatched = [d["reason"] for d in dead]
        for case, says in sorted(expected_dead, key=lambda c: -len(c[1])):  # specific first
            match = next((r for r in unmatched if says in r), None)
            assert match is not None, (case, says, unmatched)  # its own row, its own reason
            unmatched.remove(match)
        assert len({d["message_id"] for d in dead}) == len(dead)
        assert sorted((e["event_type"], e["metageneration"]) for e in events) == [
            ("OBJECT_METADATA_UPDATE", 2), ("OBJECT_METADATA_UPDATE", 3),
            ("OBJECT_OVERWRITE", 0)]  # the DELETE and ARCHIVE by overwrite share one key
        assert sum(r.ignored for r in processor.reports) >= 2  # the other bucket's two
        assert any(r.poison and r.classified for r in processor.reports), "never mixed"

        more = upload_samples(settings.replace(prefix="after/"), 2)  # still classifying
        rows = wait_rows(settings, 22, query)
        assert keys(rows) == uploaded | {(settings.bucket, n, g) for n, g in more.objects}
        assert query.isActive and query.exception() is None
    finally:
        query.stop()
