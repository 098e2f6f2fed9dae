"""JVM flags for the Spark drivers the tests start, and the class-data archive they share.

    SPARK_SUBMIT_OPTS="$(python -c 'from tests.helpers import jvm; print(jvm.submit_opts())')"

The suite is CPU-bound on 2 cores and starts ~40 Spark driver JVMs. Two things halve a driver's
start-up here, both for JVMs that live a minute, not a day (production keeps the JVM's
defaults; C2 and a shared archive of its own pay off differently in a long-running driver):
- the C1 compiler alone and the serial collector (15 -> 8 CPU-s for a session and two jobs);
- AppCDS (JDK 13+, JEP 350): the classes one driver loaded are dumped once into an archive that
  every later driver maps instead of parsing and verifying its classes again (a session and
  two small jobs, measured: 13-15 -> 8-9 CPU-s). The archive belongs to one JDK and one classpath (this
  virtualenv's pyspark jars), so it lives in the virtualenv, keyed by both; a JVM that cannot
  use it (another JDK, a changed classpath) runs as without it, silently (``-Xlog:cds=off``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BASE_OPTS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
QUIET = "-Xlog:cds=off -Xlog:cds+dynamic=off"  # a stale or missing archive says nothing
DUMP_TIMEOUT_S = 300
STALE_LOCK_S = DUMP_TIMEOUT_S + 60  # a dump killed with its pytest leaves its lock behind
# For a test session that never classifies: pyspark's own daemon, whose workers do not import
# torch, torchvision and the storage client first (pipeline.stream.daemon's ~4 CPU-s per start).
PLAIN_DAEMON = {"spark.python.daemon.module": "pyspark.daemon"}
# What one driver does: a session, a query with a shuffle, a Python UDF's round trip, stop.
_DUMP_JOB = f"""
import sys
from pipeline.stream.spark import session
s = session("local[1]", app="bucketlens-cds", conf={PLAIN_DAEMON!r})
s.range(50).selectExpr("id % 5 as k").groupBy("k").count().collect()
s.range(4).rdd.map(lambda r: r.id).collect()
proc = s.sparkContext._gateway.proc
s.stop()
proc.stdin.close()  # the gateway JVM exits when its stdin closes, writing the archive
sys.exit(proc.wait(timeout=120))
"""


def archive_path(prefix: str = sys.prefix) -> Path:
    """This virtualenv's archive for the JDK on PATH (or JAVA_HOME) and its pyspark."""
    spark = importlib.metadata.version("pyspark")  # without importing it: conftest asks
    java = os.environ.get("JAVA_HOME") or os.path.realpath(shutil.which("java") or "java")
    key = hashlib.sha256(f"{java}|{spark}|{prefix}".encode()).hexdigest()[:12]
    return Path(prefix) / "bucketlens-cds" / f"spark-{spark}-{key}.jsa"


def submit_opts(archive: Path | None = None) -> str:
    """The driver flags: the archive's when it exists."""
    archive = archive or archive_path()
    if archive.is_file():
        return f"{BASE_OPTS} -XX:SharedArchiveFile={archive} {QUIET}"
    return BASE_OPTS


def is_ours(opts: str | None) -> bool:
    """Whether SPARK_SUBMIT_OPTS holds what :func:`submit_opts` gives (not a user's own)."""
    return opts is not None and opts.startswith(BASE_OPTS)


def _dumping(lock: Path) -> bool:
    """Whether another run holds the dump's lock (a lock older than any dump is left over)."""
    return lock.exists() and time.time() - lock.stat().st_mtime < STALE_LOCK_S


def start_dump(archive: Path | None = None, root: Path | None = None) -> subprocess.Popen | None:
    """Dump the archive in the background (~30 CPU-s, once per virtualenv); None when it exists
    or another run is dumping it. Drivers started before it lands run without it."""
    archive = archive or archive_path()
    if archive.is_file() or _dumping(archive.with_suffix(".lock")):
        return None
    return subprocess.Popen([sys.executable, "-m", "tests.helpers.jvm", str(archive)], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def dump(archive: Path) -> int:
    """Run one small driver with ``-XX:ArchiveClassesAtExit`` and move its archive into place
    (a partial file never has the archive's name). One dump at a time per archive (a lock)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    lock, partial = archive.with_suffix(".lock"), archive.with_suffix(f".{os.getpid()}.partial")
    if not _dumping(lock):
        lock.unlink(missing_ok=True)
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return 0
    try:
        env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1",
               "SPARK_SUBMIT_OPTS": f"{BASE_OPTS} -XX:ArchiveClassesAtExit={partial} {QUIET}"}
        done = subprocess.run([sys.executable, "-c", _DUMP_JOB], env=env, timeout=DUMP_TIMEOUT_S,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if done.returncode == 0 and partial.is_file():
            os.replace(partial, archive)
        return done.returncode
    finally:
        partial.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(dump(Path(sys.argv[1])))
