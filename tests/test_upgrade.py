"""Upgrading bucketlens over an existing deployment: tables gain the schema's new columns."""

from __future__ import annotations

import pytest
from google.cloud import bigquery

from deploy import provision
from pipeline import clients
from pipeline.bigquery import rows as bigquery_rows
from pipeline.bigquery import sinks
from pipeline.bigquery.catalog import load_schema
from pipeline.labels import ModelInfo
from pipeline.notifications import Notification, ObjectKey
from tests.helpers.tables import query

pytestmark = [pytest.mark.integration, pytest.mark.views]

NEW = ("model_version", "label_set", "true_model_label")  # added with model bundles


def test_apply_adds_new_nullable_columns_to_an_existing_table_and_old_rows_read_null(isolated) -> None:
    bq = clients.bigquery_client(isolated)
    bq.delete_table(isolated.table_id)
    old_schema = [f for f in load_schema("predictions") if f.name not in NEW]
    bq.create_table(bigquery.Table(isolated.table_id, schema=old_schema))
    old = bigquery_rows.build_row(Notification(ObjectKey(isolated.bucket, "a/1.jpg", 1), "OBJECT_FINALIZE"),
                         status="ok", model="m")
    bq.insert_rows_json(isolated.table_id, [{k: v for k, v in old.items() if k not in NEW}])

    assert provision.Action("update", "table", isolated.table_id) in provision.plan(isolated)
    actions = provision.apply(isolated)
    assert provision.Action("update", "table", isolated.table_id) in actions
    assert [f.name for f in bq.get_table(isolated.table_id).schema][-3:] == list(NEW)
    again = provision.apply(isolated)
    assert {a.verb for a in again if a.kind == "table"} == {"exists"}

    info = ModelInfo("digits", "02cba8afc9cc", "own", tuple("0123456789"))
    new = bigquery_rows.build_row(Notification(ObjectKey(isolated.bucket, "d/7/2.png", 1), "OBJECT_FINALIZE"),
                         status="ok", model=info, topk=[(7, "7", 0.9)])
    sinks.make_sink("bigquery", isolated).write([new], batch_id=1)
    rows = {r["name"]: r for r in query(isolated, f"SELECT * FROM `{isolated.table_id}`")}
    assert [rows["a/1.jpg"][c] for c in NEW] == [None, None, None]
    assert [rows["d/7/2.png"][c] for c in NEW] == ["02cba8afc9cc", "own", "7"]
