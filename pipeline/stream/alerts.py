"""Alert rules: which written rows, and which drift windows, become Pub/Sub messages.

    rules = load_rules("alerts.json")           # refused in one sentence when malformed
    alerter = Alerter(settings, rules)
    ... sink.write(rows) ...
    alerter.after_write(written_rows, found_rows)   # publish, wait for the server's ids

A rule file::

    {"rules": [
      {"name": "cats", "labels": ["tabby", "tiger cat"], "min_probability": 0.8,
       "statuses": ["ok"], "prefix": "uploads/"},
      {"name": "mix-shift", "drift": "class_mix", "threshold": 0.2, "min_images": 20}
    ]}

Row rules match a row's top-1 label and probability (every key but ``name`` optional:
``labels`` absent = any label, ``statuses`` absent = any status). Rules are tried in file
order; the first that matches names the message, so one generation gives at most one message.
Drift rules (``drift`` + ``threshold``) fire on a window of ``pipeline.drift``'s SQL.

Delivery: messages are published after the batch's rows are written and before Spark commits
the batch, and the batch waits for Pub/Sub's acknowledgement — a message is never lost. Each
carries ``dedupe_id``; this run remembers the ids it published, so a replayed batch or a
redelivered notification publishes nothing twice within the run. A key the sink finds already
written (a predecessor wrote it, then may have died before publishing) is published again:
across a crash the guarantee errs on the side of a duplicate, never a loss.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline import drift
from pipeline.config import Settings
from pipeline.drift import METRICS, Watch, window_seconds
from pipeline.errors import UserError
from pipeline.names import printable, split_gs
from pipeline.status import Status
from pipeline.stream.recent import Recent
from pipeline.times import as_utc

log = logging.getLogger("bucketlens.alerts")

ROW_KEYS = {"name", "labels", "min_probability", "statuses", "prefix"}
DRIFT_KEYS = {"name", "drift", "threshold", "min_images"}
MIN_IMAGES = 20  # a drift rule ignores windows with fewer classified images: too few to judge
PUBLISH_TIMEOUT = 60.0  # seconds a batch waits for Pub/Sub to acknowledge its alerts


class BadRules(UserError):
    """A rule file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class RowRule:
    """Matches a written row: top-1 label, its probability, status, object name prefix."""

    name: str
    labels: frozenset[str] | None = None
    min_probability: float = 0.0
    statuses: frozenset[str] | None = None
    prefix: str = ""

    def matches(self, row: Mapping[str, Any]) -> bool:
        if self.statuses is not None and row.get("status") not in self.statuses:
            return False
        if self.labels is not None and row.get("top1_label") not in self.labels:
            return False
        if self.min_probability > 0 and (row.get("top1_prob") or 0.0) < self.min_probability:
            return False
        return str(row.get("name", "")).startswith(self.prefix)


@dataclass(frozen=True)
class DriftRule:
    """Fires when a window's drift metric (``pipeline.drift.METRICS``) reaches ``threshold`` in
    a window of at least ``min_images`` classified images (a handful of rows is noise)."""

    name: str
    drift: str
    threshold: float
    min_images: int = MIN_IMAGES

    def fires(self, window: Mapping[str, Any]) -> bool:
        value = window.get(self.drift)
        return (value is not None and float(value) >= self.threshold
                and int(window.get("images") or 0) >= self.min_images)


@dataclass(frozen=True)
class Rules:
    rows: tuple[RowRule, ...] = ()
    drift: tuple[DriftRule, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.rows or self.drift)

    def first_match(self, row: Mapping[str, Any]) -> RowRule | None:
        return next((r for r in self.rows if r.matches(row)), None)


# --- parsing (pure) -----------------------------------------------------------------------------

def parse_rules(text: str, source: str = "the rule file") -> Rules:
    """The rules in ``text``, or :class:`BadRules` saying in one sentence what is wrong."""
    where = printable(source)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRules(f"{where} is not JSON ({exc.msg} at line {exc.lineno}): see the README's "
                       "alert rule example.") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list) or not doc["rules"]:
        raise BadRules(f'{where} must be a JSON object {{"rules": [...]}} with at least one rule.')
    rows: list[RowRule] = []
    drift: list[DriftRule] = []
    names: set[str] = set()
    for i, raw in enumerate(doc["rules"]):
        rule = _rule(raw, f"{where}: rule {i + 1}")
        if rule.name in names:
            raise BadRules(f"{where}: rule {i + 1} repeats the name {rule.name!r}: names must "
                           "be unique (they name the messages).")
        names.add(rule.name)
        (drift if isinstance(rule, DriftRule) else rows).append(rule)  # type: ignore[arg-type]
    return Rules(tuple(rows), tuple(drift))


