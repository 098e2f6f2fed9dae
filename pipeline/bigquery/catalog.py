"""The BigQuery tables and views the job writes and reads: schemas, the one table registry
(:class:`TableSpec`: keys, partitioning, clustering) and view SQL.

    from pipeline.bigquery.catalog import load_schema, view_templates
    fields = load_schema("predictions")            # list[bigquery.SchemaField]
    for name, sql in view_templates(): ...         # schemas/views/*.sql in creation order

The files live in the top-level ``schemas`` package and are read with ``importlib.resources``,
so they are found the same way in a source checkout and in the installed wheel on a cluster.
Provisioning, the sink and the report all read them from here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from typing import TYPE_CHECKING, Any

from pipeline.config import Settings

if TYPE_CHECKING:
    from google.cloud import bigquery

PACKAGE = "schemas"
EMBEDDINGS_TABLE = "embeddings"  # next to the predictions table, in the same dataset
EMBEDDING_VIEWS = "similar_"  # schemas/views/similar_*.sql read the embeddings table
# near_duplicates lists pairs closer than this cosine distance. Measured with efficientnet_lite0
# on the sample photos: a copy resized to 50 % and re-encoded at JPEG quality 70 is 0.08 from
# its original, to 35 % at quality 50 0.17; distinct photos are 0.65 or more apart.
NEAR_DUPLICATE_DISTANCE = 0.15


def files() -> Traversable:
    """The ``schemas`` package's files, wherever it is installed."""
    return resources.files(PACKAGE)


def read_text(relative: str) -> str:
    """One file of the package, e.g. ``views/class_mapping.sql``."""
    node = files()
    for part in relative.split("/"):
        node = node.joinpath(part)
    return node.read_text(encoding="utf-8")


def schema_json(name: str) -> list[dict[str, Any]]:
    """``schemas/<name>.json`` as the API's field dicts."""
    return json.loads(read_text(f"{name}.json"))


def load_schema(name: str) -> list[bigquery.SchemaField]:
    """A BigQuery schema from ``schemas/<name>.json`` as SchemaField objects."""
    from google.cloud import bigquery

    return [bigquery.SchemaField.from_api_repr(f) for f in schema_json(name)]


def class_mapping() -> dict:
    """``schemas/class_mapping.json``: dataset labels → ImageNet classes."""
    return json.loads(read_text("class_mapping.json"))


def view_templates() -> list[tuple[str, str]]:
    """(file name, SQL template) of every ``schemas/views/*.sql``, in name order, which is the
    order they must be created in (a view's sources must exist first)."""
    views = files().joinpath("views")
    return sorted((p.name, p.read_text(encoding="utf-8")) for p in views.iterdir()
                  if p.name.endswith(".sql"))


PREDICTION_KEY = ("bucket", "name", "generation")
DEAD_LETTER_KEY = ("message_id", "reason")
EVENT_KEY = ("bucket", "name", "generation", "event_type", "metageneration")
EMBEDDING_KEY = ("bucket", "name", "generation", "model_version")


@dataclass(frozen=True)
class TableSpec:
    """One table the job writes: what the sinks need (its key, which copy of a key wins, the
    partition column that bounds a lookup) and how provisioning lays it out on real BigQuery
    (bqemulator gets plain tables)."""

    schema: str  # schemas/<schema>.json; also which Settings field names the table
    key: tuple[str, ...]
    order_by: str  # of several copies of a key, the one with the smallest value is kept
    partition_by: str  # a TIMESTAMP column: day partitions, so lookups read only the days they name
    cluster_by: tuple[str, ...] = ()  # block pruning inside a partition

    def table_id(self, settings: Settings) -> str:
        """``<project>.<dataset>.<table>`` of this table under ``settings``."""
        return {"predictions": settings.table_id, "dead_letters": settings.dead_letter_table_id,
                "object_events": settings.events_table_id,
                EMBEDDINGS_TABLE: embeddings_table_id(settings)}[self.schema]


# object_created (payload timeCreated): every copy of one key's row has the same day, so a
# batch's key lookup reads only the day partitions its rows fall in (pipeline.bigquery.sql)
PREDICTIONS = TableSpec("predictions", PREDICTION_KEY, "processed_at", "object_created",
                        PREDICTION_KEY)
DEAD_LETTERS = TableSpec("dead_letters", DEAD_LETTER_KEY, "recorded_at", "recorded_at")
EVENTS = TableSpec("object_events", EVENT_KEY, "recorded_at", "recorded_at", ("bucket", "name"))
# partitioned and clustered like predictions: its lookups name the same days and keys
EMBEDDINGS = TableSpec("embeddings", EMBEDDING_KEY, "processed_at", "object_created",
                       EMBEDDING_KEY)
TABLES = (PREDICTIONS, DEAD_LETTERS, EVENTS, EMBEDDINGS)
# an object generation's embedding under any model version: what makes a key done when the
# job runs with embeddings (BigQuerySink.existing_keys); a lookup, not another table
EMBEDDED = dataclasses.replace(EMBEDDINGS, key=PREDICTION_KEY)


def embeddings_table_id(settings: Settings) -> str:
    """``<project>.<dataset>.embeddings``: one row per (bucket, name, generation, model version)
    when the job runs with ``--embeddings`` (README "Similar images")."""
    return f"{settings.project}.{settings.dataset}.{EMBEDDINGS_TABLE}"


def tables(settings: Settings) -> dict[str, TableSpec]:
    """Table id → spec, for every table the job writes."""
    return {spec.table_id(settings): spec for spec in TABLES}
