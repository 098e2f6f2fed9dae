"""The Dataproc scripts run against the recording fake ``gcloud`` (tests/fake_gcloud)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATAPROC = ROOT / "deploy" / "dataproc"
FAKE_GCLOUD_DIR = ROOT / "tests" / "fake_gcloud"
EMULATOR_VARS = ("STORAGE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST")
ABSENT = {"rc": 1, "stderr": "ERROR: NOT_FOUND"}  # gcloud's answer for a missing resource
# `gcloud dataproc clusters describe --format value(...)` for submit_job.sh: 2 × n2-standard-8
CLUSTER_SHAPE = {"dataproc clusters describe": {
    "stdout": "2\thttps://www.googleapis.com/compute/v1/projects/p/zones/r-a/machineTypes/n2-standard-8\n"}}


def run_script(name: str, *args: str, tmp_path: Path, responses: dict | None = None,
               env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run deploy/dataproc/<name> with a clean BUCKETLENS_* environment and the fake gcloud."""
    log = tmp_path / f"{name}.jsonl"
    log.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("BUCKETLENS_") and k not in EMULATOR_VARS}
    base.update(PATH=f"{FAKE_GCLOUD_DIR}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(log))
    if responses is not None:
        (tmp_path / "responses.json").write_text(json.dumps(responses))
        base["FAKE_GCLOUD_RESPONSES"] = str(tmp_path / "responses.json")
    base.update(env or {})
    proc = subprocess.run([str(DATAPROC / name), *args], env=base, capture_output=True, text=True,
                          timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls
