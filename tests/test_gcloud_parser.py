"""Every gcloud command line the deployment produces, checked by the REAL gcloud CLI's parser.

The lines come from running ``deploy/dataproc/*.sh`` (each branch that calls gcloud, and what
each prints under ``--dry-run``), the
``gcloud`` lines of ``deploy/README.md``'s shell blocks (the Serverless example among them) and
``deploy/iam.py``'s gcloud calls against the recording fake ``tests/fake_gcloud/gcloud``. Each
recorded argv is then replayed through the real ``gcloud`` offline: no credentials, a throwaway
``CLOUDSDK_CONFIG`` per call, and no network where ``unshare -n`` is permitted (where it is not,
the lines run without it: with no credentials gcloud stops before any request, and the
``isolation`` fixture reports which case applied). gcloud parses every flag before it looks for
credentials, so a line it accepts stops at the auth step ("You do not currently have an active
account selected"), while an unknown or malformed flag fails in argument parsing first (exit 2)
and a missing required combination crashes (the Serverless example without ``--deps-bucket``).
Only the auth stop passes. One bad flag injected into a recorded line must be caught the same
way, so the check can fail.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy import iam
from tests.helpers.scripts import ABSENT, CLUSTER_SHAPE, FAKE_GCLOUD_DIR, ROOT, run_script

# What the real gcloud says when a command line parsed and the next step needs credentials.
AUTH_STOPS = ("You do not currently have an active account selected",
              "Your current active account", "does not have any valid credentials",
              "Reauthentication required")
# An argv that the real parser rejects: the check must not pass it.
BAD_FLAG = "--autoscaling-policy-typo=x"
README_ENV = {"BUCKETLENS_PROJECT": "my-project", "BUCKETLENS_REGION": "us-central1",
              "BUCKETLENS_BUCKET": "my-project-bucketlens-images", "BUCKETLENS_PREFIX": "uploads/",
              "BUCKETLENS_DATASET": "bucketlens"}


def _real_gcloud() -> str | None:
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != FAKE_GCLOUD_DIR.resolve())
    return shutil.which("gcloud", path=path)


REAL_GCLOUD = _real_gcloud()
pytestmark = [pytest.mark.process,  # runs the deployment's scripts against the real gcloud
              pytest.mark.skipif(REAL_GCLOUD is None,
                                 reason="the Google Cloud CLI (gcloud) is not installed on this machine")]


@dataclass(frozen=True)
class Verdict:
    kind: str  # "auth": every flag accepted; "parse": rejected by the parser; "other": anything else
    returncode: int
    stderr: str


def classify(returncode: int, stderr: str) -> str:
    """How far gcloud got with a line: parser rejection, auth stop, or something else."""
    if returncode == 2 or "unrecognized arguments" in stderr or re.search(r"argument --?\S+: ", stderr):
        return "parse"
    if returncode != 0 and any(m in stderr for m in AUTH_STOPS):
        return "auth"
    return "other"


@pytest.fixture(scope="module")
def isolation() -> list[str]:
    """``unshare -n`` (or ``-rn`` without root) when permitted, else nothing (see the docstring)."""
    if shutil.which("unshare"):
        for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
            if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
                return prefix
    print("test_gcloud_parser: unshare is not permitted here; the real gcloud runs without a "
          "network namespace (it has no credentials, so it sends no request)")
    return []


def replay(argvs: Sequence[tuple[str, ...]], prefix: list[str], config_root: Path) -> list[Verdict]:
    """Run each argv through the real gcloud, four at a time, each with its own empty config."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("CLOUDSDK_", "GOOGLE_", "BUCKETLENS_")) and not k.endswith("_EMULATOR_HOST")}

    def one(i: int, argv: tuple[str, ...]) -> Verdict:
        config = config_root / f"cfg-{i}"
        config.mkdir(parents=True)
        env = {**base, "CLOUDSDK_CONFIG": str(config), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
               "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
               "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true"}
        proc = subprocess.run([*prefix, str(REAL_GCLOUD), *argv], env=env, capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)
        return Verdict(classify(proc.returncode, proc.stderr), proc.returncode, proc.stderr)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, range(len(argvs)), argvs))


# --- recording what the deployment would run ----------------------------------------------------------

