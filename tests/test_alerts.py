"""Alert rules and drift windows: pure parts (rule files, matching, messages, which windows the
stream judges, the drift views' template values)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from pipeline import drift
from pipeline.config import Settings
from pipeline.names import InvalidSetting
from pipeline.stream import alerts
from pipeline.stream.alerts import BadRules, parse_rules


def row(label: str = "tabby", prob: float = 0.9, status: str = "ok", name: str = "up/a.jpg",
        generation: int = 7) -> dict:
    return {"bucket": "b", "name": name, "generation": generation, "status": status,
            "top1_label": label, "top1_prob": prob, "model_version": "v1",
            "object_created": "2026-01-01T00:00:05+00:00"}


RULES = {"rules": [
    {"name": "cats", "labels": ["tabby", "tiger cat"], "min_probability": 0.8, "prefix": "up/"},
    {"name": "broken", "statuses": ["corrupt", "not_image"]},
    {"name": "mix-shift", "drift": "class_mix", "threshold": 0.2},
]}


def test_rules_match_label_probability_status_and_prefix_first_rule_names_the_message() -> None:
    rules = parse_rules(json.dumps(RULES))
    assert [r.name for r in rules.rows] == ["cats", "broken"]
    assert [(r.name, r.drift, r.threshold, r.min_images) for r in rules.drift] == \
        [("mix-shift", "class_mix", 0.2, alerts.MIN_IMAGES)]
    assert rules.first_match(row()).name == "cats"
    assert rules.first_match(row(prob=0.79)) is None
    assert rules.first_match(row(label="espresso")) is None
    assert rules.first_match(row(name="other/a.jpg")) is None
    assert rules.first_match(row(label=None, prob=None, status="corrupt")).name == "broken"
    anything = parse_rules('{"rules": [{"name": "all"}]}')
    assert anything.first_match(row(label="espresso", prob=0.01)).name == "all"


@pytest.mark.parametrize("text, says", [
    ("{", "is not JSON"),
    ('{"rules": []}', "at least one rule"),
    ('[{"name": "x"}]', "at least one rule"),
    ('{"rules": [{"labels": ["a"]}]}', 'needs a "name"'),
    ('{"rules": [{"name": "x", "label": ["a"]}]}', "unknown keys ['label']"),
    ('{"rules": [{"name": "x", "labels": "tabby"}]}', '"labels" must be a non-empty list'),
    ('{"rules": [{"name": "x", "min_probability": 1.5}]}', "from 0 to 1"),
    ('{"rules": [{"name": "x", "statuses": ["fine"]}]}', '"statuses" must be'),
    ('{"rules": [{"name": "x"}, {"name": "x"}]}', "repeats the name"),
    ('{"rules": [{"name": "d", "drift": "vibes", "threshold": 1}]}', "choose one of class_mix"),
    ('{"rules": [{"name": "d", "drift": "class_mix"}]}', '"threshold" above 0'),
    ('{"rules": [{"name": "d", "drift": "class_mix", "threshold": 0.1, "labels": ["a"]}]}',
     "unknown keys ['labels']"),
])
def test_a_bad_rule_file_is_refused_in_one_sentence(text: str, says: str) -> None:
    with pytest.raises(BadRules) as info:
        parse_rules(text, "rules.json")
    message = str(info.value)
    assert says in message and message.startswith("rules.json") and "\n" not in message


def test_drift_rules_need_the_bigquery_sink_and_embedding_shift_needs_embeddings(tmp_path) -> None:
    rules = parse_rules('{"rules": [{"name": "e", "drift": "embedding_shift", "threshold": 0.1}]}')
    with pytest.raises(BadRules, match="BUCKETLENS_SINK=bigquery"):
        alerts.check_fits(rules, Settings(sink="console"))
    with pytest.raises(BadRules, match="store embeddings"):
        alerts.check_fits(rules, Settings())
    alerts.check_fits(rules, Settings(embeddings=True))
    with pytest.raises(BadRules, match="no alert rule file at"):
        alerts.load_rules(str(tmp_path / "missing.json"))


def test_row_message_carries_the_row_and_its_attributes() -> None:
    rule = parse_rules(json.dumps(RULES)).rows[0]
    m = alerts.row_message(rule, row())
    assert m.attributes == {"dedupe_id": "b/up/a.jpg#7", "rule": "cats", "label": "tabby",
                            "probability": "0.900000", "model_version": "v1"}
    assert json.loads(m.data) == row()


class FakeFuture:
    def result(self, timeout: float) -> str:
        return "id"


class Recorder:
    """Stands in for the publisher client in pure tests (the stream tests use the emulator)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict]] = []

    def publish(self, topic: str, data: bytes, **attrs: str) -> FakeFuture:
        self.sent.append((topic, data, attrs))
        return FakeFuture()


