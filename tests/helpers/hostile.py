"""Hostile notifications as data: one row per case, shared by the unit table (test_hostile) and
the run through the real stack (test_hostile_stream). Adding a case is one line here."""

from __future__ import annotations

import json
from datetime import UTC, datetime

BUCKET = "imgs"
PUBLISHED = datetime(2026, 11, 21, 20, 42, 31, tzinfo=UTC)
ATTRS = {"eventType": "OBJECT_FINALIZE", "bucketId": BUCKET, "objectId": "flowers/daisy/1.jpg",
         "objectGeneration": "1795293750903367", "eventTime": "2026-11-21T20:42:30Z",
         "payloadFormat": "JSON_API_V1"}


def msg(data: bytes | dict = b"", **attrs: str | None) -> tuple:
    """One message row as the source yields it; ``attr=None`` drops that attribute."""
    merged = {k: v for k, v in {**ATTRS, **attrs}.items() if v is not None}
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    return ("m", PUBLISHED, merged, raw)


def payload_only(**payload: object) -> tuple:
    """The key only in the JSON payload (the attributes say just the event type)."""
    return msg({"bucket": BUCKET, "name": "a/b.jpg", **payload}, bucketId=None, objectId=None,
               objectGeneration=None)


def metadata_update(metageneration: int) -> tuple:
    return msg({"metageneration": str(metageneration)}, eventType="OBJECT_METADATA_UPDATE")


DEEP = b"[" * 100_000 + b"]" * 100_000

# (case, messages, expected outcome of each): "dead: <reason part>", "ignored: <reason part>",
# "event: <event type>", "todo". Every row failed before the hardening (an exception out of
# triage or row building, a wrong outcome, or a key that dropped a distinct event).
NOTIFICATIONS: list[tuple[str, list[tuple], list[str]]] = [
    ("size 1e400", [msg(b'{"size": 1e400}')], ["dead: size is not an integer"]),
    ("generation 1e400", [payload_only(generation=float("inf"))],
     ["dead: generation is not an integer"]),
    ("generation 1e400 raw", [msg(b'{"bucket": "imgs", "name": "a", "generation": 1e400}',
                                  bucketId=None, objectId=None, objectGeneration=None)],
     ["dead: generation is not an integer"]),
    ("JSON nested 100k deep", [msg(DEEP)], ["dead: nested too deeply"]),
    ("integer of 5000 digits", [msg(b'{"size": ' + b"7" * 5000 + b"}")], ["dead: not JSON"]),
    ("eventTime 9999-12-31 with updated in that second",
     [msg({"updated": "9999-12-31T23:59:59.5Z"}, eventTime="9999-12-31T23:59:59Z")],
     ["dead: after the message was published"]),
    ("eventTime before year 1 in UTC", [msg(eventTime="0001-01-01T00:00:00+01:00")],
     ["dead: eventTime \"0001-01-01T00:00:00+01:00\" is outside 1970..2159"]),
    ("generation -5", [msg(objectGeneration="-5")], ["dead: outside 1..2^63-1"]),
    ("generation 0", [msg(objectGeneration="0")], ["dead: outside 1..2^63-1"]),
    ("generation 0 in payload", [payload_only(generation=0)], ["dead: outside 1..2^63-1"]),
    ("generation 2**63", [msg(objectGeneration=str(2**63))], ["dead: outside 1..2^63-1"]),
    ("generation 2**63 in payload", [payload_only(generation=2**63)], ["dead: outside"]),
    ("generation true", [payload_only(generation=True)], ["dead: generation is not an integer"]),
    ("generation 7.0", [payload_only(generation=7.0)], ["dead: generation is not an integer"]),
    ("generation '1_000'", [msg(objectGeneration="1_000")], ["dead: generation is not an integer"]),
    ("generation Arabic-Indic 7", [msg(objectGeneration="\u0667")],
     ["dead: generation is not an integer"]),
    ("generation ' 7 '", [msg(objectGeneration=" 7 ")], ["dead: generation is not an integer"]),
    ("size -1", [msg({"size": "-1"})], ["dead: size \"-1\" is outside"]),
    ("metadata.true_label an object", [msg({"metadata": {"true_label": {"x": 1}}})],
     ["dead: metadata.true_label is not a string"]),
    ("metadata an array", [msg({"metadata": ["daisy"]})], ["dead: metadata is not an object"]),
    ("metadata key forging a line", [msg({"metadata": {"a\nERROR forged": 5}})],
     ["dead: metadata.a\\nERROR forged is not a string"]),
    ("contentType an object", [msg({"contentType": {"x": 1}})],
     ["dead: contentType is not a string"]),
    ("name an object", [payload_only(name={"x": 1}, generation="7")],
     ["dead: name is not a string"]),
    ("another bucket", [msg(bucketId="someone-elses")], ["ignored: not the watched bucket"]),
    ("another bucket's delete", [msg(eventType="OBJECT_DELETE", bucketId="someone-elses")],
     ["ignored: not the watched bucket"]),
    ("delete by overwrite", [msg(eventType="OBJECT_DELETE", overwrittenByGeneration="8")],
     ["event: OBJECT_OVERWRITE"]),
    ("archive by overwrite (payload)",
     [msg({"overwrittenByGeneration": "8"}, eventType="OBJECT_ARCHIVE")],
     ["event: OBJECT_OVERWRITE"]),
    ("overwrittenByGeneration garbage", [msg(eventType="OBJECT_DELETE",
                                             overwrittenByGeneration="x")],
     ["dead: overwrittenByGeneration is not an integer"]),
    ("second METADATA_UPDATE of a generation", [metadata_update(2), metadata_update(3)],
     ["event: OBJECT_METADATA_UPDATE", "event: OBJECT_METADATA_UPDATE"]),
    # ------ forged times and sizes (issue 24, item 3): every time the pipeline reads is
    # range-checked (a year 9999 timeCreated ended the query in the sink's day arithmetic);
    # a dead letter stays small whatever the message (test_hostile checks every dead row)
    ("timeCreated 9999-12-31", [msg({"timeCreated": "9999-12-31T23:59:59Z"})],
     ["dead: timeCreated 9999-12-31T23:59:59+00:00 is after the message was published"]),
    ("timeCreated year 5", [msg({"timeCreated": "0005-01-01T00:00:00Z"})],
     ["dead: timeCreated 0005-01-01T00:00:00+00:00 is outside 1970..2159"]),
    ("timeCreated not a time", [msg({"timeCreated": "yesterday"})],
     ["dead: timeCreated is not an RFC 3339 time: \"yesterday\""]),
    ("timeCreated a number", [msg({"timeCreated": 1700000000})],
     ["dead: timeCreated is not a string: int"]),
    ("updated 9999-12-31", [msg({"updated": "9999-12-31T23:59:59.5Z"})],
     ["dead: updated 9999-12-31T23:59:59.500000+00:00 is after the message was published"]),
    ("eventTime garbage", [msg(eventTime="soon")],
     ["dead: eventTime is not an RFC 3339 time: \"soon\""]),
    ("eventTime 1969", [msg(eventTime="1969-12-31T23:59:59Z")],
     ["dead: eventTime 1969-12-31T23:59:59+00:00 is outside 1970..2159"]),
    ("publish time as epoch microseconds (the source's form)",
     [("m", 1795293751000000, ATTRS, b"")], ["todo"]),
    ("8 MB of data", [msg(b"x" * 8_000_000)], ["dead: data is not JSON"]),
]
