"""One configuration object for every bucketlens command.

Precedence: command-line flag > ``BUCKETLENS_*`` environment variable > default. The same
variables are what ``bucketlens local env`` prints, so ``eval "$(bucketlens local env)"``
points every command at the local stack.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

ENV_PREFIX = "BUCKETLENS_"
# Settings fields that also come from the variable Google's own clients and gcloud use, so a
# shell set up for the emulators (`gcloud beta emulators ... env-init`) needs nothing more.
EMULATOR_VARS = {"pubsub_emulator_host": "PUBSUB_EMULATOR_HOST",
                 "storage_emulator_host": "STORAGE_EMULATOR_HOST"}
RESULTS_PREFIX = "_bucketlens"  # the JSON-lines sink's default folder inside the watched bucket


@dataclass(frozen=True)
class Settings:
    """Everything a command needs to find its resources and tune its work."""

    project: str = "bucketlens-local"
    bucket: str = "bucketlens-images"
    prefix: str = ""  # only objects under this prefix are classified
    topic: str = "bucketlens-uploads"
    subscription: str = "bucketlens-uploads-sub"
    dead_letter_topic: str = "bucketlens-uploads-dlq"
    dataset: str = "bucketlens"
    table: str = "predictions"
    dead_letter_table: str = "dead_letters"
    events_table: str = "object_events"
    bq_endpoint: str = ""  # empty = the real BigQuery API
    # host:port of the Pub/Sub and Cloud Storage emulators; empty = the real services. Besides
    # BUCKETLENS_*, from_env reads the names Google's clients and tools use (EMULATOR_VARS).
    pubsub_emulator_host: str = ""
    storage_emulator_host: str = ""
    bq_storage_endpoint: str = ""  # host:port of an emulator's Storage Write API (gRPC, plaintext)
    # append: Storage Write API default stream after a partition-bounded key lookup (no jobs);
    # merge: staging table + load job + MERGE per batch (README "Delivery guarantees")
    sink_mode: str = "append"
    # how long a batch waits out BigQuery rate/quota errors before failing; 0 = no limit
    bq_quota_patience_seconds: float = 0.0
    bq_location: str = "US"
    region: str = ""  # bucket location on real GCP; empty = Cloud Storage's default (US)
    service_account: str = "bucketlens-job"  # the job's identity (name or full email)
    model: str = "mobilenet_v2"
    weights: str = ""  # empty = the model's default weights; else a path or gs:// URI
    # how often a running stream looks for a newly promoted version when `model` is a model
    # location (README "Your own classes"); the check happens between micro-batches
    model_refresh_seconds: float = 30.0
    embeddings: bool = False  # also store each image's embedding (README "Similar images")
    batch_size: int = 16
    torch_threads: int = 0  # 0 = 1 inside a Spark worker, all cores elsewhere
    # freed memory a process running the model keeps for its next batch, in MiB (glibc only;
    # 0 = glibc's defaults): pipeline/model/allocator.py
    malloc_keep_mb: int = 512
    top_k: int = 5
    min_confidence: float = 0.0
    checkpoint: str = ".bucketlens/checkpoints/predictions"
    trigger_seconds: float = 0.5  # bench/README.md: 2 s → 0.5 s cut latency p50 by ~40 %
    max_messages_per_batch: int = 1000
    # what the source's buffer may hold (pulled, not yet acked) in bytes: a Pub/Sub message
    # may be 10 MB, so a bound in messages alone is no bound on the driver's memory
    max_buffered_bytes: int = 256 * 1024 * 1024
    num_partitions: int = 0  # 0 = Spark's default parallelism
    ack_deadline_seconds: int = 60
    # Pub/Sub counts every delivery, including redeliveries after a crash, towards the
    # subscription's dead-letter policy; poison messages are dead-lettered in code, so this
    # last resort only catches messages that keep crashing whole batches.
    max_delivery_attempts: int = 20
    fetch_threads: int = 8
    fetch_timeout_seconds: float = 60.0
    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 64_000_000
    spark_master: str = "local[2]"
    # Spark's own (JVM) log and progress bars go to this file, so commands print only their
    # results; empty (`-v`) = the console. Under spark-submit the platform's logging stands.
    spark_log: str = ".bucketlens/spark.log"
    sink: str = "bigquery"  # bigquery | jsonl | console
    metrics_port: int = 0  # 0 = no Prometheus endpoint
    jsonl_uri: str = ""  # JSON-lines sink target; empty = gs://<bucket>/_bucketlens/<table>
    alerts: str = ""  # alert rule file (path or gs:// URI); empty = no alerts (README "Alerts")
    alert_topic: str = "bucketlens-alerts"  # where alerts are published
    drift_window: str = "hour"  # the drift views' window: minute, hour, day or N seconds
    drift_baseline: str = ""  # a time inside the drift baseline window; empty = the first window

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``BUCKETLENS_*`` variables, then apply non-None overrides."""
        env = os.environ if env is None else env
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper()) or env.get(EMULATOR_VARS.get(f.name, ""))
            if raw is not None and raw != "":
                values[f.name] = _coerce(f.name, hints[f.name], raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown settings: {sorted(unknown)}")
        return cls(**values).validated()  # what a command line builds is checked at once

    def validated(self) -> Settings:
        """These settings, once every GCP name in them passes GCP's naming rules and every other
        value its choices or range (``pipeline.names``); no I/O, so a command refuses bad input
        in one sentence before it builds a client."""
        from pipeline.names import check_settings

        check_settings(self)
        return self

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def table_id(self) -> str:
        return f"{self.project}.{self.dataset}.{self.table}"

    @property
    def dead_letter_table_id(self) -> str:
        return f"{self.project}.{self.dataset}.{self.dead_letter_table}"

    @property
    def events_table_id(self) -> str:
        return f"{self.project}.{self.dataset}.{self.events_table}"

    @property
    def subscription_path(self) -> str:
        return f"projects/{self.project}/subscriptions/{self.subscription}"

    @property
    def topic_path(self) -> str:
        return f"projects/{self.project}/topics/{self.topic}"

    @property
    def alert_topic_path(self) -> str:
        return f"projects/{self.project}/topics/{self.alert_topic}"

    @property
    def dead_letter_topic_path(self) -> str:
        return f"projects/{self.project}/topics/{self.dead_letter_topic}"

    @property
    def dead_letter_subscription_path(self) -> str:
        """Keeps what reaches the dead-letter topic (a topic alone drops it)."""
        return f"projects/{self.project}/subscriptions/{self.dead_letter_topic}-sub"

    def as_env(self) -> dict[str, str]:
        """The ``BUCKETLENS_*`` variables that reproduce these settings."""
        return {ENV_PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in fields(self)}


def _coerce(name: str, kind: Any, raw: str) -> Any:
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is bool:
            return raw.strip().lower() in {"1", "true", "yes", "on"}
        return raw
    except ValueError:
        from pipeline.names import InvalidSetting, printable

        raise InvalidSetting(f"{ENV_PREFIX}{name.upper()}='{printable(raw, 80)}' is not a valid "
                             f"{kind.__name__}") from None
