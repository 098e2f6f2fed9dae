"""The Spark session bucketlens runs on, with the Pub/Sub source registered.

Python workers must use this interpreter (the one with torch and bucketlens installed), and on
the local stack all traffic stays on loopback.
"""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from pipeline.source import PubSubDataSource


def session(master: str = "local[2]", app: str = "bucketlens", conf: dict | None = None) -> SparkSession:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app)
    # Under spark-submit (Dataproc jobs, the rehearsal) the master is already chosen, and
    # PYSPARK_GATEWAY_PORT names the JVM it started; an empty master defers to the platform
    # too (Dataproc Serverless rejects an explicit one).
    if master and not os.environ.get("PYSPARK_GATEWAY_PORT"):
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
