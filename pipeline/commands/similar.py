"""Similar images: the k nearest objects by cosine distance between embeddings, in SQL, and the
2-D PCA map of the collection that ``bucketlens report`` draws.

    bucketlens similar gs://BUCKET/NAME [--k 10] [--json]

Embeddings come from the forward pass that classified the object (``run|backfill
--embeddings``): L2-normalised penultimate-layer features in the ``embeddings`` table, one row
per (bucket, name, generation, model version). The ``latest_embeddings`` view keeps the newest
generation of each object (an overwrite with a broken image takes the object out), and
``near_duplicates`` lists the pairs closer than ``catalog.NEAR_DUPLICATE_DISTANCE``.

Two SQL forms return the same neighbours:

* ``vector_search_sql``, real BigQuery: ``VECTOR_SEARCH`` over the table, then the newest
  generations only. Without a vector index it is an exact brute-force search; with one it is
  approximate (see the function for when an index pays off).
* ``portable_sql``, any engine with ``COSINE_DISTANCE`` (BigQuery and bqemulator): an exact scan
  of ``latest_embeddings``. bqemulator has no ``VECTOR_SEARCH``, so the local stack uses this.

SQL text, the sentences for bad input and the PCA are pure; ``find_target``, ``nearest``,
``fetch_map`` and ``run_similar`` do the I/O.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.commands.flags import SIMILAR_SETTINGS, settings_from_args
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.names import printable, split_gs
from pipeline.status import CLASSIFIED

if TYPE_CHECKING:
    import numpy as np
    from google.cloud import bigquery

# VECTOR_SEARCH runs over the whole table: older generations and racing writers' copies of a key
# can fill some of its top_k, and are dropped afterwards. It is asked for this many more, so k
# answers remain unless an object near the query was overwritten that many times.
SEARCH_SLACK = 50
SQL_FORMS = ("vector_search", "portable")
MAP_SAMPLE = 1000  # embeddings in the map's PCA at most: 1,000 x 1280 floats is ~25 MB of JSON
MAP_MIN_POINTS = 3  # fewer have no second direction of variance to show


@dataclass(frozen=True)
class Target:
    """The query object's embedding: which generation and model version, and its length."""

    bucket: str
    name: str
    generation: int
    model_version: str
    dimensions: int

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}/{self.name}"


@dataclass(frozen=True)
class Neighbour:
    bucket: str
    name: str
    generation: int
    distance: float
    label: str | None  # true label, else the top-1 prediction

    def as_json(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "name": self.name, "generation": self.generation,
                "distance": self.distance, "label": self.label}


# --- pure -------------------------------------------------------------------------------------

def _ref(settings: Settings, name: str) -> str:
    return f"`{settings.project}.{settings.dataset}.{name}`"


def target_sql(settings: Settings) -> str:
    """The object's embeddings in ``latest_embeddings`` (newest generation), newest write first."""
    return (f"SELECT generation, model_version, dimensions FROM {_ref(settings, 'latest_embeddings')}\n"
            "WHERE bucket = @bucket AND name = @name\n"
            "ORDER BY processed_at DESC, model_version")


def status_sql(settings: Settings) -> str:
    """What the predictions say of the object's newest generation: why it has no embedding."""
    return (f"SELECT generation, status, reason FROM {_ref(settings, 'latest_predictions')}\n"
            "WHERE bucket = @bucket AND name = @name")


def version_sql(settings: Settings) -> str:
    """The embedding lengths of a model version's newest-generation embeddings."""
    return (f"SELECT dimensions, COUNT(*) AS objects FROM {_ref(settings, 'latest_embeddings')}\n"
            "WHERE model_version = @model_version GROUP BY dimensions ORDER BY objects DESC")


def portable_sql(settings: Settings, k: int) -> str:
    """The k nearest newest-generation objects by an exact scan: ``COSINE_DISTANCE`` exists in
    BigQuery (https://cloud.google.com/bigquery/docs/reference/standard-sql/mathematical_functions#cosine_distance)
    and in bqemulator. Ties are broken by bucket and name, as in ``vector_search_sql``."""
    latest = _ref(settings, "latest_embeddings")
    return (
        "WITH target AS (\n"
        f"  SELECT embedding FROM {latest}\n"
        "  WHERE bucket = @bucket AND name = @name AND generation = @generation\n"
        "    AND model_version = @query_version\n"
        "  LIMIT 1\n"
        ")\n"
        "SELECT e.bucket, e.name, e.generation, e.label,\n"
        "  COSINE_DISTANCE(e.embedding, t.embedding) AS distance\n"
        f"FROM {latest} AS e CROSS JOIN target AS t\n"
        "WHERE e.model_version = @model_version AND e.dimensions = @dimensions\n"
        "  AND NOT (e.bucket = @bucket AND e.name = @name)\n"
        "ORDER BY distance, e.bucket, e.name\n"
        f"LIMIT {int(k)}"
    )


