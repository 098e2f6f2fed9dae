"""Deployment rehearsal: the job as a cluster runs it, from the built wheel, on an older Spark.

The wheel is built from the checkout's files, installed with its runtime dependencies (and the
``offline`` model extra: no internet here) into a fresh virtualenv outside the source tree,
with the pyspark of Dataproc image 3.0 (4.1.x). Then:

* ``submit_job.sh`` runs against a recording ``gcloud``; the main file, job arguments and
  forwarded properties it submitted are replayed through that virtualenv's ``spark-submit``
  on ``local-cluster[2,1,1024]`` (two executor JVMs, as on a cluster) against the local stack.
  The only differences from the cluster: the checkpoint is a local directory (no GCS connector
  here), client mode instead of YARN cluster mode, and the emulator variables the script
  refuses to forward are set for the driver and executors.
* the installed ``bucketlens run`` console script, as a user would start it.

Each fails if a data file is missing from the wheel or the job imports anything outside it:
nothing from the checkout is importable there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from deploy.localstack import free_port
from pipeline.config import Settings
from tests.helpers.stream import upload_samples
from tests.helpers.tables import counts
from tests.helpers.wait import read_through
from tests.helpers.wheel import built_wheel, uv

pytestmark = [pytest.mark.integration, pytest.mark.spark, pytest.mark.rehearsal, pytest.mark.views]
ROOT = Path(__file__).resolve().parent.parent
FAKE_GCLOUD_DIR = Path(__file__).resolve().parent / "fake_gcloud"
DATAPROC_SPARK = "4.1.2"  # Dataproc images 3.0.0-3.0.2 (3.0.0-RC2: 4.1.1)
SHIPPED_DATA = ("schemas/predictions.json", "schemas/dead_letters.json",
                "schemas/object_events.json", "schemas/class_mapping.json",
                "schemas/views/class_mapping.sql", "schemas/views/latest_generation.sql")
EMULATOR_VARS = ("STORAGE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST", "BUCKETLENS_BQ_ENDPOINT",
                 "BUCKETLENS_BQ_STORAGE_ENDPOINT")


@pytest.fixture(scope="module")
def job_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv outside the checkout holding only the wheel and its dependencies."""
    base = tmp_path_factory.mktemp("rehearsal")
    wheel = built_wheel(tmp_path_factory)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(SHIPPED_DATA) <= names, f"missing from the wheel: {set(SHIPPED_DATA) - names}"
    venv = base / "venv"
    subprocess.run([uv(), "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    subprocess.run([uv(), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
                    f"{wheel}[offline]", f"pyspark=={DATAPROC_SPARK}"], check=True, timeout=900)
    return venv


def test_the_virtualenv_imports_the_wheel_and_nothing_from_the_checkout(job_env: Path) -> None:
    probe = ("import pipeline, schemas, pyspark; from pipeline.bigquery import catalog; "
             "print(pipeline.__file__, schemas.__file__, pyspark.__version__, "
             "len(catalog.view_templates()))")
    out = subprocess.run([str(job_env / "bin" / "python"), "-c", probe], cwd=job_env,
                         env=_clean_env(), capture_output=True, text=True, check=True).stdout.split()
    assert all(p.startswith(str(job_env)) for p in out[:2]), out
    assert out[2] == DATAPROC_SPARK
    assert int(out[3]) == len(list((ROOT / "schemas" / "views").glob("*.sql")))


def _clean_env(**extra: str) -> dict[str, str]:
    """No PYTHONPATH, no BUCKETLENS_* or emulator variables from the test's own process."""
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("BUCKETLENS_", "PYTHON", "PYSPARK_", "SPARK_HOME"))
            and k not in EMULATOR_VARS}
    return {**keep, "SPARK_LOCAL_IP": "127.0.0.1", **extra}


def submitted(settings: Settings, tmp_path: Path) -> dict:
    """What submit_job.sh hands to ``gcloud dataproc jobs submit pyspark``."""
    log, responses = tmp_path / "gcloud.jsonl", tmp_path / "gcloud-responses.json"
    # the cluster's shape sets the parallelism: 2 one-vCPU workers, like local-cluster[2,1,…]
    responses.write_text(json.dumps({"dataproc clusters describe": {
        "stdout": "2\thttps://www.googleapis.com/compute/v1/projects/p/zones/z/machineTypes/n1-standard-1\n"}}))
    env = _clean_env(PATH=f"{FAKE_GCLOUD_DIR}{os.pathsep}{os.environ['PATH']}",
                     FAKE_GCLOUD_LOG=str(log), FAKE_GCLOUD_RESPONSES=str(responses),
                     BUCKETLENS_TRIGGER_SECONDS="1",
                     BUCKETLENS_MAX_MESSAGES_PER_BATCH="40")
    subprocess.run(
        ["bash", str(ROOT / "deploy/dataproc/submit_job.sh"), "--project", settings.project,
         "--region", "us-central1", "--bucket", settings.bucket,
         "--subscription", settings.subscription, "--dataset", settings.dataset,
         "--table", settings.table, "--model", "efficientnet_lite0"],
        env=env, check=True, capture_output=True, text=True, timeout=60)
    (argv,) = [json.loads(line) for line in log.read_text().splitlines()
               if json.loads(line)[:4] == ["dataproc", "jobs", "submit", "pyspark"]]
    main_file, rest = argv[4], argv[5:]
    split = rest.index("--")
    flags, job_args = rest[:split], rest[split + 1:]
    props = flags[flags.index("--properties") + 1]
    assert props.startswith("^|^")
    properties = dict(p.split("=", 1) for p in props[3:].split("|"))
    return {"main": main_file, "args": job_args, "properties": properties}


