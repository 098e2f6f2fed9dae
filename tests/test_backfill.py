"""Backfill: pure listing logic, then real backfills (and a racing stream) on the local stack."""

from __future__ import annotations

import argparse
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from deploy.demo import counts
from pipeline import clients
from pipeline.bigquery import rows as bigquery_rows
from pipeline.bigquery import sinks
from pipeline.commands import backfill as bf
from pipeline.commands import cli
from pipeline.config import Settings
from pipeline.model.classfolders import Item, discover
from pipeline.notifications import FINALIZE, Notification, ObjectKey
from pipeline.times import parse_since
from producer.datasets import sample_dataset
from producer.replay import replay

NOW = datetime(2024, 5, 6, 12, 0, tzinfo=UTC)
SEED_MODEL = "seeded-by-test"  # rows written before the backfill; must survive it untouched


def blob(name: str, *, created: datetime = NOW, updated: datetime | None = None, **kw):
    fields = {"generation": "7", "size": 10, "content_type": "image/jpeg", "metadata": None} | kw
    return SimpleNamespace(bucket=SimpleNamespace(name="b"), name=name, time_created=created,
                           updated=updated or created, **fields)


# --- pure -------------------------------------------------------------------------------------

def test_parse_since_iso_naive_utc_and_ages() -> None:
    assert parse_since("2024-05-06T07:08:09Z") == datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    assert parse_since("2024-05-06 07:08") == datetime(2024, 5, 6, 7, 8, tzinfo=UTC)
    assert parse_since("2024-05-06T09:00+02:00") == datetime(2024, 5, 6, 7, 0, tzinfo=UTC)
    assert parse_since("90m", NOW) == NOW - timedelta(minutes=90)
    assert parse_since("2d", NOW) == NOW - timedelta(days=2)
    assert parse_since("1.5h", NOW) == NOW - timedelta(minutes=90)
    with pytest.raises(ValueError, match="neither"):
        parse_since("yesterday")


def test_notification_is_the_finalize_gcs_would_send() -> None:
    n = bf.notification(blob("flowers/daisy/1.jpg", generation="42", size=1234,
                             metadata={"true_label": "rose"}))
    assert n == Notification(ObjectKey("b", "flowers/daisy/1.jpg", 42), FINALIZE, event_time=NOW,
                             size=1234, content_type="image/jpeg", metadata={"true_label": "rose"})
    assert n.true_label == "rose"
    row = bigquery_rows.build_row(n, status="ok", batch_id=-1)
    assert (row["event_time"], row["size"], row["message_id"]) == (NOW.isoformat(), 1234, None)
    assert bf.notification(blob("x/cat/a.jpg", size=None)).true_label == "cat"


def test_selected_skips_own_output_and_filters_on_since() -> None:
    own = bf.own_prefixes(Settings(bucket="b"))
    assert own == ("_bucketlens/",)
    assert not bf.selected(blob("_bucketlens/predictions/batch-3.jsonl"), own, None)
    assert bf.selected(blob("_bucketlensx/a.jpg"), own, None)
    old = blob("a.jpg", created=NOW - timedelta(hours=2))
    touched = blob("a.jpg", created=NOW - timedelta(hours=2), updated=NOW)
    assert bf.selected(old, own, None) and not bf.selected(old, own, NOW - timedelta(hours=1))
    assert bf.selected(touched, own, NOW - timedelta(hours=1))
    assert bf.selected(blob("a.jpg"), own, NOW)  # at or after
    elsewhere = Settings(bucket="b", jsonl_uri="gs://b/results/x")
    assert bf.own_prefixes(elsewhere) == ("_bucketlens/", "results/x/")
    assert bf.own_prefixes(Settings(bucket="b", jsonl_uri="gs://other/r")) == ("_bucketlens/",)


def test_batches_are_lazy_and_bounded() -> None:
    pulled = []

    def source():
        for i in range(7):
            pulled.append(i)
            yield i

    chunks = bf.batches(source(), 3)
    assert next(chunks) == [0, 1, 2] and pulled == [0, 1, 2]  # no read-ahead past one chunk
    assert list(chunks) == [[3, 4, 5], [6]]
    with pytest.raises(ValueError):
        next(bf.batches([1], 0))


