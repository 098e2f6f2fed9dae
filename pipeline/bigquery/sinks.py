"""Sink: prediction and dead-letter rows → BigQuery, idempotently, once per micro-batch.

Delivery is at-least-once (Pub/Sub redelivers, Spark replays a batch after a crash), so the
write must be safe to repeat. Every row has a key — (bucket, name, generation) for
predictions, (message_id, reason) for dead letters — and a write adds only keys the table
lacks. Two ways (``Settings.sink_mode``):

* ``append`` (default): one query for the batch's keys, bounded to the partitions the batch's
  rows fall in by constant timestamp filters, then the missing rows go to the table's default
  write stream (Storage Write API, ``pipeline.bqwrite``): no load job, staging table or DML, so
  neither the 1,500 load jobs per table per day nor the 2 concurrent DML statements per table
  limit the trigger interval. Lookup and append are retried together, so a retried append
  never adds rows the first try committed. Two writers appending one key in the same instant
  can both add it: views count a key once and ``bucketlens compact`` removes the copy.
* ``merge``: staging table + load job + insert-only MERGE, its ON clause bounded the same way.

Costs: BigQuery bills a query by the bytes of the partitions it reads, and prunes partitions
only on constant filters on the partitioning column
(https://cloud.google.com/bigquery/docs/querying-partitioned-tables,
https://cloud.google.com/bigquery/pricing#on_demand_pricing); quotas:
https://cloud.google.com/bigquery/quotas. Legacy streaming inserts are not used: ``insertId``
dedupe is best-effort (about a minute), and one bad row fails a whole ``insertAll`` request.

Row building and SQL text are pure functions; the classes only do I/O.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    stop_never,
)

from pipeline import clients
from pipeline.catalog import (
    EMBEDDING_VIEWS,
    EMBEDDINGS_TABLE,
    NEAR_DUPLICATE_DISTANCE,
    embeddings_table_id,
    load_schema,
    schema_json,
    view_templates,
)
from pipeline.config import Settings
from pipeline.labels import ModelInfo
from pipeline.notifications import Notification, ObjectKey
from pipeline.retry import QUOTA_WAIT, call_with_retries, is_bq_transient, is_rate_limited
from pipeline.status import CLASSIFIED, sql_list
from pipeline.times import iso_time, utc
from pipeline.triage import RESULTS_PREFIX

if TYPE_CHECKING:
    from google.cloud import bigquery, storage

    from pipeline.bqwrite import StorageWriter

log = logging.getLogger(__name__)

PREDICTION_KEY = ("bucket", "name", "generation")
DEAD_LETTER_KEY = ("message_id", "reason")
EVENT_KEY = ("bucket", "name", "generation", "event_type", "metageneration")
EMBEDDING_KEY = ("bucket", "name", "generation", "model_version")
STAGING_TTL = timedelta(hours=1)  # a crashed batch's staging table cleans itself up
# How far back a copy of a dead letter or event may have been written: Pub/Sub redelivers an
# unacknowledged message for up to the subscription's retention (7 days by default), so the
# lookups of those tables (partitioned by recorded_at) read the last 8 days only. Raise it
# with the subscription's message_retention_duration.
REDELIVERY_WINDOW = timedelta(days=8)
SINK_MODES = ("append", "merge")
# An AppendRows request carries at most 10 MB (https://cloud.google.com/bigquery/quotas#write-api-limits);
# a 1280-d embedding row is ~10 kB, so a batch's embeddings go in parts of at most this many bytes.
# (pipeline.bqwrite.append_requests cuts each part's requests on their real serialized size.)
APPEND_BYTES = 8 * 1024 * 1024
# A dead letter keeps the first this many bytes of the message's data, with the whole data's
# size and SHA-256: a Pub/Sub message may be 10 MB, which base64'd would make the dead-letter
# write itself an AppendRows request over the 10 MB limit.
DEAD_LETTER_DATA_BYTES = 1024


@dataclass(frozen=True)
class TableSpec:
    """What the sink needs to know of a table: its key, which copy wins, how it is partitioned."""

    schema: str  # schemas/<schema>.json
    key: tuple[str, ...]
    order_by: str  # of several copies of a key, the one with the smallest value is kept
    partition_by: str  # the TIMESTAMP column of pipeline.catalog.table_layouts (day partitions)


PREDICTIONS = TableSpec("predictions", PREDICTION_KEY, "processed_at", "object_created")
DEAD_LETTERS = TableSpec("dead_letters", DEAD_LETTER_KEY, "recorded_at", "recorded_at")
EVENTS = TableSpec("object_events", EVENT_KEY, "recorded_at", "recorded_at")
EMBEDDINGS = TableSpec("embeddings", EMBEDDING_KEY, "processed_at", "object_created")
# an object generation's embedding under any model version: what makes a key done when the
# job runs with embeddings (BigQuerySink.existing_keys)
EMBEDDED = TableSpec("embeddings", PREDICTION_KEY, "processed_at", "object_created")


# --- rows (pure) ------------------------------------------------------------------------------

def _ts(value: datetime | int | None) -> str | None:
    """ISO-8601 in UTC; naive datetimes are taken to be UTC already, numbers are epoch
    microseconds (how the source carries publish times, ``pipeline.times.utc``)."""
    if value is None:
        return None
    return utc(value).isoformat()


def build_row(n: Notification, *, status: str, reason: str = "",
              model: ModelInfo | str | None = None, topk: Sequence[tuple[int, str, float]] = (),
              batch_id: int | None = None, processed_at: datetime | None = None) -> dict:
    """One ``predictions`` row, JSON-ready; ``topk`` is (class_id, label, prob), best first.

    With a :class:`ModelInfo` the row records the model's version and label set, and which of
    the model's own labels the true label names (what the accuracy views score directly)."""
    top = [{"class_id": int(c), "label": str(label), "prob": float(p)} for c, label, p in topk]
    first = top[0] if top else {}
    info = model if isinstance(model, ModelInfo) else None
    return {
        "bucket": n.key.bucket,
        "name": n.key.name,
        "generation": n.key.generation,
        "status": status,
        "reason": reason or None,
        "true_label": n.true_label,
        "model": info.name if info else model,
        "model_version": info.version if info else None,
        "label_set": info.label_set if info else None,
        "true_model_label": info.own_label(n.true_label) if info else None,
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
        # the partition every copy of this key agrees on: GCS's timeCreated; a notification
        # without a JSON payload has only eventTime (for OBJECT_FINALIZE the same instant)
        "object_created": _ts(n.created or n.event_time or processed_at or datetime.now(UTC)),
    }


def embedding_record(prediction: Mapping[str, Any], embedding: Sequence[float],
                     model: ModelInfo) -> dict:
    """One ``embeddings`` row, JSON-ready, for the ``predictions`` row built from the same
    forward pass: same key, partition day, batch and time, plus the model version."""
    vector = list(map(float, embedding))
    return {
        "bucket": prediction["bucket"], "name": prediction["name"],
        "generation": prediction["generation"], "model_version": model.version,
        "model": model.name, "dimensions": len(vector), "embedding": vector,
        "object_created": prediction["object_created"], "processed_at": prediction["processed_at"],
        "message_id": prediction["message_id"], "batch_id": prediction["batch_id"],
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
                       data: bytes | None, publish_time: datetime | int | None,
                       batch_id: int | None, *, recorded_at: datetime | None = None) -> dict:
    """One ``dead_letters`` row: why the message failed, its attributes, and its data as the
    first DEAD_LETTER_DATA_BYTES (base64) with the whole data's size and SHA-256, so the row
    stays small whatever the message's size (``data_bytes`` > the kept part: truncated)."""
    return {
        "message_id": message_id,
        "reason": reason,
        "attributes": json.dumps(dict(attributes), sort_keys=True),
        "data": (base64.b64encode(data[:DEAD_LETTER_DATA_BYTES]).decode("ascii")
                 if data is not None else None),
        "data_bytes": len(data) if data is not None else None,
        "data_sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
        "publish_time": _ts(publish_time),
        "recorded_at": _ts(recorded_at or datetime.now(UTC)),
        "batch_id": batch_id,
    }


def row_key(row: Mapping[str, Any]) -> ObjectKey:
    return ObjectKey(row["bucket"], row["name"], int(row["generation"]))


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


def _order(value: Any) -> Any:
    return _utc(value) if isinstance(value, str | datetime) else value


def merge_sql(target: str, staging: str, columns: Sequence[str], key: Sequence[str],
              order_by: str, bound: str = "") -> str:
    """Insert staging rows whose key the target lacks; one row per key from the staging side.

    QUALIFY keeps the earliest ``order_by`` row per key, so duplicates in one batch (or left by
    a retried load) insert once. Column lists are explicit: ``INSERT ROW`` is not portable.
    ``bound``, a constant partition filter on ``T``, goes into ON: BigQuery then reads only
    those partitions of the target (a merge-condition filter prunes; a bare key join does not).
    """
    on = " AND ".join([f"T.{k} = S.{k}" for k in key] + ([bound] if bound else []))
    return (
        f"MERGE `{target}` AS T\n"
        f"USING (SELECT * FROM `{staging}` WHERE TRUE\n"
        f"       QUALIFY ROW_NUMBER() OVER (PARTITION BY {', '.join(key)} "
        f"ORDER BY {order_by}) = 1) AS S\n"
        f"ON {on}\n"
        f"WHEN NOT MATCHED THEN INSERT ({', '.join(columns)})\n"
        f"VALUES ({', '.join('S.' + c for c in columns)})"
    )


