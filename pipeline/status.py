"""Every row status, defined once: code compares against these, the SQL views are rendered
from them (``{classified}`` in ``schemas/views``), and the README lists them."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Status(StrEnum):
    """What happened to one object generation; a ``str``, so rows and JSON carry the value."""

    OK = "ok"
    LOW_CONFIDENCE = "low_confidence"  # classified, top-1 below --min-confidence
    EMPTY = "empty"  # zero bytes
    NOT_IMAGE = "not_image"  # no image signature
    CORRUPT = "corrupt"  # looks like an image, does not decode
    TOO_LARGE = "too_large"  # over the byte, pixel or aspect budget
    GONE = "gone"  # that generation no longer exists
    FORBIDDEN = "forbidden"  # the job may not read it
    FETCH_ERROR = "fetch_error"  # retries exhausted


CLASSIFIED = frozenset({Status.OK, Status.LOW_CONFIDENCE})  # every other status is an error row
DECODE_ERRORS = (Status.EMPTY, Status.NOT_IMAGE, Status.CORRUPT, Status.TOO_LARGE)


def sql_list(statuses: Iterable[Status]) -> str:
    """``'low_confidence', 'ok'``: a SQL IN-list of status literals, in a stable order."""
    return ", ".join(f"'{s.value}'" for s in sorted(statuses))
