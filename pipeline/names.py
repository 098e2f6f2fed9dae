"""Names and text from outside: GCP naming rules, checked once, and text made safe to show.

Resource names reach SQL (``project.dataset.table`` inside backticks), request paths and
``gcloud`` command lines, so each is checked against GCP's own naming rules before any client
is built, credentials are looked up or a request is sent: a name GCP would refuse anyway can
never reach a query as an injection. Object names and exception messages come from outside
too; :func:`printable` and :func:`describe` keep them from forging log lines or putting heap
addresses (different on every delivery) into row reasons.

    check("dataset", "bucketlens")              # fine
    check("dataset", "x`; DROP TABLE y; --")    # InvalidName, one sentence
"""

from __future__ import annotations

import ipaddress
import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.config import Settings


class InvalidSetting(UserError, ValueError):
    """A setting GCP or the job would refuse (or misuse); the message is one sentence naming the
    rule, so the CLIs print it as one line and exit 2, like every ``UserError``."""


class InvalidName(InvalidSetting):
    """A resource name GCP would refuse."""


# Project IDs: 6-30 characters, lowercase letters, digits and hyphens, starting with a letter
# and not ending with a hyphen. Legacy domain-scoped projects prefix "example.com:".
# https://cloud.google.com/resource-manager/docs/creating-managing-projects#before_you_begin
# The local stack's project ("bucketlens-local", and anything an emulator test uses) follows
# the same rule, so one check serves both.
_PROJECT = re.compile(r"(?:[a-z][a-z0-9.-]{0,61}[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")

# Datasets: letters, digits and underscores, at most 1,024 characters.
# https://cloud.google.com/bigquery/docs/datasets#dataset-naming
_DATASET = re.compile(r"[A-Za-z0-9_]{1,1024}")

# Tables: Unicode categories L, M, N, Pc (connectors, "_"), Pd (dashes) and Zs (spaces), at
# most 1,024 UTF-8 bytes. https://cloud.google.com/bigquery/docs/tables#table_naming
_TABLE_CATEGORIES = ("L", "M", "N", "Pc", "Pd", "Zs")

# Buckets: 3-63 characters of lowercase letters, digits, "-", "_" and "."; start and end with
# a letter or digit; with dots up to 222 characters, 63 per dot-separated part; not an IP
# address; not starting with "goog" nor containing "google".
# https://cloud.google.com/storage/docs/buckets#naming
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]*[a-z0-9]")

# Topics and subscriptions: start with a letter; letters, digits, "-", "_", ".", "~", "+",
# "%"; 3-255 characters; not starting with "goog".
# https://cloud.google.com/pubsub/docs/pubsub-basics#resource_names
_PUBSUB = re.compile(r"[A-Za-z][A-Za-z0-9._~+%-]{2,254}")


def _fail(kind: str, name: str, rule: str, noun: str = " name") -> InvalidName:
    return InvalidName(f"{kind}{noun} '{printable(name, 80)}' is invalid: {rule}")


def project_id(name: str) -> str:
    if not _PROJECT.fullmatch(name):
        raise _fail("project", name, "a project ID has 6-30 lowercase letters, digits or "
                    "hyphens, starts with a letter and does not end with a hyphen")
    return name


def dataset(name: str) -> str:
    if not _DATASET.fullmatch(name):
        raise _fail("dataset", name, "a BigQuery dataset name has 1-1024 letters, digits or "
                    "underscores")
    return name


def table(name: str) -> str:
    ok = (name and len(name.encode()) <= 1024
          and all(unicodedata.category(c).startswith(_TABLE_CATEGORIES) for c in name))
    if not ok:
        raise _fail("table", name, "a BigQuery table name has at most 1024 bytes of letters, "
                    "marks, numbers, underscores, dashes or spaces")
    return name


def bucket(name: str) -> str:
    parts = name.split(".")
    rule = ("a bucket name has 3-63 lowercase letters, digits, '-', '_' or '.' (222 with dots, "
            "63 between dots), starts and ends with a letter or digit, is not an IP address, "
            "does not start with 'goog' and does not contain 'google'")
    limit = 222 if len(parts) > 1 else 63
    if (not 3 <= len(name) <= limit or not _BUCKET.fullmatch(name)
            or any(not 1 <= len(p) <= 63 for p in parts)
            or name.startswith("goog") or "google" in name or _is_ip(name)):
        raise _fail("bucket", name, rule)
    return name


