"""Markers come from fixtures: a test that uses the stack is `integration`, one that uses the
shared Spark session is `spark`, whatever its module says."""

from __future__ import annotations

pytest_plugins = ["pytester"]


def test_markers_follow_the_fixtures(pytester) -> None:
    pytester.makeconftest("""
import pytest
from tests.helpers.markers import pytest_collection_modifyitems  # noqa: F401

@pytest.fixture
def stack():
    return None

@pytest.fixture
def spark():
    return None
""")
    pytester.makepyfile("""
def test_plain(): pass
def test_stack(stack): pass
def test_spark(spark): pass
""")
    pytester.syspathinsert(str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    result = pytester.runpytest("-m", "not integration and not spark", "-p", "no:bqemulator",
                                "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, deselected=2)