def vector_search_sql(settings: Settings, k: int) -> str:
    """The same answer with ``VECTOR_SEARCH``, for real BigQuery.

    https://cloud.google.com/bigquery/docs/reference/standard-sql/search_functions#vector_search
    searches the base table (a query on it may only pre-filter it, and may not read a view), so
    the search runs over ``embeddings`` pre-filtered to the model version, and older generations
    and duplicate copies in its ``top_k`` are dropped by joining ``latest_embeddings`` after it
    (``SEARCH_SLACK`` extra candidates cover them). Its output order is not guaranteed: the
    outer ORDER BY sorts, ties by bucket and name.

    When an index pays off (https://cloud.google.com/bigquery/docs/vector-index,
    https://cloud.google.com/bigquery/docs/vector-search): without one, VECTOR_SEARCH is an
    exact brute-force search that reads the whole embedding column, ~10 KiB per 1280-d row, so
    1 M images bill ~10 GiB per query and take seconds. ``CREATE VECTOR INDEX ... ON
    embeddings(embedding) STORING(bucket, name, generation, model_version, dimensions)
    OPTIONS(index_type = 'IVF', distance_type = 'COSINE')`` makes it an approximate search
    (recall below 100 %; ``options => '{"use_brute_force": true}'`` forces the exact one) that
    reads a fraction of that: worth it from roughly a million rows or for frequent, latency-bound
    queries. Below that the scan costs cents and is exact. An index needs every row of the column
    to have the same length: one embedding size (one base model) per table.
    """
    table = _ref(settings, "embeddings")
    return (
        "WITH found AS (\n"
        "  SELECT base.bucket, base.name, base.generation, base.model_version, distance\n"
        "  FROM VECTOR_SEARCH(\n"
        "    (SELECT bucket, name, generation, model_version, embedding\n"
        f"     FROM {table}\n"
        "     WHERE model_version = @model_version AND dimensions = @dimensions\n"
        "       AND NOT (bucket = @bucket AND name = @name)),\n"
        "    'embedding',\n"
        f"    (SELECT embedding FROM {table}\n"
        "     WHERE bucket = @bucket AND name = @name AND generation = @generation\n"
        "       AND model_version = @query_version),\n"
        f"    top_k => {int(k) + SEARCH_SLACK}, distance_type => 'COSINE')\n"
        ")\n"
        "SELECT l.bucket, l.name, l.generation, l.label, MIN(f.distance) AS distance\n"
        "FROM found AS f\n"
        f"JOIN {_ref(settings, 'latest_embeddings')} AS l\n"
        "  ON l.bucket = f.bucket AND l.name = f.name AND l.generation = f.generation\n"
        "  AND l.model_version = f.model_version\n"
        "GROUP BY l.bucket, l.name, l.generation, l.label\n"
        "ORDER BY distance, l.bucket, l.name\n"
        f"LIMIT {int(k)}"
    )


def similar_sql(form: str, settings: Settings, k: int) -> str:
    if form not in SQL_FORMS:
        raise ValueError(f"form must be one of {', '.join(SQL_FORMS)}, not {form!r}")
    return (vector_search_sql if form == "vector_search" else portable_sql)(settings, k)


def choose_form(settings: Settings, requested: str = "auto") -> str:
    """``portable`` on an emulator (bqemulator has no VECTOR_SEARCH), else ``vector_search``."""
    if requested != "auto":
        return requested
    return "portable" if settings.bq_endpoint else "vector_search"


def no_embedding_reason(uri: str, status: Mapping[str, Any] | None) -> str:
    """One sentence: why the object has no embedding to compare (``status``: its newest
    generation's predictions row, or None when there is none)."""
    bucket = split_gs(uri)[0]
    if status is None:
        return (f"{uri} has no embedding: bucketlens has no row for it (not uploaded, outside "
                f"the watched prefix, or not classified yet; `bucketlens backfill --bucket "
                f"{bucket} --embeddings` classifies what is there).")
    if status["status"] not in CLASSIFIED:
        why = f" ({printable(status['reason'])})" if status.get("reason") else ""
        return (f"{uri} has no embedding: its newest generation ({status['generation']}) is "
                f"{status['status']}{why}, so there is no image to embed.")
    return (f"{uri} has no embedding: generation {status['generation']} was classified without "
            f"--embeddings (`bucketlens backfill --bucket {bucket} --embeddings` adds it).")