def why(log: Path) -> str:
    """The Python side of a job log: tracebacks and bucketlens' own lines, not JVM noise."""
    lines = log.read_text(errors="replace").splitlines()
    keep = [i for i, line in enumerate(lines)
            if line.startswith(("Traceback", "bucketlens", "ModuleNotFoundError", "ImportError"))
            or "Error:" in line and not line.lstrip().startswith("at ")]
    shown = sorted({j for i in keep[:6] for j in range(i, min(i + 25, len(lines)))})
    return "\n".join(lines[j] for j in shown)[-6000:] or "\n".join(lines[-40:])


def run_until_rows(cmd: list[str], env: dict[str, str], cwd: Path, settings: Settings, n: int,
                   log: Path, timeout: float = 420) -> tuple[int, int, int]:
    """Start the job, upload ``n`` samples, wait for ``n`` rows (or the job's death) and for
    the job to have read all ``n`` notifications (its Prometheus endpoint), stop it."""
    port = free_port()
    env = {**env, "BUCKETLENS_METRICS_PORT": str(port)}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        upload_samples(settings, n)
        deadline = time.monotonic() + timeout
        got = (0, 0, 0)
        while time.monotonic() < deadline and proc.poll() is None:
            got = counts(settings)
            if got[0] >= n:
                read_through(port, n)  # the batches that read them committed: no late row
                return counts(settings)
            time.sleep(2)
        state = "still running" if proc.poll() is None else f"exited {proc.returncode}"
        raise AssertionError(f"{got[0]} of {n} rows; the job is {state}:\n{why(log)}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)


def test_the_submitted_job_on_a_two_executor_cluster_writes_30_rows(
        job_env: Path, isolated: Settings, tmp_path: Path) -> None:
    job = submitted(isolated, tmp_path)
    assert Path(job["main"]) == ROOT / "deploy/dataproc/bucketlens_job.py"
    driver_env = {k.removeprefix("spark.yarn.appMasterEnv."): v
                  for k, v in job["properties"].items() if k.startswith("spark.yarn.appMasterEnv.")}
    assert driver_env["BUCKETLENS_SUBSCRIPTION"] == isolated.subscription
    executor_conf = [f"{k}={v}" for k, v in job["properties"].items()
                     if k.startswith("spark.executorEnv.")]
    args = list(job["args"])
    args[args.index("--checkpoint") + 1] = str(tmp_path / "checkpoint")  # gs:// needs a connector
    emulators = {k: os.environ[k] for k in EMULATOR_VARS}
    python = str(job_env / "bin" / "python")
    env = _clean_env(**driver_env, **emulators, PYSPARK_PYTHON=python, PYSPARK_DRIVER_PYTHON=python)
    cmd = [str(job_env / "bin" / "spark-submit"), "--master", "local-cluster[2,1,1024]",
           *[x for c in executor_conf for x in ("--conf", c)],
           *[x for k, v in emulators.items() for x in ("--conf", f"spark.executorEnv.{k}={v}")],
           "--conf", f"spark.executorEnv.PYSPARK_PYTHON={python}",
           job["main"], *args]
    assert run_until_rows(cmd, env, tmp_path, isolated, 30, tmp_path / "job.log") == (30, 30, 0)


def test_bucketlens_run_from_the_wheel_turns_20_uploads_into_20_rows(
        job_env: Path, isolated: Settings, tmp_path: Path) -> None:
    settings = isolated.replace(model="efficientnet_lite0", trigger_seconds=1.0)
    env = _clean_env(**settings.as_env(), **{k: os.environ[k] for k in EMULATOR_VARS[:2]})
    cmd = [str(job_env / "bin" / "bucketlens"), "run"]
    assert run_until_rows(cmd, env, tmp_path, settings, 20, tmp_path / "run.log") == (20, 20, 0)
