"""The streaming job: Pub/Sub notifications → fetch → classify → idempotent sink.

    from pipeline.config import Settings
    from pipeline.stream.job import start
    query, _ = start(Settings.from_env())   # a running StreamingQuery
    query.awaitTermination()

Per micro-batch (``foreachBatch``) one Spark job does the data plane where the messages are:
each task triages its partition's notifications once (``pipeline.stream.triage``), downloads the
objects generation-pinned and in parallel, and classifies them in batches with a model cached
once per Python worker (``pipeline.stream.executor``). The driver does the control plane on the
verdicts that come back — dead-letter poison messages, record events, de-duplicate across
partitions, drop keys this run already wrote (``pipeline.stream.recent``), ask BigQuery only about
keys its memory cannot vouch for — and makes one idempotent write per table per batch over
kept-open connections. Only after that returns does Spark commit the batch, and only then
does the source acknowledge the messages.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from pipeline.batches import BatchReport
from pipeline.bigquery.catalog import DEAD_LETTER_KEY, EVENT_KEY
from pipeline.bigquery.rows import event_record
from pipeline.bigquery.sinks import Verify
from pipeline.config import Settings
from pipeline.labels import ModelInfo
from pipeline.model import bundles, handler
from pipeline.names import printable
from pipeline.notifications import Notification, ObjectKey, dedupe
from pipeline.status import CLASSIFIED
from pipeline.stream.alerts import Alerter
from pipeline.stream.executor import (
    BATCH_SCHEMA,
    DEAD,
    DUPLICATE,
    EVENT,
    IGNORED,
    RESULT_SCHEMA,
    TODO,
    WORK_SCHEMA,
    classify_messages,
    classify_partitions,
    note_from_json,
    work_row,
)
from pipeline.stream.recent import Recent
from pipeline.times import utc

log = logging.getLogger("bucketlens.stream")



class ModelChoice:
    """Which model each micro-batch uses: the configured one, or — when ``settings.model`` is a
    model location — its current version, looked up at most every ``model_refresh_seconds``
    between batches (``bundles.Watcher``). Executors always get a pinned version, so one batch
    never mixes versions and a worker's cache key (the version's URI) never goes stale.

    The driver only records rows, so it learns each model's name, version and labels without
    loading it (``handler.check_model``): the executors, which classify, load the weights."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.watcher: bundles.Watcher | None = None
        self._infos: dict[str, ModelInfo] = {}  # by pinned model: a version URI never changes
        if bundles.is_reference(settings.model):
            ref = bundles.resolve(settings.model, settings)
            if ref.location is None:
                self.settings = settings.replace(model=ref.uri)
            else:
                self.watcher = bundles.Watcher(ref.location, settings,
                                               settings.model_refresh_seconds, check=self._check)
        if self.watcher is None:  # a location's current version is checked by the watcher
            self._check(self.settings.model)
        self.for_batch()  # the model (or the location's current version) is known now, or fails

    def _check(self, model: str) -> ModelInfo:
        info = self._infos[model] = handler.check_model(self.settings.replace(model=model))
        return info

    def for_batch(self) -> tuple[Settings, ModelInfo]:
        """The settings the executors get for the next batch (model pinned), and its model."""
        settings = (self.settings if self.watcher is None
                    else self.settings.replace(model=self.watcher.current()))
        info = self._infos.get(settings.model)
        if info is None:
            info = self._infos[settings.model] = handler.model_info(settings)
        return settings, info


def classify_and_write(spark, todo: Sequence[Notification], settings: Settings, sink,
                       batch_id: int, model: ModelInfo | None = None,
                       report: BatchReport | None = None) -> BatchReport:
    """Fetch → classify a list of notifications on the executors (``mapInPandas``), then one
    idempotent sink write: the backfill's path (the stream's batches classify where their
    messages are, in ``BatchProcessor``), so both write the same rows.

    ``settings.model`` must be pinned (a name or a bundle version, not a location).
    """
    done = report if report is not None else BatchReport(batch_id)  # filled in here
    if not todo:
        return done
    cores = settings.num_partitions or spark.sparkContext.defaultParallelism
    # parallelize, not createDataFrame(...).repartition(n): the same split without a shuffle
    rows = spark.sparkContext.parallelize([work_row(n) for n in todo], min(len(todo), cores))
    results = (spark.createDataFrame(rows, WORK_SCHEMA)
               .mapInPandas(classify_partitions(settings), RESULT_SCHEMA)
               .collect())
    return write_results(todo, results, settings, sink, batch_id,
                         model or handler.model_info(settings), done)


