"""The local stack: notifications, provisioning, env and lifecycle (integration), and the
process bookkeeping that makes `down` stop only what `up` started (unit)."""

from __future__ import annotations

import socket
import time

import pytest

from deploy import localstack, provision
from pipeline import clients
from pipeline.bigquery.catalog import tables
from pipeline.bigquery.sql import run_query
from pipeline.config import Settings

# the isolated dataset gets the analytics views (conftest)
pytestmark = pytest.mark.views


@pytest.mark.integration
def test_upload_produces_object_finalize_notification(isolated: Settings) -> None:
    blob = clients.storage_client(isolated).bucket(isolated.bucket).blob("flowers/daisy/a.jpg")
    blob.upload_from_string(b"not really a jpeg", content_type="image/jpeg")
    sub = clients.subscriber_client()
    found = []
    deadline = time.monotonic() + 20
    while not found and time.monotonic() < deadline:
        resp = sub.pull(subscription=isolated.subscription_path, max_messages=50, timeout=5)
        found = [m for m in resp.received_messages
                 if m.message.attributes.get("bucketId") == isolated.bucket]
    assert found, "no notification arrived within 20 s"
    attrs = found[0].message.attributes
    assert attrs["eventType"] == "OBJECT_FINALIZE"
    assert attrs["objectId"] == "flowers/daisy/a.jpg"
    assert int(attrs["objectGeneration"]) == blob.generation


@pytest.mark.integration
def test_provisioning_twice_changes_nothing(isolated: Settings) -> None:
    # `isolated` already applied once; a second apply and a plan both find everything. What
    # the emulators cannot do (IAM, the bucket's notification config) is reported as skipped.
    second = provision.apply(isolated)
    assert {a.verb for a in second} == {"exists", "skip"}
    assert {a.verb for a in provision.plan(isolated)} == {"exists", "skip"}
    kinds = sorted(a.kind for a in second if a.verb == "exists")
    assert kinds == sorted(["bucket", "topic", "topic", "topic", "subscription", "subscription",
                            "dataset", *["table"] * len(tables(isolated)), "views"])
    assert {a.kind for a in second if a.verb == "skip"} == {"service-account", "iam", "notification"}


@pytest.mark.integration
def test_views_read_as_stored_until_a_row_access_policy_exists(isolated: Settings) -> None:
    # deploy.bq_emulator lets DuckDB read a view as it stored it while no row access policy
    # exists (bqemulator inlined and re-translated every view, every read); a view of a view
    # still sees its inner view replaced (views bind by name, as in BigQuery), and once a
    # policy exists the emulator's own expansion applies it through both views.
    client = clients.bigquery_client(isolated)
    ds = f"{isolated.project}.{isolated.dataset}"
    run_query(client, f"CREATE TABLE `{ds}.rap_base` (k STRING, v INT64)")
    run_query(client, f"INSERT INTO `{ds}.rap_base` (k, v) VALUES ('a', 1), ('b', 2)")
    run_query(client, f"CREATE VIEW `{ds}.rap_inner` AS SELECT k, v FROM `{ds}.rap_base`")
    run_query(client, f"CREATE VIEW `{ds}.rap_outer` AS SELECT k FROM `{ds}.rap_inner`")

    def keys() -> list[str]:
        return [r["k"] for r in run_query(client, f"SELECT k FROM `{ds}.rap_outer` ORDER BY k")[1]]

    assert keys() == ["a", "b"]
    run_query(client, f"CREATE OR REPLACE VIEW `{ds}.rap_inner` AS "
                      f"SELECT k, v FROM `{ds}.rap_base` WHERE v > 1")
    assert keys() == ["b"]
    run_query(client, f"CREATE OR REPLACE VIEW `{ds}.rap_inner` AS SELECT k, v FROM `{ds}.rap_base`")
    # the stack is shared by the worker's other tests: the policy must not outlive this one
    run_query(client, f"CREATE ROW ACCESS POLICY only_a ON `{ds}.rap_base` "
                      "GRANT TO ('allUsers') FILTER USING (k = 'a')")
    try:
        assert keys() == ["a"]
    finally:
        run_query(client, f"DROP ROW ACCESS POLICY only_a ON `{ds}.rap_base`")
    assert keys() == ["a", "b"]


