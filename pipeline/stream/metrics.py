"""Live metrics for the streaming job: Spark's view of each micro-batch joined with ours.

Spark knows how many rows a batch read and how long the trigger took (``StreamingQueryListener``
progress events, delivered asynchronously after the batch); only the pipeline knows how many
images were classified, inserted or failed, and how old they were when written
(``BatchReport`` plus the rows' event_time → processed_at). ``MetricsRecorder`` keeps both,
keyed by batch id, and ``ProgressListener`` feeds it Spark's side:

    listener = attach(spark)                                   # in stream.start
    processor = BatchProcessor(settings, on_batch=listener.recorder.record)
    serve(listener.recorder, port)                             # optional: Prometheus text

Everything that computes (percentiles, summaries, Prometheus text) is a pure function; the
recorder only stores, under a lock because the listener and foreachBatch run on different
threads.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from pyspark.sql.streaming import StreamingQueryListener

from pipeline.times import iso_time

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from pipeline.batches import BatchReport

log = logging.getLogger("bucketlens.metrics")

KEEP_BATCHES = 256  # per-batch records kept in memory; totals are kept forever


# --- pure -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchProgress:
    """The parts of a ``StreamingQueryProgress`` we log and export."""

    query: str
    batch_id: int
    num_input_rows: int
    input_rows_per_second: float
    processed_rows_per_second: float
    batch_seconds: float  # durationMs.triggerExecution: the whole trigger, planning to commit
    duration_ms: dict[str, int] = field(default_factory=dict)


def progress_from_spark(progress: Any) -> BatchProgress:
    """From PySpark's ``StreamingQueryProgress`` (or anything with its attribute names)."""
    durations = {k: int(v) for k, v in (progress.durationMs or {}).items()}
    total_ms = durations.get("triggerExecution", getattr(progress, "batchDuration", 0) or 0)
    return BatchProgress(
        query=progress.name or str(progress.id),
        batch_id=int(progress.batchId),
        num_input_rows=int(progress.numInputRows),
        input_rows_per_second=_finite(progress.inputRowsPerSecond),
        processed_rows_per_second=_finite(progress.processedRowsPerSecond),
        batch_seconds=total_ms / 1000,
        duration_ms=durations,
    )


def _finite(value: float | None) -> float:
    """Spark reports NaN/inf rates for empty or instant batches; export those as 0."""
    return float(value) if value is not None and math.isfinite(value) else 0.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100): always an observed value, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _time(value: str | datetime | None) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return iso_time(value)


def latencies_s(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """event_time → processed_at in seconds for ``build_row`` rows (ISO strings or datetimes);
    rows without an event_time have no latency and are skipped."""
    out = []
    for r in rows:
        start, end = _time(r.get("event_time")), _time(r.get("processed_at"))
        if start is not None and end is not None:
            out.append((end - start).total_seconds())
    return out


def summarize(report: BatchReport, latencies: Sequence[float]) -> dict[str, Any]:
    """One batch as flat numbers: what the pipeline did, how fast, and how stale the rows were."""
    return {
        "batch_id": report.batch_id,
        "messages": report.messages,
        "rows": report.classified,
        "inserted": report.inserted,
        "errors": report.errors,
        "poison": report.poison,
        "ignored": report.ignored,
        "duplicates": report.duplicates,
        "already_done": report.already_done,
        "batch_seconds": report.seconds,
        "images_per_s": report.classified / report.seconds if report.seconds > 0 else 0.0,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "latency_max_s": max(latencies) if latencies else None,
        "statuses": dict(report.statuses),
    }


# metric name → help; counters are running totals, gauges describe the last batch
COUNTERS = {
    "batches": "micro-batches processed",
    "messages": "Pub/Sub messages received",
    "rows": "images classified",
    "inserted": "rows newly inserted into the sink",
    "errors": "images that failed (status other than ok / low_confidence)",
    "poison": "messages dead-lettered",
    "input_rows": "rows Spark read (StreamingQueryProgress.numInputRows)",
}
GAUGES = {
    "batch_id": "id of the last batch",
    "batch_seconds": "duration of the last foreachBatch call",
    "images_per_s": "images classified per second in the last batch",
    "latency_p50_s": "median event_time → processed_at latency in the last batch",
    "latency_p95_s": "95th percentile event_time → processed_at latency in the last batch",
    "trigger_seconds": "durationMs.triggerExecution of the last Spark progress, in seconds",
    "processed_rows_per_second": "processedRowsPerSecond of the last Spark progress",
}


def prometheus_text(totals: Mapping[str, float], last: Mapping[str, float | None],
                    prefix: str = "bucketlens") -> str:
    """Prometheus text exposition format 0.0.4; gauges with no value yet are left out."""
    lines = []
    for name, help_text in COUNTERS.items():
        metric = f"{prefix}_{name}_total"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter",
                  f"{metric} {_num(totals.get(name, 0))}"]
    for name, help_text in GAUGES.items():
        value = last.get(name)
        if value is None:
            continue
        metric = f"{prefix}_{name}"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge", f"{metric} {_num(value)}"]
    return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# --- state ------------------------------------------------------------------------------------

