"""What this run has written: the driver's memory that spares a BigQuery query per batch.

    memory = Recent(ack_deadline_seconds=60, trigger_seconds=5)
    check = memory.to_verify(attempts, ages)   # the keys only BigQuery can vouch for
    ...write, then memory.remember(keys)

A key lookup is a query job: on real BigQuery ~0.5–2 s and at least 10 MB billed per table
read (https://cloud.google.com/bigquery/pricing#on_demand_pricing), so one per micro-batch sets
both the stream's latency and most of its bill. Most batches need none: a duplicate of a key
this run wrote is caught here, and BigQuery is asked only where a copy can come from outside
this run's memory:

* the first batches after a start (the warm-up, counted from the first batch): a predecessor
  that died between its write and its ack leaves messages that Pub/Sub redelivers once their
  ack deadline runs out, at most one ack deadline after it died — so at most one after this
  run's first pull;
* a message Pub/Sub marks as redelivered (``delivery_attempt`` > 1, set where the subscription
  has a dead-letter policy; without one it is unknown, and every key is looked up);
* a message that waited in the backlog longer than the warm-up span (its object older than
  that when the batch reads it): another writer had time to write its key — above all
  ``bucketlens backfill``, which lists the bucket while the stream catches up, or a
  predecessor whose run outlived a lease. A stream that keeps up reads messages seconds old,
  so this costs a query only while it works through a backlog, once per batch, not per key;
* a key this run forgot (the memory holds the newest ``capacity`` keys).

What stays possible — GCS publishing one generation's notification twice far apart, a
backfill and the stream writing an object within seconds of its upload — is absorbed by the
views (one row per key) and ``bucketlens compact``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable

CAPACITY = 500_000  # keys; about 100 bytes each on top of the key's own strings


class Recent:
    """A bounded, insertion-ordered set of keys written by this run, plus the warm-up clock."""

    def __init__(self, ack_deadline_seconds: float, trigger_seconds: float = 0.0,
                 capacity: int = CAPACITY, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.clock = clock
        # from the first batch, not from construction: a start spends tens of seconds on
        # Spark and the model, while a predecessor's leases keep running out
        self.started: float | None = None
        # a predecessor's leases run out within one ack deadline of its death; the second
        # deadline and two triggers cover messages pulled at the end of that time. A message
        # older than this when read is "from the backlog" (see the module docstring).
        self.warmup_seconds = 2 * ack_deadline_seconds + 2 * trigger_seconds
        self._keys: dict[Hashable, None] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def warming_up(self) -> bool:
        return self.started is None or self.clock() - self.started < self.warmup_seconds

    def remember(self, keys: Iterable[Hashable]) -> None:
        """Keys now in the table (written, or found there); the oldest are forgotten first."""
        for k in keys:
            self._keys.pop(k, None)
            self._keys[k] = None
        while len(self._keys) > self.capacity:
            del self._keys[next(iter(self._keys))]

    def to_verify(self, attempts: dict[Hashable, int | None],
                  ages: dict[Hashable, float | None] | None = None) -> set[Hashable]:
        """Of the keys (with their messages' highest delivery attempt and, where given, their
        age in seconds), those only BigQuery can vouch for: all of them while warming up, else
        the redelivered, unmarked, old or unknown-age ones. The first call with keys starts the
        warm-up: a start whose first batches are empty (a replayed batch an earlier run
        planned) has not read a predecessor's messages yet."""
        if self.started is None and attempts:
            self.started = self.clock()
        if self.warming_up:
            return set(attempts)
        stale = {k for k, a in (ages or {}).items() if a is None or a > self.warmup_seconds}
        return {k for k, a in attempts.items() if a is None or a > 1} | (stale & set(attempts))
