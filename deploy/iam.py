"""Least-privilege IAM for bucketlens: who gets which role on what, as data, and the I/O to grant it.

``ROLES`` is the whole story: principal → kind of resource → role → why. Roles are granted on
the narrowest resource that works (the bucket, the subscription, the dataset, an object
prefix); only what has no narrower home (running BigQuery jobs, being a Dataproc VM) is granted
on the project, and there as a custom role (``CUSTOM_ROLES``): ``roles/dataproc.worker`` would
let the job write and delete every object of the project, the watched bucket's images included.
Provisioning (``deploy.provision``) turns these rows into idempotent resources.

The policy edits themselves are pure functions over ``{"role", "members"}`` bindings; the
stores below read and write them through the official clients (bucket, topic, subscription,
dataset) or, where no client is installed (service accounts, the project policy), ``gcloud``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

JOB = "job"  # the streaming job's own service account (Dataproc VMs / Serverless run as it)
GCS_AGENT = "gcs-service-agent"  # Cloud Storage's per-project agent: publishes notifications
PUBSUB_AGENT = "pubsub-service-agent"  # Pub/Sub's per-project agent: moves dead letters


@dataclass(frozen=True)
class CustomRole:
    """A project-level custom role, created and kept in step by ``ProjectPolicy.add``."""

    role_id: str
    title: str
    description: str
    permissions: tuple[str, ...]


# roles/dataproc.worker's permissions (IAM roles reference; the seven dataproc.* ones are what
# Dataproc checks a VM service account for). Its storage.objects.* reach every bucket of the
# project; the custom worker role below keeps all of it except those: objects are read and
# written only where a bucket-level grant says so (the watched bucket, the staging bucket, the
# JSONL output), so no other bucket of the project is readable by the job.
DATAPROC_WORKER_PERMISSIONS = (
    "dataproc.agents.create", "dataproc.agents.delete", "dataproc.agents.get",
    "dataproc.agents.list", "dataproc.agents.update", "dataproc.tasks.lease",
    "dataproc.tasks.listInvalidatedLeases", "dataproc.tasks.reportStatus",
    "logging.logEntries.create", "monitoring.metricDescriptors.create",
    "monitoring.metricDescriptors.get", "monitoring.metricDescriptors.list",
    "monitoring.monitoredResourceDescriptors.get", "monitoring.monitoredResourceDescriptors.list",
    "monitoring.timeSeries.create", "storage.buckets.get", "storage.objects.create",
    "storage.objects.delete", "storage.objects.get", "storage.objects.list",
    "storage.objects.update",
)
OBJECT_WRITES = frozenset({"storage.objects.create", "storage.objects.delete", "storage.objects.update"})
STORAGE_OBJECTS = frozenset(p for p in DATAPROC_WORKER_PERMISSIONS if p.startswith("storage.objects."))
WORKER_ROLE_ID = "bucketlensDataprocWorker"
WORKER_ROLE = "projects/{project}/roles/" + WORKER_ROLE_ID  # ``grants`` fills in the project
CUSTOM_ROLES: Mapping[str, CustomRole] = {
    WORKER_ROLE: CustomRole(
        WORKER_ROLE_ID, "bucketlens Dataproc worker",
        "roles/dataproc.worker without storage.objects.* (made by bucketlens deploy): the job "
        "reads and writes objects only where a bucket-level grant allows it",
        tuple(p for p in DATAPROC_WORKER_PERMISSIONS if p not in STORAGE_OBJECTS)),
}
# Granted by deploy/dataproc/create_cluster.sh on the staging bucket it creates (Dataproc's
# staging and temp files, driver output, the checkpoints): the worker role cannot write them.
STAGING_BUCKET_ROLE = "roles/storage.objectUser"
JSONL_OUTPUT_CONDITION_TITLE = "bucketlens-jsonl-output"

ROLES: Mapping[str, Mapping[str, Mapping[str, str]]] = {
    JOB: {
        "bucket": {
            "roles/storage.objectViewer": "read uploaded images (generation-pinned GETs)",
        },
        "jsonl_output": {
            "roles/storage.objectUser": "write the JSONL sink's batch files and overwrite them on a "
                                        "replay (GCS needs create+delete to replace an object), only "
                                        "under its output prefix (IAM condition); with "
                                        "`BUCKETLENS_SINK=jsonl` only",
        },
        "subscription": {
            "roles/pubsub.subscriber": "pull, ack and extend ack deadlines of notifications",
        },
        "alert_topic": {
            "roles/pubsub.publisher": "publish alerts (`run --alerts`), on the alert topic only",
        },
        "dataset": {
            "roles/bigquery.dataEditor": "append rows through the Storage Write API and read "
                                         "keys back (sink_mode append, the default); with "
                                         "sink_mode merge, create/drop staging tables, load "
                                         "and MERGE",
        },
        "project": {
            "roles/bigquery.jobUser": "run the key-lookup queries, drift rules' window "
                                      "queries (and, with sink_mode merge, the load and "
                                      "MERGE jobs), billed to the project",
            WORKER_ROLE: "run as a Dataproc VM (agent, task leases, logs, metrics): "
                         "`roles/dataproc.worker` minus every `storage.objects.*` permission "
                         "(objects: bucket-level grants only)",
        },
    },
    GCS_AGENT: {
        "topic": {"roles/pubsub.publisher": "publish the bucket's object notifications"},
    },
    PUBSUB_AGENT: {
        "dead_letter_topic": {"roles/pubsub.publisher": "forward undeliverable messages"},
        "subscription": {"roles/pubsub.subscriber": "ack the messages it dead-lettered"},
    },
}

PRIMITIVE_ROLES = frozenset({"roles/owner", "roles/editor", "roles/viewer"})
TARGET_KINDS = ("bucket", "jsonl_output", "topic", "dead_letter_topic", "alert_topic",
                "subscription", "dataset", "project")

# BigQuery dataset ACLs report these roles by their legacy names.
DATASET_LEGACY_ROLES = {"OWNER": "roles/bigquery.dataOwner", "WRITER": "roles/bigquery.dataEditor",
                        "READER": "roles/bigquery.dataViewer"}


# --- pure ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grant:
    principal: str  # a key of ROLES
    kind: str  # one of TARGET_KINDS
    target: str  # the resource's full name
    role: str


def grants(targets: Mapping[str, str], roles: Mapping[str, Mapping[str, Mapping[str, str]]] = ROLES
           ) -> list[Grant]:
    """Every (principal, resource, role) row, resources named by ``targets`` (kind → name).

    A kind ``targets`` leaves out gets no grant: the JSONL output exists only with that sink.
    """
    return [Grant(principal, kind, targets[kind], role.format(project=targets.get("project", "")))
            for principal, by_kind in roles.items()
            for kind, by_role in by_kind.items() if kind in targets
            for role in sorted(by_role)]


def custom_role(role: str) -> CustomRole | None:
    """The definition of ``role`` (``projects/P/roles/ID``) if it is one of ``CUSTOM_ROLES``."""
    return next((r for r in CUSTOM_ROLES.values()
                 if role.startswith("projects/") and role.endswith(f"/roles/{r.role_id}")), None)


def jsonl_output(settings: Any) -> str:
    """``gs://bucket/prefix`` the JSONL sink writes under: the sink's own reading of ``settings``."""
    from pipeline.bigquery.sinks import JsonLinesSink  # late: the sink brings the cloud clients along

    out = JsonLinesSink(settings)
    if out.bucket_name == settings.bucket and not out.prefix:
        raise ValueError(f"jsonl_uri {settings.jsonl_uri!r} is the watched bucket's root: the sink's "
                         "write grant would cover every image; give it a prefix")
    return f"gs://{out.bucket_name}/{out.prefix}"