def test_summary_json_line_keys() -> None:
    s = bf.BackfillSummary(listed=3, skipped_existing=1, classified=2, inserted=2, seconds=1.23456)
    assert list(s.as_json())[:6] == ["listed", "skipped_existing", "classified", "inserted",
                                     "errors", "seconds"]
    assert s.as_json()["seconds"] == 1.235


def test_cli_parser_flags() -> None:
    args = _parser().parse_args(["backfill", "--bucket", "b", "--prefix", "p/", "--since", "2h",
                                 "--batch", "20", "--dry-run"])
    assert (args.bucket, args.prefix, args.batch, args.dry_run) == ("b", "p/", 20, True)
    assert abs(datetime.now(UTC) - timedelta(hours=2) - args.since) < timedelta(seconds=5)
    assert args.func.target == "pipeline.commands.backfill:run_backfill"
    for bad in (["--bucket", "b", "--batch", "0"], ["--bucket", "b", "--since", "soon"], []):
        with pytest.raises(SystemExit):
            _parser().parse_args(["backfill", *bad])


def _parser() -> argparse.ArgumentParser:
    return cli.build_parser()


# --- on the local stack -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Item]:
    return discover(sample_dataset(tmp_path_factory.mktemp("sample")))


def upload(settings: Settings, photos: list[Item], n: int) -> list[tuple[str, int]]:
    summary = replay(photos, settings, rate=200, concurrency=4, limit=n, loop=True)
    assert (summary.uploaded, summary.failed) == (n, 0)
    return summary.objects


def table_rows(settings: Settings) -> list[dict]:
    bq = clients.bigquery_client(settings)
    return [dict(r) for r in bq.query(f"SELECT * FROM `{settings.table_id}`").result()]


@pytest.mark.integration
@pytest.mark.spark
def test_backfill_classifies_the_rest_once_and_a_rerun_adds_nothing(
        spark, isolated: Settings, photos: list[Item]) -> None:
    objects = upload(isolated, photos, 50)
    gcs = clients.storage_client(isolated).bucket(isolated.bucket)
    gcs.blob("_bucketlens/predictions/batch-1.jsonl").upload_from_string(b'{"x": 1}\n')
    seeded = sorted(objects)[:10]
    seed_rows = [bigquery_rows.build_row(Notification(ObjectKey(isolated.bucket, name, gen), FINALIZE),
                                status="ok", model=SEED_MODEL, batch_id=999)
                 for name, gen in seeded]
    assert sinks.BigQuerySink(isolated).write(seed_rows, 999) == 10
    before = {(r["name"], r["generation"]): r for r in table_rows(isolated)}

    s = bf.backfill(isolated, spark, batch=16, progress=True)

    assert (s.listed, s.skipped_existing, s.classified, s.inserted, s.errors) == (50, 10, 40, 40, 0)
    assert (s.ignored, s.pending) == (0, 40)
    rows = table_rows(isolated)
    by_key = {(r["name"], r["generation"]): r for r in rows}
    assert len(rows) == len(by_key) == 50 and set(by_key) == set(objects)
    assert {k: by_key[k] for k in before} == before  # the 10 seeded rows are untouched
    fresh = [r for k, r in by_key.items() if k not in before]
    assert {r["model"] for r in fresh} == {isolated.model}
    assert {r["status"] for r in fresh} <= {"ok", "low_confidence"}
    assert all(r["top1_label"] and r["top5"] for r in fresh)
    assert all(r["true_label"] == r["name"].split("/")[-2] for r in fresh)
    assert all(r["event_time"] and r["size"] and r["content_type"] == "image/jpeg" for r in fresh)
    assert all(r["message_id"] is None and r["publish_time"] is None for r in fresh)
    assert {r["batch_id"] for r in fresh} <= {-1, -2, -3, -4} and len({r["batch_id"] for r in fresh}) > 1

    again = bf.backfill(isolated, spark, batch=16, progress=False)
    assert (again.listed, again.skipped_existing, again.classified, again.inserted) == (50, 50, 0, 0)
    assert counts(clients.bigquery_client(isolated), isolated)[:2] == (50, 50)


