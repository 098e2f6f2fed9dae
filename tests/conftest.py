"""Shared fixtures: one real local stack per test session, isolated resources per test.

fake-gcs-server publishes every bucket's notifications to the one topic it was started with,
so isolation comes from a fresh bucket, subscription (created before the test uploads) and
dataset per test, all on the shared emulators.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy import localstack, provision
from pipeline.config import Settings
from pipeline.stream import forkserver
from tests.helpers import jvm
from tests.helpers.markers import pytest_collection_modifyitems  # noqa: F401 - a pytest hook

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
PARENT_STACK = "BUCKETLENS_TEST_PARENT_STACK"  # run directory of the stack a child pytest shares
# Test JVMs live a minute, not a day, and the suite is CPU-bound on 2 cores: C1 alone, the serial
# collector and a class-data archive shared by every driver (tests/helpers/jvm.py) cut a Spark
# driver's start from ~14 to ~8 CPU-s. spark-submit's launcher adds SPARK_SUBMIT_OPTS to the
# driver JVM's flags; every `bucketlens run` and bench a test starts inherits it. Production
# keeps the JVM's defaults. A user's own SPARK_SUBMIT_OPTS is left as it is.
JVM_ARCHIVE = jvm.archive_path()
os.environ.setdefault("SPARK_SUBMIT_OPTS", jvm.submit_opts(JVM_ARCHIVE))
FORKSERVER = pytest.StashKey[subprocess.Popen]()


def pytest_configure(config: pytest.Config) -> None:
    """Two things started once, in the background, for every Spark a test starts:
    - the first run in a virtualenv dumps the drivers' class-data archive (~30 CPU-s, repaid
      after ~6 drivers; so not for the compat reruns, whose 5 tests start about as many);
    - a fork server imports what Spark's Python daemon preloads (torch, torchvision, pandas,
      the storage client: ~4 CPU-s), and every daemon started after it is up forks from it
      instead of importing again (``pipeline.stream.forkserver``; a pytest started by a test
      shares its parent's)."""
    markexpr = (config.getoption("markexpr", "") or "").strip()
    if hasattr(config, "workerinput") or "not spark" in markexpr:  # an xdist worker, make check
        return
    if markexpr != "compat" and jvm.is_ours(os.environ.get("SPARK_SUBMIT_OPTS")):
        jvm.start_dump(JVM_ARCHIVE, root=Path(__file__).resolve().parent.parent)
    if forkserver.supported() and not os.environ.get(forkserver.ENV):
        path = Path(tempfile.mkdtemp(prefix="bucketlens-")) / "daemons.sock"
        config.stash[FORKSERVER] = forkserver.start(path)
        os.environ[forkserver.ENV] = str(path)  # the xdist workers start after this


def pytest_unconfigure(config: pytest.Config) -> None:
    server = config.stash.get(FORKSERVER, None)
    if server is not None:
        server.terminate()
        server.wait(30)
        shutil.rmtree(Path(os.environ.pop(forkserver.ENV)).parent, ignore_errors=True)


@pytest.fixture(autouse=True)
def _jvm_archive_once_dumped() -> None:
    """Drivers started after the background dump lands map the archive."""
    if jvm.is_ours(os.environ.get("SPARK_SUBMIT_OPTS")):
        os.environ["SPARK_SUBMIT_OPTS"] = jvm.submit_opts(JVM_ARCHIVE)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localstack.StackState]:
    """The Pub/Sub emulator, fake-gcs-server and bqemulator, started once on free ports."""
    # A pytest started by a test (test_hostile_stream's run in another time zone) uses the stack
    # of the test that started it, which stops it; starting another costs ~15 s and a JVM.
    parent = os.environ.get(PARENT_STACK)
    run_dir = Path(parent) if parent else tmp_path_factory.mktemp("stack")
    state = localstack.StackState.load(run_dir) if parent else localstack.up(run_dir, Settings())
    mp = pytest.MonkeyPatch()
    for k, v in state.env().items():
        mp.setenv(k, v)
    try:
        yield state
    finally:
        mp.undo()
        if not parent:
            localstack.down(run_dir)


@pytest.fixture
def isolated(stack: localstack.StackState, tmp_path, request: pytest.FixtureRequest) -> Settings:
    """Settings with a bucket, subscription, dead-letter topic and dataset of this test's own.

    Everything ``bucketlens deploy apply`` makes, but the analytics views only for tests marked
    ``views``: bqemulator spends about 1.3 CPU-s analysing the 19 of them, and most tests read
    none. What reads one: the report, status, sql, similar and dashboard commands, and the
    stream's drift judge (its SQL selects from ``distinct_predictions``)."""
    uid = uuid.uuid4().hex[:8]
    settings = stack.settings(Settings()).replace(
        bucket=f"test-{uid}",
        subscription=f"sub-{uid}",
        dead_letter_topic=f"dlq-{uid}",
        alert_topic=f"alerts-{uid}",
        dataset=f"ds_{uid}",
        checkpoint=str(tmp_path / "checkpoint"),
        # Pub/Sub's shortest lease: a message a killed or stopped test run held comes back in
        # 10 s, not the default 60 (the stream's own warm-up shrinks with it)
        ack_deadline_seconds=10,
    )
    wanted = provision.resources(settings)
    if request.node.get_closest_marker("views") is None:
        wanted = [r for r in wanted if r.kind != "views"]
    provision.apply_resources(wanted)
    return settings


@pytest.fixture(scope="session")
def spark(stack):
    """One local[2] Spark session for the whole run (start-up costs 10-30 s)."""
    from pipeline.stream.spark import session

    s = session("local[2]", app="bucketlens-tests")
    yield s
    s.stop()
