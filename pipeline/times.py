"""Times as users type them on the command line (pure; imported by the CLI, so kept light)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(raw: str, now: datetime | None = None) -> datetime:
    """An ISO-8601 time (naive = UTC) or an age such as ``90m``, ``6h``, ``2d`` before ``now``."""
    text = raw.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text)
    if match:
        age = timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
        return (now or datetime.now(UTC)) - age
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{raw!r} is neither an ISO-8601 time nor an age like 90m, 6h, 2d") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)
