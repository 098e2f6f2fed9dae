"""``bucketlens compact [--since DATE]``: remove the duplicate rows two racing writers can leave.

The default write path (``pipeline.bigquery.sinks``, sink_mode ``append``) looks keys up and then appends
to the Storage Write API's default stream; two writers that both look up a key before either
appends it (the stream and a backfill, or two consumers of one subscription, in the same
instant) both add it. The views count such a key once (``distinct_predictions``); this command
makes the table itself say so, keeping of each key's copies the one the views show (earliest
processed_at / recorded_at).

One MERGE per table, bounded by a constant filter on the partitioning column, so it reads and
rewrites only the partitions since DATE: BigQuery prunes partitions only on constant filters
(https://cloud.google.com/bigquery/docs/querying-partitioned-tables) and bills DML by the bytes
of the partitions it reads (https://cloud.google.com/bigquery/pricing#on_demand_pricing). The
MERGE deletes every copy of a duplicated key and inserts the kept copy back in the same atomic
statement: a key is never absent, and a run with nothing to do changes nothing. Explicit
column lists (bqemulator has no ``INSERT ROW``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pipeline.bigquery.catalog import DEAD_LETTERS, EVENTS, PREDICTIONS, TableSpec, schema_json
from pipeline.bigquery.sql import run_query, since_filter
from pipeline.config import Settings

if TYPE_CHECKING:
    from google.cloud import bigquery

# Duplicates come from writers racing on keys they are processing now; a week back covers a
# stream that was stalled (quota) or a backfill that ran meanwhile.
DEFAULT_DAYS = 7


def _order(spec: TableSpec) -> str:
    """Which copy is kept: the one ``distinct_predictions`` shows."""
    return f"{spec.order_by}, batch_id, message_id"


def _scalar(field: dict[str, Any]) -> str:
    return {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL"}.get(field["type"],
                                                                          field["type"])


def duplicates_sql(table_id: str, spec: TableSpec, since: date) -> str:
    """Keys with more than one row since ``since``, and how many rows too many (pure)."""
    key = ", ".join(spec.key)
    return (
        "SELECT COUNT(*) AS keys, IFNULL(SUM(n - 1), 0) AS extra FROM (\n"
        f"  SELECT COUNT(*) AS n FROM `{table_id}` AS X\n"
        f"  WHERE {since_filter(spec.partition_by, since, 'X')}\n"
        f"  GROUP BY {key} HAVING COUNT(*) > 1)"
    )


def compact_sql(table_id: str, fields: Sequence[dict[str, Any]], spec: TableSpec,
                since: date) -> str:
    """One MERGE: each duplicated key's rows are deleted (matched by a marker row carrying the
    key in ``_k_*`` columns) and its kept copy is inserted (a source row whose ``_k_*`` are
    NULL, so it never matches). Every scan of the table is bounded by a constant (pure)."""
    columns = [f["name"] for f in fields]
    types = {f["name"]: _scalar(f) for f in fields}
    on = " AND ".join([f"T.{k} = S._k_{k}" for k in spec.key]
                      + [since_filter(spec.partition_by, since, "T")])
    partition = ", ".join(spec.key)
    keep_nulls = ", ".join(f"CAST(NULL AS {types[k]}) AS _k_{k}" for k in spec.key)
    return (
        f"MERGE `{table_id}` AS T\n"
        "USING (\n"
        f"  SELECT {keep_nulls}, {', '.join(columns)} FROM (\n"
        f"    SELECT * FROM `{table_id}` AS X\n"
        f"    WHERE {since_filter(spec.partition_by, since, 'X')}\n"
        f"    QUALIFY COUNT(*) OVER (PARTITION BY {partition}) > 1\n"
        f"      AND ROW_NUMBER() OVER (PARTITION BY {partition} ORDER BY {_order(spec)}) = 1)\n"
        "  UNION ALL\n"
        f"  SELECT {', '.join(spec.key)}, {', '.join('NULL' for _ in columns)}\n"
        f"  FROM `{table_id}` AS Y\n"
        f"  WHERE {since_filter(spec.partition_by, since, 'Y')}\n"
        f"  GROUP BY {partition} HAVING COUNT(*) > 1\n"
        ") AS S\n"
        f"ON {on}\n"
        "WHEN MATCHED THEN DELETE\n"
        f"WHEN NOT MATCHED THEN INSERT ({', '.join(columns)})\n"
        f"VALUES ({', '.join('S.' + c for c in columns)})"
    )


def compact(settings: Settings, since: date, client: bigquery.Client | None = None
            ) -> dict[str, dict[str, int]]:
    """Compact the three tables; per table id: duplicated keys and rows removed."""
    from pipeline import clients

    client = client or clients.bigquery_client(settings)
    out = {}
    for table_id, spec in ((settings.table_id, PREDICTIONS),
                           (settings.dead_letter_table_id, DEAD_LETTERS),
                           (settings.events_table_id, EVENTS)):
        _, rows = run_query(client, duplicates_sql(table_id, spec, since))
        keys, extra = int(rows[0]["keys"]), int(rows[0]["extra"])
        if keys:
            job, _ = run_query(client, compact_sql(table_id, schema_json(spec.schema), spec,
                                                   since))
            stats = job.dml_stats  # real BigQuery: exact counts of this very statement
            if stats is not None and stats.deleted_row_count is not None:
                extra = int(stats.deleted_row_count) - int(stats.inserted_row_count or 0)
        out[table_id] = {"duplicate_keys": keys, "removed": extra}
    return out


def run_compact(args: argparse.Namespace) -> int:
    """Print {table: {duplicate_keys, removed}} as the last stdout line."""
    settings = Settings.from_env()
    since = args.since or (datetime.now(UTC) - timedelta(days=DEFAULT_DAYS)).date()
    print(json.dumps(compact(settings, since)), flush=True)
    return 0
