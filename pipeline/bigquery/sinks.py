"""Sink: prediction and dead-letter rows → BigQuery, idempotently, once per micro-batch.

Delivery is at-least-once (Pub/Sub redelivers, Spark replays a batch after a crash), so the
write must be safe to repeat. Every row has a key — (bucket, name, generation) for
predictions, (message_id, reason) for dead letters — and a write adds only keys the table
lacks. Two ways (``Settings.sink_mode``):

* ``append`` (default): one query for the batch's keys, bounded to the partitions the batch's
  rows fall in by constant timestamp filters, then the missing rows go to the table's default
  write stream (Storage Write API, ``pipeline.bigquery.bqwrite``): no load job, staging table or DML, so
  neither the 1,500 load jobs per table per day nor the 2 concurrent DML statements per table
  limit the trigger interval. Lookup and append are retried together, so a retried append
  never adds rows the first try committed. Two writers appending one key in the same instant
  can both add it: views count a key once and ``bucketlens compact`` removes the copy.
* ``merge``: staging table + load job + insert-only MERGE, its ON clause bounded the same way.

Costs and the SQL: ``pipeline.bigquery.sql``; rows: ``pipeline.bigquery.rows``; tables:
``pipeline.bigquery.catalog``. Legacy streaming inserts are not used: ``insertId`` dedupe is
best-effort (about a minute), and one bad row fails a whole ``insertAll`` request. The classes
here only do I/O.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol, TextIO

from pipeline import clients
from pipeline.bigquery.catalog import (
    DEAD_LETTERS,
    EMBEDDED,
    EMBEDDINGS,
    EVENTS,
    PREDICTIONS,
    TableSpec,
    embeddings_table_id,
    load_schema,
    schema_json,
)
from pipeline.bigquery.rows import byte_parts, first_per_key, json_default, to_ndjson
from pipeline.bigquery.sql import (
    bq_call,
    existing_keys_sql,
    merge_sql,
    partition_days,
    partition_filter,
    row_bound,
    run_query,
    staging_table_id,
)
from pipeline.config import RESULTS_PREFIX, Settings
from pipeline.names import split_gs
from pipeline.notifications import Notification, ObjectKey
from pipeline.retry import call_with_retries
from pipeline.status import CLASSIFIED, sql_list

if TYPE_CHECKING:
    from google.cloud import bigquery, storage

    from pipeline.bigquery.bqwrite import StorageWriter

log = logging.getLogger(__name__)

STAGING_TTL = timedelta(hours=1)  # a crashed batch's staging table cleans itself up
SINK_MODES = ("append", "merge")


# the keys a write must look up before its first append (None: all of them)
Verify = Collection[tuple] | None


class Sink(Protocol):
    def existing_keys(self, keys: Sequence[ObjectKey | Notification]) -> set[ObjectKey]:
        """Keys already written, whose classification can be skipped. Pass notifications
        where you have them: their creation day bounds BigQuery's lookup."""
        ...

    def write(self, rows: Sequence[dict], batch_id: int, *, verify: Verify = None) -> int:
        """Idempotent on the row key; returns the rows newly inserted.

        ``verify``: the keys (tuples in the table's key order) that may already be in the table
        and must be looked up before the first append; None = every row's key. A caller that
        knows which keys it has not written (the stream's in-run memory) passes only the rest,
        so a steady batch costs no query. A retried append always re-checks what it tried."""
        ...

    def write_dead_letters(self, records: Sequence[dict], batch_id: int, *,
                           verify: Verify = None) -> int:
        """Idempotent on (message_id, reason); returns the records newly inserted."""
        ...

    def write_events(self, records: Sequence[dict], batch_id: int, *,
                     verify: Verify = None) -> int:
        """Idempotent on (bucket, name, generation, event_type); returns records inserted."""
        ...

    def write_embeddings(self, records: Sequence[dict], batch_id: int, *,
                         verify: Verify = None) -> int:
        """Idempotent on (bucket, name, generation, model_version); returns records inserted."""
        ...


