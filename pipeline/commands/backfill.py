"""``bucketlens backfill``: classify the objects already in a bucket, exactly as the stream would.

A stream only sees uploads made after it started. The backfill lists the bucket instead, turns
each live object generation into the ``OBJECT_FINALIZE`` notification GCS would have sent, and
hands it to the stream's own executor code (``classify_partitions``) and sink, so the rows are
the same rows. Everything is keyed on (bucket, name, generation) and written with the sink's
insert-only MERGE, so a backfill can be re-run at any time, also while the stream runs: keys
already in BigQuery are skipped up front, and a race with the stream still inserts one row.

    bucketlens backfill --bucket B [--prefix P] [--since 2024-05-06T00:00Z|6h] [--batch 500]

The listing is processed ``batch`` objects at a time (one existing-keys query, one Spark job and
one MERGE per chunk), so memory stays bounded and an interrupted backfill resumes by re-running.
Chunks are written with negative batch ids (-1, -2, …) so they never look like stream batches.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pipeline.commands.flags import BACKFILL_SETTINGS, settings_from_args
from pipeline.config import Settings
from pipeline.names import printable
from pipeline.notifications import FINALIZE, Notification, ObjectKey, wanted
from pipeline.stream.job import ModelChoice, classify_and_write
from pipeline.stream.triage import own_prefixes
from pipeline.times import utc

if TYPE_CHECKING:
    from google.cloud import storage
    from pyspark.sql import SparkSession

    from pipeline.bigquery.sinks import Sink

log = logging.getLogger("bucketlens.backfill")



@dataclass
class BackfillSummary:
    """What a backfill did: ``listed`` = ``ignored`` + ``skipped_existing`` + ``pending``."""

    listed: int = 0
    skipped_existing: int = 0
    classified: int = 0
    inserted: int = 0  # fewer than classified when the stream wrote some keys meanwhile
    errors: int = 0
    seconds: float = 0.0
    ignored: int = 0  # listed but never classified by the stream either (too large, folders)
    pending: int = 0  # needed classifying; equals ``classified`` unless this was a dry run
    statuses: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The final stdout line: the six headline counts first, then the breakdown."""
        out = {k: v for k, v in asdict(self).items() if k != "statuses"}
        out["seconds"] = round(self.seconds, 3)
        return out


# --- pure pieces ------------------------------------------------------------------------------

def notification(blob: Any) -> Notification:
    """The OBJECT_FINALIZE notification GCS sent (or would have sent) for a listed object."""
    metadata = blob.metadata
    return Notification(
        key=ObjectKey(blob.bucket.name, blob.name, int(blob.generation)),
        event_type=FINALIZE,
        event_time=blob.time_created,
        size=int(blob.size) if blob.size is not None else None,
        content_type=blob.content_type,
        metadata=dict(metadata) if metadata else None,
    )


def selected(blob: Any, own: Sequence[str], since: datetime | None) -> bool:
    """Not the sink's own output, and created or updated at or after ``since``."""
    if blob.name.startswith(tuple(own)):
        return False
    if since is None:
        return True
    changed = blob.updated or blob.time_created
    return changed is not None and changed >= since


def batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of at most ``size`` items from any iterable, consumed lazily."""
    if size < 1:
        raise ValueError("batch size must be >= 1")
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


# --- the shared classify-and-write step -------------------------------------------------------

# --- the backfill -----------------------------------------------------------------------------

def backfill(settings: Settings, spark: SparkSession | None = None, *, prefix: str = "",
             since: datetime | None = None, batch: int = 500, progress: bool = True,
             dry_run: bool = False, sink: Sink | None = None,
             client: storage.Client | None = None) -> BackfillSummary:
    """Classify every live object in ``settings.bucket`` under ``prefix`` that BigQuery lacks.

    ``prefix`` defaults to ``settings.prefix``. A dry run lists and checks BigQuery for existing
    keys but classifies and writes nothing (and starts no Spark). Spark starts on the first
    chunk with work when ``spark`` is None. Raises on a sink failure: chunks already written
    stay written, and a re-run picks up from there.
    """
    from pipeline import clients
    from pipeline.bigquery.sinks import make_sink

    since = utc(since) if since is not None else None
    sink = sink if sink is not None else make_sink("bigquery", settings)
    client = client or clients.storage_client(settings)
    prefix = prefix or settings.prefix
    own = own_prefixes(settings)
    summary = BackfillSummary()
    models: ModelChoice | None = None
    started = time.monotonic()
    listing = (b for b in client.list_blobs(settings.bucket, prefix=prefix or None,
                                            page_size=min(batch, 1000))
               if selected(b, own, since))
    title = f"backfill gs://{settings.bucket}/{prefix}" + (" (dry run)" if dry_run else "")
    with _progress(title, enabled=progress) as show:
        for index, chunk in enumerate(batches(listing, batch), start=1):
            summary.listed += len(chunk)
            todo = []
            for n in map(notification, chunk):
                if wanted(n, ""):
                    summary.ignored += 1
                else:
                    todo.append(n)
            show(summary, f"chunk {index}: checking BigQuery")
            done = sink.existing_keys(todo) if todo else set()  # bounded by creation day
            summary.skipped_existing += len(done)
            todo = [n for n in todo if n.key not in done]
            summary.pending += len(todo)
            if todo and not dry_run:
                show(summary, f"chunk {index}: classifying {len(todo)}")
                if spark is None:
                    from pipeline.stream.spark import session

                    spark = session(settings.spark_master, log_file=settings.spark_log)
                models = models or ModelChoice(settings)
                pinned, model = models.for_batch()  # a location: its current version, per chunk
                written = classify_and_write(spark, todo, pinned, sink, -index, model)
                summary.classified += written.classified
                summary.inserted += written.inserted
                summary.errors += written.errors
                for status, count in written.statuses.items():
                    summary.statuses[status] = summary.statuses.get(status, 0) + count
            log.info("backfill chunk %d: %d listed, %d already done, %d to classify%s", -index,
                     len(chunk), len(done), len(todo), " (dry run)" if dry_run else "")
            summary.seconds = time.monotonic() - started
            show(summary, "listing")
        summary.seconds = time.monotonic() - started
        show(summary, "done")
    return summary


@contextmanager
def _progress(title: str, *, enabled: bool) -> Iterator[Callable[[BackfillSummary, str], None]]:
    """A rich status line on stderr (the listing's length is unknown until it ends)."""
    if not enabled:
        yield lambda summary, stage: None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    counts = ("{task.fields[listed]} listed · {task.fields[skipped]} already done · "
              "{task.fields[classified]} classified · {task.fields[inserted]} inserted · "
              "[red]{task.fields[errors]} errors[/]")
    # The title holds the operator's --prefix: a field, not part of a column's format string
    # (where "{0}" raised and "[red]" was markup), its control characters escaped.
    with Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False),
                  TextColumn(counts), TextColumn("[dim]{task.fields[stage]}"),
                  TimeElapsedColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task(printable(title), total=None, listed=0, skipped=0, classified=0,
                            inserted=0, errors=0, stage="listing")

        def show(summary: BackfillSummary, stage: str) -> None:
            bar.update(task, listed=summary.listed, skipped=summary.skipped_existing,
                       classified=summary.classified, inserted=summary.inserted,
                       errors=summary.errors, stage=stage)

        yield show


# --- command line -----------------------------------------------------------------------------

def run_backfill(args: argparse.Namespace, spark: SparkSession | None = None) -> int:
    """Print the summary as the last stdout line; 0 = every object classified, 1 = error rows."""
    settings = settings_from_args(args, BACKFILL_SETTINGS,
                                  spark_log="" if getattr(args, "verbose", False) else None)
    if not args.dry_run:
        from pipeline.model import handler

        handler.check_model(settings)  # fail fast, in one sentence; executors load it
    summary = backfill(settings, spark, since=args.since, batch=args.batch,
                       progress=True, dry_run=args.dry_run)
    print(json.dumps(summary.as_json()), flush=True)
    return 1 if summary.errors else 0
