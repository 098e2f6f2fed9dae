"""Analytics views: the class mapping's two copies agree, files run in dependency order, and
every view returns the known answer on rows written the way the pipeline writes them."""

from __future__ import annotations

import ast
import importlib.util
import re
from datetime import timedelta
from pathlib import Path

import pytest

from pipeline.bigquery import catalog
from pipeline.bigquery import views as bigquery_views
from pipeline.commands import report
from pipeline.config import Settings
from tests.helpers.views import (
    DIGITS_V1,
    DIGITS_V2,
    IMAGENET_MODEL,
    T0,
    WIDE,
    load,
    model_rows,
    quality_rows,
    select,
    timing_rows,
)

# the isolated dataset gets the analytics views (conftest)
pytestmark = pytest.mark.views

REPORT_VIEWS = {"class_mapping", "distinct_predictions", "latest_predictions",
                "processing_latency", "scored_predictions", "accuracy_by_label",
                "accuracy_by_model_version",
                "accuracy_summary", "confusion_counts", "latency_distribution",
                "latency_per_minute", "status_counts", "throughput_per_minute",
                "top_predicted_classes", "distinct_embeddings", "latest_embeddings",
                "near_duplicates", "drift_windows", "embedding_drift"}


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
        sql = bigquery_views.render_view(template, s)
        created = bigquery_views.view_id(sql).split(".")[-1]
        body = sql.split(" AS\n", 1)[1]
        reads = set(re.findall(r"`p\.d\.(\w+)`", body)) - {"t", catalog.EMBEDDINGS_TABLE}
        assert reads <= made, f"{name} reads {reads - made} before they exist"
        made.add(created)
    assert made == REPORT_VIEWS


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_view_columns() -> dict[str, list[str]]:
    """README's "Every view and its columns" table: view → its columns, or ["*", table] where
    the row says "every column of `table`"."""
    text = README.read_text()
    section = text[text.index("### Every view and its columns"):]
    section = section[:section.index("\n## ")]
    found = {}
    for view, cells in re.findall(r"^\| `(\w+)` \| (.+) \|$", section, re.M):
        every = re.match(r"every column of `(\w+)`", cells)
        found[view] = ["*", every.group(1)] if every else [c.strip() for c in cells.split(",")]
    return found


def test_readme_documents_every_view_with_columns_and_a_demo_example() -> None:
    assert set(readme_view_columns()) == REPORT_VIEWS
    text = README.read_text()
    examples = text[text.index("### Every view on the demo data"):]
    examples = examples[:examples.index("\n## ")]
    shown = set(re.findall(r"^\$ bucketlens sql \"SELECT .*? FROM (\w+)", examples, re.M))
    assert shown == REPORT_VIEWS


# --- against bqemulator -----------------------------------------------------------------------

