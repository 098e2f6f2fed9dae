"""The streaming job: Pub/Sub notifications → fetch → classify → idempotent sink.

    from pipeline.config import Settings
    from pipeline.stream import start
    query, _ = start(Settings.from_env())   # a running StreamingQuery
    query.awaitTermination()

Per micro-batch (``foreachBatch``) the driver does the control plane — parse notifications,
dead-letter poison messages, filter event types and prefixes, de-duplicate, skip keys the sink
already holds — and the executors do the data plane with ``mapInPandas``: generation-pinned
downloads in parallel, then batched inference with a model cached once per Python worker.
The result rows come back to the driver for one idempotent write per batch. Only after that
returns does Spark commit the batch, and only then does the source acknowledge the messages.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from pipeline import bundles, classify
from pipeline.batches import BatchReport
from pipeline.config import Settings
from pipeline.executor import RESULT_SCHEMA, WORK_SCHEMA, classify_partitions
from pipeline.labels import ModelInfo
from pipeline.names import describe, printable
from pipeline.notifications import Notification, ObjectKey, PoisonMessage, dedupe, parse, wanted
from pipeline.status import CLASSIFIED

log = logging.getLogger("bucketlens.stream")



@dataclass(frozen=True)
class Triage:
    """The driver-side split of one batch's messages (pure)."""

    todo: list[Notification]
    dead_letters: list[tuple[tuple, str]]  # (message row, reason)
    events: list[Notification]  # DELETE / ARCHIVE / METADATA_UPDATE: recorded, not classified
    ignored: list[tuple[Notification, str]]
    duplicates: int


def triage(rows: Sequence[tuple], settings: Settings) -> Triage:
    """Parse, filter and de-duplicate message rows (message_id, publish_time, attributes, data)."""
    from pipeline.sink import own_prefixes

    parsed, dead, ignored, events = [], [], [], []
    own = own_prefixes(settings)
    for row in rows:
        message_id, publish_time, attributes, data = row[0], row[1], row[2] or {}, row[3]
        try:  # whatever a message does to parsing, it is that message's dead letter
            n = parse(message_id, attributes, data, publish_time)
            # another bucket's notification is ignored; oversize objects get a too_large row
            why = wanted(n, settings.prefix, bucket=settings.bucket)
        except Exception as exc:  # noqa: BLE001
            dead.append((row, str(exc) if isinstance(exc, PoisonMessage) else describe(exc)))
            continue
        if why is None and n.key.name.startswith(own):
            why = "bucketlens's own output"
        if not n.is_finalize and n.key.bucket == settings.bucket and not n.key.name.startswith(own):
            events.append(n)
        elif why:
            ignored.append((n, why))
        else:
            parsed.append(n)
    todo = dedupe(parsed)
    return Triage(todo, dead, events, ignored, len(parsed) - len(todo))