def prefix_condition(uri: str) -> dict[str, str]:
    """IAM condition limiting a bucket-level grant to the objects under ``gs://bucket/prefix``.

    The prefix lands inside a CEL string literal: ``names.object_prefix`` refuses the quote or
    backslash that would end it (a configured ``jsonl_uri`` is refused earlier, by Settings)."""
    from pipeline.names import object_prefix, split_gs

    bucket, prefix = split_gs(uri)
    object_prefix(prefix)
    under = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    return {"title": JSONL_OUTPUT_CONDITION_TITLE, "description": f"objects under {uri}",
            "expression": f'resource.name.startsWith("projects/_/buckets/{bucket}/objects/{under}")'}


def service_account_email(name: str, project: str) -> str:
    return name if "@" in name else f"{name}@{project}.iam.gserviceaccount.com"


def pubsub_service_agent(project_number: str) -> str:
    return f"serviceAccount:service-{project_number}@gcp-sa-pubsub.iam.gserviceaccount.com"


def _ours(binding: Mapping[str, Any], role: str, condition: Mapping[str, str] | None) -> bool:
    """``binding`` grants ``role`` under exactly ``condition`` (``None``: unconditionally)."""
    if binding.get("role") != role:
        return False
    if condition is None:
        return not binding.get("condition")
    return (binding.get("condition") or {}).get("expression") == condition["expression"]