def _key_param(spec: TableSpec, keys: Iterable[tuple]) -> bigquery.ArrayQueryParameter:
    """``@keys``: the key tuples as an array of structs typed from the table's schema."""
    from google.cloud import bigquery

    types = {f["name"]: "INT64" if f["type"] in ("INTEGER", "INT64") else f["type"]
             for f in schema_json(spec.schema)}
    return bigquery.ArrayQueryParameter("keys", "STRUCT", [
        bigquery.StructQueryParameter(None, *(
            bigquery.ScalarQueryParameter(c, types[c], v) for c, v in zip(spec.key, k, strict=True)))
        for k in sorted(set(keys))])


class BigQuerySink(Sink):
    """Idempotent writes per ``settings.sink_mode`` (see the module docstring). Library retries
    are off so tenacity is the one retry layer, and every retried step is idempotent."""

    def __init__(self, settings: Settings, client: bigquery.Client | None = None,
                 writer: StorageWriter | None = None) -> None:
        if settings.sink_mode not in SINK_MODES:
            raise ValueError(f"sink_mode must be one of {', '.join(SINK_MODES)}, "
                             f"not {settings.sink_mode!r}")
        self.settings = settings
        self._client = client
        self._writer = writer
        self.calls: Counter[str] = Counter()  # round trips by kind: query, append, load, ...

    @property
    def client(self) -> bigquery.Client:
        """Made on first use, so constructing a sink needs no credentials or network."""
        if self._client is None:
            self._client = clients.bigquery_client(self.settings)
        return self._client

    @property
    def writer(self) -> StorageWriter:
        """The Storage Write API client, made on first append."""
        if self._writer is None:
            from pipeline.bigquery.bqwrite import StorageWriter

            self._writer = StorageWriter(clients.bigquery_write_client(self.settings))
        return self._writer

    def _query(self, sql: str, config: bigquery.QueryJobConfig | None = None
               ) -> tuple[bigquery.QueryJob, list]:
        self.calls["query"] += 1
        return run_query(self.client, sql, config)

    def _existing(self, table_id: str, spec: TableSpec, keys: Iterable[tuple], bound: str
                  ) -> set[tuple]:
        """One query: which of ``keys`` the table holds, reading only ``bound``'s partitions."""
        from google.cloud import bigquery

        wanted = set(keys)
        if not wanted or bound == "FALSE":
            return set()
        config = bigquery.QueryJobConfig(query_parameters=[_key_param(spec, wanted)])
        _, rows = self._query(existing_keys_sql(table_id, spec.key, bound), config)
        return {tuple(r[c] for c in spec.key) for r in rows} & wanted

    def existing_keys(self, keys: Sequence[ObjectKey | Notification]) -> set[ObjectKey]:
        """Bare ObjectKeys carry no creation day, so their lookup reads every partition."""
        items = [(k.key, k.created or k.event_time) if isinstance(k, Notification) else (k, None)
                 for k in keys]
        if not items:
            return set()
        bound = partition_filter(PREDICTIONS.partition_by, partition_days(t for _, t in items))
        found = bq_call(lambda: self._existing(self.settings.table_id, PREDICTIONS,
                                           [(k.bucket, k.name, k.generation) for k, _ in items],
                                           bound), self.settings.bq_quota_patience_seconds)
        if self.settings.embeddings and found:
            found -= self._lacking_embeddings(found, bound)
        return {ObjectKey(*k) for k in found}

    def _lacking_embeddings(self, keys: set[tuple], bound: str) -> set[tuple]:
        """Of ``keys`` (in predictions), those classified without an embedding: with embeddings
        on they are classified again, which adds the embedding and leaves the prediction row
        as it is (a run or backfill with ``--embeddings`` over objects classified without)."""
        patience = self.settings.bq_quota_patience_seconds
        status = f"T.status IN ({sql_list(CLASSIFIED)})"
        classified = bq_call(lambda: self._existing(
            self.settings.table_id, PREDICTIONS, keys,
            f"{bound} AND {status}" if bound else status), patience)
        if not classified:
            return set()
        embedded = bq_call(lambda: self._existing(embeddings_table_id(self.settings), EMBEDDED,
                                              classified, bound), patience)
        return classified - embedded

    def write(self, rows: Sequence[dict], batch_id: int, *, verify: Verify = None) -> int:
        return self._write(rows, self.settings.table_id, PREDICTIONS, batch_id, verify)

    def write_dead_letters(self, records: Sequence[dict], batch_id: int, *,
                           verify: Verify = None) -> int:
        return self._write(records, self.settings.dead_letter_table_id, DEAD_LETTERS, batch_id,
                           verify)

    def write_events(self, records: Sequence[dict], batch_id: int, *,
                     verify: Verify = None) -> int:
        return self._write(records, self.settings.events_table_id, EVENTS, batch_id, verify)

    def write_embeddings(self, records: Sequence[dict], batch_id: int, *,
                         verify: Verify = None) -> int:
        return self._write(records, embeddings_table_id(self.settings), EMBEDDINGS, batch_id,
                           verify)

    def _write(self, rows: Sequence[dict], table_id: str, spec: TableSpec, batch_id: int,
               verify: Verify = None) -> int:
        if not rows:
            return 0
        if self.settings.sink_mode == "merge":
            return self._merge(rows, table_id, spec, batch_id)
        return self._append(rows, table_id, spec, verify)

    def _append(self, rows: Sequence[dict], table_id: str, spec: TableSpec,
                verify: Verify = None) -> int:
        """Key lookup (of ``verify``'s keys only, bounded to their partitions), then AppendRows
        with the rows the table lacks; both are retried together, and a retry looks up every
        key an earlier attempt sent, so an append committed before its error is found, not
        redone."""
        rows = first_per_key(rows, spec)
        fields = schema_json(spec.schema)

        keys = [tuple(r[c] for c in spec.key) for r in rows]
        check = set(keys) if verify is None else set(keys) & set(verify)
        tried: set[tuple] = set()  # keys of appends that failed but may have committed

        def attempt() -> int:
            look = check | tried
            bound = row_bound(spec, [r for r, k in zip(rows, keys, strict=True) if k in look])
            have = self._existing(table_id, spec, look, bound) if look else set()
            fresh = [r for r, k in zip(rows, keys, strict=True) if k not in have]
            for part in byte_parts(fresh):  # one part, unless the rows carry embeddings
                self.calls["append"] += 1
                tried.update(tuple(r[c] for c in spec.key) for r in part)
                self.writer.append(table_id, part, fields)
            return len(fresh) + len(have & tried)  # ours, committed by an attempt that "failed"

        return bq_call(attempt, self.settings.bq_quota_patience_seconds)

    def _merge(self, rows: Sequence[dict], table_id: str, spec: TableSpec, batch_id: int) -> int:
        from google.cloud import bigquery

        schema = load_schema(spec.schema)
        staging_id = staging_table_id(table_id, batch_id)
        staging = bigquery.Table(staging_id, schema=schema)
        staging.expires = datetime.now(UTC) + STAGING_TTL
        payload = to_ndjson(rows)
        load_config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.NEWLINE_DELIMITED_JSON, schema=schema,
            write_disposition=bigquery.WriteDisposition.WRITE_APPEND)
        sql = merge_sql(table_id, staging_id, [f.name for f in schema], spec.key, spec.order_by,
                        row_bound(spec, rows))
        patience = self.settings.bq_quota_patience_seconds
        try:
            self.calls["create_table"] += 1
            bq_call(lambda: self.client.create_table(staging, exists_ok=True, retry=None), patience)
            self.calls["load"] += 1
            bq_call(lambda: self.client.load_table_from_file(
                io.BytesIO(payload), staging_id, job_config=load_config).result(retry=None),
                patience)
            self.calls["query"] += 1
            job, _ = run_query(self.client, sql, patience=patience)
        finally:
            try:
                self.calls["delete_table"] += 1
                bq_call(lambda: self.client.delete_table(staging_id, not_found_ok=True, retry=None))
            except Exception as exc:  # noqa: BLE001 — the table expires by itself within the TTL
                log.warning("could not drop %s (expires in %s): %r", staging_id, STAGING_TTL, exc)
        return inserted_count(job)