def script_lines(tmp: Path) -> list[list[str]]:
    """The argv of every gcloud call of the scripts, over the branches that call gcloud."""
    wheel = tmp / "bucketlens-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"wheel")
    fresh = {"storage buckets describe": ABSENT, "dataproc clusters describe": ABSENT,
             "compute routers describe": ABSENT}
    where = ("--project", "p1", "--region", "us-central1")
    runs = [
        ("create_cluster.sh", (*where, "--package", str(wheel)), fresh),
        ("create_cluster.sh", (*where, "--package", "bucketlens==0.1.0", "--public-ip-address", "yes"),
         fresh),
        ("create_cluster.sh", (*where, "--package", "bucketlens==0.1.0"), {}),  # all exists
        ("submit_job.sh", (*where, "--bucket", "imgs", "--dataset", "ds", "--", "--trigger-seconds", "5"),
         CLUSTER_SHAPE),
        ("teardown.sh", (*where, "--delete-staging-bucket", "yes", "--delete-nat-router", "yes"),
         {"dataproc jobs list": {"stdout": "job-a\n"}}),
    ]
    lines = []
    for i, (script, args, responses) in enumerate(runs):
        d = tmp / f"run-{i}"
        d.mkdir()
        proc, calls = run_script(script, *args, tmp_path=d, responses=responses,
                                 env={"BUCKETLENS_SINK": "jsonl"})
        assert proc.returncode == 0, f"{script} {args}: {proc.stderr}"
        lines += calls
    return lines + dry_run_lines(tmp)


def dry_run_lines(tmp: Path) -> list[list[str]]:
    """What every script prints under ``--dry-run`` (the Serverless one on both kinds of network)."""
    where = ("--project", "p1", "--region", "us-central1", "--dry-run")
    image = "us-central1-docker.pkg.dev/p1/bucketlens/job:0.1.0"
    runs = [
        ("create_cluster.sh", (*where, "--package", "bucketlens==0.1.0", "--network", "vpc1",
                               "--subnet", "vpc1-us")),
        ("submit_job.sh", (*where, "--bucket", "imgs")),
        ("submit_batch.sh", (*where, "--container-image", image, "--bucket", "imgs", "--network", "vpc1",
                             "--batch", "bucketlens-1", "--", "--trigger-seconds", "5")),
        ("submit_batch.sh", (*where, "--container-image", image, "--subnet", "vpc1-us")),
        ("teardown.sh", (*where, "--delete-staging-bucket", "yes", "--delete-nat-router", "yes",
                         "--delete-firewall-rule", "yes")),
    ]
    lines = []
    for i, (script, args) in enumerate(runs):
        d = tmp / f"dry-{i}"
        d.mkdir()
        proc, calls = run_script(script, *args, tmp_path=d, env={"BUCKETLENS_SINK": "jsonl"})
        assert proc.returncode == 0 and calls == [], f"{script} {args}: {proc.stderr}"
        lines += [shlex.split(line)[1:] for line in proc.stdout.splitlines()]
    return lines


def readme_commands() -> list[str]:
    """Each ``gcloud ...`` command of deploy/README.md's ``sh`` blocks, continuation lines joined."""
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "deploy" / "README.md").read_text(), re.S)
    joined = [re.sub(r"\\\n\s*", " ", b) for b in blocks]
    return [line.strip() for b in joined for line in b.splitlines() if line.strip().startswith("gcloud ")]


def readme_lines(tmp: Path) -> list[list[str]]:
    """The argv each README command gives gcloud, with the README's variables set."""
    log = tmp / "readme.jsonl"
    env = {**os.environ, **README_ENV, "FAKE_GCLOUD_LOG": str(log),
           "PATH": f"{FAKE_GCLOUD_DIR}{os.pathsep}{os.environ['PATH']}"}
    for command in readme_commands():
        subprocess.run(["bash", "-euc", command], env=env, cwd=ROOT, check=True, timeout=30)
    return [json.loads(line) for line in log.read_text().splitlines()]


def iam_lines(tmp: Path) -> list[list[str]]:
    """deploy/iam.py's gcloud calls, the custom role's create, update and undelete included."""
    log, responses = tmp / "iam.jsonl", tmp / "iam-responses.json"
    email = "bucketlens-job@p1.iam.gserviceaccount.com"
    worker = iam.WORKER_ROLE.format(project="p1")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{FAKE_GCLOUD_DIR}{os.pathsep}{os.environ['PATH']}")
        mp.setenv("FAKE_GCLOUD_LOG", str(log))
        mp.setenv("FAKE_GCLOUD_RESPONSES", str(responses))
        g = iam.GcloudIam("p1")
        for described in ({"rc": 1, "stderr": "NOT_FOUND"},
                          {"stdout": json.dumps({"includedPermissions": [], "deleted": True})}):
            responses.write_text(json.dumps({"iam roles describe": described,
                                             "projects get-iam-policy": {"stdout": "{}"}}))
            g.service_account_exists(email)
            g.create_service_account("bucketlens-job", "bucketlens streaming job")
            g.project_number()
            policy = g.project_policy()
            policy.members(worker)
            policy.add(worker, f"serviceAccount:{email}")
            policy.remove(worker, f"serviceAccount:{email}")
            g.delete_service_account(email)
    return [json.loads(line) for line in log.read_text().splitlines()]