@pytest.mark.integration
def test_plan_then_destroy_on_a_fresh_project_layout(stack) -> None:
    s = stack.settings(Settings()).replace(
        bucket="plan-destroy", subscription="pd-sub", dead_letter_topic="pd-dlq", dataset="pd_ds",
        alert_topic="pd-alerts")
    planned = [a for a in provision.plan(s) if a.verb != "skip"]
    # the shared topic exists already; everything else of this layout is new
    assert [a.verb for a in planned if a.kind != "topic" or "/pd-" in a.name] == \
        ["create"] * (len(planned) - 1)
    provision.apply(s)
    destroyed = [a for a in provision.destroy(s) if a.verb != "skip"]
    assert destroyed and all(a.verb == "delete" for a in destroyed)
    remaining = [a for a in provision.plan(s) if a.verb == "exists"]
    assert remaining == [], remaining


@pytest.mark.integration
def test_env_renders_exports_and_status_reports_alive(stack) -> None:
    env = stack.env()
    assert env["PUBSUB_EMULATOR_HOST"].startswith("127.0.0.1:")
    assert env["STORAGE_EMULATOR_HOST"].startswith("http://127.0.0.1:")
    assert env["BUCKETLENS_MODEL"] == "efficientnet_lite0"
    text = localstack.render_env(env)
    assert "export BUCKETLENS_TABLE=predictions" in text
    assert all(v["alive"] for v in localstack.status(stack.run_dir).values())


