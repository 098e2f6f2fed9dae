"""Scale benchmark of the BigQuery sink: one batch's write into a small and a large table.

    .venv/bin/python bench/sink.py            # 10k and 1M rows; ~2-3 min on 2 cores
    .venv/bin/python bench/sink.py --huge     # adds 5M rows
    .venv/bin/python bench/sink.py --json     # stdout is only the JSON line

Starts its own local stack (``deploy.localstack.up`` in a temporary directory, ``down`` in a
``finally``). Per table size it fills a predictions table with one INSERT … SELECT FROM
UNNEST(GENERATE_ARRAY(…)) whose rows are spread evenly over ``--days`` days of
``object_created``, inserted in day order, then times what the stream does per micro-batch
with BigQuery — ``existing_keys`` for the batch's notifications, then ``write`` of its rows —
for fresh keys created on the newest day:

* ``new``: sink_mode ``append`` (bounded lookup, bounded re-check, one AppendRows call);
* ``old``: the previous design, reproduced with sink_mode ``merge`` and no partition bound
  (unbounded existing-keys query, staging table, load job, unbounded MERGE, drop);
* ``merge``: sink_mode ``merge`` as it is now (bounded ON clause), for reference.

bqemulator copies the whole table after every write to serve time travel (O(table) per write,
on every write path; real BigQuery does nothing of the kind): the bench turns that off in its
own emulator (``deploy/bq_emulator.py``) unless ``--emulator-snapshots``.
bqemulator is DuckDB: no partitions, so it cannot show what real BigQuery bills. The rows are
inserted in day order, so DuckDB's min/max zone maps skip row groups outside a constant time
range much as BigQuery skips partitions; the billing side comes from a cost model instead:
bytes of the columns each query reads, in the partitions it reads, with the 10 MB minimum per
table referenced (https://cloud.google.com/bigquery/pricing#on_demand_pricing). BigQuery's
column sizes: STRING 2 + UTF-8 bytes, INT64 and TIMESTAMP 8
(https://cloud.google.com/bigquery/pricing#data_size_calculation).

The last stdout line is one JSON object: rows_small, rows_large, batch_s_small, batch_s_large,
growth, statements_per_batch (the new design's), then old_* / merge_* figures and the modelled
billed bytes per batch (billed_new_*, billed_old_*).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy import localstack  # noqa: E402
from pipeline import clients  # noqa: E402
from pipeline.bigquery import rows as bigquery_rows  # noqa: E402
from pipeline.bigquery import sinks  # noqa: E402
from pipeline.bigquery import sql as bigquery_sql  # noqa: E402
from pipeline.bigquery.catalog import load_schema  # noqa: E402
from pipeline.config import Settings  # noqa: E402
from pipeline.notifications import Notification, ObjectKey  # noqa: E402

MIN_BILLED = 10 * 1024 * 1024  # on-demand: 10 MB minimum per table referenced by a query
START = datetime(2025, 1, 1, tzinfo=UTC)
BUCKET = "bench-bucket"


def err(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def fill(client: Any, table_id: str, rows: int, days: int) -> float:
    """``rows`` rows over ``days`` days of object_created, in day order; seconds taken."""
    started = time.monotonic()
    sql = f"""INSERT INTO `{table_id}` (bucket, name, generation, status, model, top1_class_id,
  top1_label, top1_prob, top5, processed_at, object_created, batch_id, true_label)
SELECT '{BUCKET}', CONCAT('fill/', CAST(i AS STRING), '.jpg'), i, 'ok', 'bench', 985, 'daisy',
  0.75, [STRUCT(985 AS class_id, 'daisy' AS label, 0.75 AS prob)],
  TIMESTAMP_ADD(TIMESTAMP '{START:%Y-%m-%d} 00:00:00+00', INTERVAL DIV(i * {days}, {rows + 1}) DAY),
  TIMESTAMP_ADD(TIMESTAMP '{START:%Y-%m-%d} 00:00:00+00', INTERVAL DIV(i * {days}, {rows + 1}) DAY),
  0, 'daisy'
