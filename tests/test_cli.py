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
    from pipeline.commands.flags import RUN_SETTINGS
    from pipeline.config import Settings

    args = job_cli.build_parser().parse_args(
        ["run", "--max-messages-per-batch", "7", "--sink-mode", "merge", "--master", "local[1]",
         "--min-confidence", "0.5"])
    fields = {f: getattr(args, f) for f in RUN_SETTINGS}
    assert {k: v for k, v in fields.items() if v is not None} == {
        "max_messages_per_batch": 7, "sink_mode": "merge", "spark_master": "local[1]",
        "min_confidence": 0.5}
    assert set(RUN_SETTINGS) <= set(Settings.__dataclass_fields__)
    with pytest.raises(SystemExit):
        job_cli.build_parser().parse_args(["run", "--batch-size", "many"])


def _commands() -> dict[str, object]:
    return app_cli.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]


def test_every_commands_settings_flags_are_generated_from_the_fields(monkeypatch) -> None:
    from typing import get_type_hints

    from pipeline.commands import flags
    from pipeline.config import ENV_PREFIX, Settings
    from pipeline.names import CHOICES
    from producer.cli import PRODUCE_SETTINGS

    tables = {"run": flags.RUN_SETTINGS, "classify": flags.CLASSIFY_SETTINGS,
              "backfill": flags.BACKFILL_SETTINGS, "report": flags.REPORT_SETTINGS,
              "similar": flags.SIMILAR_SETTINGS, "train": flags.TRAIN_SETTINGS,
              "produce": PRODUCE_SETTINGS}
    hints = get_type_hints(Settings)
    for command, parser in _commands().items():
        table = tables.get(command, {})
        assert set(table) <= set(hints), command
        by_dest = {a.dest: a for a in parser._actions}  # type: ignore[attr-defined]
        for field in table:
            action = by_dest[field]
            assert action.type == (hints[field] if hints[field] in (int, float) else None)
            assert action.choices == CHOICES.get(field)
            assert action.required or f"({ENV_PREFIX}{field.upper()}" in action.help, action.help
        # a flag that says it defaults to a Settings variable is one of the generated ones
        written = {a.dest for a in parser._actions  # type: ignore[attr-defined]
                   if a.dest in hints and f"({ENV_PREFIX}{a.dest.upper()}" in (a.help or "")}
        assert written <= set(table), (command, written - set(table))

    for name in ("BUCKETLENS_PREFIX", "BUCKETLENS_EMBEDDINGS", "BUCKETLENS_MODEL"):
        monkeypatch.delenv(name, raising=False)
    args = job_cli.build_parser().parse_args(
        ["backfill", "--bucket", "my-images", "--prefix", "cats/", "--embeddings"])
    settings = flags.settings_from_args(args, flags.BACKFILL_SETTINGS)
    assert (settings.bucket, settings.prefix, settings.embeddings) == ("my-images", "cats/", True)
    args = job_cli.build_parser().parse_args(["train", "--out", "m", "--base", "resnet18"])
    assert flags.settings_from_args(args, flags.TRAIN_SETTINGS).model == "resnet18"
    monkeypatch.setenv("BUCKETLENS_MODEL", "resnet50")  # a flag not given is its variable
    args = job_cli.build_parser().parse_args(["classify", "x.jpg", "--batch-size", "3"])
    settings = flags.settings_from_args(args, flags.CLASSIFY_SETTINGS)
    assert (settings.model, settings.batch_size) == ("resnet50", 3)
