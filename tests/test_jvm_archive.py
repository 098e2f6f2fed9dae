"""The test drivers' class-data archive (tests/helpers/jvm.py) is really mapped, and its
bookkeeping (one dump per virtualenv, a user's own flags left alone) holds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import jvm

ROOT = Path(__file__).resolve().parent.parent
JVM_ARCHIVE = jvm.archive_path()


def test_flags_name_the_archive_only_once_it_exists(tmp_path: Path) -> None:
    archive = tmp_path / "a.jsa"
    assert jvm.submit_opts(archive) == jvm.BASE_OPTS
    archive.write_bytes(b"x")
    assert f"-XX:SharedArchiveFile={archive}" in jvm.submit_opts(archive)
    assert jvm.is_ours(jvm.submit_opts(archive)) and not jvm.is_ours("-Xmx2g")
    assert not jvm.is_ours(None)


def test_no_dump_when_the_archive_exists_or_another_is_dumping(tmp_path: Path) -> None:
    archive = tmp_path / "a.jsa"
    archive.with_suffix(".lock").write_text("")
    assert jvm.start_dump(archive) is None  # a fresh lock: another run is dumping
    archive.write_bytes(b"x")
    assert jvm.start_dump(archive) is None


def test_the_archive_key_follows_the_virtualenv_and_pyspark(tmp_path: Path) -> None:
    assert jvm.archive_path(str(tmp_path)) != jvm.archive_path(sys.prefix)
    assert jvm.archive_path().parent == Path(sys.prefix) / "bucketlens-cds"


@pytest.mark.spark
@pytest.mark.process
def test_a_driver_maps_the_archive_the_suite_dumped() -> None:
    """With ``-Xshare:on`` a JVM that cannot map the archive refuses to start, so a Spark job
    that runs proves the drivers' flags name an archive this JDK and classpath accept."""
    deadline = time.monotonic() + jvm.DUMP_TIMEOUT_S + 60
    while not JVM_ARCHIVE.is_file() and time.monotonic() < deadline:
        if not JVM_ARCHIVE.with_suffix(".lock").exists():  # nobody dumping: dump it here
            assert jvm.dump(JVM_ARCHIVE) == 0
        time.sleep(1)
    assert JVM_ARCHIVE.is_file()
    env = {**os.environ, "SPARK_SUBMIT_OPTS": f"{jvm.submit_opts(JVM_ARCHIVE)} -Xshare:on"}
    job = ("from pipeline.stream.spark import session; s = session('local[1]', app='cds-check'); "
           "print(s.range(7).count()); s.stop()")
    done = subprocess.run([sys.executable, "-c", job], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split()[-1] == "7", done.stderr[-2000:]
