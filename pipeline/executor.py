"""The executor side of a micro-batch, as Beam separates a RunInference DoFn from its transform.

    results = work_df.mapInPandas(classify_partitions(settings), RESULT_SCHEMA)

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
from typing import TypeVar

import numpy as np
import pandas as pd

from pipeline import classify, fetch
from pipeline.clients import shared_storage_client
from pipeline.config import Settings
from pipeline.notifications import ObjectKey

T = TypeVar("T")
R = TypeVar("R")

WORK_SCHEMA = "bucket string, name string, generation long, size long"
# embedding: the L2-normalised penultimate features of the same forward pass when the settings
# ask for them (``Settings.embeddings``), else null; float32 halves what travels to the driver
RESULT_SCHEMA = ("bucket string, name string, generation long, status string, reason string, "
                 "topk string, worker_pid long, model_loads long, model_version string, "
                 "embedding array<float>")
CHUNK = 64  # objects fetched and classified together inside one partition


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
        handler = classify.get_handler(settings)
        client = shared_storage_client(settings)

        def download(chunk: tuple[list[ObjectKey], dict[ObjectKey, int]]) -> list:
            keys, sizes = chunk
            return fetch.fetch_all(keys, settings, client, sizes=sizes)

        for (keys, _), fetched in prefetched(_work_chunks(frames, settings.max_bytes), download):
            yield _classified(keys, fetched, handler)

    return run


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
    pid, loads = os.getpid(), classify.model_load_count()
    return pd.DataFrame(
        [(k.bucket, k.name, k.generation, *results[k], pid, loads, handler.version,
          embeddings.get(k)) for k in keys],
        columns=["bucket", "name", "generation", "status", "reason", "topk", "worker_pid",
                 "model_loads", "model_version", "embedding"],
    )
