"""The Spark session bucketlens runs on, with the Pub/Sub source registered.

Python workers must use this interpreter (the one with torch and bucketlens installed), and on
the local stack all traffic stays on loopback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pyspark.sql import SparkSession

from pipeline.source import PubSubDataSource

# log4j2 configuration for a quiet session: everything Spark logs goes to one file.
LOG4J2 = """\
status = error
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = %d{{yy/MM/dd HH:mm:ss}} %p %c{{1}}: %m%n%ex
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
"""


def quiet_conf(log_file: str) -> dict[str, str]:
    """Spark conf that sends the JVM's log to ``log_file`` and hides the progress bars, so a
    command's own output is not interleaved with Spark's (pure apart from writing the file)."""
    log = Path(log_file).resolve()
    log.parent.mkdir(parents=True, exist_ok=True)
    props = log.with_suffix(".log4j2.properties")
    props.write_text(LOG4J2.format(log=log))
    return {"spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{props}",
            "spark.ui.showConsoleProgress": "false"}


def session(master: str = "local[2]", app: str = "bucketlens", conf: dict | None = None,
            log_file: str = "") -> SparkSession:
    """The session; with ``log_file`` Spark's own output goes there instead of the console."""
    submitted = bool(os.environ.get("PYSPARK_GATEWAY_PORT"))  # the JVM runs already
    if log_file and not submitted:
        conf = {**quiet_conf(log_file), **(conf or {})}
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app)
    # Under spark-submit (Dataproc jobs, the rehearsal) the master is already chosen, and
    # PYSPARK_GATEWAY_PORT names the JVM it started; an empty master defers to the platform
    # too (Dataproc Serverless rejects an explicit one).
    if master and not submitted:
        builder = builder.master(master)
    builder = (
        builder
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.python.worker.reuse", "true")
        .config("spark.sql.streaming.stopTimeout", "30s")
    )
    if os.environ.get("SPARK_LOCAL_IP"):
        builder = builder.config("spark.driver.host", os.environ["SPARK_LOCAL_IP"]) \
            .config("spark.driver.bindAddress", os.environ["SPARK_LOCAL_IP"])
    for k, v in (conf or {}).items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("BUCKETLENS_SPARK_LOG_LEVEL", "WARN"))
    _quiet_trigger_warnings(spark)
    spark.dataSource.register(PubSubDataSource)
    return spark


def _quiet_trigger_warnings(spark: SparkSession) -> None:
    """Silence "Current batch is falling behind": with a short trigger and a backlog, every batch
    outlasts the interval by design (batches grow to catch up); batch times are in the metrics."""
    jvm = spark.sparkContext._jvm
    if jvm is None:  # pragma: no cover - Spark Connect has no JVM here
        return
    level = jvm.org.apache.logging.log4j.Level.ERROR
    for package in ("org.apache.spark.sql.execution.streaming.runtime",  # Spark >= 4.1
                    "org.apache.spark.sql.execution.streaming"):
        jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(
            f"{package}.ProcessingTimeExecutor", level)