def existing_keys_sql(target: str, key: Sequence[str] = PREDICTION_KEY,
                      where: str = "") -> str:
    """The keys of ``@keys`` (an array of structs) that ``target`` holds; ``where`` is a
    constant partition filter on ``T`` (``partition_filter``) so BigQuery reads only those
    partitions, not the whole table."""
    on = " AND ".join(f"T.{k} = K.{k}" for k in key)
    return (
        f"SELECT DISTINCT {', '.join('T.' + k for k in key)} FROM `{target}` AS T\n"
        f"JOIN UNNEST(@keys) AS K\nON {on}" + (f"\nWHERE {where}" if where else "")
    )


def _utc(value: datetime | str) -> datetime:
    return iso_time(value) if isinstance(value, str) else utc(value)


def partition_days(values: Iterable[datetime | str | None]) -> list[date] | None:
    """The UTC days (day partitions) of ``values``, sorted; None when any value is missing,
    since a key without a date could be in any partition (pure)."""
    days = set()
    for v in values:
        if v is None:
            return None
        days.add(_utc(v).date())
    return sorted(days)


def day_ranges(days: Iterable[date]) -> list[tuple[date, date | None]]:
    """Consecutive days merged into half-open [first, last + 1 day) ranges (pure); the end is
    None (open) for a range that reaches date.max, whose next day Python cannot represent."""
    ranges: list[tuple[date, date | None]] = []
    for d in sorted(set(days)):
        end = d + timedelta(days=1) if d < date.max else None
        if ranges and ranges[-1][1] == d:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((d, end))
    return ranges


def ts_literal(t: datetime | date) -> str:
    """A constant BigQuery TIMESTAMP literal (UTC). Constants, not parameters or expressions
    over other tables, are what BigQuery prunes partitions with. The year has four digits
    whatever it is (``strftime('%Y')`` writes year 5 as "5")."""
    if not isinstance(t, datetime):
        t = datetime(t.year, t.month, t.day, tzinfo=UTC)
    stamp = _utc(t).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
    return f"TIMESTAMP '{stamp}+00'"


def partition_filter(column: str, days: Sequence[date] | None, alias: str = "T") -> str:
    """``alias.column`` within the given days, as ORed constant ranges; "" (no filter) when the
    days are unknown (pure). https://cloud.google.com/bigquery/docs/querying-partitioned-tables
    """
    if days is None:
        return ""
    if not days:
        return "FALSE"
    parts = [f"({alias}.{column} >= {ts_literal(a)}"
             + (f" AND {alias}.{column} < {ts_literal(b)})" if b is not None else ")")
             for a, b in day_ranges(days)]
    return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"


def since_filter(column: str, since: datetime | date, alias: str = "T") -> str:
    """``alias.column >= <constant>``: prunes every partition before ``since`` (pure)."""
    return f"{alias}.{column} >= {ts_literal(since)}"


def row_bound(spec: TableSpec, rows: Sequence[Mapping[str, Any]]) -> str:
    """The constant partition filter that covers every copy of these rows' keys (pure).

    Predictions: the rows' own object_created days (every copy has the same). Dead letters and
    events are partitioned by recorded_at, which differs per copy: the earliest row's time
    minus REDELIVERY_WINDOW, a bound that still does not grow with the table.
    """
    if spec.partition_by == "recorded_at":
        times = [_utc(r[spec.partition_by]) for r in rows if r.get(spec.partition_by)]
        earliest = min(times, default=datetime.now(UTC))
        # clamped: a time within the window of year 1 cannot go back a whole window
        start = max(earliest, datetime.min.replace(tzinfo=UTC) + REDELIVERY_WINDOW)
        return since_filter(spec.partition_by, (start - REDELIVERY_WINDOW).date())
    return partition_filter(spec.partition_by, partition_days(
        r.get(spec.partition_by) for r in rows))


def _row_bytes(row: Mapping[str, Any]) -> int:
    """A generous estimate of a row's encoded size (pure): strings at their UTF-8 size plus
    an offset, 8 bytes per number, nested records and arrays summed."""
    return 64 + _value_bytes(row)


