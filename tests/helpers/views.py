"""Known-answer rows for the analytics views, written through the real sink, and a reader."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from pipeline import clients
from pipeline.bigquery import rows as bigquery_rows
from pipeline.bigquery import sinks
from pipeline.config import Settings
from pipeline.labels import IMAGENET as IMAGENET_SET
from pipeline.labels import OWN_LABELS, ModelInfo
from pipeline.notifications import Notification, ObjectKey

T0 = datetime(2024, 5, 6, 7, 0, tzinfo=UTC)
IMAGENET = {1: "goldfish", 281: "tabby", 282: "tiger cat", 286: "cougar", 287: "lynx",
            309: "bee", 402: "acoustic guitar", 738: "pot", 985: "daisy"}

# name, generation, status, top-k class ids (best first). Only the newest generation counts for
# quality, so daisy/3 is a miss at generation 1 and a hit at 2; roses have no ImageNet class, so
# predicting "daisy" for one must not count as wrong; "mystery" is in no mapping; loose.jpg has
# no class folder at all.
QUALITY = [
    ("flowers/daisy/1.jpg", 1, "ok", [985, 309]),          # top-1 hit
    ("flowers/daisy/2.jpg", 1, "ok", [309, 985]),          # top-5 hit only
    ("flowers/daisy/3.jpg", 1, "ok", [309, 1]),            # miss, but overwritten by ...
    ("flowers/daisy/3.jpg", 2, "ok", [985]),               # ... a hit
    ("flowers/daisy/4.jpg", 1, "corrupt", []),             # no prediction: not classified
    ("samples/cat/1.jpg", 1, "ok", [282, 281]),            # top-1 hit
    ("samples/cat/2.jpg", 1, "ok", [287, 286]),            # wild cats: miss
    ("flowers/roses/1.jpg", 1, "ok", [985]),               # unmappable, not wrong
    ("flowers/roses/2.jpg", 1, "low_confidence", [738]),   # unmappable
    ("other/mystery/1.jpg", 1, "ok", [1]),                 # not in the mapping
    ("loose.jpg", 1, "ok", [1]),                           # no true label
]


def note(name: str, generation: int, bucket: str, event_time: datetime | None) -> Notification:
    return Notification(ObjectKey(bucket, name, generation), "OBJECT_FINALIZE",
                        event_time=event_time, publish_time=event_time)


def prediction(settings: Settings, name: str, generation: int, status: str, ids: Sequence[int],
               processed_at: datetime, latency_s: float | None = 1.0,
               model: ModelInfo | None = None) -> dict:
    """A row exactly as the pipeline builds it (``build_row``): with a ``model`` its labels name
    the top-k ids, else (a row written before rows carried a ModelInfo) ``IMAGENET`` does."""
    event = None if latency_s is None else processed_at - timedelta(seconds=latency_s)
    labels = model.labels if model else IMAGENET
    topk = [(c, labels[c], round(0.6 / (i + 1), 3)) for i, c in enumerate(ids)]
    return bigquery_rows.build_row(note(name, generation, settings.bucket, event), status=status,
                          model=model or "test", topk=topk, batch_id=0, processed_at=processed_at)


def quality_rows(settings: Settings) -> list[dict]:
    return [prediction(settings, n, g, s, ids, T0 + timedelta(seconds=10))
            for n, g, s, ids in QUALITY]


IMAGENET_MODEL = ModelInfo("efficientnet_lite0", "bundled", IMAGENET_SET,
                           tuple(IMAGENET.get(i, f"imagenet {i}") for i in range(1000)))
DIGITS_V1 = ModelInfo("digits", "sha256-1111", OWN_LABELS, tuple(str(i) for i in range(10)))
DIGITS_V2 = ModelInfo("digits", "sha256-2222", OWN_LABELS, DIGITS_V1.labels)
# a trained bundle whose class ids reach ImageNet's mapped ones (985 = daisy): still its own
WIDE = ModelInfo("wide", "sha256-3333", OWN_LABELS, tuple(f"w{i}" for i in range(1000)))

# name, status, top-k class ids (indices into the model's labels), model (None: an old row
# without model_version/label_set), seconds after T0. Each model version is processed at its own
# time, so accuracy_by_model_version has a known order: old row, ImageNet, wide, digits v1, v2.
MODEL_ROWS = [
    ("flowers/daisy/10.jpg", "ok", [985], None, 1),                      # old row: mapped, hit
    ("guitars/acoustic_guitar/1.jpg", "ok", [402, 1], IMAGENET_MODEL, 5),  # own label: top-1 hit
    ("guitars/acoustic_guitar/2.jpg", "ok", [1, 402], IMAGENET_MODEL, 5),  # top-5 hit only
    ("flowers/daisy/11.jpg", "ok", [985], WIDE, 6),                      # not a model label
    ("digits/0/a.png", "ok", [0], DIGITS_V1, 10),                        # hit
    ("digits/1/a.png", "ok", [7, 1], DIGITS_V1, 11),                     # top-5 only
    ("digits/2/a.png", "ok", [2], DIGITS_V1, 12),                        # hit
    ("digits/3/a.png", "ok", [5], DIGITS_V1, 13),                        # miss
    ("digits/0/b.png", "ok", [0], DIGITS_V2, 70),                        # hit
    ("digits/1/b.png", "ok", [1], DIGITS_V2, 71),                        # hit
    ("digits/2/b.png", "ok", [2], DIGITS_V2, 72),                        # hit
    ("digits/3/b.png", "ok", [8, 3], DIGITS_V2, 73),                     # top-5 only
    ("digits/4/b.png", "corrupt", [], DIGITS_V2, 74),                    # not classified
]


def model_rows(settings: Settings) -> list[dict]:
    return [prediction(settings, n, 1, s, ids, T0 + timedelta(seconds=t), model=m)
            for n, s, ids, m, t in MODEL_ROWS]


def timing_rows(settings: Settings) -> list[dict]:
    """07:00 — three rows 2 s old; 07:01 — nothing; 07:02 — twenty rows 1..20 s old and one
    failed row without an event_time (throughput counts it, latency cannot)."""
    rows = [prediction(settings, f"t0-{i}.jpg", 1, "ok", [1], T0 + timedelta(seconds=10 + i), 2.0)
            for i in range(3)]
    rows += [prediction(settings, f"t2-{i}.jpg", 1, "ok", [1], T0 + timedelta(seconds=120 + i),
                        float(i + 1)) for i in range(20)]
    rows.append(prediction(settings, "t2-bad.jpg", 1, "fetch_error", [],
                           T0 + timedelta(seconds=150), None))
    return rows


def load(settings: Settings, rows: list[dict]) -> None:
    """Write through the pipeline's sink into a dataset provisioned with its views (the
    ``views`` marker, or ``provision.apply``): views read their tables when queried."""
    assert sinks.BigQuerySink(settings).write(rows, batch_id=0) == len(rows)


def select(settings: Settings, view: str, order_by: str = "1") -> list[dict]:
    c = clients.bigquery_client(settings)
    sql = f"SELECT * FROM `{settings.project}.{settings.dataset}.{view}` ORDER BY {order_by}"
    return [dict(r.items()) for r in c.query(sql).result()]
