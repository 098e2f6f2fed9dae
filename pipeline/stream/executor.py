"""The executor side of a micro-batch, as Beam separates a RunInference DoFn from its transform.

    out = batch_df.mapInPandas(classify_messages(settings), BATCH_SCHEMA)    # the stream
    results = work_df.mapInPandas(classify_partitions(settings), RESULT_SCHEMA)  # a key list

The stream's micro-batch is one Spark job: each task triages the notifications its source
partition carries (``pipeline.stream.triage``, pure, run once: here) and classifies the objects they
name, returning a verdict per message and the results together, so a small batch pays one
scheduling round, and no message payload travels back to the driver.
Inside each partition: generation-pinned downloads of ``CHUNK`` objects at a time (bounded in
bytes too), the next chunk downloading while this one is classified, with the model and the
storage client cached once per Python worker. The driver side (triage, the batch processor,
``start``) is ``pipeline.stream``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import TypeVar

import numpy as np
import pandas as pd

from pipeline.bigquery.rows import dead_letter_record
from pipeline.clients import shared_storage_client
from pipeline.config import Settings
from pipeline.model import cache
from pipeline.model import handler as model_handler
from pipeline.notifications import Notification, ObjectKey
from pipeline.stream import fetch
from pipeline.stream.triage import Triage, triage

T = TypeVar("T")
R = TypeVar("R")

WORK_SCHEMA = "bucket string, name string, generation long, size long"
# embedding: the L2-normalised penultimate features of the same forward pass when the settings
# ask for them (``Settings.embeddings``), else null; float32 halves what travels to the driver
RESULT_SCHEMA = ("bucket string, name string, generation long, status string, reason string, "
                 "topk string, worker_pid long, model_loads long, model_version string, "
                 "embedding array<float>")
CHUNK = 64  # objects fetched and classified together inside one partition
WORK_COLUMNS = ["bucket", "name", "generation", "size"]
RESULT_COLUMNS = ["bucket", "name", "generation", "status", "reason", "topk", "worker_pid",
                  "model_loads", "model_version", "embedding"]
MESSAGE_COLUMNS = ["message_id", "publish_time", "attributes", "data", "delivery_attempt"]
# One verdict per message, decided where the message is (``triage``): what the driver needs and
# nothing more: no payload travels back. ``record`` is JSON: the parsed notification for
# todo / event / ignored, the dead-letter row for dead; null for an in-partition duplicate.
VERDICT_SCHEMA = ("message_id string, verdict string, why string, record string, "
                  "delivery_attempt int")
VERDICT_COLUMNS = ["message_id", "verdict", "why", "record", "delivery_attempt"]
TODO, DEAD, EVENT, IGNORED, DUPLICATE = "todo", "dead", "event", "ignored", "duplicate"
# one row per message (result columns null) and one per classified object (verdict columns null)
BATCH_SCHEMA = f"{VERDICT_SCHEMA}, {RESULT_SCHEMA}"
BATCH_COLUMNS = VERDICT_COLUMNS + RESULT_COLUMNS


PartitionFn = Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]


def prefetched(items: Iterable[T], fetch: Callable[[T], R]) -> Iterator[tuple[T, R]]:
    """``(item, fetch(item))`` in order, fetching item i + 1 on a thread while the caller works
    on item i, so downloads and inference overlap (at most two fetched items in hand)."""
    with ThreadPoolExecutor(1, thread_name_prefix="bucketlens-prefetch") as pool:
        pending: tuple[T, Future[R]] | None = None
        for item in items:
            future = pool.submit(fetch, item)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (item, future)
        if pending is not None:
            yield pending[0], pending[1].result()


def _work_chunks(frames: Iterable[pd.DataFrame], max_bytes: int
                 ) -> Iterator[tuple[list[ObjectKey], dict[ObjectKey, int]]]:
    """The work rows as (keys, known sizes), at most CHUNK objects and fetch.CHUNK_BYTES of
    downloads at a time."""
    for frame in frames:
        rows = [(ObjectKey(b, n, int(g)), int(size) if pd.notna(size) else None)
                for b, n, g, size in zip(frame["bucket"], frame["name"], frame["generation"],
                                         frame["size"], strict=True)]
        for chunk in fetch.budget_chunks(rows, CHUNK, max_bytes):
            yield [k for k, _ in chunk], {k: size for k, size in chunk if size is not None}


def classify_partitions(settings: Settings) -> PartitionFn:
    """The executor side: fetch and classify CHUNK objects at a time, the next chunk's
    downloads running while this one is classified; the model is cached per worker."""

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        handler = model_handler.get_handler(settings)
        client = shared_storage_client(settings)

        def download(chunk: tuple[list[ObjectKey], dict[ObjectKey, int]]) -> list:
            keys, sizes = chunk
            return fetch.fetch_all(keys, settings, client, sizes=sizes)

        for (keys, _), fetched in prefetched(_work_chunks(frames, settings.max_bytes), download):
            yield _classified(keys, fetched, handler)

    return run


def work_row(n: Notification) -> tuple[str, str, int, int | None]:
    """A notification as a row of WORK_SCHEMA. The size, when it describes the download,
    bounds it and its chunk's budget; a content-encoded (gzip) object is served decompressed,
    so it is charged ``max_bytes`` instead (size unknown) and classified like any other."""
    size = n.size if n.content_encoding in (None, "", "identity") else None
    return n.key.bucket, n.key.name, n.key.generation, size


def work_frame(todo: Iterable[Notification]) -> pd.DataFrame:
    """Notifications as rows of WORK_SCHEMA (``work_row``)."""
    return pd.DataFrame([work_row(n) for n in todo], columns=WORK_COLUMNS)


def message_rows(frame: pd.DataFrame) -> list[tuple]:
    """A source frame's messages as the row tuples ``triage`` reads (nulls as None)."""
    columns = [frame[c].astype(object).where(frame[c].notna(), None) for c in MESSAGE_COLUMNS]
    return list(zip(*columns, strict=True))


