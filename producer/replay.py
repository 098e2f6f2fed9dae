"""Steady-rate, shuffled replay of a class-folder dataset into a bucket.

Each upload is one OBJECT_FINALIZE notification downstream, so the rate of uploads is the load
the streaming job sees: a token bucket paces the starts, a bounded number of uploads are in
flight, and everything the user may want to resume or audit (names, generations) is recorded.

Pure pieces (the token bucket, the schedule, names, error classes, manifest lines) are kept apart
from the upload machinery so they are unit-testable without a bucket.
"""

from __future__ import annotations

import itertools
import json
import math
import mimetypes
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, Literal

from google.api_core import exceptions as api_exceptions
from tenacity import (
    Retrying,
    retry_if_exception,
    sleep_using_event,
    stop_after_attempt,
    stop_when_event_set,
    wait_exponential,
    wait_random,
)

from pipeline import clients
from pipeline.config import Settings
from pipeline.model.classfolders import Item
from pipeline.retry import is_transient

if TYPE_CHECKING:
    from google.cloud import storage

POLL_SECONDS = 0.1  # how long the dispatcher waits at most before re-checking stop/deadline


# --- pacing ----------------------------------------------------------------------------------


class TokenBucket:
    """Grants ``rate`` tokens per second and lets at most ``capacity`` accumulate.

    ``reserve`` never blocks: it takes a token (possibly one that has not accrued yet) and says
    how long to wait before using it. Idle time earns at most ``capacity`` tokens, so a stall
    (all uploads slow) is caught up with a burst of at most ``capacity``, which keeps the
    long-run rate on target without unbounded bursts. The clock is injected for tests.
    """

    def __init__(
        self,
        rate: float,
        capacity: float = 1.0,
        *,
        initial: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or capacity < 1:
            raise ValueError("rate must be > 0 and capacity >= 1")
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._tokens = min(initial, capacity)
        self._stamp = clock()
        self._lock = threading.Lock()

    def reserve(self, tokens: float = 1.0) -> float:
        """Take ``tokens``; returns the seconds to wait before they may be used (0 = now)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= tokens
            return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


def default_burst(rate: float) -> float:
    """A quarter second of catch-up: enough to absorb a slow upload, small enough to stay steady."""
    return max(1.0, rate / 4)


# --- the schedule ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One upload in the schedule; ``done`` = the manifest lists it, so it is skipped."""

    item: Item
    name: str
    cycle: int
    done: bool = False


def object_name(prefix: str, item: Item, cycle: int = 0) -> str:
    """``<prefix>/<class>/<file>``; later cycles add ``-<cycle>`` to the stem (a new object)."""
    rel = PurePosixPath(item.relative)
    if cycle:
        rel = rel.with_name(f"{rel.stem}-{cycle}{rel.suffix}")
    return "/".join(p for p in (prefix.strip("/"), item.class_name, str(rel)) if p)


def schedule(
    items: Iterable[Item],
    *,
    prefix: str = "",
    seed: int = 0,
    loop: bool = False,
    limit: int | None = None,
    done: frozenset[str] | set[str] = frozenset(),
) -> Iterator[Planned]:
    """The replay order: each cycle is a fresh shuffle from one seeded RNG.

    Items are sorted first, so the order depends on the dataset and the seed only, not on how
    the caller listed them. Names in ``done`` are yielded marked and do not count to ``limit``;
    with ``loop`` and no ``limit`` the schedule is endless.
    """
    order = sorted(items, key=lambda i: (i.class_name, i.relative))
    if not order:
        return
    rng = random.Random(seed)
    remaining = math.inf if limit is None else limit
    for cycle in itertools.count() if loop else (0,):
        rng.shuffle(order)
        for item in order:
            if remaining <= 0:
                return
            name = object_name(prefix, item, cycle)
            is_done = name in done
            remaining -= 0 if is_done else 1
            yield Planned(item, name, cycle, is_done)


def expected_uploads(
    items: Iterable[Item],
    *,
    prefix: str = "",
    loop: bool = False,
    limit: int | None = None,
    done: frozenset[str] | set[str] = frozenset(),
    duration: float | None = None,
    rate: float = 1.0,
) -> int | None:
    """How many uploads a replay will start (the progress bar's total); None = endless."""
    if loop:
        total = limit  # done names never count to the limit, and each cycle has new names
    else:
        total = sum(not p.done for p in schedule(items, prefix=prefix, limit=limit, done=done))
    if duration is not None:
        cap = math.ceil(duration * rate)
        total = cap if total is None else min(total, cap)
    return total


def content_type(path: Path | str) -> str:
    kind, _ = mimetypes.guess_type(str(path))
    return kind or "application/octet-stream"


def _describe(exc: BaseException) -> str:
    """One line for a report: API errors carry the whole response body, over several lines."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}"


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    planned: Planned
    status: Literal["uploaded", "skipped", "failed"]
    generation: int | None = None
    error: str | None = None
    attempts: int = 1
    started: float = 0.0  # time.monotonic() when the upload started (its rate-limited slot)
    finished: float = 0.0


@dataclass
class Summary:
    """What a replay did; ``skipped`` = already present (412) or listed in the manifest."""

    uploaded: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    objects: list[tuple[str, int]] = field(default_factory=list)  # (name, generation) uploaded
    errors: list[tuple[str, str]] = field(default_factory=list)  # (name, error) failed
    interrupted: bool = False

    @property
    def rate(self) -> float:
        return self.uploaded / self.seconds if self.seconds > 0 else 0.0

    def add(self, result: Result) -> None:
        if result.status == "uploaded":
            self.uploaded += 1
            self.objects.append((result.planned.name, result.generation or 0))
        elif result.status == "skipped":
            self.skipped += 1
        else:
            self.failed += 1
            self.errors.append((result.planned.name, result.error or ""))

    def as_json(self) -> dict[str, Any]:
        return {
            "uploaded": self.uploaded,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "rate": round(self.rate, 3),
            "skipped": self.skipped,
        }


# --- the manifest ----------------------------------------------------------------------------


def manifest_line(result: Result) -> str:
    item = result.planned.item
    record = {"name": result.planned.name, "generation": result.generation,
              "source": str(item.path), "class": item.class_name}
    return json.dumps(record) + "\n"


def manifest_names(lines: Iterable[str]) -> set[str]:
    """Names a manifest lists; a torn last line (a crash mid-write) is ignored."""
    names = set()
    for line in lines:
        try:
            names.add(json.loads(line)["name"])
        except (ValueError, KeyError, TypeError):
            continue
    return names


def read_manifest(path: Path | str | None) -> set[str]:
    if path is None or not Path(path).exists():
        return set()
    with Path(path).open(encoding="utf-8") as fh:
        return manifest_names(fh)


# --- uploading -------------------------------------------------------------------------------


class _Uploader:
    """Uploads one planned item with retries; one storage client per worker thread.

    Retries belong to tenacity alone (the library's own retry is switched off), and they stop
    early when ``stop`` is set so Ctrl-C is not held up by a backoff.
    """

    def __init__(
        self,
        settings: Settings,
        client_factory: Callable[[Settings], storage.Client],
        *,
        if_not_exists: bool,
        max_attempts: int,
        backoff: float,
        stop: threading.Event,
    ) -> None:
        self._settings = settings
        self._factory = client_factory
        self._if_not_exists = if_not_exists
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._stop = stop
        self._local = threading.local()
        self._clients: list[storage.Client] = []
        self._lock = threading.Lock()

    def _bucket(self) -> storage.Bucket:
        bucket = getattr(self._local, "bucket", None)
        if bucket is None:
            client = self._factory(self._settings)
            with self._lock:
                self._clients.append(client)
            bucket = self._local.bucket = client.bucket(self._settings.bucket)
        return bucket

    def _put(self, planned: Planned) -> int:
        blob = self._bucket().blob(planned.name)
        blob.metadata = {"true_label": planned.item.class_name}
        blob.upload_from_filename(
            str(planned.item.path),
            content_type=content_type(planned.item.path),
            if_generation_match=0 if self._if_not_exists else None,
            retry=None,
            timeout=60,
        )
        return int(blob.generation)

    def upload(self, planned: Planned, started: float) -> Result:
        retrying = Retrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(self._max_attempts) | stop_when_event_set(self._stop),
            wait=wait_exponential(multiplier=self._backoff, max=30) + wait_random(0, self._backoff),
            sleep=sleep_using_event(self._stop),
            reraise=True,
        )
        attempts = 0
        try:
            for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    generation = self._put(planned)
        except api_exceptions.PreconditionFailed:
            return Result(planned, "skipped", attempts=attempts, started=started,
                          finished=time.monotonic())
        except Exception as exc:  # permanent or retries exhausted: counted, never fatal
            return Result(planned, "failed", error=_describe(exc),
                          attempts=attempts, started=started, finished=time.monotonic())
        return Result(planned, "uploaded", generation, attempts=attempts, started=started,
                      finished=time.monotonic())

    def close(self) -> None:
        for client in self._clients:
            client.close()


class _Dispatch:
    """The main-thread side of a replay: in-flight bookkeeping, accounting, manifest, callbacks."""

    def __init__(self, summary: Summary, manifest: IO[str] | None,
                 callbacks: list[Callable[[Result], None]], stop: threading.Event) -> None:
        self.summary = summary
        self.manifest = manifest
        self.callbacks = callbacks
        self.stop = stop
        self.inflight: set[Future[Result]] = set()

    def collect(self, timeout: float) -> None:
        """Wait up to ``timeout`` for an upload to finish; account for every finished one."""
        if not self.inflight:
            self.stop.wait(timeout)
            return
        done, _ = wait(self.inflight, timeout=timeout, return_when=FIRST_COMPLETED)
        for future in done:
            result = future.result()
            self.inflight.discard(future)
            self.summary.add(result)
            if result.status == "uploaded" and self.manifest is not None:
                self.manifest.write(manifest_line(result))
                self.manifest.flush()
            for callback in self.callbacks:
                callback(result)

    def wait_until(self, when: float) -> None:
        while not self.stop.is_set() and (left := when - time.monotonic()) > 0:
            self.collect(min(left, POLL_SECONDS))

    def drain(self) -> None:
        while self.inflight:
            self.collect(POLL_SECONDS)


def replay(
    items: Sequence[Item],
    settings: Settings,
    *,
    rate: float,
    concurrency: int = 4,
    limit: int | None = None,
    loop: bool = False,
    seed: int = 0,
    duration: float | None = None,
    burst: float | None = None,
    if_not_exists: bool = False,
    manifest: Path | str | None = None,
    on_result: Callable[[Result], None] | None = None,
    stop: threading.Event | None = None,
    client_factory: Callable[[Settings], storage.Client] = clients.storage_client,
    max_attempts: int = 6,
    backoff: float = 0.25,
    progress: bool = False,
) -> Summary:
    """Upload ``items`` to ``settings.bucket`` under ``settings.prefix`` at ``rate`` images/s.

    Stops after ``limit`` uploads, after ``duration`` seconds, when ``stop`` is set, or on
    Ctrl-C (``Summary.interrupted``); in-flight uploads always finish and are accounted for.
    ``on_result`` is called in the calling thread for every finished upload; ``progress``
    shows a progress bar on stderr.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    stop = stop or threading.Event()
    summary = Summary()
    bucket = TokenBucket(rate, burst if burst is not None else default_burst(rate))
    uploader = _Uploader(settings, client_factory, if_not_exists=if_not_exists,
                         max_attempts=max_attempts, backoff=backoff, stop=stop)
    done = read_manifest(manifest)
    plan = schedule(items, prefix=settings.prefix, seed=seed, loop=loop, limit=limit, done=done)
    total = expected_uploads(items, prefix=settings.prefix, loop=loop, limit=limit, done=done,
                             duration=duration, rate=rate)
    bar = progress_bar(total) if progress else nullcontext()
    start = time.monotonic()
    deadline = start + duration if duration is not None else math.inf
    log_cm = Path(manifest).open("a", encoding="utf-8") if manifest else nullcontext(None)
    with (log_cm as log, bar as show,
          ThreadPoolExecutor(concurrency, thread_name_prefix="upload") as pool):
        callbacks = [cb for cb in (show, on_result) if cb is not None]
        run = _Dispatch(summary, log, callbacks, stop)
        try:
            for planned in plan:
                if planned.done:
                    summary.skipped += 1
                    continue
                while len(run.inflight) >= concurrency and not stop.is_set():
                    run.collect(POLL_SECONDS)
                when = time.monotonic() + bucket.reserve()
                if stop.is_set() or when > deadline:
                    break
                run.wait_until(when)
                if stop.is_set():
                    break
                run.inflight.add(pool.submit(uploader.upload, planned, time.monotonic()))
            run.drain()
        except KeyboardInterrupt:
            stop.set()  # aborts backoffs; the uploads on the wire finish
            summary.interrupted = True
            run.drain()
        finally:
            uploader.close()
    summary.interrupted = summary.interrupted or stop.is_set()
    summary.seconds = time.monotonic() - start
    return summary


@contextmanager
def progress_bar(total: int | None) -> Iterator[Callable[[Result], None]]:
    """A rich progress bar on stderr (count, rate, ETA, failures); yields its result callback."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("uploading"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        TextColumn("[red]{task.fields[failed]} failed[/] {task.fields[skipped]} skipped"),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("upload", total=total, rate="", failed=0, skipped=0)
        counts = {"failed": 0, "skipped": 0}

        def on_result(result: Result) -> None:
            if result.status != "uploaded":
                counts[result.status] += 1
            bar.advance(task)
            state = bar.tasks[task]  # rich's own speed estimate overshoots for small counts
            rate = state.completed / state.elapsed if state.elapsed else 0.0
            bar.update(task, rate=f"{rate:.1f} img/s", **counts)

        yield on_result


def preview(
    items: Sequence[Item],
    settings: Settings,
    *,
    limit: int | None = None,
    loop: bool = False,
    seed: int = 0,
    manifest: Path | str | None = None,
) -> list[Planned]:
    """What ``replay`` with the same arguments would upload, in order; touches no bucket."""
    if loop and limit is None:
        raise ValueError("a looping schedule is endless: give a limit")
    plan = schedule(items, prefix=settings.prefix, seed=seed, loop=loop, limit=limit,
                    done=read_manifest(manifest))
    return [p for p in plan if not p.done]
