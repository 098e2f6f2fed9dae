"""``spark.readStream.format("pubsub")``: a Structured Streaming source for Google Pub/Sub.

    from pyspark.sql import SparkSession
    from pipeline.stream.source import PubSubDataSource

    spark = SparkSession.builder.getOrCreate()
    spark.dataSource.register(PubSubDataSource)
    messages = (spark.readStream.format("pubsub")
                .option("subscription", "projects/my-project/subscriptions/uploads")
                .option("maxMessagesPerBatch", 500)
                .load())
    query = messages.writeStream.foreachBatch(handle).option("checkpointLocation", "/ckpt").start()

``subscription`` is a full path, or a name with ``.option("project", ...)``; with
``.option("emulatorHost", "host:port")`` the reader's own client talks to the Pub/Sub emulator
(nothing else in the process changes). Configuration comes from options only, never from the
environment.

Works on pyspark 4.0, 4.1 and >= 4.2 (Dataproc image 3.0 runs Spark 4.0.0 or 4.1.x). On
4.2+ Spark passes ``latestOffset`` its start offset and a read limit (SPARK-55304); on 4.0/4.1
``latestOffset()`` takes no arguments and the reader applies ``maxMessagesPerBatch`` itself.

Delivery semantics (at-least-once, nothing lost):

* A background thread on the driver pulls messages into a buffer, bounded in messages
  (``maxBuffered``) and in bytes (``maxBufferedBytes``, 256 MiB). ``latestOffset`` numbers
  up to ``maxMessagesPerBatch`` buffered messages as the next batch; ``partitions`` ships the
  numbered messages themselves to the executors, so ``read`` never talks to Pub/Sub.
* A message is acknowledged only once its micro-batch (and its ``foreachBatch``) has
  completed: in ``commit(end)``, or earlier in the next ``latestOffset``, which Spark calls only
  after the previous batch is done (``commit`` itself comes when the *next* batch is planned, so
  on an idle stream the last batch would stay unacked). A batch that fails is never acked: its
  messages come back by redelivery.
* A lease thread (modelled on python-pubsub's ``leaser.py``) extends the ack deadline of every
  held message while batches run, so a slow batch causes no redelivery; leases are dropped
  after ``maxLeaseSeconds`` so a stuck batch cannot hold messages forever.
* ``stop()`` hands unacked messages back at once (ack deadline 0).
* Offsets are ``{"run": id, "seq": n}``: each reader run numbers from 0 under its own id. After
  a crash the restarted reader yields nothing for a batch an earlier run planned and acks
  nothing for it, so Pub/Sub redelivers those messages (a restart may add one empty batch).

Duplicates are possible (redelivery, replay); the sink is idempotent on the object key.
``trigger(availableNow=True)`` is refused with a clear error on pyspark >= 4.2: a subscription
has no end. Spark 4.0/4.1 do not tell a Python source its trigger; there such a query re-reads
without acking anything, so nothing is lost, and ``bucketlens run`` never builds one.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyspark.sql.datasource import DataSource, DataSourceStreamReader, InputPartition
from pyspark.sql.types import StructType

from pipeline.times import to_micros

try:  # pyspark >= 4.2 (SPARK-55304): Spark passes the start offset and a read limit
    from pyspark.sql.streaming.datasource import (
        ReadAllAvailable,
        ReadLimit,
        ReadMaxRows,
        SupportsTriggerAvailableNow,
    )

    ADMISSION_CONTROL = True
except ImportError:  # 4.0 / 4.1 (Dataproc 3.0 images): latestOffset() takes no arguments
    ADMISSION_CONTROL = False
    ReadLimit = ReadMaxRows = ReadAllAvailable = None  # type: ignore[assignment,misc]

    class SupportsTriggerAvailableNow:  # type: ignore[no-redef]
        """Stand-in: Spark < 4.2 never calls ``prepareForTriggerAvailableNow``."""

log = logging.getLogger("bucketlens.source")

# publish_time: microseconds since the Unix epoch (UTC), not a Spark TIMESTAMP, which reaches
# Python as a naive time in the session's zone (mapInPandas) or the Python process's zone
# (collect()): a number is the one form no time zone on any host can change on the way.
# In SQL, timestamp_micros(publish_time) is the instant. pipeline.times.utc reads it in Python.
SCHEMA = ("message_id string, publish_time long, attributes map<string,string>, "
          "data binary, delivery_attempt int")
OFFSET_KEY = "seq"
RUN_KEY = "run"
ACK_CHUNK = 1000  # Pub/Sub accepts at most 2,500 ack ids per request; stay well below
# The buffer's default bound in bytes, as python-pubsub's FlowControl.max_bytes bounds its
# outstanding messages: a Pub/Sub message may be 10 MB, so a count alone (2 x 1,000 messages)
# would let the driver hold 20 GB.
MAX_BUFFERED_BYTES = 256 * 1024 * 1024
# The largest message Pub/Sub delivers (data and attributes: 10 MB,
# https://cloud.google.com/pubsub/quotas#resource_limits), counted generously. A pull asks for
# no more messages than fit in the buffer's free bytes at this size, so the buffer can never
# exceed its bound by more than one message: nothing caps the size of a Pull response, and a
# topic may carry others' messages. At the default bound that is 25 messages a pull (a pull
# takes milliseconds, and runs while a batch does); a larger bound pulls more at once.
MAX_MESSAGE_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class PubSubOptions:
    """Source options as typed values (Spark passes every option as a string)."""

    subscription: str
    max_messages_per_batch: int = 1000
    num_partitions: int = 2
    ack_deadline_seconds: int = 60  # each lease extension asks for this much
    max_lease_seconds: float = 3600.0
    max_buffered: int = 0  # 0 = 2 x max_messages_per_batch
    max_buffered_bytes: int = MAX_BUFFERED_BYTES  # messages held (pulled, not acked), in bytes
    pull_timeout_seconds: float = 5.0
    emulator_host: str = ""

    @classmethod
    def parse(cls, options: dict[str, str]) -> PubSubOptions:
        opts = {k.lower(): v for k, v in options.items()}
        sub = opts.get("subscription", "")
        if not sub:
            raise ValueError('the pubsub source needs .option("subscription", ...)')
        if not sub.startswith("projects/"):
            project = opts.get("project", "")
            if not project:
                raise ValueError(f"subscription {sub!r} is not a full path: pass "
                                 '"projects/PROJECT/subscriptions/NAME" or .option("project", ...)')
            sub = f"projects/{project}/subscriptions/{sub}"
        o = cls(
            subscription=sub,
            max_messages_per_batch=int(opts.get("maxmessagesperbatch", 1000)),
            num_partitions=int(opts.get("numpartitions", 2)),
            ack_deadline_seconds=int(opts.get("ackdeadlineseconds", 60)),
            max_lease_seconds=float(opts.get("maxleaseseconds", 3600)),
            max_buffered=int(opts.get("maxbuffered", 0)),
            max_buffered_bytes=int(opts.get("maxbufferedbytes", MAX_BUFFERED_BYTES)),
            pull_timeout_seconds=float(opts.get("pulltimeoutseconds", 5)),
            emulator_host=opts.get("emulatorhost", ""),
        )
        if o.max_messages_per_batch < 1 or o.num_partitions < 1 or o.max_buffered_bytes < 1:
            raise ValueError("maxMessagesPerBatch, numPartitions and maxBufferedBytes must be >= 1")
        if not 10 <= o.ack_deadline_seconds <= 600:
            raise ValueError("ackDeadlineSeconds must be between 10 and 600 (Pub/Sub's range)")
        return o

    @property
    def buffer_limit(self) -> int:
        return self.max_buffered or 2 * self.max_messages_per_batch


@dataclass
class Held:
    """A pulled, not yet acknowledged message and its lease."""

    ack_id: str
    row: tuple
    leased_at: float
    seq: int | None = None
    size: int = 0  # bytes held: data, attributes and id (message_size)


@dataclass
class MessagePartition(InputPartition):
    """The messages of one Spark task: carried from the driver, so executors need no client."""

    rows: list[tuple] = field(default_factory=list)


def message_row(received: Any) -> tuple:
    """A ReceivedMessage as a row of SCHEMA (publish_time in epoch microseconds)."""
    m = received.message
    publish_time = to_micros(m.publish_time) if m.publish_time else None
    return (m.message_id, publish_time, dict(m.attributes), bytes(m.data),
            int(received.delivery_attempt or 0) or None)


def message_size(row: tuple) -> int:
    """The bytes a message row holds in the buffer: its data, attributes and id (pure)."""
    attributes = row[2] or {}
    return (len(row[3] or b"") + len(row[0] or "")
            + sum(len(k) + len(v) for k, v in attributes.items()))


def split(items: Sequence[Any], n: int) -> list[list[Any]]:
    """Split into at most n contiguous, non-empty, near-equal chunks."""
    n = max(1, min(n, len(items)))
    size, extra = divmod(len(items), n)
    out, i = [], 0
    for k in range(n):
        j = i + size + (1 if k < extra else 0)
        out.append(list(items[i:j]))
        i = j
    return [c for c in out if c]


def chunks(items: Sequence[str], size: int = ACK_CHUNK) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


def _modack(client: Any, subscription: str, ack_ids: Sequence[str], seconds: int) -> None:
    """Set the ack deadline of these messages; a failure costs a redelivery, never a loss."""
    for part in chunks(ack_ids):
        try:
            client.modify_ack_deadline(subscription=subscription, ack_ids=part,
                                       ack_deadline_seconds=seconds)
        except Exception as exc:  # noqa: BLE001 - a lost lease means a redelivery, not a loss
            log.warning("modify_ack_deadline(%d ids, %ds) failed: %s", len(part), seconds, exc)


class Leaser:
    """Keeps the lease of every held message alive, like python-pubsub's ``leaser.py``: one
    thread, one batched modifyAckDeadline per cycle, a jittered sleep at 0.5–0.8 of the
    deadline, and leases dropped after ``max_lease_seconds`` so a stuck batch cannot hold
    messages forever (``on_expired`` hears of them; Pub/Sub redelivers them).

    ``_lock`` guards ``_leased`` (ack id → time the lease was taken) and ``stats``.
    """

    def __init__(self, client: Any, opts: PubSubOptions,
                 on_expired: Callable[[set[str]], None]) -> None:
        self.client, self.opts, self.on_expired = client, opts, on_expired
        self._lock = threading.Lock()
        self._leased: dict[str, float] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pubsub-lease", daemon=True)
        self.stats = {"extended": 0, "expired": 0}

    def start(self) -> None:
        self._thread.start()

    def add(self, ack_ids: Sequence[str]) -> None:
        """Take the lease at once: the subscription's own deadline may be shorter."""
        _modack(self.client, self.opts.subscription, ack_ids, self.opts.ack_deadline_seconds)
        now = time.monotonic()
        with self._lock:
            self._leased.update(dict.fromkeys(ack_ids, now))

    def remove(self, ack_ids: Sequence[str]) -> None:
        with self._lock:
            for a in ack_ids:
                self._leased.pop(a, None)

    def _loop(self) -> None:
        deadline = self.opts.ack_deadline_seconds
        while not self._stopping.wait(random.uniform(0.5, 0.8) * deadline):
            now = time.monotonic()
            with self._lock:
                expired = {a for a, t in self._leased.items()
                           if now - t > self.opts.max_lease_seconds}
                for a in expired:
                    del self._leased[a]
                live = list(self._leased)
                self.stats["expired"] += len(expired)
                self.stats["extended"] += len(live)
            if expired:
                log.warning("dropped the lease of %d messages held over %.0fs",
                            len(expired), self.opts.max_lease_seconds)
                self.on_expired(expired)
            if live:
                _modack(self.client, self.opts.subscription, live, deadline)

    def stop(self) -> list[str]:
        """Stop extending; return the ack ids still leased (the caller hands them back)."""
        self._stopping.set()
        self._thread.join(timeout=5)
        with self._lock:
            held, self._leased = list(self._leased), {}
        return held


