"""One retry policy for every call to Google: which errors pass, and how long to wait for them.

    from pipeline.retry import call_with_retries
    data = call_with_retries(lambda: blob.download_as_bytes(retry=None))

Fetch, the sink, the producer and the source all retry through this module; the client
libraries' own retries are turned off at each call (``retry=None``) so attempts are counted in
one place. The policy lives in module globals read at call time, so tests can shorten it:

    monkeypatch.setattr(retry, "RETRY_WAIT", tenacity.wait_none())
"""

from __future__ import annotations

import http.client
from collections.abc import Callable
from typing import TypeVar

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

T = TypeVar("T")

# Exponential backoff with full jitter (so parallel retries do not stampede), bounded both in
# attempts and in time so a batch cannot stall behind one object.
RETRY_WAIT = wait_random_exponential(multiplier=0.5, max=10)
RETRY_STOP = stop_after_attempt(6) | stop_after_delay(60)

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

# BigQuery reports its rate and quota limits as 403 with these reasons; they pass.
_RATE_REASONS = frozenset({"rateLimitExceeded", "quotaExceeded"})
# Backoff between rounds of retries of a quota or rate error: up to a minute, as the quota
# documentation asks of clients (https://cloud.google.com/bigquery/docs/troubleshoot-quotas).
QUOTA_WAIT = wait_random_exponential(multiplier=2, max=60)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: 408/429/5xx (gRPC DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL,
    UNAVAILABLE map to these), connection drops and timeouts — never 403/404/412."""
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return exc.code in TRANSIENT_STATUS
    if isinstance(exc, auth_exceptions.TransportError):  # token refresh hit the network
        return True
    return isinstance(exc, _TRANSIENT_TYPES)


def is_rate_limited(exc: BaseException) -> bool:
    """A quota or rate limit, which passes: 403 rateLimitExceeded / quotaExceeded, 429 (gRPC
    RESOURCE_EXHAUSTED) or 503 (gRPC UNAVAILABLE)."""
    if isinstance(exc, api_exceptions.Forbidden):
        return any(e.get("reason") in _RATE_REASONS for e in exc.errors or [])
    return isinstance(exc, api_exceptions.TooManyRequests | api_exceptions.ServiceUnavailable)


# bqemulator runs its REST and gRPC handlers on different threads over one DuckDB connection;
# a query that meets an append there fails at once with this (as a 400) instead of waiting.
# Real BigQuery never says it; on the local stack it passes like any other contention.
EMULATOR_BUSY = "connection is busy with another call"


def is_bq_transient(exc: BaseException) -> bool:
    """``is_transient`` plus BigQuery's 403 rate/quota limits and backend errors (and the
    local emulator's connection contention)."""
    if isinstance(exc, api_exceptions.Forbidden):
        return any(e.get("reason") in _RATE_REASONS | {"backendError"} for e in exc.errors or [])
    if isinstance(exc, api_exceptions.GoogleAPICallError) and EMULATOR_BUSY in str(exc):
        return True
    return is_transient(exc)


def call_with_retries(fn: Callable[[], T],
                      transient: Callable[[BaseException], bool] = is_transient) -> T:
    """Run ``fn`` under the policy; re-raise the last error when it gives up."""
    retrying = Retrying(retry=retry_if_exception(transient), wait=RETRY_WAIT, stop=RETRY_STOP,
                        reraise=True)
    return retrying(fn)
