"""Sink: pure row building and SQL, then idempotent writes against bqemulator and fake-gcs."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from google.api_core import exceptions as api_exceptions

from pipeline import clients, config, retry
from pipeline.bigquery import catalog, sinks
from pipeline.bigquery import rows as bigquery_rows
from pipeline.bigquery import sql as bigquery_sql
from pipeline.bigquery import views as bigquery_views
from pipeline.config import Settings
from pipeline.labels import ModelInfo
from pipeline.notifications import Notification, ObjectKey, PoisonMessage, parse

T0 = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


def note(name: str = "flowers/daisy/1.jpg", generation: int = 7, bucket: str = "b",
         **kw) -> Notification:
    return Notification(ObjectKey(bucket, name, generation), "OBJECT_FINALIZE", **kw)


def rows_for(settings: Settings, *keys: tuple[str, int], status: str = "ok") -> list[dict]:
    return [bigquery_rows.build_row(note(name, gen, settings.bucket), status=status, processed_at=T0)
            for name, gen in keys]


# --- pure -------------------------------------------------------------------------------------

def test_build_row_fields_top1_and_timestamps() -> None:
    n = parse("msg-9", {"eventType": "OBJECT_FINALIZE", "bucketId": "b",
                        "objectId": "flowers/daisy/1.jpg", "objectGeneration": "42",
                        "eventTime": "2024-05-06T07:00:00Z"},
              json.dumps({"size": "1234", "contentType": "image/jpeg"}).encode(),
              publish_time=datetime(2024, 5, 6, 9, 0, tzinfo=timezone(timedelta(hours=2))))
    topk = [(985, "daisy", 0.75), (309, "bee", 0.125)]
    row = bigquery_rows.build_row(n, status="ok", model="m", topk=topk, batch_id=3, processed_at=T0)
    assert row == {
        "bucket": "b", "name": "flowers/daisy/1.jpg", "generation": 42, "status": "ok",
        "reason": None, "true_label": "daisy", "model": "m", "model_version": None,
        "label_set": None, "true_model_label": None,
        "top1_class_id": 985, "top1_label": "daisy", "top1_prob": 0.75,
        "top5": [{"class_id": 985, "label": "daisy", "prob": 0.75},
                 {"class_id": 309, "label": "bee", "prob": 0.125}],
        "size": 1234, "content_type": "image/jpeg",
        "event_time": "2024-05-06T07:00:00+00:00",
        "publish_time": "2024-05-06T07:00:00+00:00",  # converted to UTC
        "processed_at": "2024-05-06T07:08:09.123456+00:00",
        "message_id": "msg-9", "batch_id": 3,
        "object_created": "2024-05-06T07:00:00+00:00",  # no timeCreated: the event time
    }
    json.dumps(row)  # JSON-ready as it stands


def test_build_row_records_the_model_and_the_own_label_the_true_label_names() -> None:
    info = ModelInfo("flowers", "3f9c2a1b7d4e", "own", ("Daisy", "acoustic guitar", "tulip"))
    for name, own in [("f/daisy/1.jpg", "Daisy"), ("f/Acoustic__Guitar/2.jpg", "acoustic guitar"),
                      ("f/rose/3.jpg", None), ("loose.jpg", None)]:
        row = bigquery_rows.build_row(note(name), status="ok", model=info)
        assert (row["model"], row["model_version"], row["label_set"]) == ("flowers", "3f9c2a1b7d4e", "own")
        assert row["true_model_label"] == own, name


def test_build_row_without_prediction_has_reason_and_no_top1() -> None:
    row = bigquery_rows.build_row(note("loose.jpg"), status="gone", reason="overwritten")
    assert (row["status"], row["reason"], row["true_label"]) == ("gone", "overwritten", None)
    assert row["top1_class_id"] is row["top1_label"] is row["top1_prob"] is None
    assert row["top5"] == [] and row["message_id"] is None
    processed = datetime.fromisoformat(row["processed_at"])
    assert processed.tzinfo and abs(datetime.now(UTC) - processed) < timedelta(minutes=1)


def test_build_row_accepts_numpy_like_numbers() -> None:
    class Num(float):  # what a numpy scalar looks like to json: not a plain float
        pass

    row = bigquery_rows.build_row(note(), status="ok", topk=[(Num(3.0), "x", Num(0.5))])  # type: ignore[list-item]
    assert type(row["top1_class_id"]) is int and type(row["top1_prob"]) is float


def test_dead_letter_record() -> None:
    rec = bigquery_rows.dead_letter_record("m1", "not JSON", {"b": "2", "a": "1"}, b"\xff\x00", T0, 5,
                                  recorded_at=T0)
    assert rec == {"message_id": "m1", "reason": "not JSON", "attributes": '{"a": "1", "b": "2"}',
                   "data": base64.b64encode(b"\xff\x00").decode(), "batch_id": 5,
                   "data_bytes": 2, "data_sha256": hashlib.sha256(b"\xff\x00").hexdigest(),
                   "publish_time": "2024-05-06T07:08:09.123456+00:00",
                   "recorded_at": "2024-05-06T07:08:09.123456+00:00"}
    assert bigquery_rows.dead_letter_record("m", "r", {}, None, None, None)["data"] is None


def test_merge_sql_is_insert_only_with_explicit_columns() -> None:
    sql = bigquery_sql.merge_sql("p.d.t", "p.d._s", ["bucket", "name", "generation", "status"],
                         catalog.PREDICTION_KEY, "processed_at")
    assert "ON T.bucket = S.bucket AND T.name = S.name AND T.generation = S.generation" in sql
    assert "INSERT (bucket, name, generation, status)" in sql
    assert "VALUES (S.bucket, S.name, S.generation, S.status)" in sql
    assert "MATCHED THEN UPDATE" not in sql and "INSERT ROW" not in sql
    assert "PARTITION BY bucket, name, generation ORDER BY processed_at" in sql


def test_staging_table_id_is_unique_and_valid_for_backfill() -> None:
    a, b = (bigquery_sql.staging_table_id("p.d.predictions", -1) for _ in range(2))
    assert a != b and a.startswith("p.d._staging_predictions_m1_") and "-" not in a[4:]


def test_bigquery_rate_limit_403_is_retried_but_access_denied_is_not() -> None:
    assert retry.is_bq_transient(api_exceptions.Forbidden(
        "x", errors=[{"reason": "rateLimitExceeded"}]))
    assert not retry.is_bq_transient(api_exceptions.Forbidden(
        "x", errors=[{"reason": "accessDenied"}]))
    assert retry.is_bq_transient(api_exceptions.ServiceUnavailable("x"))


def finalize(message_id: str, publish: datetime, **payload) -> Notification:
    return parse(message_id, {"eventType": "OBJECT_FINALIZE", "bucketId": "b",
                              "objectId": "a/1.jpg", "objectGeneration": "7",
                              "eventTime": "2024-05-06T23:59:59Z"},
                 json.dumps(payload).encode(), publish_time=publish)


def test_object_created_is_the_payloads_time_created_in_every_copy() -> None:
    created = "2024-05-06T23:59:58.5Z"
    copies = [finalize("m1", T0 + timedelta(days=1), timeCreated=created),
              finalize("m2", T0 + timedelta(days=3), timeCreated=created)]  # a late redelivery
    rows = [bigquery_rows.build_row(n, status="ok", processed_at=T0 + timedelta(days=i + 1))
            for i, n in enumerate(copies)]
    assert {r["object_created"] for r in rows} == {"2024-05-06T23:59:58.500000+00:00"}
    assert rows[0]["processed_at"] != rows[1]["processed_at"]
    with pytest.raises(PoisonMessage, match="timeCreated is not a string"):  # not a time
        finalize("m3", T0 + timedelta(days=1), timeCreated=42)
    # without a payload time the event time is used, then processed_at
    assert bigquery_rows.build_row(finalize("m4", T0 + timedelta(days=1)), status="ok")["object_created"] == \
        "2024-05-06T23:59:59+00:00"
    assert bigquery_rows.build_row(note(), status="ok", processed_at=T0)["object_created"] == \
        T0.isoformat()


def test_partition_filter_is_constant_day_ranges() -> None:
    days = [date(2024, 5, 7), date(2024, 5, 6), date(2024, 5, 9), date(2024, 5, 6)]
    sql = bigquery_sql.partition_filter("object_created", days)
    assert sql == (
        "((T.object_created >= TIMESTAMP '2024-05-06 00:00:00.000000+00' AND "
        "T.object_created < TIMESTAMP '2024-05-08 00:00:00.000000+00') OR "
        "(T.object_created >= TIMESTAMP '2024-05-09 00:00:00.000000+00' AND "
        "T.object_created < TIMESTAMP '2024-05-10 00:00:00.000000+00'))")
    assert bigquery_sql.partition_filter("c", [date(2024, 5, 6)], alias="X") == (
        "(X.c >= TIMESTAMP '2024-05-06 00:00:00.000000+00' AND "
        "X.c < TIMESTAMP '2024-05-07 00:00:00.000000+00')")
    assert bigquery_sql.partition_filter("c", None) == ""  # a key without a date: any partition
    assert bigquery_sql.partition_filter("c", []) == "FALSE"
    assert bigquery_sql.partition_days(["2024-05-06T23:30:00-02:00", T0]) == [date(2024, 5, 6),
                                                                       date(2024, 5, 7)]
    assert bigquery_sql.partition_days([T0, None]) is None


def test_lookup_and_merge_of_a_batch_are_bounded_to_its_days() -> None:
    rows = [{**r, "object_created": t} for r, t in zip(
        rows_for(Settings(), ("a/1.jpg", 1), ("a/2.jpg", 1)),
        ("2024-05-06T10:00:00+00:00", "2024-05-08T00:00:00+00:00"), strict=True)]
    bound = bigquery_sql.row_bound(catalog.PREDICTIONS, rows)
    sql = bigquery_sql.existing_keys_sql("p.d.t", catalog.PREDICTION_KEY, bound)
    assert sql.endswith(
        "WHERE ((T.object_created >= TIMESTAMP '2024-05-06 00:00:00.000000+00' AND "
        "T.object_created < TIMESTAMP '2024-05-07 00:00:00.000000+00') OR "
        "(T.object_created >= TIMESTAMP '2024-05-08 00:00:00.000000+00' AND "
        "T.object_created < TIMESTAMP '2024-05-09 00:00:00.000000+00'))")
    assert "@keys" in sql and "CURRENT_" not in sql
    merge = bigquery_sql.merge_sql("p.d.t", "p.d._s", ["bucket"], catalog.PREDICTION_KEY, "processed_at",
                           bound)
    assert f"ON T.bucket = S.bucket AND T.name = S.name AND T.generation = S.generation AND " \
           f"{bound}\n" in merge
    # dead letters: partitioned by recorded_at, which differs per copy: the redelivery window
    recs = [bigquery_rows.dead_letter_record("m", "r", {}, None, None, 0, recorded_at=T0)]
    assert bigquery_sql.row_bound(catalog.DEAD_LETTERS, recs) == (
        "T.recorded_at >= TIMESTAMP '2024-04-28 00:00:00.000000+00'")


def test_first_per_key_keeps_the_earliest_copy() -> None:
    a, b = rows_for(Settings(), ("x.jpg", 1), ("x.jpg", 1))
    b = {**b, "processed_at": (T0 - timedelta(microseconds=1)).isoformat(), "status": "gone"}
    c = rows_for(Settings(), ("y.jpg", 1))[0]
    assert bigquery_rows.first_per_key([a, b, c], catalog.PREDICTIONS) == [b, c]


def test_quota_errors_are_waited_out_with_patience(monkeypatch) -> None:
    from tenacity import wait_none

    monkeypatch.setattr(retry, "RETRY_WAIT", wait_none())
    monkeypatch.setattr(retry, "QUOTA_WAIT", wait_none())
    quota = api_exceptions.Forbidden("x", errors=[{"reason": "quotaExceeded"}])
    assert retry.is_rate_limited(quota) and retry.is_bq_transient(quota)
    assert retry.is_rate_limited(api_exceptions.ResourceExhausted("x"))  # gRPC 8 / HTTP 429
    assert retry.is_rate_limited(api_exceptions.ServiceUnavailable("x"))  # gRPC 14
    assert not retry.is_rate_limited(api_exceptions.Forbidden("x", errors=[{"reason": "accessDenied"}]))
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) <= 15:  # more than call_with_retries' own 6 attempts
            raise api_exceptions.ResourceExhausted("quota")
        return "ok"

    with pytest.raises(api_exceptions.ResourceExhausted):
        bigquery_sql.bq_call(flaky)  # no patience: gives up after the policy's attempts
    assert len(calls) == 6
    calls.clear()
    assert bigquery_sql.bq_call(flaky, patience=0) == "ok" and len(calls) == 16
    calls.clear()
    denied = api_exceptions.Forbidden("x", errors=[{"reason": "accessDenied"}])
    with pytest.raises(api_exceptions.Forbidden):
        bigquery_sql.bq_call(lambda: calls.append(1) or (_ for _ in ()).throw(denied), patience=0)
    assert len(calls) == 1  # never retried


def test_make_sink_kinds() -> None:
    s = Settings()
    assert isinstance(sinks.make_sink("console", s), sinks.ConsoleSink)
    assert isinstance(sinks.make_sink("jsonl", s), sinks.JsonLinesSink)
    assert isinstance(sinks.make_sink("bigquery", s), sinks.BigQuerySink)  # no client made yet
    with pytest.raises(ValueError, match="append, merge"):
        sinks.BigQuerySink(s.replace(sink_mode="upsert"))
    with pytest.raises(ValueError, match="bigquery, jsonl, console"):
        sinks.make_sink("kafka", s)


def test_console_sink_prints_json_lines() -> None:
    out = io.StringIO()
    console = sinks.ConsoleSink(stream=out)
    assert console.write(rows_for(Settings(), ("a/1.jpg", 1), ("a/2.jpg", 2)), 4) == 2
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["batch_id"], x["name"]) for x in lines] == [(4, "a/1.jpg"), (4, "a/2.jpg")]
    assert console.existing_keys([ObjectKey("b", "a/1.jpg", 1)]) == set()


# --- bqemulator -------------------------------------------------------------------------------

def count(settings: Settings, table_id: str) -> int:
    c = clients.bigquery_client(settings)
    return next(iter(c.query(f"SELECT COUNT(*) AS n FROM `{table_id}`").result()))["n"]


@pytest.mark.integration
def test_write_twice_inserts_once_and_drops_staging(isolated: Settings) -> None:
    bq = sinks.make_sink("bigquery", isolated)
    assert isinstance(bq, sinks.BigQuerySink)
    rows = rows_for(isolated, ("a/1.jpg", 1), ("a/2.jpg", 1), ("a/1.jpg", 2))
    assert bq.write(rows, batch_id=0) == 3
    assert bq.write(rows, batch_id=0) == 0  # a replayed batch
    assert count(isolated, isolated.table_id) == 3
    tables = [t.table_id for t in bq.client.list_tables(f"{isolated.project}.{isolated.dataset}")]
    assert not [t for t in tables if t.startswith("_staging_")], tables
    assert bq.write([], batch_id=1) == 0


@pytest.mark.integration
def test_two_rows_for_one_key_in_a_batch_insert_one(isolated: Settings) -> None:
    bq = sinks.BigQuerySink(isolated)
    first = rows_for(isolated, ("a/1.jpg", 5), status="fetch_error")
    later = [{**rows_for(isolated, ("a/1.jpg", 5))[0],
              "processed_at": (T0 + timedelta(seconds=1)).isoformat()}]
    assert bq.write(later + first, batch_id=2) == 1
    c = clients.bigquery_client(isolated)
    rows = list(c.query(f"SELECT status FROM `{isolated.table_id}`").result())
    assert [r["status"] for r in rows] == ["fetch_error"]  # the earliest processed_at wins


@pytest.mark.integration
def test_existing_keys_returns_exactly_the_written_keys(isolated: Settings) -> None:
    bq = sinks.BigQuerySink(isolated)
    bq.write(rows_for(isolated, ("a/1.jpg", 1), ("a/2.jpg", 1), ("b/3.jpg", 9)), batch_id=0)
    b = isolated.bucket
    written = {ObjectKey(b, "a/1.jpg", 1), ObjectKey(b, "b/3.jpg", 9)}
    unseen = {ObjectKey(b, "a/1.jpg", 2),       # newer generation of a written object
              ObjectKey(b, "a/3.jpg", 1),       # never written
              ObjectKey("other", "a/1.jpg", 1)}  # same name, other bucket
    assert bq.existing_keys([*unseen, *written]) == written
    assert bq.existing_keys([]) == set()


@pytest.mark.integration
def test_dead_letters_are_idempotent_on_message_and_reason(isolated: Settings) -> None:
    bq = sinks.BigQuerySink(isolated)
    recs = [bigquery_rows.dead_letter_record("m1", "not JSON", {"k": "v"}, b"{", T0, 0),
            bigquery_rows.dead_letter_record("m1", "lacks generation", {}, None, None, 0),
            bigquery_rows.dead_letter_record("m2", "not JSON", {}, b"x", None, 0)]
    assert bq.write_dead_letters(recs, batch_id=0) == 3
    assert bq.write_dead_letters(recs[:2], batch_id=1) == 0
    assert count(isolated, isolated.dead_letter_table_id) == 3


@pytest.mark.integration
def test_latest_generation_view(isolated: Settings) -> None:
    bq = sinks.BigQuerySink(isolated)
    bq.write(rows_for(isolated, ("x.jpg", 1), ("x.jpg", 3), ("x.jpg", 2), ("y.jpg", 5)), 0)
    views = bigquery_views.create_views(isolated)
    view = f"{isolated.project}.{isolated.dataset}.latest_predictions"
    assert view in views
    assert bigquery_views.create_views(isolated) == views  # CREATE OR REPLACE: repeatable
    c = clients.bigquery_client(isolated)
    got = {(r["name"], r["generation"]) for r in c.query(f"SELECT * FROM `{view}`").result()}
    assert got == {("x.jpg", 3), ("y.jpg", 5)}


# --- fake-gcs ---------------------------------------------------------------------------------

@pytest.mark.integration
def test_jsonl_sink_writes_one_object_per_batch_and_a_replay_overwrites(
        isolated: Settings) -> None:
    js = sinks.make_sink("jsonl", isolated)
    assert isinstance(js, sinks.JsonLinesSink)
    assert js.write(rows_for(isolated, ("a/1.jpg", 1), ("a/2.jpg", 1)), batch_id=7) == 2
    replay = rows_for(isolated, ("a/1.jpg", 1), ("a/2.jpg", 1), ("a/3.jpg", 1))
    assert js.write(replay, batch_id=7) == 3
    bucket = clients.storage_client(isolated).bucket(isolated.bucket)
    names = [b.name for b in bucket.list_blobs(prefix=f"{config.RESULTS_PREFIX}/")]
    assert names == [f"{config.RESULTS_PREFIX}/{isolated.table}/batch-7.jsonl"]
    lines = bucket.blob(names[0]).download_as_bytes().decode().splitlines()
    assert [json.loads(x)["name"] for x in lines] == ["a/1.jpg", "a/2.jpg", "a/3.jpg"]
    assert js.existing_keys([ObjectKey(isolated.bucket, "a/1.jpg", 1)]) == set()


@pytest.mark.integration
def test_jsonl_sink_ignores_its_own_output_objects(isolated: Settings) -> None:
    js = sinks.JsonLinesSink(isolated)
    own = rows_for(isolated, (f"{config.RESULTS_PREFIX}/{isolated.table}/batch-1.jsonl", 1))
    assert js.write(own, batch_id=2) == 0  # would otherwise loop: output → notification → row
    bucket = clients.storage_client(isolated).bucket(isolated.bucket)
    assert not list(bucket.list_blobs(prefix=f"{config.RESULTS_PREFIX}/"))


def test_the_emulators_connection_contention_is_retried_but_a_bad_query_is_not() -> None:
    busy = api_exceptions.BadRequest("Query execution failed: Resource In Use Error: connection "
                                     "is busy with another call; it refuses instead of waiting")
    assert retry.is_bq_transient(busy)
    assert not retry.is_bq_transient(api_exceptions.BadRequest("Syntax error at [1:8]"))
