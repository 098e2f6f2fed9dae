"""``bucketlens status``: is the stream keeping up? One look at the subscription and the tables.

    bucketlens status            # a few lines; exit 1 when the stream is behind or stopped
    bucketlens status --json     # backlog, oldest_unacked_s, last_batch_at, rows_last_minute, …

The backlog is measured by *peeking*: pull what the subscription would hand a new reader
without acknowledging it, then hand it straight back (``modify_ack_deadline`` 0). A running
stream leases every message it reads, so what a peek sees is what nobody is reading. This
works on the emulator and on Pub/Sub alike (Cloud Monitoring's ``num_undelivered_messages`` is
not emulated); each peek counts as one delivery attempt towards the subscription's
dead-letter policy (``Settings.max_delivery_attempts``, 20 by default), so run it by hand,
not in a tight loop. https://cloud.google.com/pubsub/docs/pull#unary_pull

Table reads are bounded by constant partition filters (``pipeline.bigquery.sql``): predictions by
``object_created`` over the redelivery window, dead letters by ``recorded_at`` over the hour.
SQL text, the verdict and rendering are pure; ``collect`` and ``peek_backlog`` do the I/O.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pipeline.bigquery.sql import REDELIVERY_WINDOW, since_filter, ts_literal
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.names import printable
from pipeline.times import utc

if TYPE_CHECKING:
    from google.cloud import bigquery

# What `status --json` prints, in this order (issue 27).
JSON_KEYS = ("backlog", "oldest_unacked_s", "last_batch_at", "rows_last_minute",
             "dead_letters_last_hour", "model_version")
PEEK_CAP = 5000  # messages counted at most; the backlog reads "≥ 5000" beyond
PULL_MAX = 1000  # messages per pull request (Pub/Sub's maximum for unary pull)


@dataclass(frozen=True)
class Backlog:
    """What a peek saw: how many messages nobody holds, and the oldest one's publish time."""

    count: int
    oldest_publish: datetime | None
    capped: bool = False  # stopped counting at PEEK_CAP


@dataclass(frozen=True)
class StreamStatus:
    subscription: str
    backlog: int
    backlog_capped: bool
    oldest_unacked_s: float
    last_batch_id: int | None
    last_batch_at: datetime | None
    last_batch_rows: int
    rows_last_minute: int
    rows_last_hour: int
    dead_letters_last_minute: int
    dead_letters_last_hour: int
    model: str | None
    model_version: str | None

    def as_json(self) -> dict[str, Any]:
        return {"backlog": self.backlog, "oldest_unacked_s": round(self.oldest_unacked_s, 1),
                "last_batch_at": self.last_batch_at.isoformat() if self.last_batch_at else None,
                "rows_last_minute": self.rows_last_minute,
                "dead_letters_last_hour": self.dead_letters_last_hour,
                "model_version": self.model_version}


# --- pure -------------------------------------------------------------------------------------

def predictions_window(now: datetime) -> datetime:
    """The oldest object_created a streamed row can have: Pub/Sub keeps an unacknowledged
    notification for at most the retention (7 days), so rows written now are of objects
    created since then — the partition bound of every predictions query here."""
    return now - REDELIVERY_WINDOW


def counts_sql(settings: Settings, now: datetime) -> str:
    """Rows written in the last minute and hour (one scan of the window's partitions)."""
    return (f"SELECT COUNTIF(T.processed_at >= {ts_literal(now - timedelta(minutes=1))}) AS minute_,"
            f" COUNTIF(T.processed_at >= {ts_literal(now - timedelta(hours=1))}) AS hour_"
            f" FROM `{settings.table_id}` T"
            f" WHERE {since_filter('object_created', predictions_window(now))}")


def last_batch_sql(settings: Settings, now: datetime) -> str:
    """The stream's newest micro-batch (backfill writes batch_id -1): id, time, rows, model."""
    return (f"SELECT T.batch_id, MAX(T.processed_at) AS at_, COUNT(*) AS rows_,"
            f" MAX(T.model) AS model, MAX(T.model_version) AS model_version"
            f" FROM `{settings.table_id}` T"
            f" WHERE {since_filter('object_created', predictions_window(now))} AND T.batch_id >= 0"
            f" GROUP BY T.batch_id ORDER BY at_ DESC LIMIT 1")


def dead_letters_sql(settings: Settings, now: datetime) -> str:
    """Dead letters recorded in the last minute and hour (the hour's partitions only)."""
    return (f"SELECT COUNTIF(T.recorded_at >= {ts_literal(now - timedelta(minutes=1))}) AS minute_,"
            f" COUNT(*) AS hour_ FROM `{settings.dead_letter_table_id}` T"
            f" WHERE {since_filter('recorded_at', now - timedelta(hours=1))}")


def problems(status: StreamStatus, now: datetime, max_lag_s: float) -> list[str]:
    """Why the stream is unhealthy, in sentences; empty when it keeps up.

    A running stream leases what it reads within a trigger interval, so a message nobody has
    held for ``max_lag_s`` means the stream is stopped (nothing written for as long) or behind.
    """
    if status.backlog == 0 or status.oldest_unacked_s < max_lag_s:
        return []
    waiting = (f"{'≥ ' if status.backlog_capped else ''}{status.backlog} message(s) wait, "
               f"the oldest for {status.oldest_unacked_s:.0f} s")
    idle = (status.last_batch_at is None
            or (now - status.last_batch_at).total_seconds() >= max_lag_s)
    if idle:
        return [f"stopped: {waiting} and no batch wrote rows in the last {max_lag_s:g} s "
                "(is `bucketlens run` running?)"]
    return [f"behind: {waiting} (more than --max-lag {max_lag_s:g} s)"]


