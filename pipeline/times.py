"""The one parser of times as text: RFC 3339 / ISO 8601 from GCS, rows and the command line
(pure; imported by the CLI, so kept light)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The times a message may carry: none before the Unix epoch (Pub/Sub and GCS count from it),
# none in or after 2160: BigQuery's day partitions end at 2159-12-31
# (https://cloud.google.com/bigquery/docs/partitioned-tables#date_timestamp_partitioned_tables),
# and a forged year 9999 would otherwise meet date arithmetic at the end of the calendar.
EARLIEST = EPOCH
LATEST = datetime(2160, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def iso_time(text: str) -> datetime:
    """An ISO-8601 / RFC 3339 time in UTC (naive = UTC; ``Z`` accepted); ValueError if not one."""
    return utc(datetime.fromisoformat(text.strip().replace("Z", "+00:00")))


def parse_time(value: str | None) -> datetime | None:
    """Like ``iso_time``, but None when absent, malformed or out of range (untrusted input)."""
    if not value:
        return None
    try:
        return iso_time(value)
    except (ValueError, OverflowError):  # "0001-01-01T00:00:00+01:00" is before year 1 in UTC
        return None


def from_micros(micros: int | float) -> datetime:
    """Microseconds since the Unix epoch as an aware UTC time; OverflowError beyond year 9999.

    How the Pub/Sub source carries publish times through Spark: a number is the one form that
    no session, JVM or Python time zone converts on the way (a Spark TIMESTAMP reaches pandas
    as naive session-zone time and ``collect()`` as naive local time)."""
    return EPOCH + timedelta(microseconds=int(micros))


def to_micros(t: datetime) -> int:
    """An aware time (naive = UTC) as microseconds since the Unix epoch (inverse of
    ``from_micros``)."""
    return (utc(t) - EPOCH) // _MICROSECOND


def utc(value: datetime | int | float) -> datetime:
    """A time as an aware UTC datetime: naive datetimes are UTC already, numbers are epoch
    microseconds (``from_micros``). The one place that decides what a zone-less time means."""
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"not a time: {type(value).__name__}")
    return from_micros(value)


def as_utc(value: datetime | str) -> datetime:
    """A time, or its ISO-8601 text as rows carry it, as an aware UTC datetime."""
    return iso_time(value) if isinstance(value, str) else utc(value)


def parse_since(raw: str, now: datetime | None = None) -> datetime:
    """An ISO-8601 time (naive = UTC) or an age such as ``90m``, ``6h``, ``2d`` before ``now``."""
    text = raw.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text)
    if match:
        age = timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
        return (now or datetime.now(UTC)) - age
    try:
        return iso_time(text)
    except (ValueError, OverflowError):
        raise ValueError(f"{raw!r} is neither an ISO-8601 time nor an age like 90m, 6h, 2d") from None
