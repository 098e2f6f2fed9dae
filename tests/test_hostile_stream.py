"""Every hostile notification of ``test_hostile`` and every hostile image object of
``tests/helpers/hostile_images``, through the real local stack in the same batches as 20 real
uploads: 20 prediction rows of status ok, one row per hostile object with its status, one
dead letter per poison message with its reason, the events recorded, another bucket's messages
ignored, and a stream that keeps classifying afterwards.

It runs once per time zone, with ``TZ`` set for the whole job (Spark's driver JVM, the Python
driver and the Python workers): a time read in the wrong zone dead-letters every fresh
notification west of UTC ("eventTime after publish") or shifts publish times east of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline import clients
from pipeline.config import Settings
from pipeline.stream import job as stream
from tests.conftest import PARENT_STACK
from tests.helpers.hostile import ATTRS, BUCKET, NOTIFICATIONS
from tests.helpers.hostile_images import STREAM_UPLOADS
from tests.helpers.stream import drained, keys, publish, rows_of, upload_samples, wait_rows

pytestmark = [pytest.mark.integration, pytest.mark.spark]
ROOT = Path(__file__).resolve().parents[1]
# one west of UTC (with daylight saving time), one east of it
ZONES = ["America/Los_Angeles", "Asia/Tokyo"]


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


def upload_hostile_objects(settings: Settings) -> dict[tuple, str]:
    """STREAM_UPLOADS into the bucket, as given (a gzip object stays gzip-encoded): key ->
    the status its row must get."""
    bucket = clients.storage_client(settings).bucket(settings.bucket)
    expected = {}
    for name, data, attributes, status in STREAM_UPLOADS:
        blob = bucket.blob(name)
        for attribute, value in attributes.items():
            setattr(blob, attribute, value)
        blob.upload_from_string(data)
        expected[(settings.bucket, name, blob.generation)] = status
    return expected


def run_in_zone(nodeid: str, zone: str, stack_dir: str) -> None:
    """This test again, in a fresh pytest with ``TZ=zone``: a JVM takes its zone at start-up
    and Python workers inherit the driver's environment, so only a new process has it all.
    The emulators stand for Google's services, which run in no user's zone: the child uses
    this pytest's (conftest's PARENT_STACK)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", nodeid],
        cwd=ROOT, env={**os.environ, "TZ": zone, PARENT_STACK: stack_dir},
        capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, f"TZ={zone}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"


def assert_job_sees(spark, zone: str) -> None:
    """The JVM (Spark's session zone defaults to its zone) and a Python worker run in ``zone``."""
    assert spark.conf.get("spark.sql.session.timeZone") == zone
    worker = spark.sparkContext.parallelize([0], 1).map(
        lambda _: (os.environ.get("TZ"), time.strftime("%z"))).collect()[0]
    assert worker == (zone, time.strftime("%z")) and worker[1] != "+0000", worker


@pytest.mark.timeout(900)
@pytest.mark.parametrize("zone", ZONES)
def test_hostile_input_among_real_uploads(zone: str, request: pytest.FixtureRequest) -> None:
    if os.environ.get("TZ") != zone:  # Spark and the stream start in the child, not here
        run_in_zone(request.node.nodeid, zone, request.getfixturevalue("stack").run_dir)
        return
    spark, isolated = request.getfixturevalue("spark"), request.getfixturevalue("isolated")
    assert_job_sees(spark, zone)
    settings = isolated.replace(trigger_seconds=1.0)
    summary = upload_samples(settings, 20)
    uploaded = {(settings.bucket, n, g) for n, g in summary.objects}
    hostile_objects = upload_hostile_objects(settings)
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
    total = len(uploaded) + len(hostile_objects)
    query, processor = stream.start(settings, spark=spark)
    try:
        dead = wait_rows(settings, len(expected_dead), query, table=settings.dead_letter_table)
        rows = wait_rows(settings, total, query)
        events = wait_rows(settings, 3, query, table=settings.events_table)
        drained(query, len(messages) + len(uploaded) + len(hostile_objects))  # no late row
        rows, dead = rows_of(settings), rows_of(settings, settings.dead_letter_table)
        events = rows_of(settings, settings.events_table)

        assert len(rows) == total and keys(rows) == uploaded | set(hostile_objects)
        statuses = {(r["bucket"], r["name"], r["generation"]): r["status"] for r in rows}
        assert all(statuses[k] in ("ok", "low_confidence") for k in uploaded)
        for r in rows:  # read in the right zone, Pub/Sub's publish time follows the event
            published, happened = (datetime.fromisoformat(str(r[c]))
                                   for c in ("publish_time", "event_time"))
            assert timedelta(0) <= published - happened < timedelta(minutes=5), r["name"]
        assert len(dead) == len(expected_dead), sorted(d["reason"] for d in dead)
        unmatched = [d["reason"] for d in dead]
        for case, says in sorted(expected_dead, key=lambda c: -len(c[1])):  # specific first
            match = next((r for r in unmatched if says in r), None)
            assert match is not None, (case, says, unmatched)  # its own row, its own reason
            unmatched.remove(match)
        assert len({d["message_id"] for d in dead}) == len(dead)
        assert max(d["data_bytes"] for d in dead) == 8_000_000  # kept: its start and hash
        assert sorted((e["event_type"], e["metageneration"]) for e in events) == [
            ("OBJECT_METADATA_UPDATE", 2), ("OBJECT_METADATA_UPDATE", 3),
            ("OBJECT_OVERWRITE", 0)]  # the DELETE and ARCHIVE by overwrite share one key
        assert sum(r.ignored for r in processor.reports) >= 2  # the other bucket's two
        assert any(r.poison and r.classified for r in processor.reports), "never mixed"
        assert {k: statuses[k] for k in hostile_objects} == hostile_objects
        assert all(r["reason"] for r in rows if r["status"] not in ("ok", "low_confidence"))

        more = upload_samples(settings.replace(prefix="after/"), 2)  # still classifying
        rows = wait_rows(settings, total + 2, query)
        assert keys(rows) == (uploaded | set(hostile_objects)
                              | {(settings.bucket, n, g) for n, g in more.objects})
        assert query.isActive and query.exception() is None
    finally:
        query.stop()