def size_mismatch(target: Target, model_version: str, dimensions: int) -> str:
    return (f"{printable(target.uri)}'s embedding (model version {target.model_version}) has "
            f"{target.dimensions} dimensions but model version {model_version}'s have "
            f"{dimensions}: embeddings of different sizes cannot be compared.")


def pick_target(bucket: str, name: str, rows: Sequence[Mapping[str, Any]],
                model_version: str | None) -> Target | None:
    """The embedding to search with: of the requested model version when the object has one,
    else the newest written (``rows`` as ``target_sql`` orders them)."""
    if not rows:
        return None
    row = next((r for r in rows if r["model_version"] == model_version), rows[0])
    return Target(bucket, name, int(row["generation"]), row["model_version"],
                  int(row["dimensions"]))


def query_parameters(target: Target, model_version: str) -> list[bigquery.ScalarQueryParameter]:
    from google.cloud import bigquery

    return [bigquery.ScalarQueryParameter("bucket", "STRING", target.bucket),
            bigquery.ScalarQueryParameter("name", "STRING", target.name),
            bigquery.ScalarQueryParameter("generation", "INT64", target.generation),
            bigquery.ScalarQueryParameter("query_version", "STRING", target.model_version),
            bigquery.ScalarQueryParameter("model_version", "STRING", model_version),
            bigquery.ScalarQueryParameter("dimensions", "INT64", target.dimensions)]


# --- the map (pure) ---------------------------------------------------------------------------

def map_sql(settings: Settings, limit: int) -> str:
    """At most ``limit`` newest-generation embeddings of the model version with the most of
    them: a stable pseudo-random sample (ordered by a hash of the object's name), with how many
    there are in all (``total``)."""
    latest = _ref(settings, "latest_embeddings")
    return (
        "WITH version AS (\n"
        "  SELECT model_version, COUNT(*) AS total FROM " + latest + "\n"
        "  GROUP BY model_version ORDER BY total DESC, MAX(processed_at) DESC LIMIT 1\n"
        ")\n"
        "SELECT e.bucket, e.name, e.generation, e.model, e.model_version, e.label, e.embedding,\n"
        "  v.total\n"
        f"FROM {latest} AS e JOIN version AS v ON e.model_version = v.model_version\n"
        "ORDER BY FARM_FINGERPRINT(CONCAT(e.bucket, '/', e.name)), e.bucket, e.name\n"
        f"LIMIT {int(limit)}"
    )