def members_of(bindings: Iterable[Mapping[str, Any]], role: str,
               condition: Mapping[str, str] | None = None) -> set[str]:
    """Members holding ``role`` under ``condition`` (by default unconditionally: other
    conditional bindings are not ours to count)."""
    return {m for b in bindings if _ours(b, role, condition) for m in b.get("members", ())}


def with_member(bindings: Sequence[Mapping[str, Any]], role: str, member: str,
                condition: Mapping[str, str] | None = None) -> list[dict]:
    """``bindings`` plus ``member`` in ``role`` under ``condition``; other bindings untouched."""
    out = [dict(b, members=sorted(b.get("members", ()))) for b in bindings]
    for b in out:
        if _ours(b, role, condition):
            if member not in b["members"]:
                b["members"] = sorted({*b["members"], member})
            return out
    new = {"role": role, "members": [member]}
    return [*out, new if condition is None else {**new, "condition": dict(condition)}]


def without_member(bindings: Sequence[Mapping[str, Any]], role: str, member: str,
                   condition: Mapping[str, str] | None = None) -> list[dict]:
    """``bindings`` minus ``member`` in ``role`` under ``condition``; a binding left empty is dropped."""
    out = []
    for b in bindings:
        members = sorted(b.get("members", ()))
        if _ours(b, role, condition):
            members = [m for m in members if m != member]
            if not members:
                continue
        out.append(dict(b, members=members))
    return out


def role_table(roles: Mapping[str, Mapping[str, Mapping[str, str]]] = ROLES) -> str:
    """The Markdown table deploy/README.md shows (a test keeps the two in step)."""
    rows = ["| principal | on | role | why |", "|---|---|---|---|"]
    rows += [f"| {p} | {kind} | `{role}` | {why} |"
             for p, by_kind in roles.items() for kind, by_role in by_kind.items()
             for role, why in sorted(by_role.items())]
    return "\n".join(rows)


# --- policy stores (I/O) ---------------------------------------------------------------------------

class PolicyStore(Protocol):
    def members(self, role: str) -> set[str]: ...
    def add(self, role: str, member: str) -> None: ...
    def remove(self, role: str, member: str) -> None: ...


class _BindingsPolicy:
    """add/remove as read-modify-write edits of a policy's bindings; subclasses supply ``_edit``.

    ``condition`` (a bucket's policy only: version 3) scopes every binding this store touches.
    """

    condition: Mapping[str, str] | None = None

    def _edit(self, change: Callable[[list[dict]], list[dict]]) -> None:
        raise NotImplementedError

    def add(self, role: str, member: str) -> None:
        self._edit(lambda b: with_member(b, role, member, self.condition))

    def remove(self, role: str, member: str) -> None:
        self._edit(lambda b: without_member(b, role, member, self.condition))


