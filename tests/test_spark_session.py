"""Under spark-submit the job keeps the master the platform chose (Dataproc's YARN, the
rehearsal's local-cluster); run directly it uses its own (local[2] by default)."""

from __future__ import annotations

import pytest
from pyspark.sql import SparkSession

from pipeline import spark as spark_mod


class Recorder:
    def __init__(self) -> None:
        self.masters: list[str] = []

    def appName(self, _: str) -> Recorder:  # noqa: N802 - SparkSession.Builder's names
        return self

    def master(self, m: str) -> Recorder:
        self.masters.append(m)
        return self

    def config(self, *_: object) -> Recorder:
        return self

    def getOrCreate(self) -> Recorder:  # noqa: N802
        raise RuntimeError("stop here")


@pytest.mark.parametrize("gateway, expected", [(None, ["local[2]"]), ("40123", [])])
def test_master_is_left_to_spark_submit(monkeypatch, gateway, expected) -> None:
    rec = Recorder()
    monkeypatch.setattr(SparkSession, "builder", rec)
    if gateway:
        monkeypatch.setenv("PYSPARK_GATEWAY_PORT", gateway)
    else:
        monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    with pytest.raises(RuntimeError, match="stop here"):
        spark_mod.session("local[2]")
    assert rec.masters == expected
