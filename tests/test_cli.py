"""The ``bucketlens`` command line: every command is there, and building the parser imports
nothing heavy, so ``--help`` and a mistyped command answer at once (runners load on use)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import cli as app_cli
from pipeline.commands import cli as job_cli

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "pyspark", "pandas", "google.cloud.bigquery",
         "google.cloud.storage", "google.cloud.pubsub_v1")


def test_every_command_is_on_the_application_cli_and_the_job_cli_has_the_job_ones() -> None:
    app = app_cli.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    job = job_cli.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"local", "demo", "produce", "run", "classify", "backfill", "report", "compact"} <= set(app)
    assert {"run", "classify", "backfill", "report"} <= set(job)
    assert not {"local", "demo", "produce"} & set(job)


@pytest.mark.parametrize("argv", [["--help"], ["classify", "--help"], ["clasify"]])
@pytest.mark.process
def test_parsing_imports_nothing_heavy(argv: list[str]) -> None:
    probe = (
        "import json, sys\n"
        "from deploy.cli import build_parser\n"
        "try:\n"
        f"    build_parser().parse_args({argv!r})\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        f"print(json.dumps([code, sorted(m for m in {HEAVY!r} if m in sys.modules)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=60)
    code, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert heavy == []
    assert code == (2 if argv == ["clasify"] else 0)


def test_a_runner_loads_its_module_only_when_called() -> None:
    run = job_cli.runner("pipeline.times:parse_since")
    assert run.target == "pipeline.times:parse_since"  # type: ignore[attr-defined]
    assert run("2024-05-06").year == 2024


def test_run_flags_are_the_settings_fields_they_set() -> None:
    from pipeline.config import Settings

    args = job_cli.build_parser().parse_args(
        ["run", "--max-messages-per-batch", "7", "--sink-mode", "merge", "--master", "local[1]",
         "--min-confidence", "0.5"])
    fields = {f: getattr(args, f) for f in job_cli.RUN_SETTINGS}
    assert {k: v for k, v in fields.items() if v is not None} == {
        "max_messages_per_batch": 7, "sink_mode": "merge", "spark_master": "local[1]",
        "min_confidence": 0.5}
    assert set(job_cli.RUN_SETTINGS) <= set(Settings.__dataclass_fields__)
    with pytest.raises(SystemExit):
        job_cli.build_parser().parse_args(["run", "--batch-size", "many"])
