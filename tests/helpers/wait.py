"""One way for a test to wait: poll a condition, bounded in time, and say what never came."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(probe: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    """Call ``probe`` until it returns something truthy; return that, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def scrape(port: int, metric: str) -> float | None:
    """One value from a job's Prometheus endpoint (None while it is not serving yet)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == metric:
            return float(value)
    return None


def read_through(port: int, messages: int, timeout: float = 120) -> None:
    """Wait until the job behind ``port`` has read ``messages`` messages in finished batches.

    The listener counts a batch once it has committed, so by then every row those messages
    make, a duplicate included, is in the table: the event a test waits on instead of a sleep."""
    wait_until(lambda: (scrape(port, "bucketlens_input_rows_total") or 0) >= messages, timeout,
               f"the job to read {messages} messages")
