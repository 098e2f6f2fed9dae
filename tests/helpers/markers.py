"""A test's markers follow from the fixtures it uses, so ``-m "not integration"`` can never run
a test that needs the stack because its module forgot a pytestmark (conftest installs this);
and the slowest files are collected first."""

from __future__ import annotations

import pytest

FIXTURE_MARKERS = {"stack": "integration", "isolated": "integration", "spark": "spark",
                   "gcs_server": "integration"}  # test_classify's own fake-gcs-server


# The slowest files, slowest first (measured on the 2-core machine, 2026-12-07, a clean-clone
# `make test`: the benchmarks ~6 min of one worker, train ~4, the rest 1-2.5), handed out
# first: with --no-loadscope-reorder (the Makefile) pytest-xdist gives whole files to whichever
# worker is free in collection order, so a long file collected last would keep one worker busy
# while the other idles.
SLOWEST_FIRST = ("test_bench.py", "test_train.py", "test_source.py", "test_faults.py",
                 "test_rehearsal.py", "test_hostile.py", "test_executors.py",
                 "test_hostile_stream.py", "test_alerts_stream.py", "test_gcloud_parser.py",
                 "test_localstack.py")


def file_rank(item: pytest.Item) -> int:
    name = item.path.name
    return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=file_rank)  # stable: each file's own order stays
    for item in items:
        for fixture in set(getattr(item, "fixturenames", ())) & set(FIXTURE_MARKERS):
            item.add_marker(FIXTURE_MARKERS[fixture])