@dataclass(frozen=True)
class Checked:
    lines: dict[tuple[str, ...], Verdict]  # every recorded line → what the real gcloud did
    injected: Verdict  # a recorded line plus BAD_FLAG
    without_deps_bucket: Verdict  # the README's Serverless line as it was: no --deps-bucket


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory, isolation: list[str]) -> Iterator[Checked]:
    """Record every line once, then replay them all (and the two bad ones) in one pool."""
    tmp = tmp_path_factory.mktemp("gcloud-lines")
    recorded = [*script_lines(tmp), *readme_lines(tmp), *iam_lines(tmp)]
    lines = list(dict.fromkeys(tuple(argv) for argv in recorded))
    create = next(argv for argv in lines if argv[:3] == ("dataproc", "clusters", "create"))
    batch = next(argv for argv in lines if argv[:4] == ("dataproc", "batches", "submit", "pyspark"))
    i = batch.index("--deps-bucket")
    bad = [(*create, BAD_FLAG), batch[:i] + batch[i + 2:]]
    verdicts = replay([*lines, *bad], isolation, tmp / "configs")
    yield Checked(dict(zip(lines, verdicts[:len(lines)], strict=True)), *verdicts[len(lines):])


# --- the checks --------------------------------------------------------------------------------------

# Command groups that must be among the recorded lines: the check is not allowed to pass empty.
EXPECTED_COMMANDS = [
    "storage buckets describe", "storage buckets create", "storage buckets add-iam-policy-binding",
    "storage cp", "compute routers describe", "compute routers create", "compute routers nats list",
    "compute routers nats create", "compute networks subnets describe",
    "compute firewall-rules describe", "compute firewall-rules create", "compute firewall-rules delete",
    "compute networks subnets update", "dataproc clusters describe", "dataproc clusters create",
    "dataproc clusters update", "dataproc jobs submit pyspark", "dataproc jobs list",
    "dataproc jobs kill", "dataproc clusters delete", "compute routers delete", "storage rm",
    "dataproc batches submit pyspark", "dataproc autoscaling-policies delete", "services enable",
    "iam roles describe", "iam roles create", "iam roles undelete", "iam roles update",
    "iam service-accounts create", "projects add-iam-policy-binding",
    "projects remove-iam-policy-binding", "projects get-iam-policy",
]


def test_the_recorded_lines_cover_every_gcloud_command_of_the_deployment(checked) -> None:
    found = {" ".join(argv) for argv in checked.lines}
    missing = [c for c in EXPECTED_COMMANDS if not any(line.startswith(c + " ") for line in found)]
    assert not missing, f"no recorded line for: {missing}"
    assert any("--public-ip-address" in argv for argv in checked.lines)
    batches = [argv for argv in checked.lines if argv[:3] == ("dataproc", "batches", "submit")]
    assert {"--network", "--subnet", "--user-workload-authentication-type"} <= {a for b in batches for a in b}


def test_every_gcloud_line_passes_the_real_parser(checked) -> None:
    rejected = {" ".join(argv): f"rc {v.returncode}: {v.stderr.strip()[:400]}"
                for argv, v in checked.lines.items() if v.kind != "auth"}
    assert not rejected, "the real gcloud rejects:\n" + "\n".join(f"{k}\n  -> {v}"
                                                                   for k, v in rejected.items())


def test_one_bad_flag_is_caught_by_the_same_check(checked) -> None:
    assert checked.injected.kind == "parse" and checked.injected.returncode == 2
    assert "unrecognized arguments" in checked.injected.stderr
    assert BAD_FLAG.split("=")[0] in checked.injected.stderr


def test_the_serverless_example_without_deps_bucket_is_caught(checked) -> None:
    assert checked.without_deps_bucket.kind != "auth"
    assert "--deps-bucket" in checked.without_deps_bucket.stderr


@pytest.mark.parametrize(("returncode", "stderr", "kind"), [
    (1, "ERROR: (gcloud.dataproc.clusters.create) You do not currently have an active account "
        "selected.\nPlease run:\n\n  $ gcloud auth login", "auth"),
    (2, "ERROR: (gcloud.dataproc.clusters.create) unrecognized arguments:\n  --bogus", "parse"),
    (2, "ERROR: (gcloud.dataproc.clusters.create) argument --num-workers: invalid int value: 'x'", "parse"),
    (1, "ERROR: gcloud crashed (AttributeError): --deps-bucket was not specified.", "other"),
    (0, "", "other"),
])
def test_classify(returncode, stderr, kind) -> None:
    assert classify(returncode, stderr) == kind
