"""Storage Write API path: Arrow encoding (pure), then appends, bounded lookups, views over a
duplicate and ``compact`` against bqemulator's gRPC port."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
import pytest
from google.api_core import exceptions as api_exceptions
from tenacity import wait_none

from pipeline import clients, retry
from pipeline.bigquery import bqwrite, catalog, compact, sinks
from pipeline.bigquery import rows as bigquery_rows
from pipeline.bigquery import views as bigquery_views
from pipeline.config import Settings
from pipeline.notifications import Notification, ObjectKey

T0 = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
FIELDS = catalog.schema_json("predictions")


def note(name: str, generation: int, bucket: str, created: datetime | None = T0) -> Notification:
    return Notification(ObjectKey(bucket, name, generation), "OBJECT_FINALIZE",
                        event_time=created, created=created)


def row(settings: Settings, name: str, generation: int = 1, created: datetime = T0,
        processed_at: datetime = T0, status: str = "ok") -> dict:
    return bigquery_rows.build_row(note(name, generation, settings.bucket, created), status=status,
                          model="m", topk=[(985, "daisy", 0.75), (1, "x", 0.125)], batch_id=0,
                          processed_at=processed_at)


# --- pure -------------------------------------------------------------------------------------

def test_arrow_schema_follows_the_json_schema() -> None:
    schema = bqwrite.arrow_schema(FIELDS)
    assert schema.field("generation").type == pa.int64()
    assert not schema.field("generation").nullable and schema.field("reason").nullable
    assert schema.field("processed_at").type == pa.timestamp("us", tz="UTC")
    assert schema.field("top5").type == pa.list_(pa.struct(
        [("class_id", pa.int64()), ("label", pa.string()), ("prob", pa.float64())]))
    assert schema.names == [f["name"] for f in FIELDS]


def test_record_batch_encodes_rows_exactly() -> None:
    r = row(Settings(), "a/1.jpg", 42)
    batch = bqwrite.record_batch([r, {**r, "top5": [], "reason": "x"}], FIELDS)
    got = batch.to_pylist()
    assert got[0]["processed_at"] == T0 and got[0]["object_created"] == T0
    assert got[0]["top5"] == r["top5"] and got[1]["top5"] == [] and got[1]["reason"] == "x"
    assert {k: v for k, v in got[0].items() if k not in ("processed_at", "object_created",
                                                         "event_time")} == \
        {k: v for k, v in r.items() if k not in ("processed_at", "object_created", "event_time")}
    with pytest.raises((pa.ArrowInvalid, ValueError)):
        bqwrite.record_batch([{**r, "generation": None}], FIELDS)  # REQUIRED


def test_append_requests_carry_the_schema_once_and_split_big_batches() -> None:
    batch = bqwrite.record_batch([row(Settings(), f"{i}.jpg") for i in range(5)], FIELDS)
    reqs = bqwrite.append_requests("projects/p/datasets/d/tables/t/streams/_default", batch, 2)
    assert [r.arrow_rows.rows.row_count for r in reqs] == [2, 2, 1]
    assert reqs[0].arrow_rows.writer_schema.serialized_schema
    assert not any(r.arrow_rows.writer_schema.serialized_schema for r in reqs[1:])
    assert all(r.write_stream.endswith("/streams/_default") and "offset" not in r for r in reqs)
    assert bqwrite.default_stream("p.d.t") == "projects/p/datasets/d/tables/t/streams/_default"


def test_append_requests_are_cut_on_their_serialized_size() -> None:
    from google.cloud.bigquery_storage_v1 import types

    rows = [row(Settings(), f"{i:04d}-" + "n" * 2000) for i in range(100)]
    batch = bqwrite.record_batch(rows, FIELDS)
    reqs = bqwrite.append_requests("projects/p/datasets/d/tables/t/streams/_default", batch,
                                   max_bytes=50_000)
    assert max(types.AppendRowsRequest.pb(r).ByteSize() for r in reqs) <= 50_000
    assert sum(r.arrow_rows.rows.row_count for r in reqs) == 100 and len(reqs) >= 5
    assert reqs[0].arrow_rows.writer_schema.serialized_schema
    assert not any(r.arrow_rows.writer_schema.serialized_schema for r in reqs[1:])
    with pytest.raises(ValueError, match="alone is .* over the 3000-byte limit"):
        bqwrite.append_requests("s", batch, max_bytes=3000)  # no request could carry one row


def test_in_band_append_errors_become_retryable_exceptions() -> None:
    from google.cloud.bigquery_storage_v1 import types
    from google.rpc import status_pb2

    def response(code: int) -> types.AppendRowsResponse:
        return types.AppendRowsResponse(error=status_pb2.Status(code=code, message="m"))

    with pytest.raises(api_exceptions.ResourceExhausted):
        bqwrite.raise_for_response(response(8))
    with pytest.raises(api_exceptions.ServiceUnavailable):
        bqwrite.raise_for_response(response(14))
    with pytest.raises(api_exceptions.InvalidArgument):
        bqwrite.raise_for_response(response(3))
    bqwrite.raise_for_response(types.AppendRowsResponse())  # OK: nothing raised


def test_compact_sql_is_bounded_and_explicit() -> None:
    sql = compact.compact_sql("p.d.t", FIELDS, catalog.PREDICTIONS, date(2024, 5, 6))
    bound = "object_created >= TIMESTAMP '2024-05-06 00:00:00.000000+00'"
    assert sql.count(bound) == 3  # the target and both scans of the source
    assert "INSERT ROW" not in sql and "WHEN MATCHED THEN DELETE" in sql
    assert "ORDER BY processed_at, batch_id, message_id" in sql


# --- bqemulator -------------------------------------------------------------------------------

def select(settings: Settings, sql: str) -> list[dict]:
    c = clients.bigquery_client(settings)
    return [dict(r.items()) for r in c.query(sql).result()]


class RecordingClient:
    """A bigquery.Client that remembers the SQL it was given."""

    def __init__(self, inner) -> None:
        self.inner, self.sql = inner, []

    def query(self, sql, **kw):
        self.sql.append(sql)
        return self.inner.query(sql, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.integration
def test_append_round_trip_through_the_storage_write_api(isolated: Settings) -> None:
    assert isolated.bq_storage_endpoint  # `local up` exposes the emulator's gRPC port
    bq = sinks.BigQuerySink(isolated)
    rows = [row(isolated, "a/1.jpg", 1), row(isolated, "a/2.jpg", 2, status="corrupt")]
    assert bq.write(rows, batch_id=0) == 2
    assert bq.calls == {"query": 1, "append": 1}  # one lookup, one AppendRows: no job, no DML
    got = select(isolated, f"SELECT * FROM `{isolated.table_id}` ORDER BY name")
    assert [(g["name"], g["generation"], g["status"]) for g in got] == \
        [("a/1.jpg", 1, "ok"), ("a/2.jpg", 2, "corrupt")]
    assert got[0]["top5"] == rows[0]["top5"] and got[0]["object_created"] == T0
    assert got[0]["processed_at"] == T0 and got[0]["top1_prob"] == 0.75
    assert bq.write(rows, batch_id=0) == 0  # a replay appends nothing
    assert bq.calls == {"query": 2, "append": 1}
    assert len(select(isolated, f"SELECT name FROM `{isolated.table_id}`")) == 2


@pytest.mark.integration
def test_existing_keys_reads_only_the_partitions_of_the_batch(isolated: Settings) -> None:
    bq = sinks.BigQuerySink(isolated)
    day2 = T0 + timedelta(days=2)
    bq.write([row(isolated, "a.jpg", 1, T0), row(isolated, "b.jpg", 1, day2)], 0)
    recording = RecordingClient(clients.bigquery_client(isolated))
    bq = sinks.BigQuerySink(isolated, client=recording)  # type: ignore[arg-type]
    b = isolated.bucket
    # found in the day its notification names; the same key claimed for another day is not
    # looked for there: the filter is in the SQL, not only in the result
    assert bq.existing_keys([note("a.jpg", 1, b, T0), note("b.jpg", 1, b, day2)]) == \
        {ObjectKey(b, "a.jpg", 1), ObjectKey(b, "b.jpg", 1)}
    assert bq.existing_keys([note("a.jpg", 1, b, day2)]) == set()
    assert "TIMESTAMP '2024-05-08 00:00:00.000000+00'" in recording.sql[-1]
    assert "T.object_created >=" in recording.sql[-1]
    # a bare key has no day: the lookup reads everything (and says so by having no filter)
    assert bq.existing_keys([ObjectKey(b, "b.jpg", 1)]) == {ObjectKey(b, "b.jpg", 1)}
    assert "object_created" not in recording.sql[-1]


class FlakyWriter:
    """Fails the first ``fails`` appends with ``error``; with ``commit_first`` the failing
    appends still commit (the response was lost), which the retry must not repeat."""

    def __init__(self, inner: bqwrite.StorageWriter, error: Exception, fails: int,
                 commit_first: bool = False) -> None:
        self.inner, self.error, self.fails, self.commit_first = inner, error, fails, commit_first
        self.attempts = 0

    def append(self, table_id, rows, fields) -> int:
        self.attempts += 1
        if self.attempts <= self.fails:
            if self.commit_first:
                self.inner.append(table_id, rows, fields)
            raise self.error
        return self.inner.append(table_id, rows, fields)


@pytest.mark.integration
@pytest.mark.parametrize("error", [
    api_exceptions.ResourceExhausted("RESOURCE_EXHAUSTED: quota"),
    api_exceptions.Forbidden("quota", errors=[{"reason": "quotaExceeded"}]),
    api_exceptions.ServiceUnavailable("UNAVAILABLE"),
])
@pytest.mark.parametrize("commit_first", [False, True])
def test_quota_errors_on_append_are_retried_without_duplicates(
        isolated: Settings, monkeypatch, error: Exception, commit_first: bool) -> None:
    monkeypatch.setattr(retry, "RETRY_WAIT", wait_none())
    monkeypatch.setattr(retry, "QUOTA_WAIT", wait_none())
    real = bqwrite.StorageWriter(clients.bigquery_write_client(isolated))
    flaky = FlakyWriter(real, error, fails=8, commit_first=commit_first)  # > the policy's 6 attempts
    bq = sinks.BigQuerySink(isolated, writer=flaky)  # type: ignore[arg-type]
    rows = [row(isolated, f"{i}.jpg") for i in range(3)]
    assert bq.write(rows, batch_id=0) == 3  # also when an append "failed" after committing
    assert flaky.attempts == (1 if commit_first else 9)  # a committed append is found, not redone
    assert len(select(isolated, f"SELECT name FROM `{isolated.table_id}`")) == 3


@pytest.mark.integration
def test_a_key_appended_by_two_writers_is_counted_once_by_every_view(isolated: Settings) -> None:
    # two writers that both looked the key up before either appended it: both append
    first, second = (row(isolated, "race.jpg", 1, processed_at=T0 + timedelta(seconds=s),
                         status=st) for s, st in ((1, "ok"), (2, "fetch_error")))
    writer = bqwrite.StorageWriter(clients.bigquery_write_client(isolated))
    writer.append(isolated.table_id, [first], FIELDS)
    writer.append(isolated.table_id, [second], FIELDS)
    writer.append(isolated.table_id, [row(isolated, "other.jpg", 1)], FIELDS)
    bigquery_views.create_views(isolated)
    raw = select(isolated, f"SELECT name FROM `{isolated.table_id}`")
    assert len(raw) == 3  # the duplicate is really there
    v = f"{isolated.project}.{isolated.dataset}"
    assert {r["status"]: r["images"] for r in select(isolated, f"SELECT * FROM `{v}.status_counts`")} \
        == {"ok": 2}  # the earliest copy (ok) wins; fetch_error is not counted
    assert sum(r["images"] for r in select(isolated, f"SELECT * FROM `{v}.throughput_per_minute`")) == 2
    assert len(select(isolated, f"SELECT * FROM `{v}.processing_latency`")) == 2
    assert len(select(isolated, f"SELECT * FROM `{v}.latest_predictions`")) == 2
    assert len(select(isolated, f"SELECT * FROM `{v}.distinct_predictions`")) == 2


@pytest.mark.integration
def test_compact_removes_exactly_the_duplicates(isolated: Settings) -> None:
    old = T0 - timedelta(days=10)
    writer = bqwrite.StorageWriter(clients.bigquery_write_client(isolated))
    copies = [row(isolated, "x.jpg", 1, processed_at=T0 + timedelta(seconds=s), status=st)
              for s, st in ((3, "gone"), (1, "ok"), (2, "corrupt"))]
    rows = [*copies, row(isolated, "y.jpg", 1),
            row(isolated, "old.jpg", 1, created=old), row(isolated, "old.jpg", 1, created=old)]
    for r in rows:
        writer.append(isolated.table_id, [r], FIELDS)
    dead = bigquery_rows.dead_letter_record("m1", "not JSON", {}, b"x", None, 0, recorded_at=T0)
    writer.append(isolated.dead_letter_table_id, [dead, dead],
                  catalog.schema_json("dead_letters"))
    out = compact.compact(isolated, T0.date())
    assert out[isolated.table_id] == {"duplicate_keys": 1, "removed": 2}
    assert out[isolated.dead_letter_table_id] == {"duplicate_keys": 1, "removed": 1}
    assert out[isolated.events_table_id] == {"duplicate_keys": 0, "removed": 0}
    got = select(isolated, f"SELECT name, status, top5 FROM `{isolated.table_id}` ORDER BY name")
    assert [(g["name"], g["status"]) for g in got] == \
        [("old.jpg", "ok"), ("old.jpg", "ok"), ("x.jpg", "ok"), ("y.jpg", "ok")]  # old: before --since
    assert got[2]["top5"] == copies[1]["top5"]  # the kept copy is the whole row
    assert len(select(isolated, f"SELECT * FROM `{isolated.dead_letter_table_id}`")) == 1
    again = compact.compact(isolated, T0.date())
    assert again[isolated.table_id] == {"duplicate_keys": 0, "removed": 0}
    assert compact.compact(isolated, old.date())[isolated.table_id] == \
        {"duplicate_keys": 1, "removed": 1}


@pytest.mark.integration
def test_compact_command_prints_one_json_line(isolated: Settings, monkeypatch, capsys) -> None:
    from pipeline.commands import cli

    for k, v in isolated.as_env().items():
        monkeypatch.setenv(k, v)
    assert cli.main(["compact", "--since", "2024-05-01"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out[isolated.table_id] == {"duplicate_keys": 0, "removed": 0}


@pytest.mark.integration
def test_merge_mode_is_bounded_and_idempotent(isolated: Settings) -> None:
    settings = isolated.replace(sink_mode="merge")
    recording = RecordingClient(clients.bigquery_client(settings))
    bq = sinks.BigQuerySink(settings, client=recording)  # type: ignore[arg-type]
    rows = [row(settings, "a.jpg"), row(settings, "b.jpg")]
    assert bq.write(rows, batch_id=0) == 2
    assert bq.write(rows, batch_id=1) == 0
    assert bq.calls["load"] == 2 and "append" not in bq.calls
    merges = [q for q in recording.sql if q.startswith("MERGE")]
    assert len(merges) == 2 and all(
        "AND (T.object_created >= TIMESTAMP '2024-05-06 00:00:00.000000+00'" in q for q in merges)
    assert len(select(settings, f"SELECT name FROM `{settings.table_id}`")) == 2


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.process
def test_sink_bench_runs_at_tiny_sizes_and_reports_every_figure() -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "sink.py"), "--json", "--small", "50",
         "--large", "400", "--batch", "5", "--repeats", "1", "--days", "4"],
        capture_output=True, text=True, timeout=280, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(out)[:6] == ["rows_small", "rows_large", "batch_s_small", "batch_s_large",
                             "growth", "statements_per_batch"]
    assert (out["rows_small"], out["rows_large"]) == (50, 400)
    assert out["statements_per_batch"] == 1 and out["old_statements_per_batch"] == 5
    assert out["calls_per_batch"] == {"append": 1}  # a steady batch: no query job
    assert out["start_statements_per_batch"] == 2  # after a start: one bounded lookup too
    assert out["growth"] == pytest.approx(out["batch_s_large"] / out["batch_s_small"], abs=1e-3)
    assert out["billed_new_large"] == 0
    assert out["billed_start_large"] == 10 * 2**20  # a small partition: the 10 MB minimum
    assert out["billed_old_large"] >= out["billed_start_large"]
    assert out["table_key_bytes_large"] > out["table_key_bytes_small"]


@pytest.mark.integration
def test_one_kept_open_connection_per_table_reopened_after_an_error(isolated: Settings) -> None:
    writer = bqwrite.StorageWriter(clients.bigquery_write_client(isolated))
    for i in range(3):
        writer.append(isolated.table_id, [row(isolated, f"{i}.jpg")], FIELDS)
    assert (writer.connections, writer.calls) == (1, 3)  # three batches, one connection
    later = f"{isolated.project}.{isolated.dataset}.later"
    with pytest.raises(api_exceptions.GoogleAPICallError):
        writer.append(later, [row(isolated, "x.jpg")], FIELDS)  # no such table yet
    from google.cloud import bigquery

    clients.bigquery_client(isolated).create_table(
        bigquery.Table(later, schema=catalog.load_schema("predictions")))
    writer.append(later, [row(isolated, "x.jpg")], FIELDS)  # the failed connection was dropped
    writer.append(isolated.table_id, [row(isolated, "3.jpg")], FIELDS)
    assert writer.connections == 3  # predictions once; `later` twice: opened, failed, reopened
    assert len(select(isolated, f"SELECT name FROM `{isolated.table_id}`")) == 4
    assert [r["name"] for r in select(isolated, f"SELECT name FROM `{later}`")] == ["x.jpg"]


def test_a_steady_write_sends_no_query_but_a_retried_one_looks_up_what_it_sent(
        monkeypatch) -> None:
    """``verify=()``: the caller vouches that no key is in the table (the stream's memory);
    a retry still looks up every key an earlier attempt sent (pure: fakes for both clients)."""
    monkeypatch.setattr(retry, "RETRY_WAIT", wait_none())
    looked: list[set] = []

    class Sink(sinks.BigQuerySink):
        def _existing(self, table_id, spec, keys, bound):
            looked.append(set(keys))
            return set(keys)  # the failed attempt had in fact committed

    class Writer:
        attempts = 0

        def append(self, table_id, rows, fields) -> int:
            Writer.attempts += 1
            if Writer.attempts == 1:
                raise api_exceptions.ServiceUnavailable("connection reset")
            return len(rows)

    s = Settings(project="p", dataset="d")
    rows = [row(s, f"{i}.jpg") for i in range(2)]
    assert Sink(s, writer=Writer()).write(rows, 0, verify=()) == 2
    assert Writer.attempts == 1 and looked == [{(r["bucket"], r["name"], 1) for r in rows}]
    looked.clear()
    Writer.attempts = 1  # appends succeed from now on
    assert Sink(s, writer=Writer()).write(rows, 0, verify=()) == 2 and looked == []
