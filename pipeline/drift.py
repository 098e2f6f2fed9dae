"""Drift: how each window of uploads compares with a baseline window, in SQL.

The numbers come from ``schemas/views/drift_windows.sql`` (and ``similar_4_embedding_drift.sql``
where embeddings are stored): per window of ``object_created`` (``drift_window``: ``hour``,
``day`` or seconds) against the baseline window (the second with rows — the first, where
uploads began, is rarely whole — or the one holding ``drift_baseline``):

* ``class_mix``: Jensen–Shannon divergence (base 2: 0 = same mix, 1 = disjoint) of the top-1
  label shares;
* ``confidence_drop``: the baseline's median top-1 probability minus the window's;
* ``low_margin_rise``: the window's share of rows whose top-1 and top-2 probabilities are
  closer than ``LOW_MARGIN``, minus the baseline's;
* ``embedding_shift``: cosine distance between the window's and the baseline's mean embedding.

The stream runs the same SQL (``window_sql``) for a window once it sees an upload from a later
window (``Watch``), and publishes what a drift rule (``pipeline.stream.alerts``) says crossed its
threshold. Uploads of a window that arrive after it was judged count in the views, not in its
alert. Pure: ``pipeline.stream.alerts.judge`` runs the SQL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.times import iso_time

METRICS = ("class_mix", "confidence_drop", "low_margin_rise", "embedding_shift")
WINDOWS = {"minute": 60, "hour": 3600, "day": 86400}
LOW_MARGIN = 0.1  # top-1 minus top-2 probability below this: the model could not decide
_SECONDS = re.compile(r"^\s*(\d+)\s*s?\s*$")
VIEW = "drift_windows"
EMBEDDING_VIEW = "embedding_drift"


def window_seconds(text: str) -> int:
    """``hour`` → 3600, ``day`` → 86400, ``90`` or ``90s`` → 90; ValueError otherwise."""
    if text in WINDOWS:
        return WINDOWS[text]
    m = _SECONDS.match(text)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"drift_window {text!r} is invalid: give {', '.join(WINDOWS)} or a "
                         "number of seconds such as 600")
    return int(m.group(1))


def parse_baseline(text: str) -> datetime | None:
    """``drift_baseline``: empty (the second window with rows) or an ISO 8601 time inside the
    baseline window (naive = UTC)."""
    if not text:
        return None
    try:
        return iso_time(text)
    except (ValueError, OverflowError):
        raise ValueError(f"drift_baseline {text!r} is invalid: give an ISO 8601 time inside "
                         "the baseline window, or nothing for the first window") from None


def window_start(t: datetime, seconds: int) -> datetime:
    epoch = int(t.timestamp())
    return datetime.fromtimestamp(epoch - epoch % seconds, UTC)


def template_values(settings: Any) -> dict[str, str]:
    """What ``schemas/views/drift_*.sql`` and ``similar_4_embedding_drift.sql`` fill in."""
    seconds = window_seconds(settings.drift_window)
    baseline = parse_baseline(settings.drift_baseline)
    return {
        "drift_window_seconds": str(seconds),
        # the baseline window's start: the first window, or the one holding drift_baseline
        # the second window with rows (the first, where uploads began, is rarely whole), or
        # the one holding drift_baseline; an aggregate either way, so the CTE is one row
        "drift_baseline": ("MIN(IF(n = LEAST(2, windows), window_start, NULL))" if baseline is None else
                           f"MIN(TIMESTAMP_SECONDS({int(window_start(baseline, seconds).timestamp())}))"),
        "low_margin": repr(LOW_MARGIN),
    }


def _select(view_sql: str) -> str:
    """A view file's SELECT, without ``CREATE OR REPLACE VIEW … AS``."""
    m = re.search(r"CREATE\s+OR\s+REPLACE\s+VIEW\s+`[^`]+`\s+AS\s", view_sql, re.IGNORECASE)
    if not m:
        raise ValueError("not a view file")
    return view_sql[m.end():]


def window_sql(view_sql: str, start: datetime, end: datetime) -> str:
    """The rendered view's rows for windows starting in [start, end), with this run's window
    and baseline (a view keeps the ones it was created with)."""
    return (f"SELECT * FROM ({_select(view_sql)}) "
            f"WHERE window_start >= TIMESTAMP_SECONDS({int(start.timestamp())}) "
            f"AND window_start < TIMESTAMP_SECONDS({int(end.timestamp())}) ORDER BY window_start")


@dataclass
class Watch:
    """Which windows the stream judges: a window once an upload from a later one is written.

    A restart must not lose a judgement its predecessor died before publishing: the first
    batch of a run, and every batch while the run warms up (``pipeline.stream.recent``: when a dead
    predecessor's messages come back), judge every window from the one before the oldest row
    in the batch up to the newest seen. A window judged twice publishes once per run
    (``Alerter`` remembers); across a restart it may publish again — at-least-once, as for
    row alerts."""

    seconds: int
    latest: datetime | None = None

    def advance(self, created: Iterable[datetime], warming_up: bool = False
                ) -> tuple[datetime, datetime] | None:
        """The [start, end) of window starts to judge now, given the rows just written."""
        starts = [window_start(t, self.seconds) for t in created]
        if not starts:
            return None
        oldest, newest = min(starts), max(starts)
        if self.latest is None or warming_up:
            end = newest if self.latest is None else max(newest, self.latest)
            self.latest = end
            return oldest - timedelta(seconds=self.seconds), end
        if newest <= self.latest:
            return None
        judged, self.latest = (self.latest, newest), newest
        return judged


def merge_embedding(windows: list[dict], shifts: Iterable[Mapping[str, Any]]) -> list[dict]:
    """``windows`` with ``embedding_shift`` from the embedding view's rows (same window_start)."""
    by_start = {r["window_start"]: r["embedding_shift"] for r in shifts}
    return [{**w, "embedding_shift": by_start.get(w["window_start"])} for w in windows]
