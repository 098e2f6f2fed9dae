"""Alerts through the real stream: Spark, the Pub/Sub emulator, fake-gcs-server, bqemulator.

* A run that dies between its write and its publish loses no alert: the restarted run finds
  the rows written and publishes them (at-least-once across a crash), and a replay within one
  run publishes nothing twice.
* A stream whose uploads drop a class and darken half their photos halfway raises the drift
  alert within 3 windows of the change, once per window, and no earlier (creation times are
  the notifications' own, so no test waits for windows to pass).
* `bucketlens run --alerts` in a subprocess, SIGKILLed once mid-run, every notification
  republished twice: the alert subscription holds exactly the matching generations, with a
  second message for one only from the run after the kill.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from deploy import provision
from pipeline import clients
from pipeline.model.classfolders import discover
from pipeline.stream import job as stream
from pipeline.stream.source import SCHEMA
from producer.datasets import sample_dataset
from producer.replay import replay
from tests.helpers.drift import RULES, drifted_dataset
from tests.helpers.stream import publish, rows_of
from tests.helpers.tables import query
from tests.test_faults import Pipeline, wait_for

# the drift judge's SQL reads the distinct_predictions view
pytestmark = [pytest.mark.integration, pytest.mark.spark, pytest.mark.views]
CATS = set(RULES["rules"][0]["labels"])


def alert_subscription(settings) -> str:
    path = f"projects/{settings.project}/subscriptions/{settings.alert_topic}-sub"
    clients.subscriber_client().create_subscription(name=path, topic=settings.alert_topic_path)
    return path


def pull_all(path: str, quiet: float = 3.0, timeout: float = 60.0) -> list:
    """Every message until none came for ``quiet`` seconds, acked."""
    sub = clients.subscriber_client()
    got, last, deadline = [], time.monotonic(), time.monotonic() + timeout
    while time.monotonic() - last < quiet and time.monotonic() < deadline:
        resp = sub.pull(subscription=path, max_messages=500, timeout=2)
        if resp.received_messages:
            got += [m.message for m in resp.received_messages]
            sub.acknowledge(subscription=path, ack_ids=[m.ack_id for m in resp.received_messages])
            last = time.monotonic()
    return got


class DiesBeforePublishing:
    """The publisher of a driver that dies right after its write (the row is in BigQuery)."""

    def publish(self, *args, **kwargs):
        raise RuntimeError("driver died between write and publish")


def test_a_run_that_dies_between_write_and_publish_loses_no_alert(spark, isolated):
    rules = {"rules": [{"name": "all", "statuses": ["ok", "low_confidence"]}]}
    clients.storage_client(isolated).bucket(isolated.bucket).blob("_rules/alerts.json") \
        .upload_from_string(json.dumps(rules))  # as a cluster reads it: from a gs:// URI
    settings = isolated.replace(alerts=f"gs://{isolated.bucket}/_rules/alerts.json")
    sub = alert_subscription(settings)
    summary = replay(discover(sample_dataset())[:3], isolated, rate=50, limit=3, progress=False)
    msgs = [(f"m{i}", None, {"eventType": "OBJECT_FINALIZE", "bucketId": isolated.bucket,
                             "objectId": name, "objectGeneration": str(gen)}, b"", 1)
            for i, (name, gen) in enumerate(summary.objects)]
    df = spark.createDataFrame(msgs, SCHEMA)

    dying = stream.BatchProcessor(settings)
    dying.alerter._client = DiesBeforePublishing()
    with pytest.raises(RuntimeError, match="between write and publish"):
        dying.process(df, 1)
    assert len(rows_of(isolated)) == 3  # written, never announced
    assert pull_all(sub, quiet=2) == []

    restarted = stream.BatchProcessor(settings)  # a new run: no memory of the old one
    report = restarted.process(df, 1)  # Spark replays the uncommitted batch
    assert (report.inserted, report.already_done, report.alerts) == (0, 3, 3)
    assert restarted.process(df, 1).alerts == 0  # replayed again within this run: nothing
    got = pull_all(sub)
    assert sorted(m.attributes["dedupe_id"] for m in got) == \
        sorted(f"{isolated.bucket}/{name}#{gen}" for name, gen in summary.objects)
    assert len(rows_of(isolated)) == 3


WINDOW = 2  # seconds of object_created per drift window
RATE = 10  # uploads per second of (synthetic) creation time: 20 a window
HALF = 60  # clean objects, then as many drifted ones


def notification(bucket: str, name: str, generation: int, created: datetime, i: int) -> tuple:
    """A GCS notification as the source delivers it, created at ``created``."""
    payload = json.dumps({"bucket": bucket, "name": name, "generation": str(generation),
                          "timeCreated": created.isoformat()}).encode()
    return (f"m{i}", None, {"eventType": "OBJECT_FINALIZE", "bucketId": bucket,
                            "objectId": name, "objectGeneration": str(generation)}, payload, 1)


def test_the_stream_raises_the_drift_alert_within_3_windows_of_the_change(spark, isolated,
                                                                          tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(RULES))
    settings = isolated.replace(alerts=str(rules), drift_window=str(WINDOW))
    sub = alert_subscription(settings)
    clean = replay(discover(sample_dataset()), isolated.replace(prefix="a"), rate=50,
                   limit=HALF, loop=True, seed=1, progress=False)
    drifted = replay(discover(drifted_dataset(tmp_path / "drifted")),
                     isolated.replace(prefix="b"), rate=50, limit=HALF, loop=True, seed=2,
                     progress=False)
    # creation times RATE a second, the drifted half after the clean one; not on a boundary
    t0 = datetime.now(UTC).replace(microsecond=700_000) - timedelta(minutes=10)
    t0 -= timedelta(seconds=t0.second % WINDOW)
    objects = [*clean.objects, *drifted.objects]
    msgs = [notification(isolated.bucket, name, gen, t0 + timedelta(seconds=i / RATE), i)
            for i, (name, gen) in enumerate(objects)]
    processor = stream.BatchProcessor(settings)
    for b in range(0, len(msgs), RATE * WINDOW):  # a batch a window's worth, in upload order
        processor.process(spark.createDataFrame(msgs[b:b + RATE * WINDOW], SCHEMA), b)
    got = pull_all(sub)
    drifts = [m for m in got if m.attributes["rule"] == "mix-shift"]
    change = t0 + timedelta(seconds=HALF / RATE)
    starts = sorted(datetime.fromisoformat(m.attributes["window_start"]) for m in drifts)
    step = timedelta(seconds=WINDOW)
    assert starts, [m.attributes for m in got]
    assert change - step < starts[0] <= change + 2 * step, (change, starts)  # within 3 windows
    assert len(set(starts)) == len(starts)  # once per window
    cats = [m for m in got if m.attributes["rule"] == "cats"]
    rows = rows_of(isolated)
    assert sorted(m.attributes["dedupe_id"] for m in cats) == sorted(
        f"{r['bucket']}/{r['name']}#{r['generation']}" for r in rows if r["top1_label"] in CATS)


UPLOADS = 40


def test_sigkill_and_republished_notifications_alert_each_matching_generation(isolated, tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"rules": [RULES["rules"][0]]}))
    settings = isolated.replace(alerts=str(rules))
    alerts_sub = alert_subscription(settings)
    tap = isolated.replace(subscription=isolated.subscription + "-tap")
    provision.apply(tap)  # captures the notifications, to publish each twice more
    pipe = Pipeline(settings, tmp_path / "run.log")
    uploads: dict = {}
    producer = threading.Thread(target=lambda: uploads.setdefault("s", replay(
        discover(sample_dataset()), isolated, rate=10, limit=UPLOADS, loop=True, seed=3,
        progress=False)))
    pipe.start()
    producer.start()
    try:
        wait_for(isolated, pipe, UPLOADS // 3, 240)
        pipe.kill()  # mid-run: no stop(), a batch possibly written and not yet published
        killed = datetime.now(UTC)
        pipe.start()
        producer.join(120)
        assert uploads["s"].uploaded == UPLOADS and uploads["s"].failed == 0
        sub = clients.subscriber_client()
        originals: list = []
        deadline = time.monotonic() + 30
        while len(originals) < UPLOADS and time.monotonic() < deadline:
            resp = sub.pull(subscription=tap.subscription_path, max_messages=500, timeout=5)
            originals += [m.message for m in resp.received_messages
                          if m.message.attributes.get("bucketId") == isolated.bucket]
        assert len(originals) == UPLOADS
        publish(isolated, [(m.data, dict(m.attributes)) for m in originals] * 2)
        wait_for(isolated, pipe, UPLOADS, 300)
        written = query(isolated, f"SELECT DISTINCT bucket, name, generation, top1_label "
                                  f"FROM `{isolated.table_id}`")
        expected = {f"{r['bucket']}/{r['name']}#{r['generation']}" for r in written
                    if r["top1_label"] in CATS}
        got: list = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            got += pull_all(alerts_sub, quiet=2, timeout=10)
            if expected <= {m.attributes["dedupe_id"] for m in got}:
                break
        time.sleep(5)  # a duplicate, if any, would come within a batch or two
        got += pull_all(alerts_sub)
    finally:
        pipe.kill()
    assert expected and {m.attributes["dedupe_id"] for m in got} == expected, pipe.tail()
    copies = defaultdict(list)
    for m in got:
        body = json.loads(m.data)
        assert m.attributes["rule"] == "cats"
        assert m.attributes["dedupe_id"] == f"{body['bucket']}/{body['name']}#{body['generation']}"
        assert m.attributes["label"] == body["top1_label"] and body["top1_label"] in CATS
        assert float(m.attributes["probability"]) == pytest.approx(body["top1_prob"], abs=1e-6)
        assert m.attributes["model_version"] == body["model_version"]
        copies[m.attributes["dedupe_id"]].append(m.publish_time)
    # a second message for a generation only from the run after the kill (at-least-once)
    for times in copies.values():
        assert all(t >= killed - timedelta(seconds=1) for t in sorted(times)[1:]), times
