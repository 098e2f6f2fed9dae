"""What a micro-batch did: the driver's report, read by the stream, metrics, bench and tests.

Its own module so that ``metrics`` can use it without importing the stream (no cycle).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BatchReport:
    """What one micro-batch did; logged, returned to callers, and used by tests."""

    batch_id: int
    messages: int = 0
    poison: int = 0
    events: int = 0
    ignored: int = 0
    duplicates: int = 0
    already_done: int = 0
    classified: int = 0
    inserted: int = 0
    errors: int = 0
    alerts: int = 0  # messages published to the alert topic (pipeline.stream.alerts)
    seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    workers: dict[int, int] = field(default_factory=dict)  # worker pid → model loads there
    model_version: str = ""  # the one version every row of the batch was classified with
    rows: list[dict] = field(default_factory=list, repr=False)  # the predictions rows written