class MetricsRecorder:
    """Per-batch summaries and Spark progress by batch id, plus running totals."""

    def __init__(self, keep: int = KEEP_BATCHES) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._summaries: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._progress: OrderedDict[int, BatchProgress] = OrderedDict()
        self._totals: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self._last: dict[str, float | None] = {}

    def record(self, report: BatchReport, rows: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
        """Call once per batch from foreachBatch with the rows written (``build_row`` dicts)."""
        summary = summarize(report, latencies_s(rows))
        with self._lock:
            _put(self._summaries, report.batch_id, summary, self.keep)
            self._totals["batches"] += 1
            for name in ("messages", "rows", "inserted", "errors", "poison"):
                self._totals[name] += summary[name]
            self._last.update({k: summary[k] for k in
                               ("batch_id", "batch_seconds", "images_per_s", "latency_p50_s",
                                "latency_p95_s")})
        log.info("batch %d: %d rows, %.1f images/s, %.2fs, latency p50 %s p95 %s, %d errors",
                 report.batch_id, summary["rows"], summary["images_per_s"], report.seconds,
                 _fmt(summary["latency_p50_s"]), _fmt(summary["latency_p95_s"]), summary["errors"])
        return summary

    def on_progress(self, progress: BatchProgress) -> None:
        with self._lock:
            _put(self._progress, progress.batch_id, progress, self.keep)
            self._totals["input_rows"] += progress.num_input_rows
            self._last["trigger_seconds"] = progress.batch_seconds
            self._last["processed_rows_per_second"] = progress.processed_rows_per_second

    def progress(self) -> list[BatchProgress]:
        with self._lock:
            return list(self._progress.values())

    def batches(self) -> list[dict[str, Any]]:
        """Per batch id: our summary and Spark's progress side by side (either may be missing:
        progress arrives after the batch, and an empty batch may have no summary)."""
        with self._lock:
            ids = sorted(set(self._summaries) | set(self._progress))
            return [{"batch_id": i, "summary": self._summaries.get(i),
                     "progress": asdict(self._progress[i]) if i in self._progress else None}
                    for i in ids]

    def prometheus(self) -> str:
        with self._lock:
            return prometheus_text(dict(self._totals), dict(self._last))


def _put(store: OrderedDict, key: int, value: Any, keep: int) -> None:
    store[key] = value
    store.move_to_end(key)
    while len(store) > keep:
        store.popitem(last=False)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}s"


# --- Spark ------------------------------------------------------------------------------------

class ProgressListener(StreamingQueryListener):
    """Logs every progress event and hands it to the recorder (events arrive asynchronously,
    on Spark's listener-bus thread, after the batch has committed)."""

    def __init__(self, recorder: MetricsRecorder | None = None) -> None:
        super().__init__()
        self.recorder = recorder or MetricsRecorder()

    def onQueryStarted(self, event: Any) -> None:
        log.info("query %s started (id %s, run %s)", event.name, event.id, event.runId)

    def onQueryProgress(self, event: Any) -> None:
        p = progress_from_spark(event.progress)
        self.recorder.on_progress(p)
        log.info("query %s batch %d: %d input rows, %.1f rows/s processed, %.2fs trigger",
                 p.query, p.batch_id, p.num_input_rows, p.processed_rows_per_second,
                 p.batch_seconds)

    def onQueryIdle(self, event: Any) -> None:
        pass

    def onQueryTerminated(self, event: Any) -> None:
        if event.exception:
            log.error("query %s terminated: %s", event.id, event.exception)
        else:
            log.info("query %s stopped", event.id)


def attach(spark: SparkSession, recorder: MetricsRecorder | None = None) -> ProgressListener:
    """Register a listener for every streaming query of ``spark``; remove it with
    ``spark.streams.removeListener(listener)``."""
    listener = ProgressListener(recorder)
    spark.streams.addListener(listener)
    return listener


# --- Prometheus endpoint ----------------------------------------------------------------------

def serve(recorder: MetricsRecorder, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """``GET /metrics`` in Prometheus text format on a daemon thread; ``port`` 0 picks a free
    one (read it from ``server.server_address``); stop with ``server.shutdown()``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 — the http.server API
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics is served")
                return
            body = recorder.prometheus().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 — scrapes are not news
            log.debug("metrics %s", format % args)

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="bucketlens-metrics", daemon=True).start()
    return server