def pca_2d(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2) coordinates on the first two principal components of ``vectors`` (n, d), and the
    share of the variance each explains. Signs are fixed as scikit-learn's ``svd_flip`` fixes
    them (each component's largest loading positive), so the same rows give the same map."""
    import numpy as np

    centred = vectors - vectors.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    comps = np.zeros((2, vectors.shape[1]))
    ratio = np.zeros(2)
    m = min(2, vt.shape[0])
    comps[:m] = vt[:m] * np.sign(vt[np.arange(m), np.abs(vt[:m]).argmax(axis=1)])[:, None]
    total = float((s ** 2).sum())
    if total > 0:
        ratio[:m] = (s[:m] ** 2) / total
    return centred @ comps.T, ratio


@dataclass(frozen=True)
class EmbeddingMap:
    """The rows the map shows (as ``map_sql`` returned them) and their PCA."""

    rows: list[dict[str, Any]]
    points: np.ndarray  # (n, 2)
    explained: np.ndarray  # (2,) share of the sample's variance
    total: int  # newest-generation embeddings of that model version, sampled or not

    @property
    def model_name(self) -> str | None:
        return self.rows[0]["model"]

    @property
    def model_version(self) -> str:
        return self.rows[0]["model_version"]

    @property
    def model(self) -> str:
        return f"{self.model_name or '?'} {self.model_version}"

    @property
    def caption(self) -> str:
        n = len(self.rows)
        which = (f"all {n} newest-generation embeddings" if n >= self.total else
                 f"a sample of {n} of the {self.total} newest-generation embeddings (a stable "
                 "one: the first by FARM_FINGERPRINT of bucket/name)")
        pc1, pc2 = (100 * float(v) for v in self.explained)
        return (f"PCA computed in numpy on {which} of model {self.model}, coloured by true label "
                f"(predicted label where there is none). PC1 explains {pc1:.1f} % of their "
                f"variance, PC2 {pc2:.1f} % ({pc1 + pc2:.1f} % together).")


def embedding_map(rows: Sequence[Mapping[str, Any]]) -> EmbeddingMap | None:
    """The map of ``map_sql``'s rows; None when there are too few to have two directions."""
    import numpy as np

    if len(rows) < MAP_MIN_POINTS:
        return None
    points, explained = pca_2d(np.array([r["embedding"] for r in rows], dtype=np.float64))
    return EmbeddingMap([dict(r) for r in rows], points, explained, int(rows[0]["total"]))


# --- I/O --------------------------------------------------------------------------------------

def _query(client: bigquery.Client, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    from google.cloud import bigquery

    from pipeline.bigquery.sql import run_query

    _, rows = run_query(client, sql, bigquery.QueryJobConfig(query_parameters=list(params)))
    return [dict(r.items()) for r in rows]


def find_target(client: bigquery.Client, settings: Settings, uri: str,
                model_version: str | None = None) -> tuple[Target, str]:
    """The query object's embedding and the model version to compare it with, or a UserError
    that says in one sentence why there is nothing to compare."""
    from google.cloud import bigquery

    bucket, name = split_gs(uri, object_name=True)
    where = [bigquery.ScalarQueryParameter("bucket", "STRING", bucket),
             bigquery.ScalarQueryParameter("name", "STRING", name)]
    target = pick_target(bucket, name, _query(client, target_sql(settings), where), model_version)
    if target is None:
        status = _query(client, status_sql(settings), where)
        raise UserError(no_embedding_reason(printable(f"gs://{bucket}/{name}"),
                                            status[0] if status else None))
    version = model_version or target.model_version
    if version != target.model_version:
        sizes = _query(client, version_sql(settings),
                       [bigquery.ScalarQueryParameter("model_version", "STRING", version)])
        if not sizes:
            raise UserError(f"model version {version} has no embeddings in "
                            f"{settings.project}.{settings.dataset}.")
        if int(sizes[0]["dimensions"]) != target.dimensions:
            raise UserError(size_mismatch(target, version, int(sizes[0]["dimensions"])))
    return target, version


def nearest(client: bigquery.Client, settings: Settings, target: Target, model_version: str,
            k: int, form: str) -> list[Neighbour]:
    rows = _query(client, similar_sql(form, settings, k), query_parameters(target, model_version))
    return [Neighbour(r["bucket"], r["name"], int(r["generation"]), float(r["distance"]),
                      r["label"]) for r in rows]


def fetch_map(client: bigquery.Client, settings: Settings, limit: int = MAP_SAMPLE
              ) -> EmbeddingMap | None:
    """The report's map, or None when there are fewer than MAP_MIN_POINTS embeddings; raises
    ``NotFound`` when the dataset has no embeddings table (or its views)."""
    return embedding_map(_query(client, map_sql(settings, limit)))


def run_similar(args: argparse.Namespace) -> int:
    """Print the neighbours, nearest first; 0 even when there are none (stderr says so)."""
    from google.api_core.exceptions import NotFound

    from pipeline import clients

    settings = settings_from_args(args, SIMILAR_SETTINGS)
    split_gs(args.uri, object_name=True)  # a malformed URI fails before any client is made
    client = clients.bigquery_client(settings)
    form = choose_form(settings, getattr(args, "sql", "auto"))
    try:
        target, version = find_target(client, settings, args.uri, args.model_version)
        found = nearest(client, settings, target, version, args.k, form)
    except NotFound as exc:
        raise UserError(f"{settings.project}.{settings.dataset} has no embeddings table or views "
                        f"({getattr(exc, 'message', exc)}): run `python -m deploy apply`, then "
                        "`bucketlens run` or `backfill` with --embeddings.") from None
    print(f"{len(found)} nearest to {printable(target.uri)} (generation {target.generation}, "
          f"{target.dimensions}-d embedding of model version {version}; "
          f"{'VECTOR_SEARCH' if form == 'vector_search' else 'portable SQL'})", file=sys.stderr)
    for rank, n in enumerate(found, start=1):
        if args.json:
            print(json.dumps(n.as_json()))
        else:
            print(f"{rank:>3}  {n.distance:.6f}  gs://{printable(n.bucket)}/{printable(n.name)}"
                  f"#{n.generation}  {printable(n.label or '')}")
    return 0