def classify_messages(settings: Settings) -> PartitionFn:
    """The stream's one job per micro-batch: triage each source partition's messages here,
    once, and classify the objects they name. Yields a verdict per message (the driver
    dead-letters, records events and de-duplicates across partitions from these alone) and
    then a result per classified object."""
    classify_work = classify_partitions(settings)

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        work = []
        for frame in frames:
            rows = message_rows(frame)
            t = triage(rows, settings)
            yield _batch_frame(verdict_frame(rows, t))
            work.append(work_frame(t.todo))
        if any(len(w) for w in work):
            for result in classify_work(iter(work)):
                yield _batch_frame(result)

    return run


def verdict_frame(rows: list[tuple], t: Triage) -> pd.DataFrame:
    """One VERDICT_SCHEMA row per message row of ``t`` (pure). A message triage dropped as an
    in-partition duplicate of another is a ``duplicate``."""
    attempts = {r[0]: r[4] if len(r) > 4 else None for r in rows}
    out = [(r[0], DEAD, why, json.dumps(dead_letter_record(r[0], why, r[2] or {}, r[3], r[1],
                                                           None)), attempts[r[0]])
           for r, why in t.dead_letters]
    out += [(n.message_id, TODO, None, note_json(n), attempts[n.message_id]) for n in t.todo]
    out += [(n.message_id, EVENT, None, note_json(n), attempts[n.message_id]) for n in t.events]
    out += [(n.message_id, IGNORED, why, note_json(n), attempts[n.message_id])
            for n, why in t.ignored]
    seen = {v[0] for v in out}
    out += [(r[0], DUPLICATE, None, None, attempts[r[0]]) for r in rows if r[0] not in seen]
    return pd.DataFrame(out, columns=VERDICT_COLUMNS)


def note_json(n: Notification) -> str:
    """A parsed notification as JSON: what a verdict carries back instead of the message."""
    def t(v: datetime | None) -> str | None:
        return v.isoformat() if v is not None else None

    return json.dumps({
        "bucket": n.key.bucket, "name": n.key.name, "generation": n.key.generation,
        "event_type": n.event_type, "message_id": n.message_id, "event_time": t(n.event_time),
        "publish_time": t(n.publish_time), "size": n.size, "content_type": n.content_type,
        "metadata": dict(n.metadata) if n.metadata is not None else None,
        "metageneration": n.metageneration, "created": t(n.created),
        "content_encoding": n.content_encoding})


def note_from_json(text: str) -> Notification:
    """``note_json``'s inverse: the same Notification, naive or aware times as they were."""
    d = json.loads(text)

    def t(v: str | None) -> datetime | None:
        return datetime.fromisoformat(v) if v is not None else None

    return Notification(
        key=ObjectKey(d["bucket"], d["name"], int(d["generation"])), event_type=d["event_type"],
        message_id=d["message_id"], event_time=t(d["event_time"]),
        publish_time=t(d["publish_time"]), size=d["size"], content_type=d["content_type"],
        metadata=d["metadata"], metageneration=d["metageneration"], created=t(d["created"]),
        content_encoding=d["content_encoding"])


def _batch_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with BATCH_SCHEMA's columns, the ones it lacks null (None, never NaN: an
    array column cannot take a float)."""
    return pd.DataFrame({c: frame[c] if c in frame else pd.Series([None] * len(frame),
                                                                   dtype=object, index=frame.index)
                         for c in BATCH_COLUMNS})


def _classified(keys: list[ObjectKey], fetched: list, handler) -> pd.DataFrame:
    results: dict[ObjectKey, tuple[str, str, str]] = {}
    embeddings: dict[ObjectKey, np.ndarray] = {}
    good = [f for f in fetched if f.ok]
    for f in fetched:
        if not f.ok:
            results[f.key] = (f.status, f.reason, "[]")
    for f, p in zip(good, handler.run_inference([f.data for f in good]), strict=True):
        results[f.key] = (p.status, p.reason, json.dumps([list(t) for t in p.topk]))
        if p.embedding:
            embeddings[f.key] = np.asarray(p.embedding, dtype=np.float32)
    pid, loads = os.getpid(), cache.model_load_count()
    return pd.DataFrame(
        [(k.bucket, k.name, k.generation, *results[k], pid, loads, handler.version,
          embeddings.get(k)) for k in keys],
        columns=RESULT_COLUMNS,
    )
