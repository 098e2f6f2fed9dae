"""Launch bqemulator with DuckDB's ``spatial`` extension made optional.

bqemulator aborts at start-up when it cannot download the ``spatial`` extension (no internet
here). bucketlens never uses GEOGRAPHY, so this launcher turns that step into a warning and
then runs bqemulator's own CLI unchanged: ``python -m deploy.bq_emulator start ...``. It also
gives the Storage Write API the RECORD sub-fields it drops (``_write_api_nested_fields``).
"""

from __future__ import annotations

import logging
import os
import sys


def _optional_spatial() -> None:
    from bqemulator.storage import engine

    original = engine.DuckDBEngine._load_spatial

    def load_spatial(self) -> None:  # type: ignore[no-untyped-def]
        try:
            original(self)
        except Exception as exc:  # noqa: BLE001 - GEOGRAPHY is the only thing lost
            logging.getLogger("bucketlens").warning("bqemulator without GEOGRAPHY: %s", exc)

    engine.DuckDBEngine._load_spatial = load_spatial


def _write_api_nested_fields() -> None:
    """bqemulator's Storage Write API builds the target Arrow schema without RECORD sub-fields
    (an empty struct), so any append to a table with a RECORD column fails in DuckDB; real
    BigQuery has no such limit. Build it with the nested fields."""
    from bqemulator.api.routes.tabledata import _build_arrow_schema
    from bqemulator.grpc_api import write_servicer

    def raw(field):  # type: ignore[no-untyped-def]
        return {"name": field.name, "type": field.type, "mode": field.mode,
                "fields": [raw(f) for f in field.fields]}

    write_servicer._table_arrow_schema = lambda meta: _build_arrow_schema(
        [raw(f) for f in meta.schema_.fields])


def _no_time_travel_copies() -> None:
    """bqemulator copies the whole table (``CREATE TABLE … AS SELECT *``) after every write to
    serve time travel, so each write costs O(table); real BigQuery does not. Benchmarks of
    write paths set BUCKETLENS_BQ_EMULATOR_NO_SNAPSHOTS=1 to measure the write, not the copy
    (``FOR SYSTEM_TIME AS OF`` then reads the live table)."""
    from bqemulator.versioning import snapshots

    snapshots.SnapshotManager.capture = lambda self, *a, **k: None  # type: ignore[method-assign]


def _many_write_connections(workers: int = 512) -> None:
    """bqemulator runs its (synchronous) AppendRows handler on grpc.aio's thread pool, by
    default asyncio's (min(32, cores + 4) threads: 6 here), and a kept-open connection holds
    its thread for as long as it is open. The sink keeps one connection per table open for a
    run, as Google recommends, so a handful of runs starved the emulator and the next append
    waited forever. Real BigQuery allows thousands of concurrent connections per project
    (https://cloud.google.com/bigquery/quotas#write-api-limits): give the emulator a pool
    that behaves like it for a test session's worth of runs (threads start on demand)."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc.aio

    real = grpc.aio.server

    def with_pool(*args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs.setdefault("migration_thread_pool",
                          ThreadPoolExecutor(workers, thread_name_prefix="bqemulator-rpc"))
        return real(*args, **kwargs)

    grpc.aio.server = with_pool  # bqemulator's build_grpc_server calls grpc.aio.server(...)


def _views_read_as_stored() -> None:
    """bqemulator inlines every view a query reads (recursively, views of views) so row access
    policies reach the base tables, then parses and translates the whole expansion: reading
    ``accuracy_summary`` cost 450 ms of emulator CPU, every read, and creating it as much (its
    body inlines the four views under it). bucketlens creates no row access policy, and
    DuckDB holds each view as created (resolved by name when read, as BigQuery's views are), so
    while the emulator holds no policy at all a view is read as stored; with one, as before."""
    from bqemulator.sql.rewriter import row_access_filter

    expand = row_access_filter._Rewriter._expand_view

    def expand_with_policies(self, node, **kwargs):  # type: ignore[no-untyped-def]
        if not self._catalog.list_all_row_access_policies():
            return False
        return expand(self, node, **kwargs)

    row_access_filter._Rewriter._expand_view = expand_with_policies


def main(argv: list[str] | None = None) -> None:
    _optional_spatial()
    _write_api_nested_fields()
    _many_write_connections()
    _views_read_as_stored()
    if os.environ.get("BUCKETLENS_BQ_EMULATOR_NO_SNAPSHOTS") == "1":
        _no_time_travel_copies()
    from bqemulator.cli import main as bq_main

    bq_main(args=argv if argv is not None else sys.argv[1:], prog_name="bqemulator")


if __name__ == "__main__":
    main()