def inserted_count(job: bigquery.QueryJob) -> int:
    """Rows a MERGE inserted, from the job's own statistics (no extra query).

    Real BigQuery reports ``dmlStats.insertedRowCount``; bqemulator reports only
    ``numDmlAffectedRows``, which equals it for an insert-only MERGE. If neither is reported
    we return 0 and log, rather than pay for counting the target before and after.
    """
    stats = job.dml_stats
    count = stats.inserted_row_count if stats else job.num_dml_affected_rows
    if count is None:
        log.warning("job %s reported no DML statistics; returning 0", job.job_id)
        return 0
    return int(count)


class JsonLinesSink(Sink):
    """One NDJSON object per batch at ``<uri>/batch-<id>.jsonl``: a replay overwrites it.

    ``<uri>`` is ``settings.jsonl_uri`` when set, else ``gs://<bucket>/_bucketlens/<table>``.
    Inside the watched bucket, the sink's own objects come back as notifications; their rows
    are dropped here and an empty batch writes nothing, so the sink cannot feed itself.
    """

    def __init__(self, settings: Settings, client: storage.Client | None = None) -> None:
        uri = getattr(settings, "jsonl_uri", "") or (
            f"gs://{settings.bucket}/{RESULTS_PREFIX}/{settings.table}")
        self.bucket_name, prefix = split_gs(uri, "jsonl_uri")
        self.prefix = prefix.strip("/")
        self.settings = settings
        self._client = client

    @property
    def client(self) -> storage.Client:
        if self._client is None:
            self._client = clients.storage_client(self.settings)
        return self._client

    def object_name(self, batch_id: int, kind: str = "") -> str:
        return "/".join(p for p in (self.prefix, kind, f"batch-{batch_id}.jsonl") if p)

    def existing_keys(self, keys: Sequence[ObjectKey | Notification]) -> set[ObjectKey]:
        return set()

    def write(self, rows: Sequence[dict], batch_id: int, *, verify: Verify = None) -> int:
        own = f"{self.prefix}/" if self.prefix else ""
        kept = [r for r in rows
                if not (r["bucket"] == self.bucket_name and r["name"].startswith(own))]
        return self._put(kept, self.object_name(batch_id))

    def write_dead_letters(self, records: Sequence[dict], batch_id: int, *,
                           verify: Verify = None) -> int:
        return self._put(records, self.object_name(batch_id, "dead_letters"))

    def write_events(self, records: Sequence[dict], batch_id: int, *,
                     verify: Verify = None) -> int:
        return self._put(records, self.object_name(batch_id, "object_events"))

    def write_embeddings(self, records: Sequence[dict], batch_id: int, *,
                         verify: Verify = None) -> int:
        return self._put(records, self.object_name(batch_id, "embeddings"))

    def _put(self, rows: Sequence[dict], name: str) -> int:
        if not rows:
            return 0
        blob = self.client.bucket(self.bucket_name).blob(name)
        payload = to_ndjson(rows)
        call_with_retries(lambda: blob.upload_from_string(
            payload, content_type="application/x-ndjson", retry=None))
        return len(rows)