@pytest.mark.integration
@pytest.mark.spark
def test_cli_dry_run_writes_nothing_and_since_filters(
        spark, isolated: Settings, photos: list[Item], capsys, monkeypatch) -> None:
    for k, v in isolated.as_env().items():  # the CLI reads its settings from the environment
        monkeypatch.setenv(k, v)
    old = upload(isolated, photos, 6)
    time.sleep(1.0)
    since = datetime.now(UTC)
    time.sleep(1.0)
    new = upload(isolated.replace(prefix="later"), photos, 4)

    def cli(*argv: str) -> tuple[int, dict]:
        args = _parser().parse_args(["backfill", "--bucket", isolated.bucket, *argv])
        code = bf.run_backfill(args, spark)
        return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    code, out = cli("--dry-run")
    assert code == 0
    assert (out["listed"], out["pending"], out["classified"], out["inserted"]) == (10, 10, 0, 0)
    assert table_rows(isolated) == []
    assert len(list(clients.storage_client(isolated).list_blobs(isolated.bucket))) == 10

    code, out = cli("--since", since.isoformat(), "--batch", "3")
    assert code == 0
    assert (out["listed"], out["skipped_existing"], out["classified"], out["inserted"]) == (4, 0, 4, 4)
    assert {(r["name"], r["generation"]) for r in table_rows(isolated)} == set(new)
    assert not set(old) & set(new)

    code, out = cli("--prefix", "later/", "--dry-run")
    assert (out["listed"], out["skipped_existing"], out["pending"]) == (4, 4, 0)


class GatedSink:
    """The stream's sink: its first write waits until the backfill is done, forcing the race
    (both classify the same keys, neither having seen the other's rows)."""

    def __init__(self, inner: sinks.Sink) -> None:
        self.inner, self.writing, self.release = inner, threading.Event(), threading.Event()

    def existing_keys(self, keys):
        return self.inner.existing_keys(keys)

    def write(self, rows, batch_id, **kw):
        self.writing.set()
        self.release.wait(120)
        return self.inner.write(rows, batch_id, **kw)

    def write_dead_letters(self, records, batch_id, **kw):
        return self.inner.write_dead_letters(records, batch_id, **kw)


@pytest.mark.integration
@pytest.mark.spark
@pytest.mark.timeout(240)
def test_backfill_racing_the_stream_leaves_one_row_per_key(
        spark, isolated: Settings, photos: list[Item]) -> None:
    from pipeline.stream import job as stream

    objects = upload(isolated, photos, 50)  # their notifications wait in the subscription
    settings = isolated.replace(trigger_seconds=1.0, max_messages_per_batch=20)
    gate = GatedSink(sinks.BigQuerySink(settings))
    processor = stream.BatchProcessor(settings, sink=gate)
    query, _ = stream.start(settings, spark=spark, processor=processor)
    bq = clients.bigquery_client(settings)
    try:
        assert gate.writing.wait(90), "the stream never reached its first write"
        s = bf.backfill(settings, spark, batch=25, progress=False)
        gate.release.set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not query.exception():
            if sum(r.already_done + r.classified for r in processor.reports) >= 50:
                break
            time.sleep(0.5)
        assert query.exception() is None
    finally:
        gate.release.set()
        query.stop()
    assert (s.listed, s.skipped_existing, s.classified, s.inserted) == (50, 0, 50, 50)
    first = next(r for r in processor.reports if r.classified)
    assert first.inserted == 0  # classified by both, inserted once: by the backfill's MERGE
    assert sum(r.inserted for r in processor.reports) == 0
    rows, keys, errors = counts(bq, settings)
    assert rows == keys == len(objects) == 50 and errors == 0
    assert {(r["name"], r["generation"]) for r in table_rows(settings)} == set(objects)
