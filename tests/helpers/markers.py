"""A test's markers follow from the fixtures it uses, so ``-m "not integration"`` can never run
a test that needs the stack because its module forgot a pytestmark (conftest installs this)."""

from __future__ import annotations

import pytest

FIXTURE_MARKERS = {"stack": "integration", "isolated": "integration", "spark": "spark",
                   "gcs_server": "integration"}  # test_classify's own fake-gcs-server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in set(getattr(item, "fixturenames", ())) & set(FIXTURE_MARKERS):
            item.add_marker(FIXTURE_MARKERS[fixture])