class BucketPolicy(_BindingsPolicy):
    """A bucket's IAM policy through the storage client (version 3: conditions survive).

    With ``condition``, the bindings are conditional ones (they need uniform bucket-level access,
    which ``provision`` turns on for the buckets it creates).
    """

    def __init__(self, bucket: Any, condition: Mapping[str, str] | None = None) -> None:
        self.bucket, self.condition = bucket, condition

    def _edit(self, change: Callable[[list[dict]], list[dict]]) -> None:
        policy = self.bucket.get_iam_policy(requested_policy_version=3)
        policy.version = 3
        policy.bindings = change(list(policy.bindings))
        self.bucket.set_iam_policy(policy)

    def members(self, role: str) -> set[str]:
        return members_of(self.bucket.get_iam_policy(requested_policy_version=3).bindings, role,
                          self.condition)


def prefix_policy(storage: Any, uri: str) -> BucketPolicy:
    """The policy of ``uri``'s bucket, its grants limited to the objects under ``uri``."""
    from pipeline.names import split_gs

    return BucketPolicy(storage.bucket(split_gs(uri)[0]),
                        prefix_condition(uri))


class PubSubPolicy(_BindingsPolicy):
    """A topic's or subscription's IAM policy through a Pub/Sub client (etag kept: no lost update)."""

    def __init__(self, client: Any, resource: str) -> None:
        self.client, self.resource = client, resource

    def _get(self) -> dict:
        from google.protobuf import json_format

        return json_format.MessageToDict(self.client.get_iam_policy(request={"resource": self.resource}))

    def _edit(self, change: Callable[[list[dict]], list[dict]]) -> None:
        from google.iam.v1 import policy_pb2
        from google.protobuf import json_format

        policy = self._get()
        policy["bindings"] = change(policy.get("bindings", []))
        self.client.set_iam_policy(request={
            "resource": self.resource, "policy": json_format.ParseDict(policy, policy_pb2.Policy())})

    def members(self, role: str) -> set[str]:
        return members_of(self._get().get("bindings", []), role)


class DatasetAccess:
    """A dataset's access list (BigQuery's dataset-level IAM) through the BigQuery client."""

    def __init__(self, client: Any, dataset_id: str) -> None:
        self.client, self.dataset_id = client, dataset_id

    @staticmethod
    def _member(entry: Any) -> str | None:
        if entry.entity_type == "iamMember":
            return entry.entity_id
        if entry.entity_type == "userByEmail":
            kind = "serviceAccount" if entry.entity_id.endswith(".gserviceaccount.com") else "user"
            return f"{kind}:{entry.entity_id}"
        return None

    def _matches(self, entry: Any, role: str, member: str | None = None) -> bool:
        return (DATASET_LEGACY_ROLES.get(entry.role, entry.role) == role
                and self._member(entry) is not None
                and (member is None or self._member(entry) == member))

    def members(self, role: str) -> set[str]:
        ds = self.client.get_dataset(self.dataset_id)
        return {self._member(e) for e in ds.access_entries if self._matches(e, role)}

    def _update(self, change: Callable[[list], list]) -> None:
        ds = self.client.get_dataset(self.dataset_id)
        ds.access_entries = change(list(ds.access_entries))
        self.client.update_dataset(ds, ["access_entries"])  # etag-checked by the client

    def add(self, role: str, member: str) -> None:
        from google.cloud.bigquery import AccessEntry

        email = member.partition(":")[2]
        entry = AccessEntry(role=role, entity_type="userByEmail", entity_id=email)
        self._update(lambda entries: entries if any(self._matches(e, role, member) for e in entries)
                     else [*entries, entry])

    def remove(self, role: str, member: str) -> None:
        self._update(lambda entries: [e for e in entries if not self._matches(e, role, member)])


# --- gcloud: service accounts and the project policy ------------------------------------------------

class GcloudError(RuntimeError):
    """A gcloud command failed; the message carries its command line and stderr."""