def _rule(raw: Any, where: str) -> RowRule | DriftRule:
    if not isinstance(raw, dict):
        raise BadRules(f"{where} is not a JSON object.")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or not name.isprintable():
        raise BadRules(f'{where} needs a "name": a non-empty printable string.')
    where = f"{where} ({printable(name, 60)!r})"
    is_drift = "drift" in raw
    unknown = set(raw) - (DRIFT_KEYS if is_drift else ROW_KEYS)
    if unknown:
        allowed = DRIFT_KEYS if is_drift else ROW_KEYS
        raise BadRules(f"{where} has unknown keys {sorted(unknown)}: a "
                       f"{'drift' if is_drift else 'row'} rule takes {sorted(allowed)}.")
    if is_drift:
        if raw["drift"] not in METRICS:
            raise BadRules(f"{where} watches {printable(str(raw['drift']), 40)!r}: choose one of "
                           f"{', '.join(METRICS)}.")
        threshold = raw.get("threshold")
        if not _number(threshold) or threshold <= 0:
            raise BadRules(f'{where} needs a "threshold" above 0.')
        least = raw.get("min_images", MIN_IMAGES)
        if not isinstance(least, int) or isinstance(least, bool) or least < 1:
            raise BadRules(f'{where}: "min_images" must be a whole number of 1 or more.')
        return DriftRule(name, raw["drift"], float(threshold), least)
    labels = raw.get("labels")
    if labels is not None and (not isinstance(labels, list) or not labels
                               or not all(isinstance(x, str) for x in labels)):
        raise BadRules(f'{where}: "labels" must be a non-empty list of label strings.')
    statuses = raw.get("statuses")
    known = {s.value for s in Status}
    if statuses is not None and (not isinstance(statuses, list) or not statuses
                                 or not set(statuses) <= known):
        raise BadRules(f'{where}: "statuses" must be a non-empty list of '
                       f"{', '.join(sorted(known))}.")
    p = raw.get("min_probability", 0.0)
    if not _number(p) or not 0 <= p <= 1:
        raise BadRules(f'{where}: "min_probability" must be a number from 0 to 1.')
    prefix = raw.get("prefix", "")
    if not isinstance(prefix, str):
        raise BadRules(f'{where}: "prefix" must be a string.')
    return RowRule(name, None if labels is None else frozenset(labels), float(p),
                   None if statuses is None else frozenset(statuses), prefix)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def load_rules(location: str, settings: Settings | None = None) -> Rules:
    """The rules in a local file or ``gs://`` object (read with ``settings``' storage client)."""
    if location.startswith("gs://"):
        from pipeline import clients

        bucket, name = split_gs(location, object_name=True)
        client = clients.storage_client(settings or Settings.from_env())
        text = client.bucket(bucket).blob(name).download_as_text()
    else:
        path = Path(location)
        if not path.is_file():
            raise BadRules(f"no alert rule file at {printable(location)}: give a JSON file "
                           '{"rules": [...]} (README "Alerts").')
        text = path.read_text(encoding="utf-8")
    return parse_rules(text, location)


# --- messages (pure) ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Message:
    data: bytes
    attributes: dict[str, str]

    @property
    def dedupe_id(self) -> str:
        return self.attributes["dedupe_id"]


def dedupe_id(row: Mapping[str, Any]) -> str:
    """``bucket/name#generation``: one per object generation, whatever delivered it."""
    return f"{row['bucket']}/{row['name']}#{row['generation']}"


def row_message(rule: RowRule, row: Mapping[str, Any]) -> Message:
    """The row as the JSON body; what a subscriber filters or routes on as attributes."""
    from pipeline.bigquery.rows import to_ndjson

    prob = row.get("top1_prob")
    return Message(to_ndjson([row]).rstrip(b"\n"), {
        "dedupe_id": dedupe_id(row), "rule": rule.name, "label": row.get("top1_label") or "",
        "probability": "" if prob is None else f"{prob:.6f}",
        "model_version": row.get("model_version") or ""})


def drift_message(rule: DriftRule, window: Mapping[str, Any]) -> Message:
    """One drift window that crossed ``rule``'s threshold; ``dedupe_id`` names rule and window."""
    from pipeline.bigquery.rows import to_ndjson

    start = _iso(window["window_start"])
    return Message(to_ndjson([dict(window)]).rstrip(b"\n"), {
        "dedupe_id": f"drift/{rule.name}/{start}", "rule": rule.name, "drift": rule.drift,
        "value": f"{float(window[rule.drift]):.6f}", "threshold": f"{rule.threshold:g}",
        "window_start": start, "baseline_start": _iso(window.get("baseline_start"))})


def _created(row: Mapping[str, Any]) -> datetime:
    return as_utc(row["object_created"])  # naive = UTC: window starts count from the epoch


