"""The one parser of times as text: RFC 3339 / ISO 8601 from GCS, rows and the command line
(pure; imported by the CLI, so kept light)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def iso_time(text: str) -> datetime:
    """An ISO-8601 / RFC 3339 time in UTC (naive = UTC; ``Z`` accepted); ValueError if not one."""
    t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)


def parse_time(value: str | None) -> datetime | None:
    """Like ``iso_time``, but None when absent, malformed or out of range (untrusted input)."""
    if not value:
        return None
    try:
        return iso_time(value)
    except (ValueError, OverflowError):  # "0001-01-01T00:00:00+01:00" is before year 1 in UTC
        return None


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