class Gcloud:
    """Runs ``gcloud`` non-interactively: the one place the deploy code shells out."""

    def __init__(self, binary: str = "gcloud") -> None:
        self.binary = binary

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [self.binary, *args, "--quiet"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise GcloudError(f"`{self.binary}` was not found on PATH: install the Google Cloud "
                              "CLI (https://cloud.google.com/sdk/docs/install)") from None
        if check and proc.returncode != 0:
            raise GcloudError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc


def _not_found(proc: subprocess.CompletedProcess[str]) -> bool:
    return proc.returncode != 0 and ("NOT_FOUND" in proc.stderr or "does not exist" in proc.stderr)


class ProjectPolicy:
    """The project's IAM policy; gcloud's add/remove-iam-policy-binding does the etag dance.

    Granting a ``CUSTOM_ROLES`` role first makes the role match its definition: created if
    missing, undeleted if deleted, its permissions replaced if they differ. ``remove`` leaves
    the definition (a deleted custom role's id stays reserved for weeks).
    """

    def __init__(self, gcloud: Gcloud, project: str) -> None:
        self.gcloud, self.project = gcloud, project

    def ensure_role(self, role: CustomRole) -> None:
        where = (role.role_id, f"--project={self.project}")
        proc = self.gcloud("iam", "roles", "describe", *where, "--format=json", check=False)
        if _not_found(proc):
            self.gcloud("iam", "roles", "create", *where, f"--title={role.title}",
                        f"--description={role.description}",
                        f"--permissions={','.join(role.permissions)}", "--stage=GA",
                        "--format=none")
            return
        if proc.returncode != 0:
            raise GcloudError(f"could not look up role {role.role_id}: {proc.stderr.strip()}")
        found = json.loads(proc.stdout or "{}")
        if found.get("deleted"):
            self.gcloud("iam", "roles", "undelete", *where, "--format=none")
        if found.get("deleted") or set(found.get("includedPermissions", ())) != set(role.permissions):
            self.gcloud("iam", "roles", "update", *where,
                        f"--permissions={','.join(role.permissions)}", "--format=none")

    def members(self, role: str) -> set[str]:
        out = self.gcloud("projects", "get-iam-policy", self.project, "--format=json").stdout
        return members_of(json.loads(out or "{}").get("bindings", []), role)

    def _binding(self, verb: str, role: str, member: str) -> None:
        self.gcloud("projects", f"{verb}-iam-policy-binding", self.project, f"--member={member}",
                    f"--role={role}", "--condition=None", "--format=none")

    def add(self, role: str, member: str) -> None:
        definition = custom_role(role)
        if definition is not None:
            self.ensure_role(definition)
        self._binding("add", role, member)

    def remove(self, role: str, member: str) -> None:
        self._binding("remove", role, member)


class GcloudIam:
    """Service accounts and project facts through gcloud (google-cloud-iam is not a dependency)."""

    def __init__(self, project: str, gcloud: Gcloud | None = None) -> None:
        self.project = project
        self.gcloud = gcloud or Gcloud()

    def service_account_exists(self, email: str) -> bool:
        proc = self.gcloud("iam", "service-accounts", "describe", email, f"--project={self.project}",
                           "--format=value(email)", check=False)
        if _not_found(proc):
            return False
        if proc.returncode != 0:
            raise GcloudError(f"could not look up {email}: {proc.stderr.strip()}")
        return True

    def create_service_account(self, name: str, display_name: str) -> None:
        self.gcloud("iam", "service-accounts", "create", name.split("@", 1)[0],
                    f"--project={self.project}", f"--display-name={display_name}")

    def delete_service_account(self, email: str) -> None:
        proc = self.gcloud("iam", "service-accounts", "delete", email, f"--project={self.project}",
                           check=False)
        if proc.returncode != 0 and not _not_found(proc):
            raise GcloudError(f"could not delete {email}: {proc.stderr.strip()}")

    def project_number(self) -> str:
        return self.gcloud("projects", "describe", self.project,
                           "--format=value(projectNumber)").stdout.strip()

    def project_policy(self) -> ProjectPolicy:
        return ProjectPolicy(self.gcloud, self.project)
