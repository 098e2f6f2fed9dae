"""A CLI that answers at once: every usage mistake is one line with a hint, exit 2, told before
torch or Spark are imported (they take 10–15 s to load)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.commands import cli as job_cli
from pipeline.commands import usage

# every test here starts a fresh interpreter or shell, as a user would: `make test`, not `make check`
pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "pyspark")
PROBE = """
import json, sys
from deploy.cli import main

try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as exc:
    code = exc.code
print(json.dumps([code, sorted(m for m in {heavy!r} if m in sys.modules)]), file=sys.__stdout__)
"""


def clean_env(**env: str) -> dict[str, str]:
    """This environment less every BUCKETLENS_* and emulator variable (a new user's shell),
    with this checkout's code first on the path, plus ``env``."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("BUCKETLENS_", "PUBSUB_", "STORAGE_EMULATOR"))}
    return {**clean, "PYTHONPATH": str(ROOT), **env}


def bucketlens(argv: list[str], cwd: Path, **env: str) -> tuple[int, list[str], str]:
    """(exit code, heavy modules imported, stderr) of ``bucketlens ARGV`` in a fresh process
    with no BUCKETLENS_* or emulator variables."""
    out = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), json.dumps(argv)],
                         cwd=cwd, capture_output=True, text=True, timeout=120, env=clean_env(**env))
    code, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    return code, heavy, out.stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("usage")
    (d / "photo.jpg").write_bytes(b"\xff\xd8\xff")
    (d / "rules.json").write_text('{"rules": [{"name": "cats", "label": ["tabby"]}]}')
    (d / "drift.json").write_text('{"rules": [{"name": "d", "drift": "class_mix", "threshold": 0.2}]}')
    (d / "flat").mkdir()
    for cls, n in (("one/cat", 3), ("few/cat", 3), ("few/dog", 1)):  # untrainable datasets
        (d / cls).mkdir(parents=True)
        for i in range(n):
            (d / cls / f"{i}.png").write_bytes(b"x")
    for i in range(3):
        (d / "flat" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff")
    return d


# argv, what the one line must say (its hint included)
MISTAKES = [
    ([], "the following arguments are required: COMMAND (see `bucketlens --help`)"),
    (["clasify", "x.jpg"], "invalid choice: 'clasify'"),
    (["classify", "missing.jpg"], "no such file or directory: missing.jpg"),
    (["classify", "photo.jpg", "--model", "resnet5o"], "unknown model 'resnet5o': choose a "
                                                       "torchvision classifier (resnet50"),
    (["classify", "photo.jpg", "--model", "./no/bundle"], "no model bundle or location at ./no/bundle"),
    (["classify", "photo.jpg", "--weights", "missing.pt"], "no weights file at missing.pt"),
    (["classify", "photo.jpg", "--batch-size", "0"], "--batch-size must be 1 or more"),
    (["train", "--out", "models"], "say which images to train on: --dataset DIR|gs://BUCKET/PREFIX"),
    (["train", "--dataset", "flat", "--out", "models"],
     "flat has no images in class folders (its images lie directly in it): put them in "
     "flat/<class>/"),
    (["train", "--dataset", "nowhere", "--out", "models"], "no dataset folder at nowhere"),
    (["train", "--dataset", "one", "--out", "models"],
     "Training needs at least two classes; the dataset has only class 'cat'"),
    (["train", "--dataset", "few", "--out", "models"], "'dog' have fewer than 2 images"),
    (["backfill"], "the following arguments are required: --bucket"),
    (["backfill", "--bucket", "Bad_Bucket!"], "bucket name 'Bad_Bucket!' is invalid"),
    (["backfill", "--bucket", "b1b", "--since", "yesterday"], "an age like 90m, 6h, 2d"),
    (["compact", "--since", "banana"], "an age like 90m, 6h, 2d"),
    (["run", "--subscription", "bad/name"], "subscription name 'bad/name' is invalid"),
    (["run", "--model", "nosuchnet"], "unknown model 'nosuchnet'"),
    (["run", "--alerts", "rules.json"], "rules.json: rule 1 ('cats') has unknown keys ['label']: "
                                        "a row rule takes ['labels', 'min_probability'"),
    (["run", "--alerts", "missing.json"], "no alert rule file at missing.json"),
    (["run", "--alerts", "drift.json", "--sink", "console"],
     "drift rule 'd' reads the drift views in BigQuery: it needs BUCKETLENS_SINK=bigquery"),
    (["run", "--drift-window", "fortnight"], "drift_window 'fortnight' is invalid"),
    (["models", "promote", "."], "promote needs the VERSION"),
    (["models", "list", "no-such-dir"], "no model location at no-such-dir"),
    (["similar", "photo.jpg"], "photo.jpg is not an object URI: give gs://BUCKET/NAME"),
    (["status", "--max-lag", "0"], "--max-lag: must be > 0"),
    (["sql", " "], 'give the query as one argument: bucketlens sql "SELECT …"'),
    (["local", "bogus"], "invalid choice: 'bogus'"),
    (["report", "--top", "x"], "argument --top: invalid int value: 'x'"),
]


@pytest.mark.parametrize(("argv", "says"), MISTAKES, ids=[" ".join(a) or "<none>" for a, _ in MISTAKES])
def test_a_usage_mistake_is_one_line_exit_2_before_torch_or_spark(workdir, argv, says) -> None:
    code, heavy, err = bucketlens(argv, workdir)
    assert code == 2, err
    assert heavy == [], f"{heavy} imported to say: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bucketlens") and says in lines[0], lines[0]


def test_version_and_verbose_after_the_subcommand() -> None:
    from deploy.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--version"])
    assert exc.value.code == 0
    assert build_parser().parse_args(["status", "-v"]).verbose is True
    assert build_parser().parse_args(["-v", "status"]).verbose is True
    assert build_parser().parse_args(["status"]).verbose is False
    assert job_cli.build_parser().parse_args(["report", "--verbose"]).verbose is True


def test_compact_since_takes_an_age_like_backfill() -> None:
    from datetime import UTC, datetime, timedelta

    args = job_cli.build_parser().parse_args(["compact", "--since", "2d"])
    assert args.since == (datetime.now(UTC) - timedelta(days=2)).date()


def test_missing_credentials_are_one_sentence_naming_both_ways(workdir, tmp_path) -> None:
    # no emulator variables and no credentials anywhere google-auth looks
    code, heavy, err = bucketlens(["sql", "SELECT 1"], workdir, HOME=str(tmp_path),
                                  GOOGLE_APPLICATION_CREDENTIALS="", CLOUDSDK_CONFIG=str(tmp_path),
                                  GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9")
    assert code == 2 and heavy == []
    (line,) = err.strip().splitlines()
    assert "gcloud auth application-default login" in line and "bucketlens local env" in line


def test_the_model_names_read_from_source_are_torchvisions_own() -> None:
    torchvision = pytest.importorskip("torchvision")
    assert usage.torchvision_classifiers() == set(torchvision.models.list_models(
        module=torchvision.models))
