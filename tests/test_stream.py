"""End to end through real Spark: uploads → notifications → stream → BigQuery rows.

Exactly-once *results*: every upload becomes one row keyed on (bucket, name, generation),
whatever Pub/Sub redelivers or Spark replays; poison messages become dead-letter records.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from pipeline import clients
from pipeline.bigquery.views import create_views
from pipeline.model.classfolders import discover
from pipeline.stream import executor
from pipeline.stream import job as stream
from pipeline.times import to_micros
from producer.datasets import sample_dataset
from producer.replay import replay
from tests.helpers.stream import drained, keys, publish, rows_of, upload_samples, wait_rows

pytestmark = [pytest.mark.integration, pytest.mark.spark]


@pytest.fixture
def running(spark, isolated):
    """Start the real stream on the isolated resources; stop it afterwards."""
    settings = isolated.replace(trigger_seconds=1.0)
    query, processor = stream.start(settings, spark=spark)
    yield settings, query, processor
    query.stop()


def test_prefetched_keeps_order_and_fetches_the_next_item_while_the_caller_works() -> None:
    started = {i: threading.Event() for i in range(4)}

    def fetch(i: int) -> int:
        started[i].set()
        return i * 10

    got = []
    for i, value in executor.prefetched(range(4), fetch):
        got.append((i, value))
        if i < 3:  # while the caller holds item i, the fetch of i + 1 has begun (or this hangs)
            assert started[i + 1].wait(10), f"item {i + 1} was not prefetched"
    assert got == [(0, 0), (1, 10), (2, 20), (3, 30)]
    assert list(executor.prefetched([], fetch)) == []


def test_prefetched_raises_a_fetch_error_at_its_item() -> None:
    def fetch(i: int) -> int:
        if i == 1:
            raise OSError("disk on fire")
        return i

    it = executor.prefetched(range(3), fetch)
    assert next(it) == (0, 0)
    with pytest.raises(OSError, match="disk on fire"):
        next(it)


@pytest.mark.compat
def test_20_uploads_become_exactly_20_rows(running) -> None:
    settings, query, processor = running
    summary = upload_samples(settings, 20)
    rows = wait_rows(settings, 20, query)
    drained(query, 20)  # the batches that read all 20 messages have committed: no late row
    rows = rows_of(settings)
    assert len(rows) == 20
    assert keys(rows) == {(settings.bucket, n, g) for n, g in summary.objects}
    ok = [r for r in rows if r["status"] in ("ok", "low_confidence")]
    assert len(ok) == 20, [(r["name"], r["status"], r["reason"]) for r in rows]
    for r in rows:
        assert r["true_label"] == r["name"].split("/")[-2]
        assert r["model"] == settings.model and r["event_time"] is not None
        assert len(r["top5"]) == 5 and r["top1_label"] == r["top5"][0]["label"]
        assert 0 < r["top1_prob"] <= 1 and r["top1_prob"] >= r["top5"][1]["prob"]
    coffee = [r for r in rows if r["true_label"] == "coffee"]
    assert coffee and all(r["top1_label"] in ("espresso", "cup", "coffee mug") for r in coffee)


def test_notifications_published_three_times_still_one_row_each(spark, isolated) -> None:
    # Capture the real notifications on a tap subscription, then publish each twice more.
    tap = isolated.replace(subscription=isolated.subscription + "-tap")
    from deploy import provision

    provision.apply(tap)
    summary = upload_samples(isolated, 12)
    sub = clients.subscriber_client()
    originals = []
    deadline = time.monotonic() + 30
    while len(originals) < 12 and time.monotonic() < deadline:
        resp = sub.pull(subscription=tap.subscription_path, max_messages=100, timeout=5)
        originals += [m.message for m in resp.received_messages
                      if m.message.attributes.get("bucketId") == isolated.bucket]
    assert len(originals) == 12
    publish(isolated, [(m.data, dict(m.attributes)) for m in originals] * 2)
    query, processor = stream.start(isolated.replace(trigger_seconds=1.0), spark=spark)
    try:
        wait_rows(isolated, 12, query)
        deadline = time.monotonic() + 60  # until all 36 messages went through
        while sum(r.messages for r in processor.reports) < 36 and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        query.stop()
    assert sum(r.messages for r in processor.reports) >= 36
    rows = rows_of(isolated)
    assert len(rows) == 12 and keys(rows) == {(isolated.bucket, n, g) for n, g in summary.objects}


def test_same_batch_processed_twice_adds_nothing(spark, isolated) -> None:
    items = discover(sample_dataset())[:3]
    summary = replay(items, isolated, rate=50, limit=3, progress=False)
    msgs = [(f"m{i}", None, {"eventType": "OBJECT_FINALIZE", "bucketId": isolated.bucket,
                             "objectId": name, "objectGeneration": str(gen)}, b"", 1)
            for i, (name, gen) in enumerate(summary.objects)]
    from pipeline.stream.source import SCHEMA

    df = spark.createDataFrame(msgs, SCHEMA)
    processor = stream.BatchProcessor(isolated)
    first = processor.process(df, 7)
    second = processor.process(df, 7)
    assert first.inserted == 3 and first.classified == 3
    assert second.inserted == 0 and second.already_done == 3 and second.classified == 0
    assert len(rows_of(isolated)) == 3


def test_poison_and_foreign_events_do_not_stop_the_stream(running) -> None:
    settings, query, processor = running
    publish(settings, [
        (b"\x00\x01 definitely not json", {"eventType": "OBJECT_FINALIZE"}),
        (b"{}", {"eventType": "OBJECT_FINALIZE", "bucketId": settings.bucket}),
        (b"{}", {"eventType": "OBJECT_DELETE", "bucketId": settings.bucket,
                 "objectId": "x/y.jpg", "objectGeneration": "5"}),
    ])
    upload_samples(settings, 4)
    wait_rows(settings, 4, query)
    dead = wait_rows(settings, 2, query, table=settings.dead_letter_table)
    reasons = sorted(d["reason"] for d in dead)
    assert len(dead) == 2
    assert "data is not JSON" in reasons[0] and "lacks name, generation" in reasons[1]
    assert all(d["message_id"] for d in dead)
    events = wait_rows(settings, 1, query, table=settings.events_table)
    assert [(e["name"], e["generation"], e["event_type"]) for e in events] == \
        [("x/y.jpg", 5, "OBJECT_DELETE")]  # recorded, not classified
    assert sum(r.events for r in processor.reports) == 1
    assert len(rows_of(settings)) == 4


def test_overwrite_gives_two_rows_and_latest_view_shows_new_generation(running) -> None:
    settings, query, _ = running
    blob = clients.storage_client(settings).bucket(settings.bucket).blob("photos/cat/c.jpg")
    data = (sample_dataset() / "cat").glob("*")
    payload = next(iter(data)).read_bytes()
    blob.upload_from_string(payload, content_type="image/jpeg")
    first_gen = blob.generation
    wait_rows(settings, 1, query)
    blob.upload_from_string(payload[: len(payload) // 2], content_type="image/jpeg")  # truncated
    rows = wait_rows(settings, 2, query)
    by_gen = {r["generation"]: r for r in rows}
    assert set(by_gen) == {first_gen, blob.generation}
    assert by_gen[first_gen]["status"] == "ok"
    assert by_gen[blob.generation]["status"] in ("corrupt", "gone")
    create_views(settings)
    bq = clients.bigquery_client(settings)
    latest = list(bq.query(
        f"SELECT name, generation FROM `{settings.project}.{settings.dataset}.latest_predictions`"
    ).result())
    assert [(r["name"], r["generation"]) for r in latest] == [("photos/cat/c.jpg", blob.generation)]


def test_batch_report_is_json_serialisable(running) -> None:
    settings, query, processor = running
    upload_samples(settings, 2)
    wait_rows(settings, 2, query)
    done = [r for r in processor.reports if r.classified]
    assert done and json.loads(json.dumps(done[0].__dict__))["classified"] >= 1


def test_a_micro_batch_is_one_spark_job(spark, isolated) -> None:
    """Triage, fetch and classify run in the job that reads the messages: a small batch pays
    Spark's scheduling once. The same notification in two partitions is still one row."""
    from pipeline.stream.source import SCHEMA

    items = discover(sample_dataset())[:3]
    summary = replay(items, isolated, rate=50, limit=3, progress=False)
    msgs = [(f"m{i}", None, {"eventType": "OBJECT_FINALIZE", "bucketId": isolated.bucket,
                             "objectId": name, "objectGeneration": str(gen)}, b"", 1)
            for i, (name, gen) in enumerate([*summary.objects, summary.objects[0]])]
    msgs.append(("poison", None, {"eventType": "OBJECT_FINALIZE"}, b"\x00 not json", 1))
    df = spark.createDataFrame(spark.sparkContext.parallelize(msgs, 2), SCHEMA)  # no shuffle
    processor = stream.BatchProcessor(isolated)
    sc = spark.sparkContext
    sc.setJobGroup("one-batch", "one micro-batch")
    try:
        report = processor.process(df, 3)
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    assert len(sc.statusTracker().getJobIdsForGroup("one-batch")) == 1
    assert (report.messages, report.classified, report.inserted) == (5, 3, 3)
    assert (report.duplicates, report.poison) == (1, 1)
    assert keys(rows_of(isolated)) == {(isolated.bucket, n, g) for n, g in summary.objects}


