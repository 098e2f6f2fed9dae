"""Fetch: parallel, generation-pinned downloads of the objects a batch must classify.

Reading ``(bucket, name, generation)`` rather than the live object means an overwrite between
the notification and the read can never attach the new bytes to the old generation's row:
the old generation is either still readable (versioned bucket) or "gone" (404), and the new
generation gets its own notification. Per-object problems become a ``Fetched`` status, never an
exception, so one bad object cannot fail (and endlessly replay) a whole micro-batch.

The retry policy lives in module globals read at call time, so tests can shorten it:

    fetch.RETRY_WAIT = tenacity.wait_none()
"""

from __future__ import annotations

import http.client
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import requests
import urllib3
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud.storage.exceptions import DataCorruption
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from pipeline import clients
from pipeline.config import Settings
from pipeline.notifications import ObjectKey

if TYPE_CHECKING:
    from google.cloud import storage

log = logging.getLogger(__name__)
T = TypeVar("T")

OK, GONE, FORBIDDEN, FETCH_ERROR, TOO_LARGE = "ok", "gone", "forbidden", "fetch_error", "too_large"

# Exponential backoff with full jitter (so parallel retries do not stampede), bounded both in
# attempts and in time so a batch cannot stall behind one object.
RETRY_WAIT = wait_random_exponential(multiplier=0.5, max=10)
RETRY_STOP = stop_after_attempt(6) | stop_after_delay(60)
DEFAULT_TIMEOUT_SECONDS = 60.0

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    http.client.HTTPException,
    urllib3.exceptions.HTTPError,
    DataCorruption,  # checksum mismatch: a truncated or garbled transfer, worth another read
)


@dataclass(frozen=True)
class Fetched:
    key: ObjectKey
    data: bytes | None
    status: str  # ok | gone | forbidden | fetch_error | too_large
    reason: str  # "" when ok

    @property
    def ok(self) -> bool:
        return self.status == OK


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: 408/429/5xx, connection drops and timeouts — never 403/404."""
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return exc.code in TRANSIENT_STATUS
    if isinstance(exc, auth_exceptions.TransportError):  # token refresh hit the network
        return True
    return isinstance(exc, _TRANSIENT_TYPES)


def call_with_retries(fn: Callable[[], T],
                      transient: Callable[[BaseException], bool] = is_transient) -> T:
    """Run ``fn`` under the module's retry policy; re-raise the last error when it gives up."""
    retrying = Retrying(retry=retry_if_exception(transient), wait=RETRY_WAIT, stop=RETRY_STOP,
                        reraise=True)
    return retrying(fn)


def fetch_all(keys: Sequence[ObjectKey], settings: Settings,
              client: storage.Client | None = None, *,
              sizes: Mapping[ObjectKey, int | None] | None = None) -> list[Fetched]:
    """Download every key's pinned generation in parallel; results in the order of ``keys``.

    ``sizes`` (from the notifications) lets the size guard skip a metadata request per object;
    without it the object's metadata is read first so an oversized object is never downloaded.
    """
    if not keys:
        return []
    client = client or clients.storage_client(settings)
    sizes = sizes or {}
    timeout = float(getattr(settings, "fetch_timeout_seconds", DEFAULT_TIMEOUT_SECONDS))
    workers = max(1, min(settings.fetch_threads, len(keys)))

    def one(key: ObjectKey) -> Fetched:
        return fetch_one(client, key, settings.max_bytes, sizes.get(key), timeout)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch") as pool:
        return list(pool.map(one, keys))


def fetch_one(client: storage.Client, key: ObjectKey, max_bytes: int, size: int | None = None,
              timeout: float = DEFAULT_TIMEOUT_SECONDS) -> Fetched:
    """One object's pinned generation, or the status that says why not; never raises."""
    bucket = client.bucket(key.bucket)
    try:
        if size is None:
            meta = bucket.blob(key.name, generation=key.generation)
            # retry=None everywhere: tenacity is the one retry layer, so attempts stay countable.
            call_with_retries(lambda: meta.reload(retry=None, timeout=timeout))
            size = meta.size
        if size is not None and size > max_bytes:
            return Fetched(key, None, TOO_LARGE,
                           f"object is {size} bytes, over the {max_bytes}-byte limit")
        # A fresh Blob: its download URL is built from the client's endpoint and pinned by the
        # generation parameter, rather than the mediaLink the metadata response carried.
        blob = bucket.blob(key.name, generation=key.generation)
        data = call_with_retries(lambda: blob.download_as_bytes(retry=None, timeout=timeout))
    except api_exceptions.NotFound:
        return Fetched(key, None, GONE,
                       f"generation {key.generation} no longer exists (overwritten or deleted)")
    except api_exceptions.Forbidden as exc:
        return Fetched(key, None, FORBIDDEN, f"access denied: {exc.message}")
    except Exception as exc:  # noqa: BLE001 — per-object failure, recorded as a row
        log.warning("fetch gs://%s/%s#%d failed: %r", key.bucket, key.name, key.generation, exc)
        return Fetched(key, None, FETCH_ERROR, f"{type(exc).__name__}: {exc}"[:1000])
    if len(data) > max_bytes:  # the metadata was stale or absent: still refuse to pass it on
        return Fetched(key, None, TOO_LARGE,
                       f"object is {len(data)} bytes, over the {max_bytes}-byte limit")
    return Fetched(key, data, OK, "")