def check_fits(rules: Rules, settings: Settings) -> None:
    """Drift rules read BigQuery, and ``embedding_shift`` the stored embeddings."""
    if rules.drift and settings.sink != "bigquery":
        raise BadRules(f"drift rule {rules.drift[0].name!r} reads the drift views in BigQuery: "
                       f"it needs BUCKETLENS_SINK=bigquery, not {settings.sink}.")
    watching = [r.name for r in rules.drift if r.drift == "embedding_shift"]
    if watching and not settings.embeddings:
        raise BadRules(f"drift rule {watching[0]!r} watches embedding_shift: store embeddings "
                       "(--embeddings or BUCKETLENS_EMBEDDINGS=1).")


def _iso(value: Any) -> str:
    return "" if value is None else value.isoformat() if hasattr(value, "isoformat") else str(value)


# --- I/O ---------------------------------------------------------------------------------------

def judge(settings: Settings, client: Any, start: datetime, end: datetime) -> list[dict]:
    """The drift rows of the windows starting in [start, end), from BigQuery: the drift views'
    SQL with this run's window and baseline (a view keeps the ones it was created with)."""
    from pipeline.bigquery.catalog import view_templates
    from pipeline.bigquery.sql import run_query
    from pipeline.bigquery.views import render_view

    templates = dict(view_templates())
    rows = [dict(r.items()) for r in run_query(client, drift.window_sql(
        render_view(templates[f"{drift.VIEW}.sql"], settings), start, end))[1]]
    if rows and settings.embeddings:
        emb = render_view(templates[f"similar_4_{drift.EMBEDDING_VIEW}.sql"], settings)
        rows = drift.merge_embedding(rows, [dict(r.items()) for r in run_query(
            client, drift.window_sql(emb, start, end))[1]])
    return rows


# --- publishing (I/O) ---------------------------------------------------------------------------

class Alerter:
    """Publishes a batch's alerts after its write and waits for them; remembers what it sent."""

    def __init__(self, settings: Settings, rules: Rules, client: Any = None,
                 bigquery: Any = None) -> None:
        self.settings = settings
        self.rules = rules
        self._client = client
        self._bigquery = bigquery
        self.sent = Recent(0)  # dedupe_ids this run published (bounded, oldest forgotten first)
        self.published = 0
        self.watch = Watch(window_seconds(settings.drift_window)) if rules.drift else None

    @classmethod
    def from_settings(cls, settings: Settings) -> Alerter | None:
        """The run's alerter, or None without ``settings.alerts``."""
        if not settings.alerts:
            return None
        rules = load_rules(settings.alerts, settings)
        check_fits(rules, settings)
        return cls(settings, rules)

    @property
    def bigquery(self) -> Any:
        if self._bigquery is None:
            from pipeline import clients

            self._bigquery = clients.bigquery_client(self.settings)
        return self._bigquery

    @property
    def client(self) -> Any:
        if self._client is None:
            from pipeline import clients

            self._client = clients.publisher_client(self.settings)
        return self._client

    def after_batch(self, written: Sequence[Mapping[str, Any]],
                    found: Sequence[Mapping[str, Any]] = (), warming_up: bool = False) -> int:
        """Row alerts for the batch's rows, then drift alerts for the windows its rows closed
        (``pipeline.drift.Watch``). Call after the write, before the batch commits."""
        sent = self.after_write(written, found)
        if self.watch is not None:
            span = self.watch.advance((_created(r) for r in [*written, *found]
                                       if r.get("object_created")), warming_up)
            if span is not None:
                sent += self.after_windows(judge(self.settings, self.bigquery, *span))
        return sent

    def after_write(self, written: Iterable[Mapping[str, Any]],
                    found: Iterable[Mapping[str, Any]] = ()) -> int:
        """Publish an alert for every matching row this batch wrote, and for every matching row
        the sink found already written (its writer may have died before publishing), unless
        this run already published it. Returns the number published."""
        messages = []
        for row in [*written, *found]:
            rule = self.rules.first_match(row)
            if rule is not None:
                messages.append(row_message(rule, row))
        return self.publish(messages)

    def after_windows(self, windows: Iterable[Mapping[str, Any]]) -> int:
        """Publish every (drift rule, window) that crossed its threshold."""
        return self.publish([drift_message(rule, w) for w in windows
                             for rule in self.rules.drift if rule.fires(w)])

    def publish(self, messages: Sequence[Message]) -> int:
        fresh: dict[str, Message] = {}
        for m in messages:
            if m.dedupe_id not in self.sent and m.dedupe_id not in fresh:
                fresh[m.dedupe_id] = m
        if not fresh:
            return 0
        topic = self.settings.alert_topic_path
        futures = [self.client.publish(topic, m.data, **m.attributes) for m in fresh.values()]
        for f in futures:  # an error fails the batch: it is redone, nothing is lost
            f.result(timeout=PUBLISH_TIMEOUT)
        self.sent.remember(fresh)
        self.published += len(fresh)
        log.info("published %d alerts to %s", len(fresh), topic)
        return len(fresh)
