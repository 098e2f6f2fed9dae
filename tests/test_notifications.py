"""Unit tests for notification parsing, keys, filtering and in-batch de-duplication."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from pipeline.notifications import (
    ObjectKey,
    PoisonMessage,
    dedupe,
    event_time,
    parse,
    true_label_from_name,
    wanted,
)

ATTRS = {
    "eventType": "OBJECT_FINALIZE",
    "bucketId": "imgs",
    "objectId": "flowers/daisy/1.jpg",
    "objectGeneration": "1795293750903367",
    "eventTime": "2026-11-21T20:42:30Z",
    "payloadFormat": "JSON_API_V1",
}
PAYLOAD = {
    "kind": "storage#object", "name": "flowers/daisy/1.jpg", "bucket": "imgs",
    "generation": "1795293750903367", "contentType": "image/jpeg", "size": "5",
    "timeCreated": "2026-11-21T20:42:30.903359Z",
}


def test_parse_real_gcs_shape_gives_key_label_and_metadata() -> None:
    n = parse("m1", ATTRS, json.dumps(PAYLOAD).encode())
    assert n.key == ObjectKey("imgs", "flowers/daisy/1.jpg", 1795293750903367)
    assert n.true_label == "daisy"
    assert n.size == 5 and n.content_type == "image/jpeg"
    # eventTime in whole seconds (fake-gcs): the payload's time inside that second is used
    assert n.event_time == datetime(2026, 11, 21, 20, 42, 30, 903359, tzinfo=UTC)
    assert n.is_finalize and n.message_id == "m1"


@pytest.mark.parametrize(("attr", "payload", "expected"), [
    ("2026-11-21T20:42:30.5Z", {"updated": "2026-11-21T20:42:30.903359Z"}, (30, 500000)),
    ("2026-11-21T20:42:30Z", {"updated": "2026-11-21T20:42:30.25Z"}, (30, 250000)),
    ("2026-11-21T20:42:30Z", {"timeCreated": "2026-11-21T20:42:31.1Z"}, (30, 0)),
    ("2026-11-21T20:42:30Z", {"updated": "2026-11-21T20:42:29.9Z"}, (30, 0)),
    (None, {"timeCreated": "2026-11-21T20:42:31.1Z"}, (31, 100000)),
    ("2026-11-21T20:42:30Z", {"updated": 17}, (30, 0)),
])
def test_event_time_is_as_precise_as_the_message_allows(attr, payload, expected) -> None:
    attrs = {"eventTime": attr} if attr else {}
    second, micro = expected
    assert event_time(attrs, payload) == datetime(2026, 11, 21, 20, 42, second, micro, tzinfo=UTC)


def test_event_time_absent_everywhere_is_none() -> None:
    assert event_time({}, {}) is None


def test_payload_fills_in_missing_attributes() -> None:
    attrs = {"eventType": "OBJECT_FINALIZE"}
    n = parse("m2", attrs, json.dumps(PAYLOAD).encode())
    assert n.key == ObjectKey("imgs", "flowers/daisy/1.jpg", 1795293750903367)
    assert n.event_time == datetime(2026, 11, 21, 20, 42, 30, 903359, tzinfo=UTC)


def test_metadata_true_label_wins_over_path() -> None:
    payload = {**PAYLOAD, "metadata": {"true_label": "tulips"}}
    assert parse("m", ATTRS, json.dumps(payload).encode()).true_label == "tulips"


@pytest.mark.parametrize(
    ("attrs", "data", "reason"),
    [
        (ATTRS, b"\xff\xfe not json", "not JSON"),
        (ATTRS, b"[1, 2]", "not an object"),
        ({"foo": "bar"}, b"{}", "not a GCS notification"),
        ({"eventType": "OBJECT_FINALIZE", "bucketId": "b"}, b"{}", "lacks name, generation"),
        ({**ATTRS, "objectGeneration": "abc"}, b"{}", "generation is not an integer"),
    ],
)
def test_poison_messages_raise_with_reason(attrs, data, reason) -> None:
    with pytest.raises(PoisonMessage, match=reason):
        parse("m", attrs, data)


def test_wanted_filters_event_type_prefix_folder_and_size() -> None:
    n = parse("m", ATTRS, json.dumps(PAYLOAD).encode())
    assert wanted(n) is None
    assert wanted(n, prefix="flowers/") is None
    assert "outside prefix" in wanted(n, prefix="other/")
    assert "over the 4-byte limit" in wanted(n, max_bytes=4)
    deleted = parse("m", {**ATTRS, "eventType": "OBJECT_DELETE"}, b"")
    assert "OBJECT_DELETE" in wanted(deleted)
    folder = parse("m", {**ATTRS, "objectId": "flowers/"}, b"")
    assert wanted(folder) == "folder placeholder"


def test_true_label_needs_a_folder() -> None:
    assert true_label_from_name("a.jpg") is None
    assert true_label_from_name("p/q/roses/a.jpg") == "roses"


def test_dedupe_keeps_first_per_key_and_distinct_generations() -> None:
    a = parse("m1", ATTRS, b"")
    b = parse("m2", ATTRS, b"")
    c = parse("m3", {**ATTRS, "objectGeneration": "2"}, b"")
    out = dedupe([a, b, c])
    assert [n.message_id for n in out] == ["m1", "m3"]


def test_publish_time_in_any_form_is_the_same_instant() -> None:
    """Aware in any zone, naive (UTC) or epoch microseconds (how the source carries it)."""
    from datetime import timedelta, timezone

    instant = datetime(2026, 11, 21, 20, 42, 31, tzinfo=UTC)
    forms = [instant, instant.astimezone(timezone(timedelta(hours=9))),
             instant.replace(tzinfo=None), 1795293751000000, 1795293751000000.0]
    got = {parse("m", ATTRS, b"", form).publish_time for form in forms}
    assert got == {instant}
    with pytest.raises(PoisonMessage, match="publish_time"):
        parse("m", ATTRS, b"", 10**20)  # beyond year 9999