def write_results(todo: Sequence[Notification], results: Sequence, settings: Settings, sink,
                  batch_id: int, model: ModelInfo, report: BatchReport,
                  verify: Verify = None) -> BatchReport:
    """Rows for ``todo`` from the executors' results (one per key), then the sink write
    (``verify``: the keys the sink must look up first; None = all, see ``Sink.write``).

    With ``settings.embeddings`` each classified row's embedding (same forward pass) goes to
    the embeddings table first, so a prediction row written implies its embedding was.
    """
    from pipeline.bigquery.rows import embedding_record

    by_key = {ObjectKey(r.bucket, r.name, r.generation): r for r in results}
    missing = [n.key for n in todo if n.key not in by_key]
    if missing:  # executors and driver disagree on the batch: fail it, so it is redone
        raise RuntimeError(f"batch {batch_id}: no result for {len(missing)} objects, e.g. "
                           f"{describe_key(missing[0])}")
    versions = {by_key[n.key].model_version for n in todo}
    if todo and versions != {model.version}:  # a worker with another version: fail, redo
        raise RuntimeError(f"batch {batch_id}: executors used model versions {sorted(versions)}, "
                           f"the driver chose {model.version}")
    now = datetime.now(UTC)
    embeddings = []
    for n in todo:
        r = by_key[n.key]
        row = result_row(n, r, model, batch_id, now)
        report.rows.append(row)
        if settings.embeddings and r.embedding:
            embeddings.append(embedding_record(row, r.embedding, model))
        report.statuses[r.status] = report.statuses.get(r.status, 0) + 1
        report.workers[int(r.worker_pid)] = int(r.model_loads)
    report.classified = len(report.rows)
    report.errors = sum(v for s, v in report.statuses.items() if s not in CLASSIFIED)
    if embeddings:
        added = sink.write_embeddings(  # the embeddings table's key adds the model version
            embeddings, batch_id,
            verify=None if verify is None else {(*k, model.version) for k in verify})
        log.info("batch %d: %d embeddings, %d inserted", batch_id, len(embeddings), added)
    if report.rows:
        report.inserted = sink.write(report.rows, batch_id, verify=verify)
    return report


def result_row(n: Notification, r, model: ModelInfo, batch_id: int, now: datetime) -> dict:
    """The ``predictions`` row of one executor result."""
    from pipeline.bigquery.rows import build_row

    return build_row(n, status=r.status, reason=r.reason or "", model=model,
                     topk=[tuple(x) for x in json.loads(r.topk)],
                     batch_id=batch_id, processed_at=now)


