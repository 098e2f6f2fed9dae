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
import re
import unicodedata
from collections.abc import Callable
from typing import TYPE_CHECKING

from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.config import Settings


class InvalidName(UserError, ValueError):
    """A resource name GCP would refuse; the message is one sentence naming the rule (so the
    CLIs print it as one line and exit 2, like every ``UserError``)."""


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


def _fail(kind: str, name: str, rule: str) -> InvalidName:
    return InvalidName(f"{kind} name '{printable(name, 80)}' is invalid: {rule}")


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


def settings_names(settings: Settings) -> list[tuple[str, Callable[[str], str]]]:
    """Every name in ``settings`` that reaches GCP, with its rule (pure)."""
    s = settings
    return [
        (s.project, project_id),
        (s.bucket, bucket),
        (s.topic, pubsub),
        (s.dead_letter_topic, pubsub),
        (s.subscription, lambda n: pubsub(n, "subscription")),
        # provisioning keeps the dead-letter topic's messages in "<dlq>-sub"
        (s.dead_letter_subscription_path.rsplit("/", 1)[1], lambda n: pubsub(n, "subscription")),
        (s.dataset, dataset),
        (s.table, table),
        (s.dead_letter_table, table),
        (s.events_table, table),
    ]


def check_settings(settings: Settings) -> None:
    """Raise :class:`InvalidName` for the first name GCP would refuse; no I/O."""
    for name, rule in settings_names(settings):
        rule(name)


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
