"""Integration: the local stack itself — notifications, provisioning, env, lifecycle."""

from __future__ import annotations

import time

import pytest

from deploy import localstack, provision
from pipeline import clients
from pipeline.config import Settings

pytestmark = pytest.mark.integration


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


def test_provisioning_twice_changes_nothing(isolated: Settings) -> None:
    # `isolated` already applied once; a second apply and a plan both find everything. What
    # the emulators cannot do (IAM, the bucket's notification config) is reported as skipped.
    second = provision.apply(isolated)
    assert {a.verb for a in second} == {"exists", "skip"}
    assert {a.verb for a in provision.plan(isolated)} == {"exists", "skip"}
    kinds = sorted(a.kind for a in second if a.verb == "exists")
    assert kinds == sorted(["bucket", "topic", "topic", "subscription", "subscription",
                            "dataset", "table", "table", "table", "views"])
    assert {a.kind for a in second if a.verb == "skip"} == {"service-account", "iam", "notification"}


def test_plan_then_destroy_on_a_fresh_project_layout(stack) -> None:
    s = stack.settings(Settings()).replace(
        bucket="plan-destroy", subscription="pd-sub", dead_letter_topic="pd-dlq", dataset="pd_ds")
    planned = [a for a in provision.plan(s) if a.verb != "skip"]
    # the shared topic exists already; everything else of this layout is new
    assert [a.verb for a in planned if a.kind != "topic" or "pd-dlq" in a.name] == \
        ["create"] * (len(planned) - 1)
    provision.apply(s)
    destroyed = [a for a in provision.destroy(s) if a.verb != "skip"]
    assert destroyed and all(a.verb == "delete" for a in destroyed)
    remaining = [a for a in provision.plan(s) if a.verb == "exists"]
    assert remaining == [], remaining


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


def test_down_stops_only_our_processes(tmp_path) -> None:
    state = localstack.up(tmp_path / "run", Settings(), provision=False)
    pids = [s.pid for s in state.services.values()]
    assert sorted(localstack.down(tmp_path / "run")) == ["bigquery", "gcs", "pubsub"]
    for pid in pids:
        assert not (tmp_path / f"/proc/{pid}").exists() or localstack._alive(
            localstack.Service("x", 0, pid, "", ["never-matches"])) is False
    assert localstack.down(tmp_path / "run") == []
