"""Sink: prediction and dead-letter rows → BigQuery, idempotently, once per micro-batch.

Delivery is at-least-once (Pub/Sub redelivers, Spark replays a batch after a crash), so the
write must be safe to repeat. Rows are loaded into a per-batch staging table and merged into
the target with ``WHEN NOT MATCHED THEN INSERT`` on the row key — (bucket, name, generation)
for predictions, (message_id, reason) for dead letters — so a replay inserts nothing. Load
jobs and MERGE are used rather than streaming inserts: ``insertId`` dedupe is best-effort
(about a minute), and one bad row fails a whole ``insertAll`` request anyway.

Row building and SQL text are pure functions; the classes only do I/O.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from google.api_core import exceptions as api_exceptions

from pipeline import clients
from pipeline.catalog import load_schema, view_templates
from pipeline.config import Settings
from pipeline.fetch import call_with_retries, is_transient
from pipeline.notifications import Notification, ObjectKey

if TYPE_CHECKING:
    from google.cloud import bigquery, storage

log = logging.getLogger(__name__)

PREDICTION_KEY = ("bucket", "name", "generation")
DEAD_LETTER_KEY = ("message_id", "reason")
EVENT_KEY = ("bucket", "name", "generation", "event_type", "metageneration")
STAGING_TTL = timedelta(hours=1)  # a crashed batch's staging table cleans itself up
RESULTS_PREFIX = "_bucketlens"  # JsonLinesSink's default folder inside the watched bucket


# --- rows (pure) ------------------------------------------------------------------------------

def _ts(value: datetime | None) -> str | None:
    """ISO-8601 in UTC; naive datetimes are taken to be UTC already."""
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC).isoformat()


def build_row(n: Notification, *, status: str, reason: str = "", model: str | None = None,
              topk: Sequence[tuple[int, str, float]] = (), batch_id: int | None = None,
              processed_at: datetime | None = None) -> dict:
    """One ``predictions`` row, JSON-ready; ``topk`` is (class_id, label, prob), best first."""
    top = [{"class_id": int(c), "label": str(label), "prob": float(p)} for c, label, p in topk]
    first = top[0] if top else {}
    return {
        "bucket": n.key.bucket,
        "name": n.key.name,
        "generation": n.key.generation,
        "status": status,
        "reason": reason or None,
        "true_label": n.true_label,
        "model": model,
        "top1_class_id": first.get("class_id"),
        "top1_label": first.get("label"),
        "top1_prob": first.get("prob"),
        "top5": top,
        "size": n.size,
        "content_type": n.content_type,
        "event_time": _ts(n.event_time),
        "publish_time": _ts(n.publish_time),
        "processed_at": _ts(processed_at or datetime.now(UTC)),
        "message_id": n.message_id or None,
        "batch_id": batch_id,
    }


def event_record(n: Notification, batch_id: int | None, *,
                 recorded_at: datetime | None = None) -> dict:
    """One ``object_events`` row: a DELETE / ARCHIVE / METADATA_UPDATE, recorded not classified."""
    return {
        "bucket": n.key.bucket, "name": n.key.name, "generation": n.key.generation,
        "event_type": n.event_type, "event_time": _ts(n.event_time), "message_id": n.message_id,
        "metageneration": n.metageneration or 0,  # 0: not given (a NULL would never match)
        "recorded_at": _ts(recorded_at or datetime.now(UTC)), "batch_id": batch_id,
    }


def dead_letter_record(message_id: str, reason: str, attributes: Mapping[str, str],
                       data: bytes | None, publish_time: datetime | None, batch_id: int | None,
                       *, recorded_at: datetime | None = None) -> dict:
    """One ``dead_letters`` row: the message as received (data base64), and why it failed."""
    return {
        "message_id": message_id,
        "reason": reason,
        "attributes": json.dumps(dict(attributes), sort_keys=True),
        "data": base64.b64encode(data).decode("ascii") if data is not None else None,
        "publish_time": _ts(publish_time),
        "recorded_at": _ts(recorded_at or datetime.now(UTC)),
        "batch_id": batch_id,
    }


def row_key(row: Mapping[str, Any]) -> ObjectKey:
    return ObjectKey(row["bucket"], row["name"], int(row["generation"]))


def own_prefixes(settings: Settings) -> tuple[str, ...]:
    """Where bucketlens writes into the watched bucket itself: never input to classify."""
    prefixes = [f"{RESULTS_PREFIX}/"]
    bucket, _, prefix = settings.jsonl_uri.removeprefix("gs://").partition("/")
    if settings.jsonl_uri.startswith("gs://") and bucket == settings.bucket and prefix.strip("/"):
        prefixes.append(prefix.strip("/") + "/")
    return tuple(prefixes)


def to_ndjson(rows: Sequence[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(r, default=_json_default) + "\n" for r in rows).encode()


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return _ts(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# --- SQL (pure) -------------------------------------------------------------------------------

def staging_table_id(table_id: str, batch_id: int) -> str:
    """``<project>.<dataset>._staging_<table>_<batch>_<uuid8>``: unique even for a replay."""
    project_dataset, table = table_id.rsplit(".", 1)
    batch = str(batch_id) if batch_id >= 0 else f"m{-batch_id}"  # no '-' in table names
    return f"{project_dataset}._staging_{table}_{batch}_{uuid.uuid4().hex[:8]}"


def merge_sql(target: str, staging: str, columns: Sequence[str], key: Sequence[str],
              order_by: str) -> str:
    """Insert staging rows whose key the target lacks; one row per key from the staging side.

    QUALIFY keeps the earliest ``order_by`` row per key, so duplicates in one batch (or left by
    a retried load) insert once. Column lists are explicit: ``INSERT ROW`` is not portable.
    """
    on = " AND ".join(f"T.{k} = S.{k}" for k in key)
    return (
        f"MERGE `{target}` AS T\n"
        f"USING (SELECT * FROM `{staging}` WHERE TRUE\n"
        f"       QUALIFY ROW_NUMBER() OVER (PARTITION BY {', '.join(key)} "
        f"ORDER BY {order_by}) = 1) AS S\n"
        f"ON {on}\n"
        f"WHEN NOT MATCHED THEN INSERT ({', '.join(columns)})\n"
        f"VALUES ({', '.join('S.' + c for c in columns)})"
    )


def existing_keys_sql(target: str) -> str:
    return (
        f"SELECT DISTINCT T.bucket, T.name, T.generation FROM `{target}` AS T\n"
        "JOIN UNNEST(@keys) AS K\n"
        "ON T.bucket = K.bucket AND T.name = K.name AND T.generation = K.generation"
    )


def render_view(template: str, settings: Settings) -> str:
    return template.format(project=settings.project, dataset=settings.dataset,
                           table=settings.table, dead_letter_table=settings.dead_letter_table)


def view_id(sql: str) -> str:
    match = re.search(r"CREATE\s+OR\s+REPLACE\s+VIEW\s+`([^`]+)`", sql, re.IGNORECASE)
    if not match:
        raise ValueError("a view file must contain CREATE OR REPLACE VIEW `<id>`")
    return match.group(1)


def _bq_transient(exc: BaseException) -> bool:
    """``is_transient`` plus BigQuery's rate limits, which it reports as 403."""
    if isinstance(exc, api_exceptions.Forbidden):
        return any(e.get("reason") in {"rateLimitExceeded", "backendError"}
                   for e in exc.errors or [])
    return is_transient(exc)


