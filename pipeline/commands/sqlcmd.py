"""``bucketlens sql "SELECT …"``: your own query against the configured project.

    eval "$(bucketlens local env)"
    bucketlens sql "SELECT top1_label, COUNT(*) AS n FROM bucketlens.predictions GROUP BY 1"
    bucketlens sql --json "SELECT * FROM bucketlens.report_2_status_counts"

The same client every command uses (``pipeline.clients``), so the local stack and a real project
are one code path; the default dataset is ``BUCKETLENS_DATASET``, so tables need no project
prefix. Cells are printed escaped: object names and labels come from uploaders.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.names import printable


def json_value(value: Any) -> Any:
    """A BigQuery cell as JSON: times as ISO 8601, NUMERIC as a string (no float rounding),
    BYTES as base64; records and arrays recursively (pure)."""
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, Mapping):
        return {k: json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return value


def cell(value: Any, limit: int = 80) -> str:
    """One table cell: NULL for None, records/arrays as compact JSON, escaped and cut (pure)."""
    if value is None:
        return "NULL"
    if isinstance(value, Mapping | list | tuple):
        value = json.dumps(json_value(value), separators=(",", ":"))
    elif not isinstance(value, str):
        value = json_value(value)
    return printable(str(value), limit)


def json_lines(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Iterable[str]:
    for r in rows:
        yield json.dumps({c: json_value(v) for c, v in zip(columns, r, strict=True)})


def run_sql(args: argparse.Namespace) -> int:
    if not args.query.strip():
        raise UserError('give the query as one argument: bucketlens sql "SELECT …".')
    if args.max_rows < 0:
        raise UserError(f"--max-rows must be 0 (all) or more, got {args.max_rows}.")
    settings = Settings.from_env()
    from google.api_core import exceptions as gexc
    from google.cloud import bigquery

    from pipeline import clients
    from pipeline.retry import call_with_retries, is_bq_transient

    bq = clients.bigquery_client(settings)
    config = bigquery.QueryJobConfig(
        default_dataset=bigquery.DatasetReference(settings.project, settings.dataset))

    def attempt() -> tuple[list[str], list[tuple]]:
        result = bq.query(args.query, job_config=config, retry=None, job_retry=None).result(
            retry=None, job_retry=None, max_results=args.max_rows or None)
        return [f.name for f in result.schema], [tuple(r.values()) for r in result]

    try:
        columns, rows = call_with_retries(attempt, transient=is_bq_transient)
    except (gexc.BadRequest, gexc.NotFound, gexc.Forbidden) as exc:
        raise UserError(f"the query failed: {printable(exc.message, 500)}") from None
    if args.json:
        for line in json_lines(columns, rows):
            print(line)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, box=None, highlight=False)
    for r in rows:
        table.add_row(*(cell(v) for v in r))
    Console(file=sys.stdout, markup=False, emoji=False).print(table)
    print(f"{len(rows)} row(s)" + (f" (--max-rows {args.max_rows})"
                                    if args.max_rows and len(rows) == args.max_rows else ""),
          file=sys.stderr)
    return 0
