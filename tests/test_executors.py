"""The model is loaded once per executor Python worker — not per batch, partition or job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.model.classfolders import discover
from pipeline.stream import forkserver
from producer.datasets import sample_dataset
from producer.replay import replay

pytestmark = [pytest.mark.integration, pytest.mark.spark]
ROOT = Path(__file__).resolve().parent.parent


def test_two_executors_load_the_model_once_each(isolated) -> None:
    summary = replay(discover(sample_dataset()), isolated, rate=50, limit=6, progress=False)
    objects = [f"{name}#{gen}" for name, gen in summary.objects]
    env = {**os.environ, **isolated.as_env(), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "tests.helpers.executors", isolated.bucket, *objects],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["executors"] == 2
    assert report["statuses"] == ["ok"]
    # 3 jobs x 8 partitions ran on 2 executors (1 core each): one reused worker per executor,
    # and each loaded the model exactly once.
    assert len(report["loads"]) == 2, report
    assert set(report["loads"].values()) == {1}, report


def test_workers_fork_from_a_daemon_that_imported_torch_already(spark) -> None:
    """Each Python worker starts with torch in memory: its parent is pipeline.stream.daemon."""
    import pandas as pd

    def probe(frames):
        import os
        import sys

        warm = "torch" in sys.modules  # before this task imported anything of ours
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as fh:
            parent = fh.read().replace(b"\0", b" ").decode()
        for _ in frames:
            pass
        yield pd.DataFrame({"warm": [warm], "parent": [parent]})

    rows = spark.range(4, numPartitions=2).mapInPandas(probe, "warm boolean, parent string") \
        .collect()
    assert rows and all(r.warm for r in rows), rows
    # or, where a fork server runs (the suite's: conftest), a daemon forked from it
    served = os.environ.get(forkserver.ENV)
    daemon = f"-m pipeline.stream.forkserver {served}" if served else \
        "-m pipeline.stream.daemon pyspark.worker"
    assert all(daemon in r.parent for r in rows), rows