class ModelChoice:
    """Which model each micro-batch uses: the configured one, or — when ``settings.model`` is a
    model location — its current version, looked up at most every ``model_refresh_seconds``
    between batches (``bundles.Watcher``). Executors always get a pinned version, so one batch
    never mixes versions and a worker's cache key (the version's URI) never goes stale."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.watcher: bundles.Watcher | None = None
        if bundles.is_reference(settings.model):
            ref = bundles.resolve(settings.model, settings)
            if ref.location is None:
                self.settings = settings.replace(model=ref.uri)
            else:
                self.watcher = bundles.Watcher(ref.location, settings,
                                               settings.model_refresh_seconds, check=self._load)
        self.for_batch()  # the model (or the location's current version) loads now, or fails

    def _load(self, uri: str) -> ModelInfo:
        return classify.get_handler(self.settings.replace(model=uri)).info

    def for_batch(self) -> tuple[Settings, ModelInfo]:
        """The settings the executors get for the next batch (model pinned), and its model."""
        settings = (self.settings if self.watcher is None
                    else self.settings.replace(model=self.watcher.current()))
        return settings, classify.get_handler(settings).info


def classify_and_write(spark, todo: Sequence[Notification], settings: Settings, sink,
                       batch_id: int, model: ModelInfo | None = None,
                       report: BatchReport | None = None) -> BatchReport:
    """Fetch → classify on the executors (``mapInPandas``), then one idempotent sink write.

    Shared by the stream's micro-batches and the backfill, so both write the same rows.
    ``settings.model`` must be pinned (a name or a bundle version, not a location). With
    ``settings.embeddings`` each classified row's embedding (same forward pass) goes to the
    embeddings table first, so a prediction row written implies its embedding was.
    """
    from pipeline.sink import build_row, embedding_record

    done = report if report is not None else BatchReport(batch_id)  # filled in here
    if not todo:
        return done
    model = model or classify.get_handler(settings).info
    cores = settings.num_partitions or spark.sparkContext.defaultParallelism
    # parallelize, not createDataFrame(...).repartition(n): the same split without a shuffle
    rows = spark.sparkContext.parallelize(
        [(n.key.bucket, n.key.name, n.key.generation, n.size) for n in todo],
        min(len(todo), cores))
    results = (spark.createDataFrame(rows, WORK_SCHEMA)
               .mapInPandas(classify_partitions(settings), RESULT_SCHEMA)
               .collect())
    versions = {r.model_version for r in results}
    if versions != {model.version}:  # a worker with another version: fail, so it is redone
        raise RuntimeError(f"batch {batch_id}: executors used model versions {sorted(versions)}, "
                           f"the driver chose {model.version}")
    by_key = {ObjectKey(r.bucket, r.name, r.generation): r for r in results}
    now = datetime.now(UTC)
    embeddings = []
    for n in todo:
        r = by_key[n.key]
        row = build_row(n, status=r.status, reason=r.reason or "", model=model,
                        topk=[tuple(x) for x in json.loads(r.topk)],
                        batch_id=batch_id, processed_at=now)
        done.rows.append(row)
        if settings.embeddings and r.embedding:
            embeddings.append(embedding_record(row, r.embedding, model))
        done.statuses[r.status] = done.statuses.get(r.status, 0) + 1
        done.workers[int(r.worker_pid)] = int(r.model_loads)
    done.classified = len(done.rows)
    done.errors = sum(v for s, v in done.statuses.items() if s not in CLASSIFIED)
    if embeddings:
        added = sink.write_embeddings(embeddings, batch_id)
        log.info("batch %d: %d embeddings, %d inserted", batch_id, len(embeddings), added)
    done.inserted = sink.write(done.rows, batch_id)
    return done


class BatchProcessor:
    """The ``foreachBatch`` function. Raises on sink failure so the batch is not committed."""

    def __init__(self, settings: Settings, sink=None,
                 on_batch: Callable[[BatchReport, list[dict]], object] | None = None) -> None:
        from pipeline.sink import make_sink

        self.settings = settings
        self.models = ModelChoice(settings)
        self.sink = sink if sink is not None else make_sink(settings.sink, settings)
        self.on_batch = on_batch  # e.g. metrics.MetricsRecorder.record
        self.reports: list[BatchReport] = []

    def __call__(self, batch_df, batch_id: int) -> None:
        self.process(batch_df, batch_id)

    def process(self, batch_df, batch_id: int) -> BatchReport:
        from pipeline.sink import dead_letter_record

        started = time.monotonic()
        rows = [tuple(r) for r in batch_df.collect()]
        report = BatchReport(batch_id, messages=len(rows))
        t = triage(rows, self.settings)
        report.poison, report.ignored, report.duplicates = (
            len(t.dead_letters), len(t.ignored), t.duplicates)
        if t.dead_letters:
            records = [dead_letter_record(r[0], why, r[2] or {}, r[3], r[1], batch_id)
                       for r, why in t.dead_letters]
            self.sink.write_dead_letters(records, batch_id)
        report.events = len(t.events)
        if t.events:
            from pipeline.sink import event_record

            self.sink.write_events([event_record(n, batch_id) for n in t.events], batch_id)
        for n, why in t.ignored:
            log.debug("batch %d: %s/%s#%d ignored: %s", batch_id, *_k(n.key), why)
        todo = t.todo
        if todo:
            done = self.sink.existing_keys(todo)  # notifications: their day bounds the lookup
            report.already_done = len(done)
            todo = [n for n in todo if n.key not in done]
        settings, model = self.models.for_batch()
        classify_and_write(batch_df.sparkSession, todo, settings, self.sink, batch_id, model,
                           report)
        report.model_version = model.version
        report.seconds = time.monotonic() - started
        self.reports.append(report)
        if self.on_batch is not None:
            self.on_batch(report, report.rows)
        report.rows = []  # handed on; the reports a long stream keeps hold only counts
        log.info("batch %d: %d messages, %d classified, %d inserted, %d errors, %d poison, "
                 "%d ignored, %d already done, %.2fs", batch_id, report.messages,
                 report.classified, report.inserted, report.errors, report.poison,
                 report.ignored, report.already_done, report.seconds)
        return report


def _k(key: ObjectKey) -> tuple[str, str, int]:
    return printable(key.bucket), printable(key.name), key.generation  # a name cannot forge a line


def messages(spark, settings: Settings):
    """The notification stream as a DataFrame (the source's schema)."""
    reader = (spark.readStream.format("pubsub")
              .option("subscription", settings.subscription_path)
              .option("maxMessagesPerBatch", settings.max_messages_per_batch)
              .option("numPartitions", max(1, settings.num_partitions or 2))
              .option("ackDeadlineSeconds", settings.ack_deadline_seconds))
    if settings.pubsub_emulator_host:
        reader = reader.option("emulatorHost", settings.pubsub_emulator_host)
    return reader.load()


def start(settings: Settings, spark=None, processor: BatchProcessor | None = None):
    """Start the streaming query; returns (StreamingQuery, BatchProcessor).

    A metrics listener is attached to the session; the processor feeds it per-batch figures.
    """
    from pipeline import metrics
    from pipeline.spark import session

    spark = spark or session(settings.spark_master, log_file=settings.spark_log)
    listener = metrics.attach(spark)
    processor = processor or BatchProcessor(settings, on_batch=listener.recorder.record)
    if settings.metrics_port:
        metrics.serve(listener.recorder, settings.metrics_port)
    query = (messages(spark, settings).writeStream
             .foreachBatch(processor)
             .option("checkpointLocation", settings.checkpoint)
             .trigger(processingTime=f"{settings.trigger_seconds} seconds")
             .queryName(f"bucketlens-{settings.table}")
             .start())
    return query, processor
