"""Least-privilege IAM for bucketlens: who gets which role on what, as data, and the I/O to grant it.

``ROLES`` is the whole story: principal → kind of resource → role → why. Roles are granted on
the narrowest resource that works (the bucket, the subscription, the dataset); only what has
no narrower home (running BigQuery jobs, being a Dataproc VM) is granted on the project.
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

ROLES: Mapping[str, Mapping[str, Mapping[str, str]]] = {
    JOB: {
        "bucket": {
            "roles/storage.objectViewer": "read uploaded images (generation-pinned GETs)",
        },
        "subscription": {
            "roles/pubsub.subscriber": "pull, ack and extend ack deadlines of notifications",
            "roles/pubsub.viewer": "look the subscription up (ack deadline, dead-letter policy)",
        },
        "dataset": {
            "roles/bigquery.dataEditor": "create/drop staging tables, load rows, MERGE into targets",
        },
        "project": {
            "roles/bigquery.jobUser": "run the load and MERGE query jobs (billed to the project)",
            "roles/dataproc.worker": "run as a Dataproc VM or Serverless workload (agent, logs, "
                                     "staging/temp buckets, checkpoints)",
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
TARGET_KINDS = ("bucket", "topic", "dead_letter_topic", "subscription", "dataset", "project")

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
    """Every (principal, resource, role) row, resources named by ``targets`` (kind → name)."""
    return [Grant(principal, kind, targets[kind], role)
            for principal, by_kind in roles.items()
            for kind, by_role in by_kind.items()
            for role in sorted(by_role)]


def service_account_email(name: str, project: str) -> str:
    return name if "@" in name else f"{name}@{project}.iam.gserviceaccount.com"


def pubsub_service_agent(project_number: str) -> str:
    return f"serviceAccount:service-{project_number}@gcp-sa-pubsub.iam.gserviceaccount.com"


def members_of(bindings: Iterable[Mapping[str, Any]], role: str) -> set[str]:
    """Members holding ``role`` unconditionally (conditional bindings are not ours to count)."""
    return {m for b in bindings if b.get("role") == role and not b.get("condition")
            for m in b.get("members", ())}


def with_member(bindings: Sequence[Mapping[str, Any]], role: str, member: str) -> list[dict]:
    """``bindings`` plus ``member`` in ``role``; other bindings, conditions included, untouched."""
    out = [dict(b, members=sorted(b.get("members", ()))) for b in bindings]
    for b in out:
        if b.get("role") == role and not b.get("condition"):
            if member not in b["members"]:
                b["members"] = sorted({*b["members"], member})
            return out
    return [*out, {"role": role, "members": [member]}]


def without_member(bindings: Sequence[Mapping[str, Any]], role: str, member: str) -> list[dict]:
    """``bindings`` minus ``member`` in ``role``; a binding left empty is dropped."""
    out = []
    for b in bindings:
        members = sorted(b.get("members", ()))
        if b.get("role") == role and not b.get("condition"):
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
    """add/remove as read-modify-write edits of a policy's bindings; subclasses supply ``_edit``."""

    def _edit(self, change: Callable[[list[dict]], list[dict]]) -> None:
        raise NotImplementedError

    def add(self, role: str, member: str) -> None:
        self._edit(lambda b: with_member(b, role, member))

    def remove(self, role: str, member: str) -> None:
        self._edit(lambda b: without_member(b, role, member))


class BucketPolicy(_BindingsPolicy):
    """A bucket's IAM policy through the storage client (version 3: conditions survive)."""

    def __init__(self, bucket: Any) -> None:
        self.bucket = bucket

    def _edit(self, change: Callable[[list[dict]], list[dict]]) -> None:
        policy = self.bucket.get_iam_policy(requested_policy_version=3)
        policy.version = 3
        policy.bindings = change(list(policy.bindings))
        self.bucket.set_iam_policy(policy)

    def members(self, role: str) -> set[str]:
        return members_of(self.bucket.get_iam_policy(requested_policy_version=3).bindings, role)


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
    """The project's IAM policy; gcloud's add/remove-iam-policy-binding does the etag dance."""

    def __init__(self, gcloud: Gcloud, project: str) -> None:
        self.gcloud, self.project = gcloud, project

    def members(self, role: str) -> set[str]:
        out = self.gcloud("projects", "get-iam-policy", self.project, "--format=json").stdout
        return members_of(json.loads(out or "{}").get("bindings", []), role)

    def _binding(self, verb: str, role: str, member: str) -> None:
        self.gcloud("projects", f"{verb}-iam-policy-binding", self.project, f"--member={member}",
                    f"--role={role}", "--condition=None", "--format=none")

    def add(self, role: str, member: str) -> None:
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
