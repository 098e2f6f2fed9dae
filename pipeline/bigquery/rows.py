"""The rows bucketlens writes, JSON-ready, built from notifications and predictions (pure):
``predictions``, ``embeddings``, ``object_events`` and ``dead_letters``, and how a batch's rows
are cut and de-duplicated before a write."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pipeline.bigquery.catalog import TableSpec
from pipeline.labels import ModelInfo
from pipeline.notifications import Notification
from pipeline.times import as_utc, utc

# An AppendRows request carries at most 10 MB (https://cloud.google.com/bigquery/quotas#write-api-limits);
# a 1280-d embedding row is ~10 kB, so a batch's embeddings go in parts of at most this many bytes.
# (pipeline.bigquery.bqwrite.append_requests cuts each part's requests on their real serialized size.)
APPEND_BYTES = 8 * 1024 * 1024
# A dead letter keeps the first this many bytes of the message's data, with the whole data's
# size and SHA-256: a Pub/Sub message may be 10 MB, which base64'd would make the dead-letter
# write itself an AppendRows request over the 10 MB limit.
DEAD_LETTER_DATA_BYTES = 1024


def _ts(value: datetime | int | None) -> str | None:
    """ISO-8601 in UTC; naive datetimes are taken to be UTC already, numbers are epoch
    microseconds (how the source carries publish times, ``pipeline.times.utc``)."""
    if value is None:
        return None
    return utc(value).isoformat()


def build_row(n: Notification, *, status: str, reason: str = "",
              model: ModelInfo | str | None = None, topk: Sequence[tuple[int, str, float]] = (),
              batch_id: int | None = None, processed_at: datetime | None = None) -> dict:
    """One ``predictions`` row, JSON-ready; ``topk`` is (class_id, label, prob), best first.

    With a :class:`ModelInfo` the row records the model's version and label set, and which of
    the model's own labels the true label names (what the accuracy views score directly)."""
    top = [{"class_id": int(c), "label": str(label), "prob": float(p)} for c, label, p in topk]
    first = top[0] if top else {}
    info = model if isinstance(model, ModelInfo) else None
    return {
        "bucket": n.key.bucket,
        "name": n.key.name,
        "generation": n.key.generation,
        "status": status,
        "reason": reason or None,
        "true_label": n.true_label,
        "model": info.name if info else model,
        "model_version": info.version if info else None,
        "label_set": info.label_set if info else None,
        "true_model_label": info.own_label(n.true_label) if info else None,
        "top1_class_id": first.get("class_id"),
        "top1_label": first.get("label"),
        "top1_prob": first.get("prob"),
        "top5": top,
        "size": n.size,
        "content_type": n.content_type,
        "event_time": _ts(n.event_time),
        "publish_time": _ts(n.publish_time),
        "processed_at": _ts(processed_at or datetime.now(UTC)),
        "message_id": n.message_id or None,
        "batch_id": batch_id,
        # the partition every copy of this key agrees on: GCS's timeCreated; a notification
        # without a JSON payload has only eventTime (for OBJECT_FINALIZE the same instant)
        "object_created": _ts(n.created or n.event_time or processed_at or datetime.now(UTC)),
    }


def embedding_record(prediction: Mapping[str, Any], embedding: Sequence[float],
                     model: ModelInfo) -> dict:
    """One ``embeddings`` row, JSON-ready, for the ``predictions`` row built from the same
    forward pass: same key, partition day, batch and time, plus the model version."""
    vector = list(map(float, embedding))
    return {
        "bucket": prediction["bucket"], "name": prediction["name"],
        "generation": prediction["generation"], "model_version": model.version,
        "model": model.name, "dimensions": len(vector), "embedding": vector,
        "object_created": prediction["object_created"], "processed_at": prediction["processed_at"],
        "message_id": prediction["message_id"], "batch_id": prediction["batch_id"],
    }


def event_record(n: Notification, batch_id: int | None, *,
                 recorded_at: datetime | None = None) -> dict:
    """One ``object_events`` row: a DELETE / ARCHIVE / METADATA_UPDATE, recorded not classified."""
    return {
        "bucket": n.key.bucket, "name": n.key.name, "generation": n.key.generation,
        "event_type": n.event_type, "event_time": _ts(n.event_time), "message_id": n.message_id,
        "metageneration": n.metageneration or 0,  # 0: not given (a NULL would never match)
        "recorded_at": _ts(recorded_at or datetime.now(UTC)), "batch_id": batch_id,
    }


def dead_letter_record(message_id: str, reason: str, attributes: Mapping[str, str],
                       data: bytes | None, publish_time: datetime | int | None,
                       batch_id: int | None, *, recorded_at: datetime | None = None) -> dict:
    """One ``dead_letters`` row: why the message failed, its attributes, and its data as the
    first DEAD_LETTER_DATA_BYTES (base64) with the whole data's size and SHA-256, so the row
    stays small whatever the message's size (``data_bytes`` > the kept part: truncated)."""
    return {
        "message_id": message_id,
        "reason": reason,
        "attributes": json.dumps(dict(attributes), sort_keys=True),
        "data": (base64.b64encode(data[:DEAD_LETTER_DATA_BYTES]).decode("ascii")
                 if data is not None else None),
        "data_bytes": len(data) if data is not None else None,
        "data_sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
        "publish_time": _ts(publish_time),
        "recorded_at": _ts(recorded_at or datetime.now(UTC)),
        "batch_id": batch_id,
    }


def to_ndjson(rows: Sequence[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(r, default=json_default) + "\n" for r in rows).encode()


def json_default(value: object) -> object:
    if isinstance(value, datetime):
        return _ts(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _order(value: Any) -> Any:
    return as_utc(value) if isinstance(value, str | datetime) else value


def _row_bytes(row: Mapping[str, Any]) -> int:
    """A generous estimate of a row's encoded size (pure): strings at their UTF-8 size plus
    an offset, 8 bytes per number, nested records and arrays summed."""
    return 64 + _value_bytes(row)


def _value_bytes(value: Any) -> int:
    if isinstance(value, str):
        return 8 + len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes | bytearray):
        return 8 + len(value)
    if isinstance(value, Mapping):
        return sum(_value_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return 8 + sum(_value_bytes(v) for v in value)
    return 8


def byte_parts(rows: Sequence[dict], limit: int = APPEND_BYTES) -> list[list[dict]]:
    """Consecutive parts of ``rows`` of at most ``limit`` estimated bytes each (pure)."""
    parts: list[list[dict]] = []
    size = 0
    for r in rows:
        n = _row_bytes(r)
        if not parts or size + n > limit:
            parts.append([])
            size = 0
        parts[-1].append(r)
        size += n
    return parts


def first_per_key(rows: Sequence[dict], spec: TableSpec) -> list[dict]:
    """One row per key, the smallest ``order_by`` (what the MERGE's QUALIFY keeps) (pure)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        k = tuple(r[c] for c in spec.key)
        if k not in best or _order(r[spec.order_by]) < _order(best[k][spec.order_by]):
            best[k] = r
    return list(best.values())