def pubsub(name: str, kind: str = "topic") -> str:
    if not _PUBSUB.fullmatch(name) or name.startswith("goog"):
        raise _fail(kind, name, f"a Pub/Sub {kind} name has 3-255 letters, digits, "
                    "'-', '_', '.', '~', '+' or '%', starts with a letter and not with 'goog'")
    return name


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# Service account IDs: 6-30 lowercase letters, digits and hyphens, starting with a letter and
# ending with a letter or digit; an email is any service account's, in any project.
# https://cloud.google.com/iam/docs/service-accounts-create#creating
_ACCOUNT_ID = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]")
_ACCOUNT_EMAIL = re.compile(r"[a-z0-9][a-z0-9-]{0,62}@(?:[a-z0-9-]+\.)+gserviceaccount\.com")

# Locations: Cloud Storage, BigQuery and Dataproc name them alike, a multi-region (US, EU), a
# dual-region (NAM4) or a region (us-central1); Cloud Storage takes either case.
# https://cloud.google.com/storage/docs/locations, https://cloud.google.com/bigquery/docs/locations
_LOCATION = re.compile(r"[A-Za-z]{2,}(?:-[A-Za-z]+)*[0-9]{0,3}")


def service_account(name: str) -> str:
    if not (_ACCOUNT_ID.fullmatch(name) or _ACCOUNT_EMAIL.fullmatch(name)):
        raise _fail("service_account", name, "give an account ID of 6-30 lowercase letters, "
                    "digits or hyphens starting with a letter, or a service account's email "
                    "(...@....gserviceaccount.com)", noun="")
    return name


def location(name: str, kind: str = "region", *, empty_ok: bool = False) -> str:
    if not (name == "" and empty_ok) and not (len(name) <= 63 and _LOCATION.fullmatch(name)):
        raise _fail(kind, name, "a location is a multi-region like US, a dual-region like NAM4 "
                    "or a region like us-central1", noun="")
    return name


def object_prefix(prefix: str, kind: str = "object prefix") -> str:
    """An object-name prefix safe to put inside an IAM condition's string literal.

    ``iam.prefix_condition`` writes ``resource.name.startsWith("…/objects/PREFIX")``: a quote
    or a backslash would end or escape that literal (``out") || true || ("`` makes the grant
    unconditional), so neither may appear; GCS object names exclude control characters and
    "." / ".." segments anyway (https://cloud.google.com/storage/docs/objects#naming).
    """
    ok = (len(prefix.encode()) <= 1024 and prefix.isprintable() and not set(prefix) & set('"\\\'')
          and not {".", ".."} & set(prefix.split("/")))
    if not ok:
        raise _fail(kind, prefix, "an object prefix is printable text of at most 1024 bytes, "
                    "with no quote, backslash or '.'/'..' segment", noun="")
    return prefix


GS = "gs://"


def split_gs(uri: str, kind: str = "", *, object_name: bool = False) -> tuple[str, str]:
    """``gs://BUCKET/PATH`` → ``("BUCKET", "PATH")``: the one reading of a GCS URI.

    ``PATH`` comes back as written (empty, or ending in "/", for a prefix); with ``object_name``
    it must name something below the bucket. Another scheme or no bucket is refused in one
    sentence, as a setting (``kind`` given: "jsonl_uri '…' is invalid: …") or as an argument.
    """
    name, _, path = uri.removeprefix(GS).partition("/")
    if uri.startswith(GS) and name and (path.strip("/") or not object_name):
        return name, path
    shape = "gs://BUCKET/NAME" if object_name else "gs://BUCKET/PREFIX"
    if kind:
        raise _fail(kind, uri, f"it must be {shape}", noun="")
    what = "an object URI" if object_name else "a gs:// URI"
    raise InvalidSetting(f"{printable(uri)} is not {what}: give {shape}.")


def gcs_uri(uri: str, kind: str = "jsonl_uri") -> str:
    """``gs://BUCKET/PREFIX`` with a valid bucket name and a prefix :func:`object_prefix` allows."""
    name, prefix = split_gs(uri, kind)
    bucket(name)
    object_prefix(prefix, f"{kind}'s prefix")
    return uri