def _bq(fn: Callable[[], Any]) -> Any:
    return call_with_retries(fn, transient=_bq_transient)


def run_query(client: bigquery.Client, sql: str, config: bigquery.QueryJobConfig | None = None
              ) -> tuple[bigquery.QueryJob, list]:
    """Run to completion with retries (a retry is a new job: callers' SQL is idempotent)."""

    def attempt() -> tuple[bigquery.QueryJob, list]:
        job = client.query(sql, job_config=config, retry=None, job_retry=None)
        return job, list(job.result(retry=None, job_retry=None))

    return _bq(attempt)


# --- sinks ------------------------------------------------------------------------------------

class Sink(Protocol):
    def existing_keys(self, keys: Sequence[ObjectKey]) -> set[ObjectKey]:
        """Keys already written, whose classification can be skipped."""
        ...

    def write(self, rows: Sequence[dict], batch_id: int) -> int:
        """Idempotent on the row key; returns the rows newly inserted."""
        ...

    def write_dead_letters(self, records: Sequence[dict], batch_id: int) -> int:
        """Idempotent on (message_id, reason); returns the records newly inserted."""
        ...

    def write_events(self, records: Sequence[dict], batch_id: int) -> int:
        """Idempotent on (bucket, name, generation, event_type); returns records inserted."""
        ...


