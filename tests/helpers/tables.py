"""What landed in a predictions table, in the one shape the end-to-end tests compare."""

from __future__ import annotations

from pipeline import clients
from pipeline.config import Settings
from pipeline.retry import call_with_retries, is_bq_transient


def query(settings: Settings, sql: str) -> list[dict]:
    """Rows of ``sql``, retried like the sink retries (the emulator refuses, rather than queues,
    a query that meets a concurrent append)."""
    bq = clients.bigquery_client(settings)
    return call_with_retries(lambda: [dict(r.items()) for r in bq.query(sql).result()],
                             transient=is_bq_transient)


def counts(settings: Settings) -> tuple[int, int, int]:
    """(rows, distinct (name, generation) keys, error rows) of the settings' predictions table."""
    (row,) = query(settings, (
        "SELECT COUNT(*) AS n, COUNT(DISTINCT CONCAT(name, '#', CAST(generation AS STRING))) AS k, "
        f"COUNTIF(status NOT IN ('ok', 'low_confidence')) AS e FROM `{settings.table_id}`"))
    return int(row["n"]), int(row["k"]), int(row["e"] or 0)
