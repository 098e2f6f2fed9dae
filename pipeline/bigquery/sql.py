"""The SQL the sinks and commands send (text built by pure functions), and how a query runs:
to completion, under the retry policy (``pipeline.retry``).

Costs: BigQuery bills a query by the bytes of the partitions it reads, and prunes partitions
only on constant filters on the partitioning column
(https://cloud.google.com/bigquery/docs/querying-partitioned-tables,
https://cloud.google.com/bigquery/pricing#on_demand_pricing), so every lookup here is bounded
by constant timestamp filters (``partition_filter``, ``since_filter``, ``row_bound``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    stop_never,
)

from pipeline.bigquery.catalog import PREDICTION_KEY, TableSpec
from pipeline.retry import QUOTA_WAIT, call_with_retries, is_bq_transient, is_rate_limited
from pipeline.times import as_utc

if TYPE_CHECKING:
    from google.cloud import bigquery

log = logging.getLogger(__name__)

# How far back a copy of a dead letter or event may have been written: Pub/Sub redelivers an
# unacknowledged message for up to the subscription's retention (7 days by default), so the
# lookups of those tables (partitioned by recorded_at) read the last 8 days only. Raise it
# with the subscription's message_retention_duration.
REDELIVERY_WINDOW = timedelta(days=8)


def staging_table_id(table_id: str, batch_id: int) -> str:
    """``<project>.<dataset>._staging_<table>_<batch>_<uuid8>``: unique even for a replay."""
    project_dataset, table = table_id.rsplit(".", 1)
    batch = str(batch_id) if batch_id >= 0 else f"m{-batch_id}"  # no '-' in table names
    return f"{project_dataset}._staging_{table}_{batch}_{uuid.uuid4().hex[:8]}"


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


def partition_days(values: Iterable[datetime | str | None]) -> list[date] | None:
    """The UTC days (day partitions) of ``values``, sorted; None when any value is missing,
    since a key without a date could be in any partition (pure)."""
    days = set()
    for v in values:
        if v is None:
            return None
        days.add(as_utc(v).date())
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
    stamp = as_utc(t).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
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
        times = [as_utc(r[spec.partition_by]) for r in rows if r.get(spec.partition_by)]
        earliest = min(times, default=datetime.now(UTC))
        # clamped: a time within the window of year 1 cannot go back a whole window
        start = max(earliest, datetime.min.replace(tzinfo=UTC) + REDELIVERY_WINDOW)
        return since_filter(spec.partition_by, (start - REDELIVERY_WINDOW).date())
    return partition_filter(spec.partition_by, partition_days(
        r.get(spec.partition_by) for r in rows))


def bq_call(fn: Callable[[], Any], patience: float | None = None) -> Any:
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

    return bq_call(attempt, patience)