class ConsoleSink(Sink):
    """Rows as JSON lines on a stream (stdout by default), for debugging a pipeline."""

    def __init__(self, settings: Settings | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream

    def existing_keys(self, keys: Sequence[ObjectKey | Notification]) -> set[ObjectKey]:
        return set()

    def write(self, rows: Sequence[dict], batch_id: int, *, verify: Verify = None) -> int:
        return self._print(rows, batch_id, "prediction")

    def write_dead_letters(self, records: Sequence[dict], batch_id: int, *,
                           verify: Verify = None) -> int:
        return self._print(records, batch_id, "dead_letter")

    def write_events(self, records: Sequence[dict], batch_id: int, *,
                     verify: Verify = None) -> int:
        return self._print(records, batch_id, "event")

    def write_embeddings(self, records: Sequence[dict], batch_id: int, *,
                         verify: Verify = None) -> int:
        return self._print(records, batch_id, "embedding")

    def _print(self, rows: Sequence[dict], batch_id: int, kind: str) -> int:
        stream = self.stream or sys.stdout
        for r in rows:
            print(json.dumps({"kind": kind, **r, "batch_id": batch_id}, default=json_default),
                  file=stream)
        return len(rows)


SINKS: dict[str, Callable[[Settings], Sink]] = {
    "bigquery": BigQuerySink,
    "jsonl": JsonLinesSink,
    "console": ConsoleSink,
}


def make_sink(kind: str, settings: Settings) -> Sink:
    try:
        factory = SINKS[kind]
    except KeyError:
        raise ValueError(f"unknown sink {kind!r}; choose one of {', '.join(SINKS)}") from None
    return factory(settings)


