"""Launch bqemulator with DuckDB's ``spatial`` extension made optional.

bqemulator aborts at start-up when it cannot download the ``spatial`` extension (no internet
here). bucketlens never uses GEOGRAPHY, so this launcher turns that step into a warning and
then runs bqemulator's own CLI unchanged: ``python -m deploy.bq_emulator start ...``.
"""

from __future__ import annotations

import logging
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


def main(argv: list[str] | None = None) -> None:
    _optional_spatial()
    from bqemulator.cli import main as bq_main

    bq_main(args=argv if argv is not None else sys.argv[1:], prog_name="bqemulator")


if __name__ == "__main__":
    main()