@pytest.mark.integration
def test_create_views_creates_every_view(isolated: Settings) -> None:
    created = bigquery_views.create_views(isolated)
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
def test_own_labels_are_scored_directly_and_per_model_version(isolated: Settings) -> None:
    """Rows carrying a ModelInfo: a true label that is one of the model's labels is scored by
    label (ImageNet models and bundles alike); class_mapping applies only to ImageNet rows."""
    load(isolated, model_rows(isolated))

    scored = {r["name"]: r for r in select(isolated, "scored_predictions")}
    guitar = scored["guitars/acoustic_guitar/1.jpg"]
    assert (guitar["true_label"], guitar["true_model_label"], guitar["top1_label"]) == (
        "acoustic_guitar", "acoustic guitar", "acoustic guitar")
    assert (guitar["mapping"], guitar["classified"], guitar["scored"], guitar["top1_hit"],
            guitar["top5_hit"]) == ("own_label", 1, 1, 1, 1)
    assert (guitar["model"], guitar["model_version"], guitar["label_set"]) == (
        IMAGENET_MODEL.name, IMAGENET_MODEL.version, "imagenet-1k")
    # a bundle's class 985 is its own 'w985', not ImageNet's daisy: not scored at all
    wide = scored["flowers/daisy/11.jpg"]
    assert (wide["top1_class_id"], wide["label_set"], wide["true_model_label"]) == (985, "own", None)
    assert (wide["mapping"], wide["scored"], wide["top1_hit"], wide["top5_hit"]) == (
        "not_a_model_label", 0, None, None)
    old = scored["flowers/daisy/10.jpg"]  # no label_set: ImageNet, through class_mapping
    assert (old["label_set"], old["mapping"], old["top1_hit"], old["top5_hit"]) == (
        "imagenet-1k", "mapped", 1, 1)
    assert (scored["digits/4/b.png"]["classified"], scored["digits/4/b.png"]["top1_hit"]) == (0, 0)

    acc = {(r["true_label"], r["mapping"]): r for r in select(isolated, "accuracy_by_label")}
    cols = ("images", "classified", "top1_correct", "top5_correct", "top1_accuracy",
            "top5_accuracy")
    assert {k: tuple(r[c] for c in cols) for k, r in acc.items()} == {
        ("acoustic_guitar", "own_label"): (2, 2, 1, 2, 0.5, 1.0),
        ("daisy", "mapped"): (1, 1, 1, 1, 1.0, 1.0),
        ("daisy", "not_a_model_label"): (1, 1, None, None, None, None),
        ("0", "own_label"): (2, 2, 2, 2, 1.0, 1.0),
        ("1", "own_label"): (2, 2, 1, 2, 0.5, 1.0),
        ("2", "own_label"): (2, 2, 2, 2, 1.0, 1.0),
        ("3", "own_label"): (2, 2, 0, 1, 0.0, 0.5),
        ("4", "own_label"): (1, 0, 0, 0, None, None),
    }
    (summary,) = select(isolated, "accuracy_summary")
    assert summary == {"labelled_images": 13, "scored_images": 11, "unmappable_images": 1,
                       "top1_correct": 7, "top5_correct": 10,
                       "top1_accuracy": pytest.approx(7 / 11),
                       "top5_accuracy": pytest.approx(10 / 11)}

    versions = select(isolated, "accuracy_by_model_version", "first_processed_at")
    cols = ("model", "model_version", "images", "scored", "top1_correct", "top1_accuracy",
            "top5_accuracy")
    assert [tuple(r[c] for c in cols) for r in versions] == [
        ("test", None, 1, 1, 1, 1.0, 1.0),
        (IMAGENET_MODEL.name, IMAGENET_MODEL.version, 2, 2, 1, 0.5, 1.0),
        (WIDE.name, WIDE.version, 1, 0, 0, None, None),
        (DIGITS_V1.name, DIGITS_V1.version, 4, 4, 2, 0.5, 0.75),
        (DIGITS_V2.name, DIGITS_V2.version, 5, 4, 3, 0.75, 1.0),
    ]
    assert [(r["first_processed_at"], r["last_processed_at"]) for r in versions[-2:]] == [
        (T0 + timedelta(seconds=10), T0 + timedelta(seconds=13)),
        (T0 + timedelta(seconds=70), T0 + timedelta(seconds=74))]

    confusion = {(r["true_label"], r["true_model_label"], r["predicted_label"]): r["images"]
                 for r in select(isolated, "confusion_counts")}
    assert confusion[("acoustic_guitar", "acoustic guitar", "acoustic guitar")] == 1
    assert confusion[("acoustic_guitar", "acoustic guitar", "goldfish")] == 1
    assert confusion[("daisy", None, "w985")] == 1 and confusion[("3", "3", "8")] == 1


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


@pytest.mark.integration
def test_readme_view_columns_are_the_views_own(isolated: Settings) -> None:
    """Each view's columns, in order, as BigQuery (here bqemulator) reports them."""
    from pipeline import clients

    bigquery_views.create_views(isolated)
    client = clients.bigquery_client(isolated)
    for view, documented in readme_view_columns().items():
        sql = f"SELECT * FROM `{isolated.project}.{isolated.dataset}.{view}` LIMIT 0"
        columns = [f.name for f in client.query(sql).result().schema]
        if documented[0] == "*":
            documented = [f["name"] for f in catalog.schema_json(documented[1])]
        assert columns == documented, view