def test_missing_pubsub_emulator_is_one_clear_sentence(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("BUCKETLENS_PUBSUB_EMULATOR", str(tmp_path / "nope"))
    monkeypatch.setattr(localstack, "PUBSUB_EMULATOR_CANDIDATES", ())
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(localstack.StackError, match="apt-get install google-cloud-cli-pubsub"):
        localstack.find_pubsub_emulator()


@pytest.mark.integration
@pytest.mark.integration  # starts the emulators itself
def test_down_stops_only_our_processes(tmp_path) -> None:
    state = localstack.up(tmp_path / "run", Settings(), provision=False)
    pids = [s.pid for s in state.services.values()]
    assert sorted(localstack.down(tmp_path / "run")) == ["bigquery", "gcs", "pubsub"]
    for pid in pids:
        assert not (tmp_path / f"/proc/{pid}").exists() or localstack._alive(
            localstack.Service("x", 0, pid, "", ["never-matches"])) is False
    assert localstack.down(tmp_path / "run") == []


# --- down kills only what up started (no stack needed) -----------------------------------------

@pytest.fixture
def sleeper():
    """An unrelated process leading its own group, as the emulators do; killed afterwards."""
    import shutil
    import subprocess

    proc = subprocess.Popen([shutil.which("sleep") or "/bin/sleep", "1000"],
                            start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def _state(run_dir, svc: localstack.Service) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    localstack.StackState(str(run_dir), "bucketlens-local", {svc.name: svc}).save()


@pytest.mark.parametrize("recorded", ["older state (no identity)", "another start time",
                                      "another argv"])
def test_down_leaves_a_reused_pid_alone_and_says_so(tmp_path, sleeper, caplog, recorded) -> None:
    info = localstack.proc_info(sleeper.pid)
    assert info is not None
    # what the state says: a "sleep" we started at this PID (same basename, even same argv)
    identity = {"older state (no identity)": {},
                "another start time": {"start_time": info.start_time - 1, "argv": info.argv},
                "another argv": {"start_time": info.start_time, "argv": [*info.argv, "x"]}}
    svc = localstack.Service("pubsub", 1, sleeper.pid, "", ["/opt/other/bin/sleep", "1000"],
                             **identity[recorded])
    _state(tmp_path / "run", svc)
    assert localstack.status(tmp_path / "run")["pubsub"]["alive"] is False
    with caplog.at_level("WARNING", logger="bucketlens.localstack"):
        assert localstack.down(tmp_path / "run") == []  # not reported as stopped
    time.sleep(0.2)
    assert sleeper.poll() is None, "down killed a process it did not start"
    assert f"pid {sleeper.pid}" in caplog.text and "left alone" in caplog.text


def test_down_stops_the_process_it_recorded_and_only_says_so_once_it_is_gone(
        tmp_path, sleeper) -> None:
    info = localstack.proc_info(sleeper.pid)
    svc = localstack.Service("gcs", 1, sleeper.pid, "", ["sleep", "1000"],
                             start_time=info.start_time, argv=info.argv)
    _state(tmp_path / "run", svc)
    assert localstack.status(tmp_path / "run")["gcs"]["alive"] is True
    assert localstack.down(tmp_path / "run", timeout=5) == ["gcs"]
    assert sleeper.poll() is not None  # gone (and reaped) before "stopped" was said
    assert not (tmp_path / "run" / "state.json").exists()


@pytest.mark.parametrize(("stat", "expected"), [
    ("42 (sleep) S 1 42 42 0 -1 4194560 " + "0 " * 12 + "777 0", (777, 42)),
    ("42 (a) (b c) S 1 7 7 0 -1 4194560 " + "0 " * 12 + "12345 0", (12345, 7)),  # odd comm
])
def test_proc_stat_fields_are_counted_after_the_command_name(stat, expected) -> None:
    info = localstack.parse_proc(stat, b"sleep\0" + b"1000\0")
    assert info is not None and (info.start_time, info.pgrp) == expected
    assert info.argv == ["sleep", "1000"]
    assert localstack.parse_proc(stat.replace(") S", ") Z"), b"") is None  # a zombie is gone


def test_unreachable_emulator_is_one_sentence(monkeypatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PUBSUB_EMULATOR_HOST": f"127.0.0.1:{port}"}
    with pytest.raises(localstack.StackError, match=f"cannot reach PUBSUB_EMULATOR_HOST=127.0.0.1:{port}"):
        localstack.check_emulators(Settings(), env)
    localstack.check_emulators(Settings(), {})  # real GCP: nothing to probe


@pytest.mark.integration
@pytest.mark.integration  # starts the emulators itself
def test_down_then_up_starts_every_service_empty(tmp_path, monkeypatch) -> None:
    """Pub/Sub and BigQuery keep nothing across a restart, so GCS must not either: an object
    that survived would have no notification and no row."""
    settings = Settings()
    state = localstack.up(tmp_path / "run", settings)
    try:
        with localstack.environment(state.env()):
            clients.storage_client(settings).bucket(settings.bucket).blob("kept.jpg") \
                .upload_from_string(b"x")
        localstack.down(tmp_path / "run")
        state = localstack.up(tmp_path / "run", settings)
        with localstack.environment(state.env()):
            names = [b.name for b in clients.storage_client(settings).list_blobs(settings.bucket)]
        assert names == []
    finally:
        localstack.down(tmp_path / "run")


@pytest.mark.integration  # starts the emulators itself
def test_up_starts_again_on_new_ports_when_one_was_taken_meanwhile(tmp_path, monkeypatch) -> None:
    """free_port() only says a port was free a moment ago; a parallel run may take it first."""
    import socket

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = held.getsockname()[1]
    real, first = localstack.free_port, iter([taken])
    monkeypatch.setattr(localstack, "free_port", lambda: next(first, None) or real())
    run_dir = tmp_path / "stack"
    try:
        state = localstack.up(run_dir, Settings(), provision=False)
        assert state.services["pubsub"].port != taken
        assert all(info["alive"] for info in localstack.status(run_dir).values())
    finally:
        localstack.down(run_dir)
        held.close()
