"""The driver's memory of written keys and the executors' verdicts (pure: no stack, no Spark).

A steady micro-batch asks BigQuery nothing: these pin down when the memory answers and when
only BigQuery can (warm-up after a start, redelivered or unmarked messages, forgotten keys).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pandas as pd

from pipeline.config import Settings
from pipeline.notifications import Notification, ObjectKey
from pipeline.stream import executor
from pipeline.stream.recent import Recent
from pipeline.stream.triage import triage
from tests.helpers.hostile import BUCKET, NOTIFICATIONS, msg


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_warm_up_verifies_every_key_then_only_redelivered_or_unmarked_ones() -> None:
    clock = Clock()
    recent = Recent(ack_deadline_seconds=60, trigger_seconds=5, clock=clock)
    attempts = {"fresh": 1, "again": 2, "unmarked": None}
    assert recent.warming_up and recent.to_verify(attempts) == set(attempts)
    clock.now += 2 * 60 + 2 * 5 - 0.1
    assert recent.to_verify(attempts) == set(attempts)  # a predecessor's lease may run out now
    clock.now += 0.2
    assert not recent.warming_up
    assert recent.to_verify(attempts) == {"again", "unmarked"}
    assert recent.to_verify({"fresh": 1}) == set()  # the steady state: no query


def test_past_the_warm_up_a_message_from_the_backlog_is_looked_up() -> None:
    """A message that waited longer than the warm-up span (a backfill had time to write its
    key) or whose age is unknown is verified; a fresh one is not."""
    clock = Clock()
    recent = Recent(ack_deadline_seconds=10, trigger_seconds=1, clock=clock)
    assert recent.to_verify({}) == set() and recent.started is None  # an empty batch: no clock
    recent.to_verify({"first": 1})
    clock.now += 22.1
    attempts = {"fresh": 1, "old": 1, "unknown": 1, "again": 2}
    ages = {"fresh": 3.0, "old": 22.5, "unknown": None, "again": 1.0}
    assert recent.to_verify(attempts, ages) == {"old", "unknown", "again"}
    assert recent.to_verify({"fresh": 1}, {"fresh": 21.9}) == set()


def test_memory_is_bounded_and_forgets_the_oldest_first() -> None:
    recent = Recent(60, capacity=3)
    recent.remember(["a", "b", "c"])
    recent.remember(["a"])  # seen again: now the newest
    recent.remember(["d"])
    assert len(recent) == 3 and "b" not in recent
    assert all(k in recent for k in ("a", "c", "d"))


def test_a_notification_survives_the_trip_back_from_the_executor() -> None:
    for n in (
        Notification(ObjectKey("b", "x/é.jpg", 7), "OBJECT_FINALIZE", "m1",
                     event_time=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
                     publish_time=datetime(2026, 1, 2, 3, 4, 6), size=10,
                     content_type="image/jpeg", metadata={"true_label": "cat"},
                     metageneration=2, created=datetime(2026, 1, 2, tzinfo=UTC)),
        Notification(ObjectKey("b", "y", 1), "OBJECT_DELETE"),
    ):
        assert executor.note_from_json(executor.note_json(n)) == n


def test_every_message_gets_exactly_one_verdict_and_no_payload_travels_back() -> None:
    settings = Settings(bucket=BUCKET)
    rows = [(f"{case}#{i}", *r[1:], 1) for case, msgs, _ in NOTIFICATIONS
            for i, r in enumerate(msgs)]
    dup = msg(objectId="dup/cat/1.jpg")[1:]
    rows += [("dup#0", *dup, 1), ("dup#1", *dup, 3)]  # one key twice
    frame = executor.verdict_frame(rows, triage(rows, settings))
    assert sorted(frame["message_id"]) == sorted(r[0] for r in rows)
    verdicts = dict(zip(frame["message_id"], frame["verdict"], strict=True))
    assert verdicts["dup#0"] == executor.TODO and verdicts["dup#1"] == executor.DUPLICATE
    attempts = dict(zip(frame["message_id"], frame["delivery_attempt"], strict=True))
    assert attempts["dup#1"] == 3
    for _, v in frame.iterrows():
        if v.verdict in (executor.TODO, executor.EVENT, executor.IGNORED):
            n = executor.note_from_json(v.record)
            assert n.message_id == v.message_id
            assert "data" not in json.loads(v.record)  # the message body stays on the executor
        elif v.verdict == executor.DEAD:
            assert json.loads(v.record)["reason"] == v.why and v.why
        else:
            assert v.record is None or pd.isna(v.record)


def test_a_gzip_encoded_object_is_charged_max_bytes_not_its_stored_size() -> None:
    """GCS notifies a ``Content-Encoding: gzip`` object's stored (compressed) size and serves
    it decompressed: that size cannot budget the download, so it is charged max_bytes (a
    legitimate ``gsutil cp -Z`` photo is classified; a bomb stops at max_bytes)."""
    from pipeline.notifications import parse

    attrs = {"eventType": "OBJECT_FINALIZE", "bucketId": "b", "objectId": "a/cat/1.jpg",
             "objectGeneration": "3"}
    plain = parse("m1", attrs, json.dumps({"size": "5126"}).encode())
    gz = parse("m2", attrs, json.dumps({"size": "5126", "contentEncoding": "gzip"}).encode())
    assert gz.content_encoding == "gzip"
    assert executor.work_row(plain)[3] == 5126 and executor.work_row(gz)[3] is None
    assert executor.note_from_json(executor.note_json(gz)) == gz  # survives the trip back
