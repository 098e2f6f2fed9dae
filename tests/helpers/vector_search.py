"""VECTOR_SEARCH as the BigQuery documentation defines it without a vector index, for an engine
that lacks it (bqemulator): an exact brute-force search.

https://cloud.google.com/bigquery/docs/reference/standard-sql/search_functions#vector_search:
for each row of the query table, the ``top_k`` rows of the base table nearest by
``distance_type``, as a ``base`` STRUCT of the base's columns and a ``distance`` column. The
rewrite keeps everything around the call, so what a test runs is the rest of the rendered SQL
exactly as real BigQuery would get it.
"""

from __future__ import annotations

import sqlglot
from sqlglot import exp


def _kwarg(node: exp.Expression | None, default: str) -> str:
    return default if node is None else node.expression.name


def brute_force(sql: str) -> str:
    """``sql`` with every ``VECTOR_SEARCH((base query), 'column', (query), top_k => n,
    distance_type => 'COSINE')`` replaced by the equivalent exact search. Supports what
    ``pipeline.commands.similar`` uses: query statements (not TABLE), COSINE, one query row."""
    tree = sqlglot.parse_one(sql, read="bigquery")
    for call in list(tree.find_all(exp.VectorSearch)):
        base, query = call.this, call.args["query_table"]
        assert isinstance(base, exp.Subquery) and isinstance(query, exp.Subquery), "query statements"
        assert _kwarg(call.args.get("distance_type"), "EUCLIDEAN").upper() == "COSINE"
        column = call.args["column_to_search"].name
        query_column = call.args["query_column_to_search"].name if call.args.get(
            "query_column_to_search") else column
        top_k = int(_kwarg(call.args.get("top_k"), "10"))
        fields = [e.alias_or_name for e in base.this.expressions]
        distance = f"COSINE_DISTANCE(b.{column}, q.{query_column})"
        replacement = sqlglot.parse_one(
            f"(SELECT STRUCT({', '.join(f'b.{f} AS {f}' for f in fields)}) AS base, "
            f"{distance} AS distance "
            f"FROM {base.sql('bigquery')} AS b CROSS JOIN {query.sql('bigquery')} AS q "
            f"WHERE TRUE QUALIFY ROW_NUMBER() OVER (ORDER BY {distance}) <= {top_k})",
            read="bigquery")
        call.parent.replace(replacement)
    return tree.sql("bigquery")
