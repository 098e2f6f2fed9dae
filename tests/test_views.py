"""Analytics views: the class mapping's two copies agree, files run in dependency order, and
every view returns the known answer on rows written the way the pipeline writes them."""

from __future__ import annotations

import ast
import importlib.util
import re
from datetime import timedelta
from pathlib import Path

import pytest

from pipeline import catalog, report, sink
from pipeline.config import Settings
from tests.helpers.views import (
    T0,
    load,
    quality_rows,
    select,
    timing_rows,
)

REPORT_VIEWS = {"class_mapping", "distinct_predictions", "latest_predictions",
                "processing_latency", "accuracy_by_label",
                "accuracy_summary", "confusion_counts", "latency_distribution",
                "latency_per_minute", "status_counts", "throughput_per_minute",
                "top_predicted_classes"}


# --- pure -------------------------------------------------------------------------------------

def imagenet_categories() -> list[str]:
    """torchvision's ImageNet-1k names (what ``classify.imagenet_labels`` returns), read from
    its source so that this check does not pay ~10 s for importing torch."""
    spec = importlib.util.find_spec("torchvision")
    assert spec and spec.origin, "torchvision is not installed"
    tree = ast.parse((Path(spec.origin).parent / "models" / "_meta.py").read_text())
    (value,) = [n.value for n in tree.body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", "") == "_IMAGENET_CATEGORIES"]
    return ast.literal_eval(value)


def test_inline_mapping_in_sql_equals_class_mapping_json() -> None:
    sql = catalog.read_text("views/class_mapping.sql")
    assert report.embedded_mapping_sql(sql) == report.mapping_rows_sql(report.load_class_mapping())


def test_class_mapping_json_is_honest_about_imagenet() -> None:
    from producer.datasets import FLOWERS_CLASSES, SAMPLE_SOURCES

    labels = imagenet_categories()
    assert len(labels) == 1000
    classes = {c["label"]: c for c in report.load_class_mapping()["classes"]}
    for c in classes.values():
        assert (c["match"] == "none") == (not c["imagenet"]), c["label"]
        for t in c["imagenet"]:
            assert labels[t["class_id"]] == t["label"], t  # ids are real ImageNet-1k indices
    # the TF flowers set: only daisy exists in ImageNet-1k
    assert {f for f in FLOWERS_CLASSES if classes[f]["imagenet"]} == {"daisy"}
    assert [t["class_id"] for t in classes["daisy"]["imagenet"]] == [985]
    assert {name for name, _, _ in SAMPLE_SOURCES} <= set(classes)  # every sample class decided
    assert {t["label"] for t in classes["cat"]["imagenet"]} == {
        "tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def test_mapping_rows_sql_quotes_and_refuses_braces() -> None:
    m = {"classes": [{"label": "o'brien", "match": "none", "imagenet": []},
                     {"label": "a", "match": "exact", "imagenet": [{"class_id": 2, "label": "b"}]}]}
    assert report.mapping_rows_sql(m) == (
        "SELECT 'a' AS true_label, 2 AS class_id, 'b' AS imagenet_label, 'exact' AS match_kind\n"
        "UNION ALL SELECT 'o\\'brien', CAST(NULL AS INT64), CAST(NULL AS STRING), 'none'")
    with pytest.raises(ValueError):
        report.sql_string("{project}")


def test_view_files_run_after_the_views_they_read() -> None:
    """create_views runs files in name order and BigQuery checks a view's sources exist."""
    s = Settings(project="p", dataset="d", table="t")
    made: set[str] = set()
    for name, template in catalog.view_templates():
        sql = sink.render_view(template, s)
        created = sink.view_id(sql).split(".")[-1]
        body = sql.split(" AS\n", 1)[1]
        reads = set(re.findall(r"`p\.d\.(\w+)`", body)) - {"t"}
        assert reads <= made, f"{name} reads {reads - made} before they exist"
        made.add(created)
    assert made == REPORT_VIEWS


# --- against bqemulator -----------------------------------------------------------------------

@pytest.mark.integration
def test_create_views_creates_every_view(isolated: Settings) -> None:
    created = sink.create_views(isolated)
    assert {v.split(".")[-1] for v in created} == REPORT_VIEWS
    assert all(v.startswith(f"{isolated.project}.{isolated.dataset}.") for v in created)
    assert select(isolated, "accuracy_summary")[0]["labelled_images"] == 0  # empty table works
    assert select(isolated, "latency_distribution") == []


@pytest.mark.integration
def test_quality_views_known_answers(isolated: Settings) -> None:
    load(isolated, quality_rows(isolated))

    acc = {r["true_label"]: r for r in select(isolated, "accuracy_by_label")}
    assert set(acc) == {"daisy", "cat", "roses", "mystery"}  # loose.jpg has no label
    cols = ("mapping", "images", "classified", "top1_correct", "top5_correct")
    assert tuple(acc["daisy"][c] for c in cols) == ("mapped", 4, 3, 2, 3)
    assert acc["daisy"]["top1_accuracy"] == pytest.approx(2 / 3)
    assert acc["daisy"]["top5_accuracy"] == pytest.approx(1.0)
    assert tuple(acc["cat"][c] for c in cols) == ("mapped", 2, 2, 1, 1)
    assert (acc["cat"]["top1_accuracy"], acc["cat"]["top5_accuracy"]) == (0.5, 0.5)
    for label, kind in (("roses", "no_imagenet_class"), ("mystery", "not_in_mapping")):
        assert acc[label]["mapping"] == kind
        assert [acc[label][c] for c in ("top1_correct", "top5_correct", "top1_accuracy",
                                         "top5_accuracy")] == [None] * 4

    (summary,) = select(isolated, "accuracy_summary")
    assert summary == {"labelled_images": 9, "scored_images": 5, "unmappable_images": 3,
                       "top1_correct": 3, "top5_correct": 4,
                       "top1_accuracy": pytest.approx(0.6), "top5_accuracy": pytest.approx(0.8)}

    confusion = {(r["true_label"], r["predicted_label"]): r["images"]
                 for r in select(isolated, "confusion_counts")}
    assert confusion == {("daisy", "daisy"): 2, ("daisy", "bee"): 1, ("cat", "tiger cat"): 1,
                         ("cat", "lynx"): 1, ("roses", "daisy"): 1, ("roses", "pot"): 1,
                         ("mystery", "goldfish"): 1}

    top = select(isolated, "top_predicted_classes", "frequency_rank, class_id")
    assert [(r["label"], r["predictions"], r["frequency_rank"]) for r in top] == [
        ("daisy", 3, 1), ("goldfish", 2, 2), ("tiger cat", 1, 3), ("lynx", 1, 3),
        ("bee", 1, 3), ("pot", 1, 3)]
    assert top[0]["mean_prob"] == pytest.approx(0.6)

    status = {r["status"]: (r["images"], r["share"]) for r in select(isolated, "status_counts")}
    assert status == {"ok": (9, pytest.approx(9 / 11)), "low_confidence": (1, pytest.approx(1 / 11)),
                      "corrupt": (1, pytest.approx(1 / 11))}  # every generation counts here


@pytest.mark.integration
def test_timing_views_known_answers(isolated: Settings) -> None:
    load(isolated, timing_rows(isolated))
    minute = [T0, T0 + timedelta(minutes=2)]

    thr = select(isolated, "throughput_per_minute", "minute")
    assert [(r["minute"], r["images"], r["classified"], r["errors"]) for r in thr] == [
        (minute[0], 3, 3, 0), (minute[1], 21, 20, 1)]
    assert thr[1]["images_per_s"] == pytest.approx(21 / 60)

    lat = select(isolated, "latency_per_minute", "minute")
    assert [(r["minute"], r["images"]) for r in lat] == [(minute[0], 3), (minute[1], 20)]
    assert [lat[0][c] for c in ("p50_s", "p95_s", "p99_s", "max_s")] == [2.0] * 4
    # 1..20 s: exact quantiles are 10/19/20 (nearest rank); APPROX_QUANTILES may be off by one
    for col, want in (("p50_s", 10), ("p95_s", 19), ("p99_s", 20)):
        assert abs(lat[1][col] - want) <= 1.0, (col, lat[1][col])
    assert lat[1]["max_s"] == 20.0

    dist = select(isolated, "latency_distribution", "percentile")
    assert [r["percentile"] for r in dist] == list(range(101))
    seconds = [r["latency_s"] for r in dist]
    assert seconds == sorted(seconds) and (seconds[0], seconds[-1]) == (1.0, 20.0)
