"""Faults against the whole pipeline: `bucketlens run` in a subprocess, real stack.

* SIGKILL three times during a 300-image replay, restart each time on the same checkpoint →
  exactly 300 rows with 300 distinct keys.
* About 10 % of GCS and BigQuery calls answer 503 (a proxy on 127.0.0.1) → every image lands,
  none twice, none as an error row.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deploy.localstack import free_port
from pipeline import clients
from pipeline.config import Settings
from pipeline.model.classfolders import discover
from producer.datasets import sample_dataset
from producer.replay import replay
from tests.helpers.faultproxy import sometimes, start_proxy, stop_proxy
from tests.helpers.tables import counts
from tests.helpers.wait import read_through

pytestmark = [pytest.mark.integration, pytest.mark.spark]
ROOT = Path(__file__).resolve().parent.parent


class Pipeline:
    """`python -m pipeline.commands.cli run` as a child process, with its own log."""

    def __init__(self, settings: Settings, log: Path, **env: str) -> None:
        self.port = free_port()  # its Prometheus endpoint: what it has read, batch by batch
        self.env = {**os.environ, **settings.as_env(), "PYTHONPATH": str(ROOT),
                    "BUCKETLENS_TRIGGER_SECONDS": "1", "BUCKETLENS_METRICS_PORT": str(self.port),
                    "BUCKETLENS_MAX_MESSAGES_PER_BATCH": "40", **env}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.commands.cli", "run"], env=self.env, cwd=ROOT,
                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """``sig`` to the driver's whole group (its JVM too), unless the driver was reaped
        already (``terminate``, ``alive``): its pid, the group's id, may be another's by now
        (pid_max is 32768 here, and the suite wraps it), and killpg would signal that group."""
        assert self.proc is not None
        if self.proc.returncode is None:  # alive or a zombie: the id is still ours
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
        self.proc.wait(60)

    def terminate(self, timeout: float = 90) -> int:
        """SIGTERM to the driver alone, as a service manager sends it; its exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def whereabouts(settings: Settings, missing: set[str]) -> dict[str, str]:
    """For objects with no row: is their notification still queued, dead-lettered, or gone?

    Called after the pipeline is killed: first let the leases it held lapse, or a message it
    held would read as gone."""
    time.sleep(settings.ack_deadline_seconds + 2)
    sub = clients.subscriber_client()
    found: dict[str, str] = {}
    for where, path in (("subscription", settings.subscription_path),
                        ("dead-letter", settings.dead_letter_subscription_path)):
        for _ in range(3):
            resp = sub.pull(subscription=path, max_messages=1000, timeout=5)
            for m in resp.received_messages:
                name = m.message.attributes.get("objectId", "")
                if name in missing:
                    found[name] = f"{where} (delivery attempt {m.delivery_attempt})"
    return {name: found.get(name, "nowhere") for name in sorted(missing)}


def wait_for(settings: Settings, pipe: Pipeline, at_least: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        if not pipe.alive():
            raise AssertionError(f"`bucketlens run` exited:\n{pipe.tail()}")
        n = counts(settings)[0]
        if n >= at_least:
            return n
        time.sleep(1)
    raise AssertionError(f"{n} of {at_least} rows after {timeout}s; log:\n{pipe.tail()}")


def test_sigkill_three_times_during_300_uploads_gives_exactly_300_rows(isolated, tmp_path) -> None:
    # the subscription's own ack deadline (10 s, conftest) bounds how long messages a killed
    # driver held wait before redelivery
    items = discover(sample_dataset())
    pipe = Pipeline(isolated, tmp_path / "run.log")
    uploads: dict = {}
    producer = threading.Thread(target=lambda: uploads.setdefault("s", replay(
        items, isolated, rate=10, limit=300, loop=True, seed=3, progress=False)))
    pipe.start()
    producer.start()
    try:
        for threshold in (40, 110, 180):
            wait_for(isolated, pipe, threshold, 240)
            pipe.kill()  # a crash: no stop(), no nack, a batch possibly half done
            written = counts(isolated)[0]  # what the last run must read at least: the rest
            pipe.start()
        producer.join(120)
        assert uploads["s"].uploaded == 300 and uploads["s"].failed == 0
        try:
            wait_for(isolated, pipe, 300, 420)
        except AssertionError:
            pipe.kill()
            bq = clients.bigquery_client(isolated)
            have = {r["name"] for r in bq.query(f"SELECT name FROM `{isolated.table_id}`").result()}
            missing = {name for name, _ in uploads["s"].objects} - have
            raise AssertionError(f"no row for {len(missing)} uploads: "
                                 f"{whereabouts(isolated, missing)}\n{pipe.tail()}") from None
        # the batches in which the last run read every notification not yet written have
        # committed: a duplicate among them would be in the table now
        read_through(pipe.port, 300 - written)
    finally:
        pipe.kill(signal.SIGTERM)
    rows, keys, errors = counts(isolated)
    assert (rows, keys, errors) == (300, 300, 0), pipe.tail()


def test_ten_percent_503s_on_gcs_and_bigquery_lose_and_duplicate_nothing(stack, isolated,
                                                                         tmp_path) -> None:
    def objects_and_jobs(method: str, path: str) -> bool:
        return "/o/" in path or "/download/" in path or "/queries" in path or "/jobs" in path

    gcs = start_proxy(stack.storage_host, sometimes(0.10, seed=1, only=objects_and_jobs))
    # seed 31 fails BigQuery's first job call: steady batches now make none (the stream's
    # memory), so the few lookups of its first batches are where a 503 can land
    bq = start_proxy(stack.bq_endpoint, sometimes(0.10, seed=31, only=objects_and_jobs))
    pipe = Pipeline(isolated.replace(bq_endpoint=bq.url, storage_emulator_host=gcs.url),
                    tmp_path / "run.log")
    try:
        summary = replay(discover(sample_dataset()), isolated, rate=20, limit=60, loop=True,
                         seed=4, progress=False)
        assert summary.uploaded == 60
        pipe.start()
        wait_for(isolated, pipe, 60, 300)
        read_through(pipe.port, 60)  # the batches that read all 60 committed: no late row
        # A graceful stop: the query stops and hands back what it holds; no Py4J tracebacks.
        assert pipe.terminate() == 0, pipe.tail()
        log = pipe.log.read_text(errors="replace")
        assert "Py4J" not in log, pipe.tail()
        assert "falling behind" not in log  # slow batches under a 1 s trigger are not warnings
    finally:
        pipe.kill(signal.SIGTERM)
        stop_proxy(gcs)
        stop_proxy(bq)
    injected = {name: sum(1 for s in p.seen if s[2] == 503) for name, p in
                (("gcs", gcs), ("bigquery", bq))}
    assert injected["gcs"] >= 3 and injected["bigquery"] >= 1, (injected, bq.seen, pipe.tail())
    assert counts(isolated) == (60, 60, 0), pipe.tail()