class Puller:
    """Pulls messages into the buffer on one thread while the buffer has room (flow control:
    ``buffer_limit`` messages not yet numbered, ``max_buffered_bytes`` held in all), leasing
    each batch it receives, and numbers buffered messages into batches for Spark; acks once a
    batch is done.

    A pull asks for no more messages than fit in the bytes left at MAX_MESSAGE_BYTES each
    (at least one), so the bytes held exceed the bound by at most one message.

    ``_lock`` guards ``unplanned``, ``planned``, ``next_seq``, ``held_bytes`` and ``stats``.
    """

    def __init__(self, client: Any, opts: PubSubOptions, leaser: Leaser) -> None:
        self.client, self.opts, self.leaser = client, opts, leaser
        self._lock = threading.Lock()
        self.unplanned: deque[Held] = deque()
        self.planned: dict[int, Held] = {}
        self.next_seq = 0
        self.held_bytes = 0  # of unplanned and planned messages: everything not yet acked
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pubsub-pull", daemon=True)
        self.stats = {"pulled": 0, "acked": 0, "max_held_bytes": 0}

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        from google.api_core import exceptions as gexc

        while not self._stopping.is_set():
            with self._lock:
                room = self.opts.buffer_limit - len(self.unplanned)
                room_bytes = self.opts.max_buffered_bytes - self.held_bytes
            if room <= 0 or room_bytes <= 0:  # flow control: let Spark catch up first
                self._stopping.wait(0.05)
                continue
            try:
                resp = self.client.pull(
                    subscription=self.opts.subscription,
                    max_messages=max(1, min(room, 1000, room_bytes // MAX_MESSAGE_BYTES)),
                    timeout=self.opts.pull_timeout_seconds,
                )
            except (gexc.DeadlineExceeded, gexc.ServiceUnavailable, gexc.InternalServerError,
                    gexc.Aborted, gexc.Unknown) as exc:
                log.debug("pull: %s", exc)
                self._stopping.wait(0.5)
                continue
            except Exception:  # noqa: BLE001 - keep pulling; the query must not die silently
                log.exception("pull failed")
                self._stopping.wait(1.0)
                continue
            if not resp.received_messages:
                continue
            now = time.monotonic()
            held = []
            for r in resp.received_messages:
                row = message_row(r)
                held.append(Held(r.ack_id, row, now, size=message_size(row)))
            self.leaser.add([h.ack_id for h in held])
            with self._lock:
                self.unplanned.extend(held)
                self.held_bytes += sum(h.size for h in held)
                self.stats["pulled"] += len(held)
                self.stats["max_held_bytes"] = max(self.stats["max_held_bytes"], self.held_bytes)

    def forget(self, ack_ids: set[str]) -> None:
        """Drop messages whose lease expired: Pub/Sub redelivers them."""
        with self._lock:
            self.held_bytes -= sum(h.size for h in self.unplanned if h.ack_id in ack_ids)
            self.unplanned = deque(h for h in self.unplanned if h.ack_id not in ack_ids)
            for seq in [s for s, h in self.planned.items() if h.ack_id in ack_ids]:
                self.held_bytes -= self.planned.pop(seq).size

    def number(self, limit: int | None) -> int:
        """Give sequence numbers to up to ``limit`` buffered messages; return the end seq."""
        with self._lock:
            take = len(self.unplanned) if limit is None else min(limit, len(self.unplanned))
            for _ in range(take):
                h = self.unplanned.popleft()
                h.seq = self.next_seq
                self.planned[h.seq] = h
                self.next_seq += 1
            return self.next_seq

    def rows(self, start: int, end: int) -> list[tuple]:
        with self._lock:
            return [self.planned[s].row for s in range(start, end) if s in self.planned]

    def ack_below(self, end: int) -> int:
        with self._lock:
            done = [self.planned.pop(s) for s in [s for s in self.planned if s < end]]
            ack_ids = [h.ack_id for h in done]
            self.held_bytes -= sum(h.size for h in done)
        self.leaser.remove(ack_ids)
        for part in chunks(ack_ids):
            _ack_with_retry(self.client, self.opts.subscription, part)
        with self._lock:
            self.stats["acked"] += len(ack_ids)
        return len(ack_ids)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=self.opts.pull_timeout_seconds + 1)
        with self._lock:
            self.unplanned.clear()
            self.planned.clear()
            self.held_bytes = 0


class _Runtime:
    """Driver-side state: the client, a puller and a leaser, and this run's id. Never pickled."""

    def __init__(self, opts: PubSubOptions) -> None:
        from pipeline.clients import subscriber_client
        from pipeline.config import Settings

        self.opts = opts
        # The option names the emulator for this reader alone: nothing global changes.
        self.client = subscriber_client(Settings(pubsub_emulator_host=opts.emulator_host))
        # Offsets name the run that numbered them: a restarted reader cannot know which
        # messages an older run's offsets meant (Spark < 4.2 does not even say where it resumes).
        self.run = uuid.uuid4().hex[:12]
        self.leaser = Leaser(self.client, opts, on_expired=lambda ids: self.puller.forget(ids))
        self.puller = Puller(self.client, opts, self.leaser)
        self.leaser.start()
        self.puller.start()

    @property
    def next_seq(self) -> int:
        return self.puller.next_seq

    def close(self) -> None:
        """Stop both threads and hand every unacked message back to Pub/Sub at once."""
        self.puller.stop()
        held = self.leaser.stop()
        _modack(self.client, self.opts.subscription, held, 0)
        try:
            self.client.close()
        except Exception:  # noqa: BLE001
            pass


def _ack_with_retry(client: Any, subscription: str, ack_ids: list[str]) -> None:
    from pipeline.retry import call_with_retries

    try:
        call_with_retries(lambda: client.acknowledge(subscription=subscription, ack_ids=ack_ids))
    except Exception as exc:  # noqa: BLE001 - unacked means redelivered; the sink dedupes
        log.warning("acknowledge of %d messages failed, they will be redelivered: %s",
                    len(ack_ids), exc)


class PubSubStreamReader(DataSourceStreamReader, SupportsTriggerAvailableNow):
    """The driver-side reader. Only ``opts`` is pickled; the runtime stays on the driver."""

    def __init__(self, opts: PubSubOptions) -> None:
        self.opts = opts
        self._rt: _Runtime | None = None

    def __getstate__(self) -> dict:
        return {"opts": self.opts, "_rt": None}

    @property
    def runtime(self) -> _Runtime:
        if self._rt is None:
            self._rt = _Runtime(self.opts)
        return self._rt

    def initialOffset(self) -> dict:
        return {RUN_KEY: self.runtime.run, OFFSET_KEY: 0}  # starts pulling as early as possible

    def prepareForTriggerAvailableNow(self) -> None:
        """Refuse ``trigger(availableNow=True)`` in one sentence.

        A subscription has no "latest data" to stop at. Spark < 4.2 never calls this (a Python
        source cannot see the trigger there): ``bucketlens run`` offers no such trigger, and a
        hand-built availableNow query only ever re-reads, since ``latestOffset`` is not asked
        again and nothing gets acked.
        """
        raise ValueError("the pubsub source does not support trigger(availableNow=True): a "
                         "subscription has no end; use a processingTime trigger and stop the "
                         "query when it is idle")

    def getDefaultReadLimit(self) -> ReadLimit:
        return ReadMaxRows(self.opts.max_messages_per_batch)

    def _seq(self, offset: dict | None) -> int | None:
        """The offset's sequence number if this run numbered it, else None."""
        if offset and offset.get(RUN_KEY) == self.runtime.run:
            return int(offset[OFFSET_KEY])
        return None

    def latestOffset(self, start: dict | None = None, limit: ReadLimit | None = None) -> dict:
        """Number up to ``maxMessagesPerBatch`` buffered messages as the next batch.

        Spark calls this only once the previous batch has run and its commit log is written
        (the micro-batch loop is sequential), but ``commit`` for that batch comes only when the
        *next* batch is planned, which on an idle stream never happens: so everything numbered
        so far is acked here. pyspark >= 4.2 passes the previous end as ``start`` and a read
        limit; 4.0/4.1 pass nothing and the option is the limit.
        """
        rt = self.runtime
        done = rt.next_seq if start is None else self._seq(start)
        if done:
            rt.puller.ack_below(done)
        if ADMISSION_CONTROL and limit is not None:
            max_rows = None if isinstance(limit, ReadAllAvailable) else getattr(limit, "max_rows", None)
        else:
            max_rows = self.opts.max_messages_per_batch
        return {RUN_KEY: rt.run, OFFSET_KEY: rt.puller.number(max_rows)}

    def partitions(self, start: dict, end: dict) -> Sequence[InputPartition]:
        """Ship this run's numbered messages; a batch planned by an earlier run yields nothing
        here (its messages were never acked, so Pub/Sub redelivers them)."""
        stop = self._seq(end)
        if stop is None:
            return []
        rows = self.runtime.puller.rows(self._seq(start) or 0, stop)
        return [MessagePartition(rows=c) for c in split(rows, self.opts.num_partitions)]

    def read(self, partition: InputPartition) -> Iterator[tuple]:
        yield from partition.rows  # type: ignore[attr-defined]

    def commit(self, end: dict) -> None:
        stop = self._seq(end)
        n = self.runtime.puller.ack_below(stop) if stop else 0
        log.debug("committed offset %s: acked %d", end, n)

    def stop(self) -> None:
        if self._rt is not None:
            self._rt.close()
            self._rt = None


class PubSubDataSource(DataSource):
    """Register with ``spark.dataSource.register(PubSubDataSource)``; use ``format("pubsub")``."""

    @classmethod
    def name(cls) -> str:
        return "pubsub"

    def schema(self) -> str:
        return SCHEMA

    def streamReader(self, schema: StructType) -> DataSourceStreamReader:
        return PubSubStreamReader(PubSubOptions.parse(dict(self.options)))
