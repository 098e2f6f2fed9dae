"""Drift rules on real model outputs, judged by the drift SQL on bqemulator, published to the
Pub/Sub emulator: a replay whose second half drops a class and darkens half its photos raises
the drift alert within 3 windows of the change; three clean replays raise none. (The stream's
own path to the same alert: tests/test_alerts_stream.py.)"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from pipeline import clients
from pipeline.config import Settings
from pipeline.model import handler
from pipeline.model.classfolders import discover
from pipeline.stream import alerts
from producer.datasets import sample_dataset
from producer.replay import schedule
from tests.helpers.drift import RULES, drifted_dataset
from tests.helpers.views import load

pytestmark = [pytest.mark.integration, pytest.mark.views]

WINDOW = 2  # seconds
RATE = 10  # uploads per second: 20 a window
HALF = 80  # uploads before the change, and after it


def predictions(items, settings: Settings) -> dict:
    """Each distinct photo classified once, in-process, with the stack's (offline) model."""
    model = handler.get_handler(settings)
    paths = sorted({i.path for i in items})
    return dict(zip(paths, model.run_inference([p.read_bytes() for p in paths]), strict=True))


def replay_rows(halves, seed: int, t0: datetime, seen: dict, bucket: str) -> list[dict]:
    """The rows a stream would write for this replay: RATE uploads a second from t0 (which is
    not on a window boundary, as in life), the halves one after the other."""
    rows = []
    for h, items in enumerate(halves):
        for p in schedule(items, seed=seed, loop=True, limit=HALF, prefix=f"r{seed}h{h}"):
            pred = seen[p.item.path]
            top = [{"class_id": c, "label": label, "prob": prob} for c, label, prob in pred.topk]
            created = t0 + timedelta(seconds=len(rows) / RATE)
            rows.append({"bucket": bucket, "name": p.name, "generation": 1, "status": pred.status,
                         "top1_class_id": top[0]["class_id"], "top1_label": top[0]["label"],
                         "top1_prob": top[0]["prob"], "top5": top, "model_version": "v",
                         "object_created": created.isoformat(),
                         "processed_at": created.isoformat()})
    return rows


def test_a_drifting_replay_alerts_within_3_windows_and_clean_replays_do_not(isolated, tmp_path):
    clean = discover(sample_dataset())
    shifted = discover(drifted_dataset(tmp_path / "drifted"))
    seen = predictions([*clean, *shifted], isolated)
    days = [datetime(2026, 3, d, 9, 0, 0, 700_000, tzinfo=UTC) for d in (1, 2, 3, 4)]
    plans = [(clean, clean), (clean, clean), (clean, clean), (clean, shifted)]
    rows = [r for k, (t0, halves) in enumerate(zip(days, plans, strict=True))
            for r in replay_rows(halves, k + 1, t0, seen, isolated.bucket)]
    load(isolated, rows)

    sub = f"projects/{isolated.project}/subscriptions/{isolated.alert_topic}-drift"
    subscriber = clients.subscriber_client()
    subscriber.create_subscription(name=sub, topic=isolated.alert_topic_path)
    rules = alerts.parse_rules(json.dumps(RULES))
    bq = clients.bigquery_client(isolated)
    fired: dict[int, list[datetime]] = {}
    for k, t0 in enumerate(days):
        # each replay against its own second window (its first is partial)
        s = isolated.replace(drift_window=str(WINDOW),
                             drift_baseline=(t0 + timedelta(seconds=WINDOW)).isoformat())
        windows = alerts.judge(s, bq, t0 - timedelta(seconds=WINDOW), t0 + timedelta(minutes=1))
        assert len(windows) == 2 * HALF // (RATE * WINDOW) + 1, windows  # 8 whole, 2 partial
        alerter = alerts.Alerter(s, rules)
        alerter.after_windows(windows)
        fired[k] = [w["window_start"] for w in windows if rules.drift[0].fires(w)]
        clean_mix = [w["class_mix"] for w in windows if w["images"] >= 10
                     and w["window_start"] + timedelta(seconds=WINDOW) <= t0 + timedelta(seconds=HALF / RATE)]
        assert max(clean_mix) < 0.1, (k, clean_mix)

    assert fired[0] == fired[1] == fired[2] == []
    change = days[3] + timedelta(seconds=HALF / RATE)
    assert fired[3], "the drifting replay raised no alert"
    first = min(fired[3])
    assert change - timedelta(seconds=WINDOW) < first <= change + timedelta(seconds=2 * WINDOW), \
        (change, fired[3])

    got = []
    for _ in range(5):
        resp = subscriber.pull(subscription=sub, max_messages=100, timeout=5)
        got += [m.message for m in resp.received_messages]
        if len(got) >= len(fired[3]):
            break
    assert sorted(m.attributes["window_start"] for m in got) == \
        sorted(w.isoformat() for w in fired[3])
    assert {m.attributes["rule"] for m in got} == {"mix-shift"}
    assert len({m.attributes["dedupe_id"] for m in got}) == len(got)
