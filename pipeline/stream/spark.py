"""The Spark session bucketlens runs on, with the Pub/Sub source registered.

Python workers must use this interpreter (the one with torch and bucketlens installed), and on
the local stack all traffic stays on loopback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyspark.sql import SparkSession

from pipeline.stream.source import PubSubDataSource

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
            log_file: str = "", log_level: str = "WARN") -> SparkSession:
    """The session; with ``log_file`` Spark's own output goes there instead of the console."""
    # Set by spark-submit in the Python driver it starts: the JVM runs already.
    submitted = bool(os.environ.get("PYSPARK_GATEWAY_PORT"))
    if log_file and not submitted:
        conf = {**quiet_conf(log_file), **(conf or {})}
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
        # workers fork from a daemon that imported torch already (pipeline.stream.daemon)
        .config("spark.python.daemon.module", "pipeline.stream.daemon")
        .config("spark.sql.streaming.stopTimeout", "30s")
    )
    # SPARK_LOCAL_IP is Spark's own variable (spark-env.sh, "Environment Variables" in Spark's
    # configuration docs): Spark binds to it by itself. The driver's advertised host and bind
    # address follow it too, so that on the local stack all traffic stays on loopback.
    local_ip = os.environ.get("SPARK_LOCAL_IP")
    if local_ip:
        builder = builder.config("spark.driver.host", local_ip) \
            .config("spark.driver.bindAddress", local_ip)
    for k, v in (conf or {}).items():
        builder = builder.config(k, v)
    with _jvm_stderr(log_file if log_file and not submitted else ""):
        spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(log_level)
    _python_workers(spark)
    _quiet_trigger_warnings(spark)
    spark.dataSource.register(PubSubDataSource)
    return spark


@contextmanager
def _jvm_stderr(log_file: str) -> Iterator[None]:
    """Point file descriptor 2 at ``log_file`` while pyspark launches the JVM, which inherits it:
    the JVM's own console chatter (the incubator-module warning, the default-log-level notice,
    and later whatever its Python workers print) then lands in the log, not in the command's
    output. This process's stderr is restored at once."""
    from pyspark import SparkContext

    if not log_file or SparkContext._gateway is not None:  # the JVM runs already
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log_file, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _python_workers(spark: SparkSession) -> None:
    """Python workers run ``spark.pyspark.python``, else ``$PYSPARK_PYTHON`` (Spark's
    documented order), else this interpreter, the one with torch and bucketlens installed.

    When the driver is this Python process, Spark takes the workers' interpreter from
    ``$PYSPARK_PYTHON`` alone (measured on pyspark 4.3: with only ``spark.pyspark.python``
    set, local workers started ``python3``); the context keeps it as ``pythonExec``, which every
    UDF, ``mapInPandas`` and data source registered afterwards carries to the executors. Setting
    it here chooses the interpreter without changing the process environment.
    """
    sc = spark.sparkContext
    sc.pythonExec = (sc.getConf().get("spark.pyspark.python")
                     or os.environ.get("PYSPARK_PYTHON") or sys.executable)


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
