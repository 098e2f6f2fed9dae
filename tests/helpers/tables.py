"""What landed in a predictions table, in the one shape the end-to-end tests compare."""

from __future__ import annotations

from pipeline import clients
from pipeline.config import Settings


def counts(settings: Settings) -> tuple[int, int, int]:
    """(rows, distinct (name, generation) keys, error rows) of the settings' predictions table."""
    bq = clients.bigquery_client(settings)
    row = next(iter(bq.query(
        "SELECT COUNT(*) AS n, COUNT(DISTINCT CONCAT(name, '#', CAST(generation AS STRING))) AS k, "
        f"COUNTIF(status NOT IN ('ok', 'low_confidence')) AS e FROM `{settings.table_id}`"
    ).result()))
    return int(row["n"]), int(row["k"]), int(row["e"] or 0)
