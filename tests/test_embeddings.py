"""Embeddings: rows from the classifying forward pass, similarity in SQL (both forms), near
duplicates, the report's map, and one-sentence errors; on the real local stack.

bqemulator has no VECTOR_SEARCH, so the VECTOR_SEARCH form is checked two ways: its structure
(parsed), and its result with the call replaced by the exact search the BigQuery docs define
for it without an index (``tests.helpers.vector_search``), against the portable form and numpy.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import sqlglot
from google.cloud import bigquery
from PIL import Image
from sqlglot import exp

from deploy import provision
from pipeline import clients
from pipeline.bigquery import catalog, sinks
from pipeline.bigquery import rows as bigquery_rows
from pipeline.bigquery import sql as bigquery_sql
from pipeline.bigquery import views as bigquery_views
from pipeline.commands import backfill as bf
from pipeline.commands import cli, report, similar
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.labels import IMAGENET, ModelInfo
from pipeline.notifications import Notification, ObjectKey
from producer.datasets import sample_dataset
from tests.helpers.tables import query
from tests.helpers.vector_search import brute_force

# the isolated dataset gets the analytics views (conftest)
pytestmark = pytest.mark.views

CAT = "samples/cat/chelsea.jpg"
DUP = "copies/cat/dup.jpg"  # CAT's bytes under another name
SMALL = "copies/cat/small.jpg"  # CAT resized to 50 % and re-encoded at quality 70
BROKEN = "broken/half.jpg"  # a truncated JPEG: a corrupt row, no embedding
VERSION = "bundled"  # efficientnet_lite0's model_version
MODEL = ModelInfo("efficientnet_lite0", VERSION, IMAGENET)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- pure -------------------------------------------------------------------------------------

def note(name: str = "a/cat/x.jpg") -> Notification:
    return Notification(ObjectKey("b", name, 7), "OBJECT_FINALIZE", message_id="m1")


def test_embedding_record_shares_its_prediction_rows_key_partition_and_batch() -> None:
    row = bigquery_rows.build_row(note(), status="ok", model=MODEL, topk=[(1, "goldfish", 0.9)],
                         batch_id=3)
    rec = bigquery_rows.embedding_record(row, np.float32([0.6, 0.8]), MODEL)
    assert rec == {"bucket": "b", "name": "a/cat/x.jpg", "generation": 7, "model_version": VERSION,
                   "model": "efficientnet_lite0", "dimensions": 2,
                   "embedding": [pytest.approx(0.6), pytest.approx(0.8)],
                   "object_created": row["object_created"], "processed_at": row["processed_at"],
                   "message_id": "m1", "batch_id": 3}
    assert all(type(v) is float for v in rec["embedding"])  # JSON- and Arrow-ready
    assert {f["name"] for f in catalog.schema_json("embeddings")} == set(rec)
    from pipeline.bigquery.bqwrite import record_batch

    batch = record_batch([rec], catalog.schema_json("embeddings"))
    assert batch.column("embedding").to_pylist() == [rec["embedding"]]


def test_embedding_rows_go_in_appends_under_the_request_limit() -> None:
    big = [{"k": i, "embedding": [0.0] * 1280} for i in range(2000)]
    parts = bigquery_rows.byte_parts(big)
    assert [r for p in parts for r in p] == big and len(parts) > 1
    assert all(sum(bigquery_rows._row_bytes(r) for r in p) <= bigquery_rows.APPEND_BYTES for p in parts)
    small = [bigquery_rows.build_row(note(f"x/{i}.jpg"), status="ok") for i in range(1000)]
    assert len(bigquery_rows.byte_parts(small)) == 1  # predictions: one append per batch, as before


def test_embeddings_table_is_keyed_partitioned_and_clustered_like_predictions() -> None:
    s = Settings()
    spec = catalog.tables(s)[catalog.embeddings_table_id(s)]
    assert spec is catalog.EMBEDDINGS
    assert spec.partition_by == catalog.PREDICTIONS.partition_by == "object_created"
    assert spec.cluster_by == spec.key == (*catalog.PREDICTION_KEY, "model_version")


def test_console_and_jsonl_sinks_take_embeddings() -> None:
    out = io.StringIO()
    row = bigquery_rows.build_row(note(), status="ok", batch_id=1)
    rec = bigquery_rows.embedding_record(row, [1.0], MODEL)
    assert sinks.ConsoleSink(stream=out).write_embeddings([rec], 1) == 1
    assert json.loads(out.getvalue())["kind"] == "embedding"
    assert sinks.JsonLinesSink(Settings(bucket="b")).object_name(4, "embeddings") == \
        "_bucketlens/predictions/embeddings/batch-4.jsonl"


def tables(node: exp.Expression) -> set[str]:
    """The tables (and CTEs) a parsed query reads, by name."""
    return {".".join(p for p in (t.catalog, t.db, t.name) if p) for t in node.find_all(exp.Table)
            if not isinstance(t.this, exp.VectorSearch)}


def test_vector_search_sql_searches_the_table_and_keeps_newest_generations() -> None:
    s = Settings(project="p", dataset="d")
    tree = sqlglot.parse_one(similar.vector_search_sql(s, 7), read="bigquery")
    (call,) = list(tree.find_all(exp.VectorSearch))
    base, query_stmt = call.this.this, call.args["query_table"].this
    assert tables(base) == {"p.d.embeddings"}
    assert [e.alias_or_name for e in base.expressions] == [
        "bucket", "name", "generation", "model_version", "embedding"]
    where = base.args["where"].sql("bigquery")
    for cond in ("model_version = @model_version", "dimensions = @dimensions",
                 "NOT (bucket = @bucket AND name = @name)"):
        assert cond in where  # pre-filters on plain columns, none on the embedding
    assert call.args["column_to_search"].name == "embedding"
    assert [e.alias_or_name for e in query_stmt.expressions] == ["embedding"]
    assert tables(query_stmt) == {"p.d.embeddings"}
    assert "generation = @generation" in query_stmt.args["where"].sql("bigquery")
    assert call.args["top_k"].expression.name == str(7 + similar.SEARCH_SLACK)
    assert call.args["distance_type"].expression.name == "COSINE"
    outer = tree  # newest generations only, nearest first, k of them
    assert tables(outer) == {"p.d.embeddings", "p.d.latest_embeddings", "found"}
    assert outer.args["order"].sql("bigquery") == "ORDER BY distance, l.bucket, l.name"
    assert outer.args["limit"].expression.name == "7"


def test_portable_sql_is_an_exact_scan_of_latest_embeddings() -> None:
    tree = sqlglot.parse_one(similar.portable_sql(Settings(project="p", dataset="d"), 3),
                             read="bigquery")
    assert not list(tree.find_all(exp.VectorSearch))
    assert tables(tree) == {"p.d.latest_embeddings", "target"}
    assert "COSINE_DISTANCE(e.embedding, t.embedding) AS distance" in tree.sql("bigquery")
    assert tree.args["order"].sql("bigquery") == "ORDER BY distance, e.bucket, e.name"
    assert tree.args["limit"].expression.name == "3"


def test_sql_form_follows_the_endpoint() -> None:
    assert similar.choose_form(Settings(bq_endpoint="http://127.0.0.1:9050")) == "portable"
    assert similar.choose_form(Settings()) == "vector_search"
    assert similar.choose_form(Settings(), "portable") == "portable"
    with pytest.raises(ValueError, match="form must be one of"):
        similar.similar_sql("ann", Settings(), 3)


def test_pca_matches_the_covariance_eigenvectors() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 6)) @ np.diag([5, 3, 1, 0.5, 0.2, 0.1])
    points, ratio = similar.pca_2d(x)
    values, vectors = np.linalg.eigh(np.cov(x.T))
    top = vectors[:, ::-1][:, :2]
    expected = (x - x.mean(0)) @ top
    signs = np.sign((points * expected).sum(0))  # eigenvectors have no sign of their own
    assert points == pytest.approx(expected * signs, abs=1e-9)
    assert ratio == pytest.approx(values[::-1][:2] / values.sum())
    assert (similar.pca_2d(x)[0] == points).all()  # deterministic signs
    two, r2 = similar.pca_2d(np.array([[0.0, 1.0], [1.0, 0.0]]))  # one direction only
    assert two[:, 1] == pytest.approx([0, 0]) and r2 == pytest.approx([1, 0])


def test_map_groups_keep_the_most_frequent_labels() -> None:
    labels = ["b", "a", "b", None, "c", "a", "b"]
    assert report.map_groups(labels, 2) == ["b", "a", "b", report.OTHER, report.OTHER, "a", "b"]
    assert report.map_groups(labels)[3] == "(no label)"


def test_bad_input_is_one_sentence() -> None:
    uri = "gs://b/x.jpg"
    sentences = [
        similar.no_embedding_reason(uri, None),
        similar.no_embedding_reason(uri, {"generation": 3, "status": "corrupt",
                                          "reason": "truncated"}),
        similar.no_embedding_reason(uri, {"generation": 3, "status": "ok", "reason": None}),
        similar.size_mismatch(similar.Target("b", "x.jpg", 3, "v1", 1280), "v2", 512),
    ]
    for s in sentences:
        assert s.startswith(uri) and s.endswith(".") and "\n" not in s
        assert s.count(": ") == 1  # what, then why
    assert "corrupt (truncated)" in sentences[1] and "--embeddings" in sentences[2]
    assert "1280 dimensions" in sentences[3] and "have 512" in sentences[3]


def test_cli_flags() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["run", "--embeddings"]).embeddings is True
    assert parser.parse_args(["run"]).embeddings is None  # unset: BUCKETLENS_EMBEDDINGS
    assert parser.parse_args(["backfill", "--bucket", "b", "--embeddings"]).embeddings is True
    args = parser.parse_args(["similar", "gs://b/x.jpg", "--k", "3", "--json"])
    assert (args.uri, args.k, args.json, args.sql) == ("gs://b/x.jpg", 3, True, "auto")
    assert args.func.target == "pipeline.commands.similar:run_similar"
    with pytest.raises(SystemExit):
        parser.parse_args(["similar", "gs://b/x.jpg", "--k", "0"])


# --- on the local stack -----------------------------------------------------------------------

@dataclass
class Collection:
    settings: Settings
    generations: dict[str, int]  # object name → generation


def resized_copy(data: bytes) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    out = io.BytesIO()
    img.resize((img.width // 2, img.height // 2), Image.Resampling.BILINEAR).save(
        out, "JPEG", quality=70)
    return out.getvalue()


def backfill_cli(settings: Settings, spark, capsys, *argv: str) -> dict:
    args = cli.build_parser().parse_args(["backfill", "--bucket", settings.bucket, *argv])
    assert bf.run_backfill(args, spark) in (0, 1)  # 1: the broken object's error row
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def collection(stack, spark, tmp_path_factory) -> Collection:
    """The sample photos, an exact duplicate and a resized copy of the cat, and a broken JPEG,
    classified by a backfill without embeddings and then one with ``--embeddings``."""
    uid = uuid.uuid4().hex[:8]
    settings = stack.settings(Settings()).replace(
        bucket=f"emb-{uid}", subscription=f"sub-{uid}", dead_letter_topic=f"dlq-{uid}",
        dataset=f"emb_{uid}", checkpoint=str(tmp_path_factory.mktemp("checkpoint")))
    provision.apply(settings)
    photos = {f"samples/{p.parent.name}/{p.name}": p.read_bytes()
              for p in sorted(sample_dataset().glob("*/*.jpg"))}
    cat = photos[CAT]
    objects = {**photos, DUP: cat, SMALL: resized_copy(cat), BROKEN: cat[: len(cat) // 3]}
    bucket = clients.storage_client(settings).bucket(settings.bucket)
    generations = {}
    for name, data in objects.items():
        blob = bucket.blob(name)
        blob.upload_from_string(data, content_type="image/jpeg")
        generations[name] = blob.generation
    first = bf.backfill(settings, spark, progress=False)  # embeddings off
    assert (first.classified, first.errors) == (len(objects), 1)
    mp = pytest.MonkeyPatch()  # the CLI reads its settings from the environment
    for k, v in settings.as_env().items():
        mp.setenv(k, v)
    try:
        args = cli.build_parser().parse_args(["backfill", "--bucket", settings.bucket,
                                              "--embeddings"])
        assert bf.run_backfill(args, spark) == 0  # the broken object is done: no image
        yield Collection(settings, generations)
    finally:
        mp.undo()


def latest(settings: Settings, version: str = VERSION) -> list[dict]:
    return query(settings, f"SELECT * FROM `{settings.project}.{settings.dataset}.latest_embeddings` "
                           f"WHERE model_version = '{version}' ORDER BY bucket, name")


def similar_cli(settings: Settings, capsys, *argv: str) -> list[dict]:
    args = cli.build_parser().parse_args(["similar", *argv, "--json"])
    assert args.func(args) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.integration
@pytest.mark.spark
def test_embeddings_from_the_classifying_pass_added_by_a_later_backfill(
        collection: Collection, spark, capsys) -> None:
    s = collection.settings
    n = len(collection.generations)
    preds = query(s, f"SELECT * FROM `{s.table_id}`")
    assert len(preds) == n  # the second backfill added embeddings, not prediction rows
    table = catalog.embeddings_table_id(s)
    rows = query(s, f"SELECT * FROM `{table}`")
    by_key = {(r["bucket"], r["name"], r["generation"]): r for r in preds}
    assert len(rows) == n - 1  # every object but the broken one
    for r in rows:
        p = by_key[(r["bucket"], r["name"], r["generation"])]
        assert p["status"] in ("ok", "low_confidence") and r["name"] != BROKEN
        assert (r["model"], r["model_version"], r["dimensions"]) == (
            "efficientnet_lite0", VERSION, 1280)
        assert len(r["embedding"]) == 1280
        assert np.linalg.norm(r["embedding"]) == pytest.approx(1.0, abs=1e-5)
        assert r["object_created"] == p["object_created"] and r["batch_id"] < 0

    out = backfill_cli(s, spark, capsys, "--embeddings")  # nothing left to do
    assert (out["listed"], out["skipped_existing"], out["classified"]) == (n, n, 0)
    assert len(query(s, f"SELECT * FROM `{table}`")) == n - 1


@pytest.mark.integration
@pytest.mark.spark
def test_similar_finds_the_duplicate_then_the_resized_copy(collection: Collection, capsys) -> None:
    s, gens = collection.settings, collection.generations
    found = similar_cli(s, capsys, f"gs://{s.bucket}/{CAT}", "--k", "4")
    assert [f["name"] for f in found[:2]] == [DUP, SMALL]
    assert found[0]["distance"] < 1e-4 < found[1]["distance"] < 0.15
    assert all(f["distance"] > 0.5 for f in found[2:]) and len(found) == 4
    assert found[0] == {"bucket": s.bucket, "name": DUP, "generation": gens[DUP],
                        "distance": found[0]["distance"], "label": "cat"}
    assert CAT not in [f["name"] for f in found]  # never the query object itself

    back = similar_cli(s, capsys, f"gs://{s.bucket}/{DUP}", "--k", "1")
    assert [(b["name"], b["label"]) for b in back] == [(CAT, "cat")]

    args = cli.build_parser().parse_args(["similar", f"gs://{s.bucket}/{SMALL}", "--k", "2"])
    assert args.func(args) == 0
    printed = capsys.readouterr()
    assert "2 nearest to" in printed.err and "portable SQL" in printed.err
    rank, distance, uri, label = printed.out.splitlines()[0].split()
    assert (rank, uri, label) == ("1", f"gs://{s.bucket}/{DUP}#{gens[DUP]}", "cat")
    assert float(distance) == pytest.approx(found[1]["distance"], abs=1e-6)


@pytest.mark.integration
@pytest.mark.spark
def test_sql_knn_equals_numpy_and_vector_search_form_agrees(collection: Collection) -> None:
    s = collection.settings
    rows = latest(s)
    assert len(rows) == len(collection.generations) - 1
    x = np.array([r["embedding"] for r in rows])
    distance = 1 - (x @ x.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(x, axis=1))
    client = clients.bigquery_client(s)
    k = len(rows) - 1
    for i, r in enumerate(rows):
        target, version = similar.find_target(client, s, f"gs://{r['bucket']}/{r['name']}")
        assert (target.generation, version, target.dimensions) == (r["generation"], VERSION, 1280)
        order = sorted((j for j in range(len(rows)) if j != i),
                       key=lambda j: (round(distance[i, j], 9), rows[j]["name"]))
        expected = [(rows[j]["name"], rows[j]["label"]) for j in order]
        portable = similar.nearest(client, s, target, version, k, "portable")
        assert [(n.name, n.label) for n in portable] == expected
        assert [n.distance for n in portable] == pytest.approx([distance[i, j] for j in order],
                                                               abs=1e-9)
        params = similar.query_parameters(target, version)
        emulated = query_with(client, brute_force(similar.vector_search_sql(s, k)), params)
        assert [(e["name"], e["generation"], e["label"]) for e in emulated] == \
            [(n.name, n.generation, n.label) for n in portable]
        assert [e["distance"] for e in emulated] == pytest.approx(
            [n.distance for n in portable], abs=1e-12)


def query_with(client: bigquery.Client, sql: str, params: list) -> list[dict]:
    _, rows = bigquery_sql.run_query(client, sql, bigquery.QueryJobConfig(query_parameters=params))
    return [dict(r.items()) for r in rows]


@pytest.mark.integration
@pytest.mark.spark
def test_near_duplicates_view_lists_the_copies(collection: Collection) -> None:
    s = collection.settings
    pairs = query(s, f"SELECT * FROM `{s.project}.{s.dataset}.near_duplicates` "
                     "ORDER BY distance, name, other_name")
    assert [(p["name"], p["other_name"]) for p in pairs] == [(DUP, CAT), (DUP, SMALL), (SMALL, CAT)]
    assert pairs[0]["distance"] < 1e-4 and pairs[2]["distance"] < catalog.NEAR_DUPLICATE_DISTANCE
    assert {p["model_version"] for p in pairs} == {VERSION}


@pytest.mark.integration
@pytest.mark.spark
def test_report_draws_the_map_from_the_query_result(collection: Collection, tmp_path: Path,
                                                    capsys) -> None:
    s = collection.settings
    args = cli.build_parser().parse_args(["report", "--out", str(tmp_path / "r")])
    assert args.func(args) == 0
    png = (tmp_path / "r" / "embedding_map.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    page = (tmp_path / "r" / "report.md").read_text()
    assert "![Embedding map](embedding_map.png)" in page
    assert f"all {len(collection.generations) - 1} newest-generation embeddings" in page
    assert "PC1 explains" in page and "computed in numpy" in page
    capsys.readouterr()

    client = clients.bigquery_client(s)
    for sample in (similar.MAP_SAMPLE, 5):
        m, caption = report.fetch_embedding_map(client, s, sample)
        plotted = report.plot_embedding_map(m, tmp_path / f"map{sample}.png")
        rows = [dict(r.items()) for r in client.query(similar.map_sql(s, sample)).result()]
        assert [(r["name"], r["label"]) for r in rows] == [(r["name"], r["label"]) for r in m.rows]
        x = np.array([r["embedding"] for r in rows])
        centred = x - x.mean(0)
        values, vectors = np.linalg.eigh(centred.T @ centred)
        expected = centred @ vectors[:, ::-1][:, :2]
        signs = np.sign((m.points * expected).sum(0))
        drawn = sorted(zip(plotted["labels"], plotted["x"], plotted["y"], strict=True))
        want = sorted(zip(report.map_groups([r["label"] for r in rows]),
                          *(expected * signs).T.tolist(), strict=True))
        assert [d[0] for d in drawn] == [w[0] for w in want]
        assert np.array([d[1:] for d in drawn]) == pytest.approx(np.array([w[1:] for w in want]),
                                                                 abs=1e-6)
        ratio = values[::-1][:2] / values.sum()
        assert f"PC1 explains {100 * ratio[0]:.1f} %" in caption
        assert ("a sample of 5 of the" in caption) == (sample == 5)


@pytest.mark.integration
@pytest.mark.spark
def test_similar_says_why_in_one_sentence(collection: Collection) -> None:
    s = collection.settings
    client = clients.bigquery_client(s)
    with pytest.raises(UserError, match=rf"^gs://{s.bucket}/{BROKEN} has no embedding: its newest "
                                        r"generation \(\d+\) is corrupt"):
        similar.find_target(client, s, f"gs://{s.bucket}/{BROKEN}")
    with pytest.raises(UserError, match="has no embedding: bucketlens has no row for it"):
        similar.find_target(client, s, f"gs://{s.bucket}/nothing/here.jpg")

    # another model version, of another size, for one object
    row = query(s, f"SELECT * FROM `{s.table_id}` WHERE name = '{DUP}'")[0]
    tiny = ModelInfo("tiny", "tiny-v1", IMAGENET)
    sinks.BigQuerySink(s).write_embeddings([bigquery_rows.embedding_record(row, [1.0, 0.0, 0.0], tiny)], 9)
    with pytest.raises(UserError, match=r"has 1280 dimensions but model version tiny-v1's have 3: "
                                        "embeddings of different sizes cannot be compared"):
        similar.find_target(client, s, f"gs://{s.bucket}/{CAT}", "tiny-v1")
    with pytest.raises(UserError, match="model version nope has no embeddings"):
        similar.find_target(client, s, f"gs://{s.bucket}/{CAT}", "nope")
    target, version = similar.find_target(client, s, f"gs://{s.bucket}/{DUP}", "tiny-v1")
    assert (target.model_version, target.dimensions, version) == ("tiny-v1", 3, "tiny-v1")
    assert similar.nearest(client, s, target, version, 5, "portable") == []  # alone in its space


@pytest.mark.integration
def test_report_without_an_embeddings_table_leaves_the_map_out(stack, tmp_path: Path,
                                                              monkeypatch, capsys) -> None:
    """A dataset provisioned before the embeddings table existed: views are made without the
    similar_* ones, and the report says why there is no map instead of failing."""
    s = stack.settings(Settings()).replace(dataset=f"old_{uuid.uuid4().hex[:8]}")
    client = clients.bigquery_client(s)
    client.create_dataset(bigquery.Dataset(f"{s.project}.{s.dataset}"))
    for table_id, spec in catalog.tables(s).items():
        if table_id != catalog.embeddings_table_id(s):
            client.create_table(bigquery.Table(table_id, schema=catalog.load_schema(spec.schema)))
    created = {v.rsplit(".", 1)[1] for v in bigquery_views.create_views(s, client)}
    assert "latest_predictions" in created and not created & {
        "distinct_embeddings", "latest_embeddings", "near_duplicates"}
    for k, v in s.as_env().items():
        monkeypatch.setenv(k, v)
    args = cli.build_parser().parse_args(["report", "--out", str(tmp_path)])
    assert args.func(args) == 0
    page = (tmp_path / "report.md").read_text()
    assert "## Embedding map" in page and "has no embeddings table" in page
    assert not (tmp_path / "embedding_map.png").exists()
    assert "No embedding map" in capsys.readouterr().out
    args = cli.build_parser().parse_args(["similar", f"gs://{s.bucket}/x.jpg"])
    with pytest.raises(UserError, match="has no embeddings table or views"):
        args.func(args)


@pytest.mark.integration
@pytest.mark.spark
def test_stream_batch_writes_each_embedding_once(spark, isolated: Settings) -> None:
    from pipeline.stream import job as stream
    from pipeline.stream.source import SCHEMA

    s = isolated.replace(embeddings=True)
    bucket = clients.storage_client(s).bucket(s.bucket)
    msgs = []
    for i, p in enumerate(sorted(sample_dataset().glob("*/*.jpg"))[:3]):
        blob = bucket.blob(f"stream/{p.parent.name}/{p.name}")
        blob.upload_from_string(p.read_bytes(), content_type="image/jpeg")
        msgs.append((f"m{i}", None, {"eventType": "OBJECT_FINALIZE", "bucketId": s.bucket,
                                     "objectId": blob.name,
                                     "objectGeneration": str(blob.generation)}, b"", 1))
    df = spark.createDataFrame(msgs, SCHEMA)
    processor = stream.BatchProcessor(s)
    first, second = processor.process(df, 5), processor.process(df, 5)
    assert (first.classified, first.inserted) == (3, 3)
    assert (second.classified, second.already_done) == (0, 3)
    rows = query(s, f"SELECT * FROM `{catalog.embeddings_table_id(s)}`")
    assert sorted(r["message_id"] for r in rows) == ["m0", "m1", "m2"]
    assert {(r["batch_id"], r["dimensions"], r["model_version"]) for r in rows} == {(5, 1280, VERSION)}
