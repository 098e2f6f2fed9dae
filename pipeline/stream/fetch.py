"""Fetch: parallel, generation-pinned downloads of the objects a batch must classify.

Reading ``(bucket, name, generation)`` rather than the live object means an overwrite between
the notification and the read can never attach the new bytes to the old generation's row:
the old generation is either still readable (versioned bucket) or "gone" (404), and the new
generation gets its own notification. Per-object problems become a ``Fetched`` status, never an
exception, so one bad object cannot fail (and endlessly replay) a whole micro-batch.

Retries follow ``pipeline.retry`` (the one policy for every Google call).
"""

from __future__ import annotations

import io
import logging
import signal
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from google.api_core import exceptions as api_exceptions

from pipeline import clients
from pipeline.config import Settings
from pipeline.names import describe, printable
from pipeline.notifications import ObjectKey
from pipeline.retry import call_with_retries
from pipeline.status import Status

if TYPE_CHECKING:
    from google.cloud import storage

log = logging.getLogger(__name__)
T = TypeVar("T")

OK, GONE, FORBIDDEN, FETCH_ERROR, TOO_LARGE = (Status.OK, Status.GONE, Status.FORBIDDEN,
                                              Status.FETCH_ERROR, Status.TOO_LARGE)

DEFAULT_TIMEOUT_SECONDS = 60.0

# Raw bytes one chunk of downloads may hold. A partition holds two chunks (one classified while
# the next downloads), so a Python worker holds at most 2 x CHUNK_BYTES of object bytes however
# large the objects are: 64 objects x 32 MiB x 2 chunks would otherwise be 4 GiB.
CHUNK_BYTES = 128 * 1024 * 1024


@dataclass(frozen=True)
class Fetched:
    key: ObjectKey
    data: bytes | None
    status: str  # ok | gone | forbidden | fetch_error | too_large
    reason: str  # "" when ok

    @property
    def ok(self) -> bool:
        return self.status == OK


def download_cost(size: int | None, max_bytes: int) -> int:
    """Bytes a download may hold in memory: an unknown or non-positive size may be anything up
    to the cap, an object over it is refused unread (pure)."""
    if size is None or size <= 0:
        return max_bytes
    return 0 if size > max_bytes else size


def budget_chunks(items: Iterable[tuple[T, int | None]], max_count: int, max_bytes: int,
                  budget: int = CHUNK_BYTES) -> Iterator[list[tuple[T, int | None]]]:
    """``(item, size)`` pairs in order, grouped so that no group has more than ``max_count``
    items or costs (``download_cost``) more than ``budget`` bytes; an item that alone costs
    more than the budget is a group of its own (pure)."""
    chunk: list[tuple[T, int | None]] = []
    held = 0
    for item, size in items:
        cost = download_cost(size, max_bytes)
        if chunk and (len(chunk) >= max_count or held + cost > budget):
            yield chunk
            chunk, held = [], 0
        chunk.append((item, size))
        held += cost
    if chunk:
        yield chunk


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


class _OverLimit(Exception):
    """The body ran past the byte cap: the download stops there."""


class _CappedBuffer(io.BytesIO):
    """A download target that refuses to grow past ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, data) -> int:  # type: ignore[no-untyped-def, override]
        if self.tell() + len(data) > self.limit:
            raise _OverLimit
        return super().write(data)


def _too_large(key: ObjectKey, size: int | str, max_bytes: int) -> Fetched:
    return Fetched(key, None, TOO_LARGE, f"object is {size} bytes, over the {max_bytes}-byte limit")


def fetch_one(client: storage.Client, key: ObjectKey, max_bytes: int, size: int | None = None,
              timeout: float = DEFAULT_TIMEOUT_SECONDS) -> Fetched:
    """One object's pinned generation, or the status that says why not; never raises.

    The size guard never depends on the size being known: a missing or non-positive size is
    looked up. The download itself stops at what it was budgeted (``download_cost``: the size
    the notification gave, else ``max_bytes``) whatever the bytes turn out to be, since the
    chunk it belongs to was sized on that figure. A notification's size is the *stored* size:
    an object stored with ``Content-Encoding: gzip`` is served decompressed ("decompressive
    transcoding", https://cloud.google.com/storage/docs/transcoding), so 32 KB stored may
    arrive as 32 MiB; such an object, a stale size and a forged one alike become ``too_large``
    at the budget instead of holding 1,000 times the memory its chunk reserved.
    """
    bucket = client.bucket(key.bucket)
    budget = download_cost(size, max_bytes)  # what budget_chunks charged for this object
    try:
        if size is None or size <= 0:
            meta = bucket.blob(key.name, generation=key.generation)
            # retry=None everywhere: tenacity is the one retry layer, so attempts stay countable.
            call_with_retries(lambda: meta.reload(retry=None, timeout=timeout))
            size = meta.size
        if size is not None and size > max_bytes:
            return _too_large(key, size, max_bytes)
        # A fresh Blob: its download URL is built from the client's endpoint and pinned by the
        # generation parameter, rather than the mediaLink the metadata response carried.
        blob = bucket.blob(key.name, generation=key.generation)

        def download() -> bytes:
            target = _CappedBuffer(budget)  # a fresh one per attempt
            blob.download_to_file(target, retry=None, timeout=timeout)
            return target.getvalue()

        data = call_with_retries(download)
    except _OverLimit:  # transcoded, or the metadata was stale, absent or lying
        if budget < max_bytes:
            return Fetched(key, None, TOO_LARGE,
                           f"download ran past the {budget} bytes its notification declared "
                           "(an object stored with Content-Encoding: gzip is served "
                           "decompressed); stopped there")
        return _too_large(key, f"more than {max_bytes}", max_bytes)
    except api_exceptions.NotFound:
        return Fetched(key, None, GONE,
                       f"generation {key.generation} no longer exists (overwritten or deleted)")
    except api_exceptions.Forbidden as exc:
        return Fetched(key, None, FORBIDDEN, f"access denied: {printable(exc.message)}")
    except Exception as exc:  # noqa: BLE001 — per-object failure, recorded as a row
        log.warning("fetch gs://%s/%s#%d failed: %s", printable(key.bucket), printable(key.name),
                    key.generation, describe(exc))
        return Fetched(key, None, FETCH_ERROR, describe(exc, 1000))
    return Fetched(key, data, OK, "")


class CommandTimeout(Exception):
    """A command ran past its overall deadline.

    Not a ``TimeoutError``: retry layers (ours and the client libraries') treat those as
    transient and would swallow the deadline to try again.
    """


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Bound a whole command in wall-clock time: :class:`CommandTimeout` saying what timed out.

    Client libraries retry an unreachable endpoint for minutes (storage: 120 s per call), so a
    command of many calls needs one deadline over all of them. SIGALRM interrupts sleeps,
    sockets and gRPC waits alike, and fires again every second in case a handler swallowed it.
    Off the main thread, where signals cannot be handled, the block runs unbounded;
    ``seconds <= 0`` means no deadline.
    """
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise CommandTimeout(f"{what} did not finish within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