class BigQuerySink(Sink):
    """Staging table + one MERGE per write; library retries are off so tenacity is the one
    retry layer (every step is idempotent: the load goes to a table of its own, the MERGE
    inserts only missing keys, the drop ignores a missing table)."""

    def __init__(self, settings: Settings, client: bigquery.Client | None = None) -> None:
        self.settings = settings
        self._client = client

    @property
    def client(self) -> bigquery.Client:
        """Made on first use, so constructing a sink needs no credentials or network."""
        if self._client is None:
            self._client = clients.bigquery_client(self.settings)
        return self._client

    def existing_keys(self, keys: Sequence[ObjectKey]) -> set[ObjectKey]:
        from google.cloud import bigquery

        wanted = set(keys)
        if not wanted:
            return set()

        def struct(k: ObjectKey) -> bigquery.StructQueryParameter:
            return bigquery.StructQueryParameter(
                None,
                bigquery.ScalarQueryParameter("bucket", "STRING", k.bucket),
                bigquery.ScalarQueryParameter("name", "STRING", k.name),
                bigquery.ScalarQueryParameter("generation", "INT64", k.generation),
            )

        param = bigquery.ArrayQueryParameter("keys", "STRUCT", [struct(k) for k in sorted(wanted)])
        config = bigquery.QueryJobConfig(query_parameters=[param])
        _, rows = run_query(self.client, existing_keys_sql(self.settings.table_id), config)
        return {ObjectKey(r["bucket"], r["name"], r["generation"]) for r in rows} & wanted

    def write(self, rows: Sequence[dict], batch_id: int) -> int:
        return self._merge(rows, self.settings.table_id, "predictions", PREDICTION_KEY,
                           "processed_at", batch_id)

    def write_dead_letters(self, records: Sequence[dict], batch_id: int) -> int:
        return self._merge(records, self.settings.dead_letter_table_id, "dead_letters",
                           DEAD_LETTER_KEY, "recorded_at", batch_id)

    def write_events(self, records: Sequence[dict], batch_id: int) -> int:
        return self._merge(records, self.settings.events_table_id, "object_events",
                           EVENT_KEY, "recorded_at", batch_id)

    def _merge(self, rows: Sequence[dict], table_id: str, schema_name: str,
               key: Sequence[str], order_by: str, batch_id: int) -> int:
        from google.cloud import bigquery

        if not rows:
            return 0
        schema = load_schema(schema_name)
        staging_id = staging_table_id(table_id, batch_id)
        staging = bigquery.Table(staging_id, schema=schema)
        staging.expires = datetime.now(UTC) + STAGING_TTL
        payload = to_ndjson(rows)
        load_config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.NEWLINE_DELIMITED_JSON, schema=schema,
            write_disposition=bigquery.WriteDisposition.WRITE_APPEND)
        sql = merge_sql(table_id, staging_id, [f.name for f in schema], key, order_by)
        try:
            _bq(lambda: self.client.create_table(staging, exists_ok=True, retry=None))
            _bq(lambda: self.client.load_table_from_file(
                io.BytesIO(payload), staging_id, job_config=load_config).result(retry=None))
            job, _ = run_query(self.client, sql)
        finally:
            try:
                _bq(lambda: self.client.delete_table(staging_id, not_found_ok=True, retry=None))
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
        if not uri.startswith("gs://"):
            raise ValueError(f"jsonl_uri must be gs://<bucket>/<prefix>, not {uri!r}")
        self.bucket_name, _, prefix = uri[len("gs://"):].partition("/")
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

    def existing_keys(self, keys: Sequence[ObjectKey]) -> set[ObjectKey]:
        return set()

    def write(self, rows: Sequence[dict], batch_id: int) -> int:
        own = f"{self.prefix}/" if self.prefix else ""
        kept = [r for r in rows
                if not (r["bucket"] == self.bucket_name and r["name"].startswith(own))]
        return self._put(kept, self.object_name(batch_id))

    def write_dead_letters(self, records: Sequence[dict], batch_id: int) -> int:
        return self._put(records, self.object_name(batch_id, "dead_letters"))

    def write_events(self, records: Sequence[dict], batch_id: int) -> int:
        return self._put(records, self.object_name(batch_id, "object_events"))

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

    def existing_keys(self, keys: Sequence[ObjectKey]) -> set[ObjectKey]:
        return set()

    def write(self, rows: Sequence[dict], batch_id: int) -> int:
        return self._print(rows, batch_id, "prediction")

    def write_dead_letters(self, records: Sequence[dict], batch_id: int) -> int:
        return self._print(records, batch_id, "dead_letter")

    def write_events(self, records: Sequence[dict], batch_id: int) -> int:
        return self._print(records, batch_id, "event")

    def _print(self, rows: Sequence[dict], batch_id: int, kind: str) -> int:
        stream = self.stream or sys.stdout
        for r in rows:
            print(json.dumps({"kind": kind, **r, "batch_id": batch_id}, default=_json_default),
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


def create_views(settings: Settings, client: bigquery.Client | None = None) -> list[str]:
    """Render and run every ``schemas/views/*.sql`` (CREATE OR REPLACE: safe to repeat)."""
    client = client or clients.bigquery_client(settings)
    created = []
    for _, template in view_templates():
        sql = render_view(template, settings)
        run_query(client, sql)
        created.append(view_id(sql))
    return created