class BatchProcessor:
    """The ``foreachBatch`` function. Raises on sink failure so the batch is not committed."""

    def __init__(self, settings: Settings, sink=None,
                 on_batch: Callable[[BatchReport, list[dict]], object] | None = None) -> None:
        from pipeline.bigquery.sinks import make_sink

        self.settings = settings
        self.models = ModelChoice(settings)
        self.sink = sink if sink is not None else make_sink(settings.sink, settings)
        self.on_batch = on_batch  # e.g. metrics.MetricsRecorder.record
        self.reports: list[BatchReport] = []
        # keys this run wrote: most batches need no BigQuery lookup (pipeline.stream.recent)
        self.recent = Recent(settings.ack_deadline_seconds, settings.trigger_seconds)
        self.alerter = Alerter.from_settings(settings)  # None without an alert rule file

    def __call__(self, batch_df, batch_id: int) -> None:
        self.process(batch_df, batch_id)

    def process(self, batch_df, batch_id: int) -> BatchReport:
        """One Spark job: the executors triage the messages their partitions hold (once) and
        classify what they name; from their verdicts the driver dead-letters, records events,
        de-duplicates across partitions, drops keys this run already wrote (``self.recent``),
        looks up in BigQuery only the keys its memory cannot vouch for — none in a steady
        batch — and writes."""
        started = time.monotonic()
        settings, model = self.models.for_batch()
        out = batch_df.mapInPandas(classify_messages(settings), BATCH_SCHEMA).collect()
        verdicts = [r for r in out if r.verdict is not None]
        results = [r for r in out if r.status is not None]
        report = BatchReport(batch_id, messages=len(verdicts))
        by_kind: dict[str, list] = {}
        for v in verdicts:
            by_kind.setdefault(v.verdict, []).append(v)
        report.ignored = len(by_kind.get(IGNORED, []))
        for v in by_kind.get(IGNORED, []):
            log.debug("batch %d: %s ignored: %s", batch_id, printable(v.message_id), v.why)
        dead = [{**json.loads(v.record), "batch_id": batch_id} for v in by_kind.get(DEAD, [])]
        report.poison = len(dead)
        self._write_once(dead, DEAD_LETTER_KEY, by_kind.get(DEAD, []),
                         "write_dead_letters", batch_id)
        events = [(v, note_from_json(v.record)) for v in by_kind.get(EVENT, [])]
        report.events = len(events)
        self._write_once([event_record(n, batch_id) for _, n in events], EVENT_KEY,
                         [v for v, _ in events], "write_events", batch_id)

        todo_verdicts = by_kind.get(TODO, [])
        notes = [note_from_json(v.record) for v in todo_verdicts]
        todo = dedupe(notes)
        report.duplicates = len(by_kind.get(DUPLICATE, [])) + len(notes) - len(todo)
        attempts: dict[ObjectKey, int | None] = {}
        for v, n in zip(todo_verdicts, notes, strict=True):
            attempts[n.key] = _worst(attempts.get(n.key, 1), v.delivery_attempt)
        if any(_worst(1, v.delivery_attempt) != 1 for v in by_kind.get(DUPLICATE, [])):
            attempts = dict.fromkeys(attempts)  # a redelivered copy of some key: verify all
        known = [n for n in todo if n.key in self.recent]
        todo = [n for n in todo if n.key not in self.recent]
        now = datetime.now(UTC)
        verify = self.recent.to_verify({n.key: attempts[n.key] for n in todo},
                                       {n.key: waited(n, now) for n in todo})
        done = self.sink.existing_keys([n for n in todo if n.key in verify]) if verify else set()
        report.already_done = len(known) + len(done)
        found = [n for n in todo if n.key in done]  # written before: by a predecessor?
        todo = [n for n in todo if n.key not in done]
        # the keys only BigQuery can vouch for are looked up again right before their append:
        # another writer (a backfill) may have added them while this batch was classified
        keys = {(k.bucket, k.name, k.generation) for k in verify} - {
            (k.bucket, k.name, k.generation) for k in done}
        write_results(todo, results, settings, self.sink, batch_id, model, report, verify=keys)
        self.recent.remember([*done, *(n.key for n in todo)])
        if self.alerter is not None:  # after the write, before the commit (pipeline.stream.alerts);
            # a failure here fails the query, and with it this run's memory of the keys
            by_key = {ObjectKey(r.bucket, r.name, r.generation): r for r in results}
            now = datetime.now(UTC)
            report.alerts = self.alerter.after_batch(
                report.rows, [result_row(n, by_key[n.key], model, batch_id, now) for n in found],
                warming_up=self.recent.warming_up)
        report.model_version = model.version
        report.seconds = time.monotonic() - started
        self.reports.append(report)
        if self.on_batch is not None:
            self.on_batch(report, report.rows)
        report.rows = []  # handed on; the reports a long stream keeps hold only counts
        log.info("batch %d: %d messages, %d classified, %d inserted, %d errors, %d poison, "
                 "%d ignored, %d already done, %d alerts, %.2fs", batch_id, report.messages,
                 report.classified, report.inserted, report.errors, report.poison,
                 report.ignored, report.already_done, report.alerts, report.seconds)
        return report

    def _write_once(self, records: list[dict], key: Sequence[str], verdicts: Sequence,
                    write: str, batch_id: int) -> None:
        """Dead letters or events: drop what this run wrote, verify what only BigQuery knows
        (warm-up, redelivered messages), append the rest, remember their keys."""
        if not records:
            return
        keyed = [(tuple(r[c] for c in key), r, v) for r, v in zip(records, verdicts, strict=True)]
        fresh = [(k, r, v) for k, r, v in keyed if ("table", key, k) not in self.recent]
        if not fresh:
            return
        attempts: dict[tuple, int | None] = {}
        for k, _, v in fresh:
            attempts[k] = _worst(attempts.get(k, 1), v.delivery_attempt)
        verify = self.recent.to_verify(attempts)
        getattr(self.sink, write)([r for _, r, _ in fresh], batch_id, verify=verify)
        self.recent.remember(("table", key, k) for k, _, _ in fresh)


def waited(n: Notification, now: datetime) -> float | None:
    """Seconds since the earliest time the notification carries (its object's creation, the
    event, the publish): how long another writer may have known the object; None if none."""
    times = [utc(t) for t in (n.created, n.event_time, n.publish_time) if t is not None]
    return (now - min(times)).total_seconds() if times else None


def _worst(a: int | None, b: int | None) -> int | None:
    """The delivery attempt that says most about redelivery: unknown (None) beats any count."""
    return None if a is None or b is None else max(a, b)


def describe_key(key: ObjectKey) -> str:
    bucket, name, generation = _k(key)
    return f"{bucket}/{name}#{generation}"


def _k(key: ObjectKey) -> tuple[str, str, int]:
    return printable(key.bucket), printable(key.name), key.generation  # a name cannot forge a line


def messages(spark, settings: Settings):
    """The notification stream as a DataFrame (the source's schema). Its partitions are the
    classify tasks too, so there are as many as the cluster has cores unless set."""
    partitions = settings.num_partitions or spark.sparkContext.defaultParallelism
    reader = (spark.readStream.format("pubsub")
              .option("subscription", settings.subscription_path)
              .option("maxMessagesPerBatch", settings.max_messages_per_batch)
              .option("numPartitions", max(1, partitions))
              .option("maxBufferedBytes", settings.max_buffered_bytes)
              .option("ackDeadlineSeconds", settings.ack_deadline_seconds))
    if settings.pubsub_emulator_host:
        reader = reader.option("emulatorHost", settings.pubsub_emulator_host)
    return reader.load()


def start(settings: Settings, spark=None, processor: BatchProcessor | None = None):
    """Start the streaming query; returns (StreamingQuery, BatchProcessor).

    A metrics listener is attached to the session; the processor feeds it per-batch figures.
    """
    from pipeline.stream import metrics
    from pipeline.stream.spark import session

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
