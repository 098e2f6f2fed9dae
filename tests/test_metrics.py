"""Live metrics: pure summaries and Prometheus text, the HTTP endpoint, and a real Spark
streaming query whose batches the test controls, seen through the listener."""

from __future__ import annotations

import math
import os
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.batches import BatchReport
from pipeline.bigquery.rows import build_row
from pipeline.notifications import Notification, ObjectKey
from pipeline.stream import metrics

T0 = datetime(2024, 5, 6, 7, 0, tzinfo=UTC)


def rows_with_latencies(latencies: list[float | None]) -> list[dict]:
    """``build_row`` output (ISO strings) processed at T0 with the given ages."""
    return [build_row(Notification(ObjectKey("b", f"{i}.jpg", 1), "OBJECT_FINALIZE",
                                   event_time=None if s is None else T0 - timedelta(seconds=s)),
                      status="ok", processed_at=T0)
            for i, s in enumerate(latencies)]


# --- pure -------------------------------------------------------------------------------------

def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(10, 0, -1)]  # 10..1, unsorted on purpose
    assert [metrics.percentile(values, q) for q in (0, 50, 95, 100)] == [1.0, 5.0, 10.0, 10.0]
    assert metrics.percentile([], 50) is None


def test_latencies_from_build_row_rows_skip_missing_event_time() -> None:
    assert metrics.latencies_s(rows_with_latencies([1.5, None, 3.0])) == [1.5, 3.0]


def test_summarize_a_batch() -> None:
    report = BatchReport(7, messages=12, classified=10, inserted=9, errors=2, poison=1,
                         seconds=2.5, statuses={"ok": 8, "corrupt": 2})
    s = metrics.summarize(report, [float(v) for v in range(1, 21)])
    assert (s["batch_id"], s["messages"], s["rows"], s["inserted"], s["errors"], s["poison"]) == \
        (7, 12, 10, 9, 2, 1)
    assert s["images_per_s"] == pytest.approx(4.0) and s["batch_seconds"] == 2.5
    assert (s["latency_p50_s"], s["latency_p95_s"], s["latency_max_s"]) == (10.0, 19.0, 20.0)
    assert s["statuses"] == {"ok": 8, "corrupt": 2}
    empty = metrics.summarize(BatchReport(8), [])
    assert empty["images_per_s"] == 0.0 and empty["latency_p50_s"] is None


def test_progress_from_spark_uses_trigger_duration_and_drops_nan_rates() -> None:
    p = SimpleNamespace(name="q", id="id", batchId=3, numInputRows=40, inputRowsPerSecond=math.nan,
                        processedRowsPerSecond=20.0, batchDuration=999,
                        durationMs={"triggerExecution": 2000, "addBatch": 1500})
    got = metrics.progress_from_spark(p)
    assert (got.query, got.batch_id, got.num_input_rows, got.input_rows_per_second,
            got.processed_rows_per_second, got.batch_seconds) == ("q", 3, 40, 0.0, 20.0, 2.0)
    assert got.duration_ms == {"triggerExecution": 2000, "addBatch": 1500}


def test_prometheus_text_counters_and_known_gauges_only() -> None:
    text = metrics.prometheus_text({"batches": 2, "rows": 5}, {"batch_seconds": 1.5,
                                                               "latency_p50_s": None})
    lines = text.splitlines()
    assert "# TYPE bucketlens_rows_total counter" in lines and "bucketlens_rows_total 5" in lines
    assert "bucketlens_input_rows_total 0" in lines
    assert "bucketlens_batch_seconds 1.5" in lines and "# TYPE bucketlens_batch_seconds gauge" in lines
    assert not any(line.startswith("bucketlens_latency_p50_s") for line in lines)


def test_recorder_joins_report_and_progress_by_batch_and_keeps_a_bounded_history() -> None:
    rec = metrics.MetricsRecorder(keep=2)
    for b in range(3):
        rec.record(BatchReport(b, messages=4, classified=4, seconds=1.0), rows_with_latencies([2.0]))
    rec.on_progress(metrics.BatchProgress("q", 2, 4, 1.0, 4.0, 1.2))
    batches = rec.batches()
    assert [b["batch_id"] for b in batches] == [1, 2]
    assert batches[1]["summary"]["latency_p50_s"] == 2.0
    assert batches[1]["progress"]["num_input_rows"] == 4 and batches[0]["progress"] is None
    assert "bucketlens_batches_total 3" in rec.prometheus().splitlines()


def test_metrics_endpoint_serves_prometheus_text_on_loopback() -> None:
    rec = metrics.MetricsRecorder()
    rec.record(BatchReport(0, messages=3, classified=3, seconds=0.5), rows_with_latencies([1.0] * 3))
    server = metrics.serve(rec, 0)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            body = resp.read().decode()
        assert "bucketlens_rows_total 3" in body and "bucketlens_images_per_s 6" in body
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
        assert err.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


# --- Spark ------------------------------------------------------------------------------------

@pytest.mark.spark
def test_listener_sees_the_batches_the_test_feeds(spark, tmp_path: Path) -> None:
    """Two files, one per trigger (7 rows, then 5): the listener must report those counts for
    the same batch ids foreachBatch saw, and a trigger at least as long as the batch's work."""
    src = tmp_path / "in"
    src.mkdir()
    for i, (name, n) in enumerate((("a.txt", 7), ("b.txt", 5))):
        path = src / name
        path.write_text("".join(f"{name}-{j}\n" for j in range(n)))
        stamp = time.time() - 100 + i  # oldest first: the file source reads in mtime order
        os.utime(path, (stamp, stamp))
    listener = metrics.attach(spark)
    fed: dict[int, int] = {}

    def each(df, batch_id: int) -> None:
        started = time.monotonic()
        n = df.count()
        fed[batch_id] = n
        time.sleep(0.3)
        listener.recorder.record(
            BatchReport(batch_id, messages=n, classified=n, seconds=time.monotonic() - started),
            rows_with_latencies([1.0] * n))

    try:
        query = (spark.readStream.format("text").option("maxFilesPerTrigger", 1).load(str(src))
                 .writeStream.foreachBatch(each).queryName("metrics-test")
                 .option("checkpointLocation", str(tmp_path / "ckpt"))
                 .trigger(availableNow=True).start())
        assert query.awaitTermination(90), "the availableNow query did not finish"
        assert query.exception() is None
        deadline = time.monotonic() + 30  # progress events arrive asynchronously
        while len(listener.recorder.progress()) < len(fed) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        spark.streams.removeListener(listener)

    assert sorted(fed.values()) == [5, 7]
    progress = {p.batch_id: p for p in listener.recorder.progress()}
    assert {b: p.num_input_rows for b, p in progress.items()} == fed
    assert all(p.query == "metrics-test" and p.batch_seconds >= 0.3 for p in progress.values())
    for b in listener.recorder.batches():
        assert b["progress"]["num_input_rows"] == b["summary"]["messages"] == fed[b["batch_id"]]
        assert b["progress"]["batch_seconds"] >= b["summary"]["batch_seconds"] - 0.05
    assert "bucketlens_input_rows_total 12" in listener.recorder.prometheus().splitlines()
