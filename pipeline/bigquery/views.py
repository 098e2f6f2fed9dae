"""The analytics views: every ``schemas/views/*.sql`` rendered for the configured dataset and
created (CREATE OR REPLACE, so safe to repeat)."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING  # noqa: E402

from pipeline import clients
from pipeline.bigquery.catalog import (
    EMBEDDING_VIEWS,
    EMBEDDINGS_TABLE,
    NEAR_DUPLICATE_DISTANCE,
    view_templates,
)
from pipeline.bigquery.sql import run_query
from pipeline.config import Settings
from pipeline.status import CLASSIFIED, sql_list

if TYPE_CHECKING:
    from google.cloud import bigquery

log = logging.getLogger(__name__)

def render_view(template: str, settings: Settings) -> str:
    """A ``schemas/views`` file for these settings; ``{classified}`` is the statuses that count
    as classified (``pipeline.status``), so the SQL never spells them itself; the drift
    views' window and baseline come from ``pipeline.drift``."""
    from pipeline.drift import template_values

    return template.format(project=settings.project, dataset=settings.dataset,
                           table=settings.table, dead_letter_table=settings.dead_letter_table,
                           classified=sql_list(CLASSIFIED), embeddings=EMBEDDINGS_TABLE,
                           near_duplicate_distance=repr(NEAR_DUPLICATE_DISTANCE),
                           **template_values(settings))


def view_id(sql: str) -> str:
    match = re.search(r"CREATE\s+OR\s+REPLACE\s+VIEW\s+`([^`]+)`", sql, re.IGNORECASE)
    if not match:
        raise ValueError("a view file must contain CREATE OR REPLACE VIEW `<id>`")
    return match.group(1)


def create_views(settings: Settings, client: bigquery.Client | None = None) -> list[str]:
    """Render and run every ``schemas/views/*.sql`` (CREATE OR REPLACE: safe to repeat).

    A dataset provisioned before the embeddings table existed gets every other view: the
    ``similar_*`` views are left out, with a warning, until ``python -m deploy apply`` adds it.
    """
    from google.api_core.exceptions import NotFound

    client = client or clients.bigquery_client(settings)
    created = []
    for name, template in view_templates():
        sql = render_view(template, settings)
        try:
            run_query(client, sql)
        except NotFound as exc:
            if not name.startswith(EMBEDDING_VIEWS):
                raise
            log.warning("view %s not created: %s (`python -m deploy apply` creates the "
                        "embeddings table)", view_id(sql), getattr(exc, "message", exc))
            continue
        created.append(view_id(sql))
    return created

