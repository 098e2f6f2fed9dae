"""``bucketlens sql``: a user's own query against the configured project, local stack included."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from deploy import cli
from pipeline.commands import sqlcmd
from tests.helpers.views import load, prediction

# the isolated dataset gets the analytics views (conftest)
pytestmark = pytest.mark.views


def test_cells_are_escaped_json_for_records_and_null_for_none() -> None:
    assert sqlcmd.cell(None) == "NULL"
    assert sqlcmd.cell("evil\x1b[31m\nname") == "evil\\x1b[31m\\nname"
    assert sqlcmd.cell([{"label": "tabby", "prob": 0.5}]) == '[{"label":"tabby","prob":0.5}]'
    assert sqlcmd.cell("x" * 100, limit=10) == "x" * 10 + "…"
    t = datetime(2024, 5, 6, 7, 0, tzinfo=UTC)
    assert sqlcmd.json_value({"t": t, "d": date(2024, 5, 6), "n": Decimal("1.10"), "b": b"\x00"}) == {
        "t": "2024-05-06T07:00:00+00:00", "d": "2024-05-06", "n": "1.10", "b": "AA=="}


@pytest.fixture
def env_of(isolated, monkeypatch):
    """The CLI reads BUCKETLENS_*: point them at this test's own resources."""
    for k, v in isolated.as_env().items():
        monkeypatch.setenv(k, v)
    return isolated


@pytest.mark.integration
def test_sql_runs_against_the_configured_dataset_as_a_table_or_json_lines(env_of, capsys) -> None:
    t = datetime.now(UTC).replace(microsecond=0)
    load(env_of, [prediction(env_of, "cats/tabby/1.jpg", 1, "ok", [281], t),
                  prediction(env_of, "cats/\x1b[2Jevil\n.jpg", 1, "ok", [282], t)])
    query = "SELECT name, top1_label, top5 FROM predictions ORDER BY name"  # no dataset prefix
    assert cli.main(["sql", query, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in rows] == ["cats/\x1b[2Jevil\n.jpg", "cats/tabby/1.jpg"]
    assert rows[1]["top1_label"] == "tabby" and rows[1]["top5"][0]["label"] == "tabby"

    assert cli.main(["sql", query, "--max-rows", "1"]) == 0
    out, err = capsys.readouterr()
    assert "\x1b" not in out and "\\x1b[2Jevil\\n.jpg" in out and "tiger cat" in out
    assert "tabby/1.jpg" not in out and "1 row(s) (--max-rows 1)" in err


@pytest.mark.integration
def test_a_bad_query_is_one_line_and_exit_2(env_of, capsys) -> None:
    assert cli.main(["sql", "SELECT nope FROM no_such_table"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bucketlens: the query failed:") and "\n" not in err


def test_demo_keep_says_what_to_run_next_with_commands_that_exist() -> None:
    from pathlib import Path

    from deploy.demo import next_steps

    text = next_steps(Path(".bucketlens/demo"))
    assert 'eval "$(bucketlens local env --run-dir .bucketlens/demo)"' in text
    commands = cli.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for line in text.splitlines()[1:]:
        words = line.split()
        if words[0] == "bucketlens":
            assert words[1] in commands, line
    assert "bucketlens sql" in text and "bucketlens dashboard" in text and "local down" in text
