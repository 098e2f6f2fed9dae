"""Under spark-submit the job keeps the master the platform chose (Dataproc's YARN, the
rehearsal's local-cluster); run directly it uses its own (local[2] by default)."""

from __future__ import annotations

import pytest
from pyspark.sql import SparkSession

from pipeline.stream import spark as spark_mod


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


def test_quiet_conf_points_log4j_at_the_file(tmp_path) -> None:
    conf = spark_mod.quiet_conf(str(tmp_path / "logs" / "spark.log"))
    props = tmp_path / "logs" / "spark.log4j2.properties"
    assert conf["spark.driver.extraJavaOptions"] == f"-Dlog4j2.configurationFile=file:{props}"
    assert conf["spark.ui.showConsoleProgress"] == "false"
    assert f"fileName = {tmp_path / 'logs' / 'spark.log'}" in props.read_text()


@pytest.mark.spark
def test_a_quiet_session_logs_to_its_file_not_the_console(tmp_path) -> None:
    import subprocess
    import sys

    log = tmp_path / "spark.log"
    code = ("from pipeline.stream.spark import session\n"
            f"s = session('local[1]', app='quiet', log_file={str(log)!r})\n"
            "print('rows', s.range(3).count())\n"
            "import sys; print('ours', file=sys.stderr)\n"
            "s.stop()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env={**__import__("os").environ,
                                                          "SPARK_LOCAL_IP": "127.0.0.1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "rows 3"
    assert "Running Spark version" in log.read_text()
    assert "SparkContext" not in out.stderr and "log4j" not in out.stderr, out.stderr[-2000:]
    # the JVM's launch chatter goes to the log too; what the command itself says still shows
    assert out.stderr.strip() == "ours", out.stderr[-2000:]
    assert "Setting default log level" in log.read_text()


def test_only_the_classifying_workers_daemon_preloads() -> None:
    from pipeline.stream.daemon import preloads

    assert preloads(["daemon.py", "pyspark.worker"]) and preloads(["daemon.py"])
    assert not preloads(["daemon.py", "pyspark.sql.worker.lookup_data_sources"])
