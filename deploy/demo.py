"""``bucketlens demo``: the whole product on the embedded local stack, in one command.

local up → replay the bundled sample photos → stream until every upload is a row (or the
timeout) → print what the model saw → local down, or with ``keep`` leave the stack and its rows
up and say what to run next (``status``, ``sql``, ``dashboard``, ``report``). The last stdout
line (printed by the CLI) is one JSON object: uploaded, rows, distinct_keys, errors, seconds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from deploy import localstack
from pipeline.config import Settings

console = Console(stderr=True)

SUMMARY_SQL = """
SELECT true_label, top1_label, COUNT(*) AS n, ROUND(AVG(top1_prob), 3) AS avg_prob
FROM `{table}` WHERE bucket = @bucket
GROUP BY true_label, top1_label ORDER BY true_label, n DESC
"""
COUNTS_SQL = """
SELECT COUNT(*) AS rows_,
       COUNT(DISTINCT CONCAT(bucket, '/', name, '#', CAST(generation AS STRING))) AS keys_,
       COUNTIF(status NOT IN ('ok', 'low_confidence')) AS errors
FROM `{table}` WHERE bucket = @bucket
"""


def _query(bq, sql: str, bucket: str) -> list:
    from google.cloud import bigquery

    cfg = bigquery.QueryJobConfig(query_parameters=[
        bigquery.ScalarQueryParameter("bucket", "STRING", bucket)])
    return list(bq.query(sql, job_config=cfg).result())


def counts(bq, settings: Settings) -> tuple[int, int, int]:
    row = _query(bq, COUNTS_SQL.format(table=settings.table_id), settings.bucket)[0]
    return int(row["rows_"]), int(row["keys_"]), int(row["errors"] or 0)


def run(images: int = 60, rate: float = 10.0, timeout: float = 600.0,
        run_dir: Path = Path(".bucketlens/demo"), model: str | None = None,
        keep: bool = False) -> dict:
    started = time.monotonic()
    console.rule("[bold]bucketlens demo")
    console.print(f"starting the local stack in {run_dir} …")
    state = localstack.up(run_dir)
    try:
        with localstack.environment(state.env()):
            summary = _stream_samples(Settings.from_env(model=model), images, rate, timeout)
    except BaseException:
        localstack.down(run_dir)
        raise
    if keep:
        console.print(next_steps(run_dir))
    else:
        localstack.down(run_dir)
    return {**summary, "seconds": round(time.monotonic() - started, 1)}


def next_steps(run_dir: Path) -> str:
    """What to run against the stack ``--keep`` left up (pure)."""
    env = f'eval "$(bucketlens local env --run-dir {run_dir})"'
    return "\n".join([
        f"The local stack is still up in {run_dir}, with the demo's rows. Next:",
        f"  {env}",
        '  bucketlens sql "SELECT top1_label, COUNT(*) AS n FROM predictions GROUP BY 1 ORDER BY n DESC"',
        "  bucketlens status",
        "  bucketlens dashboard             # http://127.0.0.1:8000",
        "  bucketlens produce --sample --rate 2 --limit 20 & bucketlens run   # more uploads, live",
        f"  bucketlens local down --run-dir {run_dir}    # when done",
    ])


def _stream_samples(settings: Settings, images: int, rate: float, timeout: float) -> dict:
    """Stream, replay the sample photos, and wait until every upload is a row."""
    from pipeline import clients
    from pipeline.model import handler
    from pipeline.model.classfolders import discover
    from pipeline.stream import job as stream
    from producer.datasets import sample_dataset
    from producer.replay import replay

    console.print(f"loading model {settings.model} …")
    handler.get_handler(settings)
    dataset = sample_dataset()
    items = discover(dataset)
    console.print(f"sample set: {len(items)} real photos in "
                  f"{len({i.class_name for i in items})} classes ({dataset})")
    console.print("starting Spark and the stream …")
    query, _ = stream.start(settings)
    try:
        console.print(f"uploading {images} images at {rate:g}/s into gs://{settings.bucket} …")
        uploads = replay(items, settings, rate=rate, limit=images, loop=True, seed=0,
                         progress=False)
        bq = clients.bigquery_client(settings)
        rows = keys = errors = 0
        deadline = time.monotonic() + timeout
        with console.status("waiting for rows in BigQuery …") as status:
            while time.monotonic() < deadline:
                if query.exception():
                    raise RuntimeError(f"the stream failed: {query.exception()}")
                rows, keys, errors = counts(bq, settings)
                status.update(f"rows in BigQuery: {rows}/{uploads.uploaded}")
                if rows >= uploads.uploaded:
                    break
                time.sleep(1.0)
        _print_summary(bq, settings)
    finally:
        query.stop()
    return {"uploaded": uploads.uploaded, "rows": rows, "distinct_keys": keys,
            "errors": errors + uploads.failed}


def _print_summary(bq, settings: Settings) -> None:
    table = Table(title=f"what {settings.model} saw (SELECT true_label, top1_label, COUNT(*) …)")
    for col in ("true_label", "top1_label", "n", "avg_prob"):
        table.add_column(col, justify="right" if col in ("n", "avg_prob") else "left")
    for r in _query(bq, SUMMARY_SQL.format(table=settings.table_id), settings.bucket):
        table.add_row(str(r["true_label"]), str(r["top1_label"]), str(r["n"]), str(r["avg_prob"]))
    Console(file=sys.stdout).print(table)