# Settings that must be one of a few words: the sink's own tables (pipeline.bigquery.sinks.SINKS,
# SINK_MODES) list the same ones, a test keeps them equal.
CHOICES: dict[str, tuple[str, ...]] = {
    "sink": ("bigquery", "jsonl", "console"),
    "sink_mode": ("append", "merge"),
}


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric setting (``None``: unbounded) and why they are what they are."""

    low: float | None
    high: float | None = None
    why: str = ""
    low_open: bool = False  # the value must be above ``low``, not at it

    def holds(self, value: float) -> bool:
        return (math.isfinite(value)
                and (self.low is None or (value > self.low if self.low_open else value >= self.low))
                and (self.high is None or value <= self.high))

    def __str__(self) -> str:
        low = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = "" if self.high is None else f"<= {self.high:g}"
        text = " and ".join(p for p in (low, high) if p) or "finite"
        return f"it must be {text}" + (f" ({self.why})" if self.why else "")


# Numeric settings and their bounds: a value outside them would fail a GCP request later, spin
# the stream or silently turn a limit off.
RANGES: dict[str, Range] = {
    "trigger_seconds": Range(0, why="a micro-batch interval"),
    # https://cloud.google.com/pubsub/docs/handling-failures#dead_letter_topic
    "max_delivery_attempts": Range(5, 100, "Pub/Sub's dead-letter policy takes 5-100"),
    # https://cloud.google.com/pubsub/docs/lease-management
    "ack_deadline_seconds": Range(10, 600, "Pub/Sub's ack deadline is 10-600 s"),
    "max_messages_per_batch": Range(1),
    "max_buffered_bytes": Range(0, low_open=True),
    "num_partitions": Range(0, why="0 = Spark's default parallelism"),
    "batch_size": Range(1),
    "torch_threads": Range(0, why="0 = one per Spark worker, all cores elsewhere"),
    "malloc_keep_mb": Range(0, why="0 = the C library's defaults"),
    "top_k": Range(1),
    "min_confidence": Range(0, 1, "a probability"),
    "fetch_threads": Range(1),
    "fetch_timeout_seconds": Range(0, low_open=True),
    "max_bytes": Range(0, low_open=True),
    "max_pixels": Range(0, low_open=True),
    "model_refresh_seconds": Range(0),
    "bq_quota_patience_seconds": Range(0, why="0 = no limit"),
    "metrics_port": Range(0, 65535, "0 = no endpoint"),
}


def check_value(field: str, value: object) -> None:
    """Raise :class:`InvalidSetting` if ``value`` is outside ``field``'s choices or range."""
    if field in CHOICES and value not in CHOICES[field]:
        raise InvalidSetting(f"{field} '{printable(str(value), 80)}' is invalid: choose one of "
                             f"{', '.join(CHOICES[field])}")
    if field in RANGES and isinstance(value, int | float) and not RANGES[field].holds(value):
        raise InvalidSetting(f"{field} {value!r} is invalid: {RANGES[field]}")


def settings_names(settings: Settings) -> list[tuple[str, Callable[[str], str]]]:
    """Every name in ``settings`` that reaches GCP, with its rule (pure)."""
    s = settings
    return [
        (s.project, project_id),
        (s.bucket, bucket),
        (s.topic, pubsub),
        (s.dead_letter_topic, pubsub),
        (s.alert_topic, pubsub),
        (s.subscription, lambda n: pubsub(n, "subscription")),
        # provisioning keeps the dead-letter topic's messages in "<dlq>-sub"
        (s.dead_letter_subscription_path.rsplit("/", 1)[1], lambda n: pubsub(n, "subscription")),
        (s.dataset, dataset),
        (s.table, table),
        (s.dead_letter_table, table),
        (s.events_table, table),
    ]


def check_settings(settings: Settings) -> None:
    """Raise :class:`InvalidSetting` for the first name GCP would refuse, or value outside its
    choices or range; no I/O."""
    for name, rule in settings_names(settings):
        rule(name)
    service_account(settings.service_account)
    location(settings.region, "region", empty_ok=True)
    location(settings.bq_location, "bq_location")
    if settings.jsonl_uri:
        gcs_uri(settings.jsonl_uri)
    try:
        from pipeline.drift import parse_baseline, window_seconds

        window_seconds(settings.drift_window)
        parse_baseline(settings.drift_baseline)
    except ValueError as exc:
        raise InvalidSetting(str(exc)) from None
    for f in fields(settings):
        check_value(f.name, getattr(settings, f.name))


# --- text from outside, made safe to show -------------------------------------------------

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def printable(text: str, limit: int = 300) -> str:
    """``text`` with control and format characters escaped (``\\n``, ``\\x1b``, ``\\u202e``),
    so an object name cannot forge a log line or reorder a terminal; long text is cut."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)[:limit])
    return shown if len(text) <= limit else shown + "…"


def describe(exc: BaseException, limit: int = 500) -> str:
    """``Type: message`` for a row's reason: the same text on every delivery of a message.

    Messages that embed an object repr (PIL's ``<_io.BytesIO object at 0x7f…>``) would change
    from one process to the next and break the (message_id, reason) dedupe key, so the
    addresses are dropped; control characters are escaped as in :func:`printable`.
    """
    message = printable(_ADDRESS.sub("", str(exc)), limit)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