FROM UNNEST(GENERATE_ARRAY(1, {rows})) AS i"""
    client.query(sql).result()
    return time.monotonic() - started


def key_bytes(client: Any, table_id: str, columns: str, where: str = "TRUE") -> int:
    """What BigQuery would bill for reading ``columns`` of the rows ``where`` selects."""
    sizes = {"bucket": "2 + LENGTH(bucket)", "name": "2 + LENGTH(name)", "generation": "8",
             "object_created": "8"}
    expr = " + ".join(sizes[c] for c in columns.split(","))
    row = next(iter(client.query(
        f"SELECT IFNULL(SUM({expr}), 0) AS b FROM `{table_id}` AS T WHERE {where}").result()))
    return int(row["b"])


def batch(size: int, day: datetime, tag: str) -> tuple[list[Notification], list[dict]]:
    """``size`` fresh notifications created on ``day`` and their classified rows."""
    notes = [Notification(ObjectKey(BUCKET, f"batch/{tag}/{i}.jpg", 10**15 + i), "OBJECT_FINALIZE",
                          event_time=day + timedelta(seconds=i), created=day + timedelta(seconds=i),
                          size=1000, content_type="image/jpeg")
             for i in range(size)]
    rows = [bigquery_rows.build_row(n, status="ok", model="bench", topk=[(985, "daisy", 0.75)],
                           batch_id=1) for n in notes]
    return notes, rows


@contextmanager
def unbounded() -> Iterator[None]:
    """The old design: no partition filter anywhere."""
    original = bigquery_sql.row_bound
    bigquery_sql.row_bound = lambda spec, rows: ""  # type: ignore[assignment]
    try:
        yield
    finally:
        bigquery_sql.row_bound = original  # type: ignore[assignment]


def one_batch(bq: sinks.BigQuerySink, notes: list[Notification], rows: list[dict], mode: str
              ) -> tuple[float, Counter[str]]:
    """What the stream does with BigQuery per batch; seconds and calls. ``new``: a steady
    batch — the stream's in-run memory knows its keys are new, so the write looks nothing up
    (``verify=()``); ``start``: a batch right after a start (or of redelivered messages) —
    one bounded lookup, then the same write; ``old`` / ``merge``: lookup, then a write that
    re-checks every key, as before."""
    before = Counter(bq.calls)
    started = time.monotonic()
    if mode == "old":
        with unbounded():
            done = bq.existing_keys([n.key for n in notes])  # bare keys: no bound, as before
            inserted = bq.write(rows, batch_id=1)
    elif mode == "new":
        done, inserted = set(), bq.write(rows, batch_id=1, verify=())
    elif mode == "start":
        done = bq.existing_keys(notes)
        inserted = bq.write(rows, batch_id=1, verify=())
    else:
        done = bq.existing_keys(notes)
        inserted = bq.write(rows, batch_id=1)
    seconds = time.monotonic() - started
    assert not done and inserted == len(rows), (len(done), inserted)
    return seconds, bq.calls - before


def measure(settings: Settings, mode: str, size: int, day: datetime, repeats: int, label: str
            ) -> tuple[float, Counter[str]]:
    bq = sinks.BigQuerySink(settings.replace(
        sink_mode="append" if mode in ("new", "start") else "merge"))
    times, calls = [], Counter()
    for r in range(repeats + 1):  # the first is a warm-up (clients, channels, caches)
        notes, rows = batch(size, day, f"{label}-{mode}-{r}")
        seconds, calls = one_batch(bq, notes, rows, mode)
        if r:
            times.append(seconds)
    return statistics.median(times), calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="stdout is only the JSON line")
    p.add_argument("--batch", type=int, default=200, help="rows per batch (default 200)")
    p.add_argument("--small", type=int, default=10_000)
    p.add_argument("--large", type=int, default=1_000_000)
    p.add_argument("--huge", action="store_true", help="also 5,000,000 rows")
    p.add_argument("--days", type=int, default=365, help="days the rows are spread over")
    p.add_argument("--repeats", type=int, default=5, help="timed batches per figure (median)")
    p.add_argument("--emulator-snapshots", action="store_true",
                   help="keep bqemulator's time-travel copy of the whole table after every write")
    args = p.parse_args(argv)
    if not args.emulator_snapshots:  # an emulator artifact: O(table) per write, on every path
        os.environ["BUCKETLENS_BQ_EMULATOR_NO_SNAPSHOTS"] = "1"
    sizes = {"small": args.small, "large": args.large, **({"huge": 5_000_000} if args.huge else {})}

    run_dir = Path(tempfile.mkdtemp(prefix="bucketlens-bench-sink-"))
    out: dict[str, Any] = {"batch_rows": args.batch, "days": args.days,
                           "emulator_snapshots": args.emulator_snapshots}
    try:
        err(f"starting the local stack in {run_dir} …")
        state = localstack.up(run_dir, Settings(), provision=False)
        base = state.settings(Settings())
        client = clients.bigquery_client(base)
        for label, size in sizes.items():
            from google.cloud import bigquery

            settings = base.replace(dataset=f"bench_{label}")
            client.create_dataset(f"{settings.project}.{settings.dataset}", exists_ok=True)
            client.create_table(bigquery.Table(settings.table_id, schema=load_schema("predictions")))
            seconds = fill(client, settings.table_id, size, args.days)
            last_day = START + timedelta(days=args.days - 1)
            err(f"{label}: {size:,} rows over {args.days} days filled in {seconds:.1f}s")
            out[f"rows_{label}"] = size
            for mode in ("new", "start", "old", "merge"):
                t, calls = measure(settings, mode, args.batch, last_day + timedelta(hours=12),
                                   args.repeats, label)
                prefix = "" if mode == "new" else f"{mode}_"
                out[f"{prefix}batch_s_{label}"] = round(t, 4)
                out[f"{prefix}statements_per_batch"] = sum(calls.values())
                out[f"{prefix}calls_per_batch"] = dict(calls)
                err(f"  {mode:5s}: {t * 1000:7.1f} ms per batch, calls {dict(calls)}")
            # the cost model: what each design's queries would bill on real BigQuery
            day = bigquery_sql.partition_filter("object_created", [last_day.date()])
            partition = key_bytes(client, settings.table_id, "bucket,name,generation,object_created",
                                  day)
            table = key_bytes(client, settings.table_id, "bucket,name,generation")
            staging = args.batch * 600  # a staging table of one batch: far under the minimum
            out[f"billed_new_{label}"] = 0  # a steady batch runs no query
            out[f"billed_start_{label}"] = max(MIN_BILLED, partition)  # one bounded lookup
            out[f"billed_old_{label}"] = (max(MIN_BILLED, table)  # existing_keys
                                          + max(MIN_BILLED, table) + max(MIN_BILLED, staging))
            out[f"partition_key_bytes_{label}"] = partition
            out[f"table_key_bytes_{label}"] = table
            err(f"  model: a day partition's key columns {partition:,} B, the table's "
                f"{table:,} B → billed per batch new {out[f'billed_new_{label}']:,} B, old "
                f"{out[f'billed_old_{label}']:,} B")
            client.delete_dataset(f"{settings.project}.{settings.dataset}", delete_contents=True)
    finally:
        localstack.down(run_dir)
    for prefix in ("", "start_", "old_", "merge_"):
        out[f"{prefix}growth"] = round(out[f"{prefix}batch_s_large"] / out[f"{prefix}batch_s_small"], 3)
    head = {k: out.pop(k) for k in ("rows_small", "rows_large", "batch_s_small", "batch_s_large",
                                    "growth", "statements_per_batch")}
    if not args.json:
        err(json.dumps({**head, **out}, indent=1))
    print(json.dumps({**head, **out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