def test_the_alerter_publishes_each_dedupe_id_once_per_run_found_rows_included() -> None:
    client = Recorder()
    a = alerts.Alerter(Settings(alert_topic="al"), parse_rules(json.dumps(RULES)), client=client)
    assert a.after_write([row(), row(label="espresso", generation=8)]) == 1
    assert a.after_write([row()], found=[row(generation=9), row(generation=9)]) == 1
    assert a.after_write([], found=[row(generation=9)]) == 0  # replayed batch: nothing again
    assert [(t, m["dedupe_id"]) for t, _, m in client.sent] == \
        [("projects/bucketlens-local/topics/al", "b/up/a.jpg#7"),
         ("projects/bucketlens-local/topics/al", "b/up/a.jpg#9")]


def test_drift_rule_fires_at_its_threshold_in_windows_big_enough() -> None:
    rule = alerts.DriftRule("m", "class_mix", 0.2, min_images=20)
    assert rule.fires({"class_mix": 0.2, "images": 20})
    assert not rule.fires({"class_mix": 0.19, "images": 200})
    assert not rule.fires({"class_mix": 0.9, "images": 19})
    assert not rule.fires({"class_mix": None, "images": 50})
    w = {"window_start": datetime(2026, 1, 1, tzinfo=UTC), "images": 30, "class_mix": 0.25,
         "baseline_start": datetime(2025, 12, 31, 23, tzinfo=UTC)}
    m = alerts.drift_message(rule, w)
    assert m.attributes == {"dedupe_id": "drift/m/2026-01-01T00:00:00+00:00", "rule": "m",
                            "drift": "class_mix", "value": "0.250000", "threshold": "0.2",
                            "window_start": "2026-01-01T00:00:00+00:00",
                            "baseline_start": "2025-12-31T23:00:00+00:00"}
    assert json.loads(m.data)["class_mix"] == 0.25


def test_window_settings_parse_and_bad_ones_are_refused() -> None:
    assert [drift.window_seconds(t) for t in ("hour", "day", "minute", "90", "90s")] == \
        [3600, 86400, 60, 90, 90]
    for bad in ("0", "week", "-5", "1.5"):
        with pytest.raises(ValueError):
            drift.window_seconds(bad)
    with pytest.raises(InvalidSetting, match="drift_window 'fortnight' is invalid"):
        Settings(drift_window="fortnight").validated()
    with pytest.raises(InvalidSetting, match="drift_baseline"):
        Settings(drift_baseline="yesterday").validated()
    values = drift.template_values(Settings(drift_window="600", drift_baseline="2026-01-01T10:07"))
    start = int(datetime(2026, 1, 1, 10, tzinfo=UTC).timestamp())
    assert values["drift_window_seconds"] == "600"
    assert values["drift_baseline"] == f"MIN(TIMESTAMP_SECONDS({start}))"


def test_the_watch_judges_a_window_once_a_later_one_shows_up() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    w = drift.Watch(10)
    at = lambda s: t0 + timedelta(seconds=s)  # noqa: E731
    # a start judges from the window before its oldest row: a predecessor may have died
    # between writing a window's last rows and publishing its judgement
    assert w.advance([at(22), at(15)]) == (at(0), at(20))
    assert w.advance([at(29)]) is None
    assert w.advance([at(3)]) is None  # a straggler of a judged window
    assert w.advance([at(28), at(51)]) == (at(20), at(50))  # 20, 30, 40 closed
    assert w.advance([]) is None
    # while warming up (a dead predecessor's messages come back): from before the oldest again
    assert w.advance([at(33), at(55)], warming_up=True) == (at(20), at(50))
    assert w.advance([at(61)], warming_up=True) == (at(50), at(60))