def test_a_steady_batch_asks_bigquery_nothing(spark, isolated) -> None:
    """Past the warm-up, the driver's memory replaces the key lookup: no query job for fresh
    or repeated keys, one for redelivered messages or messages from the backlog (another
    writer, a backfill, had time to write them); a restarted run looks everything up."""
    from pipeline.stream.source import SCHEMA

    items = discover(sample_dataset())[:5]
    objects = replay(items, isolated, rate=50, limit=5, progress=False).objects

    def batch(objs, attempt: int | None, prefix: str, poison: bool = False,
              waited: float = 0.0):
        published = to_micros(datetime.now(UTC) - timedelta(seconds=waited))
        msgs = [(f"{prefix}{i}", published, {"eventType": "OBJECT_FINALIZE",
                                             "bucketId": isolated.bucket, "objectId": name,
                                             "objectGeneration": str(gen)}, b"", attempt)
                for i, (name, gen) in enumerate(objs)]
        if poison:
            msgs.append(("poison", published, {"eventType": "OBJECT_FINALIZE"}, b"\x00", attempt))
        return spark.createDataFrame(msgs, SCHEMA)

    processor = stream.BatchProcessor(isolated)
    processor.recent.started = time.monotonic() - processor.recent.warmup_seconds  # long running
    calls = processor.sink.calls
    first = processor.process(batch(objects[:2], 1, "a", poison=True), 1)
    assert (first.inserted, first.poison, calls["query"]) == (2, 1, 0)
    again = processor.process(batch(objects[:2], 1, "b", poison=True), 2)  # republished copies
    assert (again.inserted, again.already_done, calls["query"]) == (0, 2, 0)
    redelivered = processor.process(batch(objects[2:4], 2, "c"), 3)
    # only BigQuery can vouch for these: looked up, and again right before the append
    assert (redelivered.inserted, calls["query"]) == (2, 2)
    unmarked = processor.process(batch(objects[:1], None, "d"), 4)  # no dead-letter policy
    assert (unmarked.inserted, unmarked.already_done, calls["query"]) == (0, 1, 2)  # memory
    backlog = processor.process(
        batch(objects[4:], 1, "f", waited=processor.recent.warmup_seconds + 5), 5)
    assert (backlog.inserted, calls["query"]) == (1, 4)  # first delivery, but an old message
    assert processor.sink.writer.connections == 2  # predictions, dead letters: kept open

    restarted = stream.BatchProcessor(isolated)  # warming up: a predecessor may have written
    late = restarted.process(batch(objects, 1, "e", poison=True), 6)
    assert (late.inserted, late.already_done) == (0, 5)
    assert restarted.sink.calls["query"] == 2  # predictions and dead letters, looked up once
    assert len(rows_of(isolated)) == 5
    assert len(rows_of(isolated, table=isolated.dead_letter_table)) == 1