def _ago(t: datetime | None, now: datetime) -> str:
    if t is None:
        return "never"
    return f"{t.isoformat(timespec='seconds')} ({(now - t).total_seconds():.0f} s ago)"


def render(status: StreamStatus, now: datetime, found: list[str]) -> str:
    """The terminal view; model names come from rows, so they are escaped."""
    batch = ("none yet" if status.last_batch_id is None else
             f"#{status.last_batch_id} at {_ago(status.last_batch_at, now)}, "
             f"{status.last_batch_rows} row(s)")
    model = (f"{printable(status.model)} (version {printable(status.model_version or '?')})"
             if status.model else "no rows yet")
    lines = [
        f"subscription  {status.subscription}",
        f"backlog       {'≥ ' if status.backlog_capped else ''}{status.backlog} message(s), "
        f"oldest unacked {status.oldest_unacked_s:.0f} s",
        f"last batch    {batch}",
        f"rows          {status.rows_last_minute} last minute, {status.rows_last_hour} last hour",
        f"dead letters  {status.dead_letters_last_minute} last minute, "
        f"{status.dead_letters_last_hour} last hour",
        f"model         {model}",
        "health        " + ("; ".join(found) if found else "ok"),
    ]
    return "\n".join(lines)


# --- I/O --------------------------------------------------------------------------------------

def peek_backlog(settings: Settings, cap: int = PEEK_CAP, wait_s: float = 3.0) -> Backlog:
    """Pull without acknowledging, then hand every message back at once (see the module doc)."""
    from google.api_core import exceptions as gexc

    from pipeline import clients

    sub = clients.subscriber_client(settings)
    ack_ids: list[str] = []
    oldest: datetime | None = None
    try:
        while len(ack_ids) < cap:
            try:  # return_immediately is deprecated for readers that wait for messages; a
                # peek wants exactly "what is there now" (the emulator honours it too)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    resp = sub.pull(request={"subscription": settings.subscription_path,
                                             "max_messages": min(PULL_MAX, cap - len(ack_ids)),
                                             "return_immediately": True},
                                    timeout=wait_s, retry=None)
            except gexc.DeadlineExceeded:
                break
            if not resp.received_messages:
                break
            for m in resp.received_messages:
                ack_ids.append(m.ack_id)
                t = utc(m.message.publish_time)
                oldest = t if oldest is None or t < oldest else oldest
    except gexc.NotFound:
        raise UserError(f"subscription {settings.subscription_path} does not exist: provision it "
                        "with `python -m deploy apply` (or `bucketlens local up`).") from None
    finally:
        for i in range(0, len(ack_ids), PULL_MAX):  # back to the subscription, now
            sub.modify_ack_deadline(request={"subscription": settings.subscription_path,
                                             "ack_ids": ack_ids[i:i + PULL_MAX],
                                             "ack_deadline_seconds": 0})
    return Backlog(len(ack_ids), oldest, capped=len(ack_ids) >= cap)


def _rows(bq: bigquery.Client, sql: str) -> list:
    from google.api_core import exceptions as gexc

    from pipeline.bigquery.sql import run_query

    try:
        return run_query(bq, sql)[1]
    except gexc.NotFound as exc:
        raise UserError(f"{exc.message}: provision the tables with `python -m deploy apply` "
                        "(or `bucketlens local up`).") from None


def collect(settings: Settings, now: datetime | None = None) -> StreamStatus:
    from pipeline import clients

    backlog = peek_backlog(settings)
    now = now or datetime.now(UTC)
    bq = clients.bigquery_client(settings)
    (c,) = _rows(bq, counts_sql(settings, now))
    last = _rows(bq, last_batch_sql(settings, now))
    (d,) = _rows(bq, dead_letters_sql(settings, now))
    b = last[0] if last else None
    at = b["at_"] if b else None
    return StreamStatus(
        subscription=settings.subscription_path,
        backlog=backlog.count, backlog_capped=backlog.capped,
        oldest_unacked_s=max(0.0, (now - backlog.oldest_publish).total_seconds())
        if backlog.oldest_publish else 0.0,
        last_batch_id=int(b["batch_id"]) if b else None,
        last_batch_at=utc(at) if at else None,
        last_batch_rows=int(b["rows_"]) if b else 0,
        rows_last_minute=int(c["minute_"] or 0), rows_last_hour=int(c["hour_"] or 0),
        dead_letters_last_minute=int(d["minute_"] or 0), dead_letters_last_hour=int(d["hour_"] or 0),
        model=b["model"] if b else None, model_version=b["model_version"] if b else None)


def run_status(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    status = collect(settings)
    now = datetime.now(UTC)
    found = problems(status, now, args.max_lag)
    if args.json:
        print(json.dumps(status.as_json()))
        for line in found:
            print(f"bucketlens status: {line}", file=sys.stderr)
    else:
        print(render(status, now, found))
    return 1 if found else 0
