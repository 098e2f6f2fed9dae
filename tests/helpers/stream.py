"""The end-to-end tests' verbs: publish to the topic, upload sample photos, read the rows."""

from __future__ import annotations

from pipeline import clients
from pipeline.config import Settings
from pipeline.model.classfolders import discover
from producer.datasets import sample_dataset
from producer.replay import replay
from tests.helpers.tables import query
from tests.helpers.wait import wait_until


def publish(settings: Settings, payloads: list[tuple[bytes, dict[str, str]]]) -> list[str]:
    """Publish messages to the settings' topic and wait for their ids."""
    pub = clients.publisher_client()
    futures = [pub.publish(settings.topic_path, data, **attrs) for data, attrs in payloads]
    return [f.result(timeout=30) for f in futures]


def upload_samples(settings: Settings, n: int):
    """Replay ``n`` of the bundled sample photos into the settings' bucket, all of them."""
    items = discover(sample_dataset())
    summary = replay(items, settings, rate=50, limit=n, loop=True, seed=1, progress=False)
    assert summary.uploaded == n and summary.failed == 0
    return summary


def rows_of(settings: Settings, table: str | None = None) -> list[dict]:
    table_id = f"{settings.project}.{settings.dataset}.{table or settings.table}"
    return query(settings, f"SELECT * FROM `{table_id}`")


def wait_rows(settings: Settings, n: int, query, timeout: float = 180,
              table: str | None = None) -> list[dict]:
    """At least ``n`` rows, failing early with the stream's own error if it died.

    Rows land only inside a batch, so the table is read again only once another batch has
    committed: bqemulator parses every query in Python (~50 ms of its CPU), and a poll each
    second of an idle stream was a large share of the suite's emulator time."""
    read_after: object = object()  # the batch id of the last read (none yet)

    def enough() -> list[dict]:
        nonlocal read_after
        if query.exception():
            raise AssertionError(f"stream failed: {query.exception()}")
        batch = (query.lastProgress or {}).get("batchId")
        if batch == read_after:
            return []
        read_after = batch
        rows = rows_of(settings, table)
        return rows if len(rows) >= n else []

    return wait_until(enough, timeout, f"{n} rows in {table or settings.table}", interval=1)


def keys(rows: list[dict]) -> set[tuple]:
    return {(r["bucket"], r["name"], r["generation"]) for r in rows}


def drained(query, messages: int, timeout: float = 120) -> None:
    """Wait until the in-process stream has read ``messages`` messages in finished batches.

    A batch's progress is reported after it commits, so by then every row those messages
    make, a duplicate included, is in the table: the event to wait on instead of a sleep."""

    def done() -> bool:
        if query.exception():
            raise AssertionError(f"stream failed: {query.exception()}")
        return sum(p["numInputRows"] for p in query.recentProgress) >= messages

    wait_until(done, timeout, f"the stream to read {messages} messages")