def _value_bytes(value: Any) -> int:
    if isinstance(value, str):
        return 8 + len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes | bytearray):
        return 8 + len(value)
    if isinstance(value, Mapping):
        return sum(_value_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return 8 + sum(_value_bytes(v) for v in value)
    return 8


def byte_parts(rows: Sequence[dict], limit: int = APPEND_BYTES) -> list[list[dict]]:
    """Consecutive parts of ``rows`` of at most ``limit`` estimated bytes each (pure)."""
    parts: list[list[dict]] = []
    size = 0
    for r in rows:
        n = _row_bytes(r)
        if not parts or size + n > limit:
            parts.append([])
            size = 0
        parts[-1].append(r)
        size += n
    return parts


def first_per_key(rows: Sequence[dict], spec: TableSpec) -> list[dict]:
    """One row per key, the smallest ``order_by`` (what the MERGE's QUALIFY keeps) (pure)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        k = tuple(r[c] for c in spec.key)
        if k not in best or _order(r[spec.order_by]) < _order(best[k][spec.order_by]):
            best[k] = r
    return list(best.values())


def render_view(template: str, settings: Settings) -> str:
    """A ``schemas/views`` file for these settings; ``{classified}`` is the statuses that count
    as classified (``pipeline.status``), so the SQL never spells them itself."""
    return template.format(project=settings.project, dataset=settings.dataset,
                           table=settings.table, dead_letter_table=settings.dead_letter_table,
                           classified=sql_list(CLASSIFIED), embeddings=EMBEDDINGS_TABLE,
                           near_duplicate_distance=repr(NEAR_DUPLICATE_DISTANCE))


def view_id(sql: str) -> str:
    match = re.search(r"CREATE\s+OR\s+REPLACE\s+VIEW\s+`([^`]+)`", sql, re.IGNORECASE)
    if not match:
        raise ValueError("a view file must contain CREATE OR REPLACE VIEW `<id>`")
    return match.group(1)


def _bq(fn: Callable[[], Any], patience: float | None = None) -> Any:
    """``fn`` under the retry policy (``pipeline.retry``); with ``patience`` (seconds, 0 = no limit) rate and
    quota errors that outlast it are waited out too, so a stream stalls instead of dying."""
    def once() -> Any:
        return call_with_retries(fn, transient=is_bq_transient)

    if patience is None:
        return once()

    def warn(state: RetryCallState) -> None:
        log.warning("BigQuery rate/quota limit, retrying (round %d): %r", state.attempt_number,
                    state.outcome.exception() if state.outcome else None)

    return Retrying(retry=retry_if_exception(is_rate_limited), wait=QUOTA_WAIT,
                    stop=stop_after_delay(patience) if patience > 0 else stop_never,
                    before_sleep=warn, reraise=True)(once)


def run_query(client: bigquery.Client, sql: str, config: bigquery.QueryJobConfig | None = None,
              patience: float | None = None) -> tuple[bigquery.QueryJob, list]:
    """Run to completion with retries (a retry is a new job: callers' SQL is idempotent)."""

    def attempt() -> tuple[bigquery.QueryJob, list]:
        job = client.query(sql, job_config=config, retry=None, job_retry=None)
        return job, list(job.result(retry=None, job_retry=None))

    return _bq(attempt, patience)


# --- sinks ------------------------------------------------------------------------------------

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
            from pipeline.bqwrite import StorageWriter

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
        found = _bq(lambda: self._existing(self.settings.table_id, PREDICTIONS,
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
        classified = _bq(lambda: self._existing(
            self.settings.table_id, PREDICTIONS, keys,
            f"{bound} AND {status}" if bound else status), patience)
        if not classified:
            return set()
        embedded = _bq(lambda: self._existing(embeddings_table_id(self.settings), EMBEDDED,
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

        return _bq(attempt, self.settings.bq_quota_patience_seconds)

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
            _bq(lambda: self.client.create_table(staging, exists_ok=True, retry=None), patience)
            self.calls["load"] += 1
            _bq(lambda: self.client.load_table_from_file(
                io.BytesIO(payload), staging_id, job_config=load_config).result(retry=None),
                patience)
            self.calls["query"] += 1
            job, _ = run_query(self.client, sql, patience=patience)
        finally:
            try:
                self.calls["delete_table"] += 1
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
    """Render and run every ``schemas/views/*.sql`` (CREATE OR REPLACE: safe to repeat).

    A dataset provisioned before the embeddings table existed gets every other view: the
    ``similar_*`` views are left out, with a warning, until ``python -m deploy apply`` adds it.
    """
    from google.api_core.exceptions import NotFound

    client = client or clients.bigquery_client(settings)
    created = []
    for name, template in view_templates():
        sql = render_view(template, settings)
        try:
            run_query(client, sql)
        except NotFound as exc:
            if not name.startswith(EMBEDDING_VIEWS):
                raise
            log.warning("view %s not created: %s (`python -m deploy apply` creates the "
                        "embeddings table)", view_id(sql), getattr(exc, "message", exc))
            continue
        created.append(view_id(sql))
    return created
