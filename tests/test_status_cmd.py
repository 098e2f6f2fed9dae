"""``bucketlens status``: backlog, last batch, rows and dead letters, and a non-zero exit when the
stream is behind or stopped."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from deploy import cli
from pipeline.commands import status_report as sr
from pipeline.config import Settings
from pipeline.stream import job as stream
from tests.helpers.stream import upload_samples, wait_rows
from tests.helpers.wait import wait_until

# the isolated dataset gets the analytics views (conftest)
pytestmark = pytest.mark.views

NOW = datetime(2024, 5, 6, 12, 0, tzinfo=UTC)


def status(**kw) -> sr.StreamStatus:
    base = dict(subscription="projects/p/subscriptions/s", backlog=0, backlog_capped=False,
                oldest_unacked_s=0.0, last_batch_id=3, last_batch_at=NOW - timedelta(seconds=2),
                last_batch_rows=4, rows_last_minute=4, rows_last_hour=9,
                dead_letters_last_minute=0, dead_letters_last_hour=1, model="efficientnet_lite0",
                model_version="bundled")
    return sr.StreamStatus(**{**base, **kw})


def test_json_has_exactly_the_documented_keys() -> None:
    got = status().as_json()
    assert tuple(got) == sr.JSON_KEYS == (
        "backlog", "oldest_unacked_s", "last_batch_at", "rows_last_minute",
        "dead_letters_last_hour", "model_version")
    assert got["last_batch_at"] == "2024-05-06T11:59:58+00:00"


def test_healthy_behind_and_stopped() -> None:
    assert sr.problems(status(), NOW, 30) == []
    assert sr.problems(status(backlog=5, oldest_unacked_s=3), NOW, 30) == []  # fresh: not late
    (behind,) = sr.problems(status(backlog=5, oldest_unacked_s=45), NOW, 30)
    assert behind.startswith("behind: 5 message(s) wait, the oldest for 45 s")
    (stopped,) = sr.problems(status(backlog=5, oldest_unacked_s=45,
                                    last_batch_at=NOW - timedelta(minutes=5)), NOW, 30)
    assert stopped.startswith("stopped:") and "bucketlens run" in stopped
    assert sr.problems(status(backlog=1, oldest_unacked_s=45, last_batch_id=None,
                              last_batch_at=None), NOW, 30)[0].startswith("stopped:")


def test_every_query_is_bounded_by_a_constant_partition_filter() -> None:
    s = Settings()
    window = "T.object_created >= TIMESTAMP '2024-04-28 12:00:00.000000+00'"  # 8 days back
    assert window in sr.counts_sql(s, NOW) and window in sr.last_batch_sql(s, NOW)
    assert "T.recorded_at >= TIMESTAMP '2024-05-06 11:00:00.000000+00'" in sr.dead_letters_sql(s, NOW)
    assert "T.batch_id >= 0" in sr.last_batch_sql(s, NOW)  # backfill's -1 is no stream batch


def test_render_escapes_what_rows_carry() -> None:
    text = sr.render(status(model="m\x1b[2J"), NOW, [])
    assert "\x1b" not in text and "health        ok" in text and "#3 at 2024-05-06T11:59:58" in text


@pytest.mark.integration
@pytest.mark.spark
def test_status_follows_a_stream_and_fails_once_it_stops_with_messages_waiting(
        spark, isolated, monkeypatch, capsys) -> None:
    for k, v in isolated.as_env().items():
        monkeypatch.setenv(k, v)
    settings = isolated.replace(trigger_seconds=1.0)
    query, _ = stream.start(settings, spark=spark)
    try:
        upload_samples(settings, 6)
        wait_rows(settings, 6, query)
        assert cli.main(["status", "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert tuple(got) == sr.JSON_KEYS
        assert got["backlog"] == 0 and got["oldest_unacked_s"] == 0
        assert got["rows_last_minute"] >= 6 and got["model_version"]
        assert got["last_batch_at"] and got["dead_letters_last_hour"] == 0
    finally:
        query.stop()

    upload_samples(settings, 3)  # nobody reads these now
    wait_until(lambda: sr.peek_backlog(settings).count >= 3, 90, "3 messages waiting")
    capsys.readouterr()

    def failing_status() -> tuple[int, dict, str] | None:
        code = cli.main(["status", "--json", "--max-lag", "3"])
        out, err = capsys.readouterr()
        got = json.loads(out.splitlines()[-1])
        # A peek right after another can miss a message the last one just handed back (its
        # redelivery is not instantaneous, here as on Pub/Sub): wait for one that sees all 3.
        return (code, got, err) if code and got["backlog"] >= 3 else None

    code, got, err = wait_until(failing_status, 90, "a failing status that sees all 3 messages")
    assert code == 1
    assert got["backlog"] >= 3 and got["oldest_unacked_s"] >= 3
    assert err.strip().splitlines()[-1].startswith("bucketlens status: stopped: ")
    # the peeks handed every message back: they are all still there to read
    wait_until(lambda: sr.peek_backlog(settings).count == got["backlog"], 30,
               f"{got['backlog']} messages handed back")
