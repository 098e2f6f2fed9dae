"""Idempotent provisioning: one code path for real GCP and for the local emulator stack.

Each resource knows how to look itself up, create itself and delete itself; ``plan`` lists
what is missing without changing anything, ``apply`` creates only what is missing (so running
it twice changes nothing), ``destroy`` deletes in reverse order. What an emulator cannot do
(bucket notification configs, IAM) is reported as ``skip`` with the reason, never faked.

    from deploy import provision
    from pipeline.config import Settings
    for action in provision.apply(Settings.from_env()):
        print(action)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from google.api_core.exceptions import BadRequest, NotFound

from deploy import iam
from pipeline import clients
from pipeline.bigquery.catalog import TableSpec, load_schema, tables, view_templates
from pipeline.config import Settings
from pipeline.notifications import EVENT_TYPES

# Every event the job handles (classify FINALIZE, record the rest in the events table), sorted
# so the notification config compares equal however GCS orders it.
NOTIFICATION_EVENTS = sorted(EVENT_TYPES)
NOTIFICATION_FORMAT = "JSON_API_V1"
IAM_PROPAGATION_SECONDS = 120  # a new service account can be unknown to IAM for a while
EMULATOR_NOTIFICATION = "emulator: fake-gcs-server publishes by its -event.* flags instead"
EMULATOR_IAM = "emulator: no IAM"


def subscription_filter(event_types: Sequence[str]) -> str:
    """Pub/Sub filter admitting exactly these GCS event types."""
    return " OR ".join(f'attributes.eventType = "{t}"' for t in event_types)


@dataclass(frozen=True)
class Action:
    verb: str  # "create", "exists", "update", "delete", "absent", "skip"
    kind: str
    name: str
    note: str = ""

    def __str__(self) -> str:
        text = f"{self.verb:<7} {self.kind:<15} {self.name}"
        return f"{text}  ({self.note})" if self.note else text


@dataclass(frozen=True)
class Resource:
    kind: str
    name: str
    exists: Callable[[], bool]
    create: Callable[[], object]
    delete: Callable[[], object]
    skip: str = ""  # non-empty: not managed here, and why (plan/apply/destroy report it)
    # an existing resource that lacks what this version of bucketlens needs, and the fix
    outdated: Callable[[], bool] = lambda: False
    update: Callable[[], object] = lambda: None


class _Clients:
    """Clients made on first use, so a plan for the emulator never needs gcloud or credentials."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def storage(self):
        return clients.storage_client(self.settings)

    @cached_property
    def publisher(self):
        return clients.publisher_client(self.settings)

    @cached_property
    def subscriber(self):
        return clients.subscriber_client(self.settings)

    @cached_property
    def bigquery(self):
        return clients.bigquery_client(self.settings)

    @cached_property
    def iam(self) -> iam.GcloudIam:
        return iam.GcloudIam(self.settings.project)


def _found(lookup: Callable[[], object]) -> bool:
    try:
        return lookup() is not None
    except NotFound:
        return False


def _holds(check: Callable[[], object]) -> bool:
    """``check()`` is truthy; a missing parent (NotFound) means no."""
    try:
        return bool(check())
    except NotFound:
        return False


def _ignore_missing(action: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            action()
        except NotFound:
            pass

    return run


def on_emulator(settings: Settings) -> bool:
    """Cloud Storage is fake-gcs-server: it has no notification configs to manage."""
    return bool(settings.storage_emulator_host)


def subscription_request(settings: Settings, *, pubsub_emulator: bool) -> dict[str, Any]:
    """The notification subscription's settings (pure), without its name.

    No ``retry_policy`` on the Pub/Sub emulator: with one set, the emulator never redelivers a
    message whose lease has lapsed three times (measured: silent for 150 s, against a 60 s
    maximum backoff; nacked messages are unaffected), so a stream that crashes three times
    while holding a message would lose it. Real Pub/Sub gets the backoff.
    """
    s = settings
    request: dict[str, Any] = {
        "topic": s.topic_path,
        "ack_deadline_seconds": s.ack_deadline_seconds,
        "dead_letter_policy": {"dead_letter_topic": s.dead_letter_topic_path,
                               "max_delivery_attempts": s.max_delivery_attempts},
        # Applied by real Pub/Sub; the emulator accepts but ignores it, so the stream
        # filters event types in code as well. Immutable: changing it means a new subscription.
        "filter": subscription_filter(NOTIFICATION_EVENTS),
    }
    if not pubsub_emulator:
        request["retry_policy"] = {"minimum_backoff": {"seconds": 1},
                                   "maximum_backoff": {"seconds": 60}}
    return request


def emulated(settings: Settings) -> bool:
    """Any service pointed at an emulator: then there is no IAM to manage."""
    return on_emulator(settings) or bool(settings.pubsub_emulator_host or settings.bq_endpoint)


def notification_matches(n: Any, settings: Settings) -> bool:
    """Whether a bucket notification config is the one bucketlens needs (pure)."""
    return (n.topic_name == settings.topic and n.topic_project == settings.project
            and sorted(n.event_types or []) == NOTIFICATION_EVENTS
            and n.payload_format == NOTIFICATION_FORMAT
            and (n.blob_name_prefix or "") == settings.prefix)


def targets(settings: Settings) -> dict[str, str]:
    """The full name of each kind of resource IAM roles are granted on."""
    s = settings
    return {"bucket": s.bucket, "topic": s.topic_path, "dead_letter_topic": s.dead_letter_topic_path,
            "alert_topic": s.alert_topic_path,
            "subscription": s.subscription_path, "dataset": f"{s.project}.{s.dataset}",
            "project": s.project,
            # only the JSONL sink writes objects, and only under its own prefix
            **({"jsonl_output": iam.jsonl_output(s)} if s.sink == "jsonl" else {})}


def tables_row(settings: Settings) -> str:
    """deploy/README.md's row of the resource table for the tables, from the catalog (a test
    keeps the two in step): names, day partitioning and clustering on real BigQuery."""
    parts = [f"`{table_id.rsplit('.', 1)[1]}` (day-partitioned on `{spec.partition_by}`"
             + (f", clustered by {', '.join(spec.cluster_by)})" if spec.cluster_by else ")")
             for table_id, spec in tables(settings).items()]
    return f"| dataset, table ×{len(parts)} | {'; '.join(parts)} | created |"


def view_ids(settings: Settings) -> list[str]:
    """The views ``bigquery_views.create_views`` makes, one per ``schemas/views/*.sql``."""
    from pipeline.bigquery import views as bigquery_views

    return [bigquery_views.view_id(bigquery_views.render_view(sql, settings)) for _, sql in view_templates()]


def _create_bucket(c: _Clients, settings: Settings) -> None:
    """The watched bucket, IAM-only (uniform bucket-level access: conditional grants need it)."""
    bucket = c.storage.bucket(settings.bucket)
    bucket.iam_configuration.uniform_bucket_level_access_enabled = True
    c.storage.create_bucket(bucket, location=settings.region or None)


def _delete_bucket(c: _Clients, name: str) -> None:
    bucket = c.storage.bucket(name)
    try:
        bucket.delete(force=True)
    except ValueError:  # force=True refuses more than 256 objects: empty it page by page
        for blob in c.storage.list_blobs(name):
            _ignore_missing(blob.delete)()
        bucket.delete()


def core_resources(settings: Settings, c: _Clients) -> list[Resource]:
    """Bucket, topics, subscriptions, dataset, tables and views, in creation order."""
    from google.cloud import bigquery

    s = settings
    dataset_id = f"{s.project}.{s.dataset}"

    def topic(path: str) -> Resource:
        return Resource(
            "topic", path,
            exists=lambda: _found(lambda: c.publisher.get_topic(topic=path)),
            create=lambda: c.publisher.create_topic(name=path),
            delete=_ignore_missing(lambda: c.publisher.delete_topic(topic=path)),
        )

    def subscription(path: str, request: dict) -> Resource:
        return Resource(
            "subscription", path,
            exists=lambda: _found(lambda: c.subscriber.get_subscription(subscription=path)),
            create=lambda: c.subscriber.create_subscription(request={"name": path, **request}),
            delete=_ignore_missing(lambda: c.subscriber.delete_subscription(subscription=path)),
        )

    def table(table_id: str, spec: TableSpec) -> Resource:
        """The table. An existing one is *outdated* when its schema file gained columns since
        it was made (an upgrade of bucketlens); ``update`` adds them in place with ``ALTER TABLE
        … ADD COLUMN``, which BigQuery allows for NULLABLE columns (https://cloud.google.com/
        bigquery/docs/reference/standard-sql/data-definition-language#alter_table_add_column_statement).
        Rows written before read NULL there."""

        def missing() -> list | None:
            """The schema's columns the table lacks; None when there is no table yet."""
            try:
                have = {f.name for f in c.bigquery.get_table(table_id).schema}
            except NotFound:
                return None  # the table resource creates it whole
            return [f for f in load_schema(spec.schema) if f.name not in have]

        def add() -> None:
            new = missing() or []
            unsupported = [f.name for f in new if f.mode == "REQUIRED" or f.field_type == "RECORD"]
            if unsupported:
                raise RuntimeError(f"{table_id} lacks column(s) {unsupported}, which cannot be added "
                                   "to an existing table as NULLABLE scalars; add them by hand.")
            # DDL rather than tables.patch: the same statements on BigQuery (free DDL queries) and
            # on the emulator, whose patch changes only the metadata, not the stored table. One
            # column per statement: the emulator's DuckDB takes one ALTER action at a time.
            from pipeline.bigquery.sql import run_query

            for f in new:
                run_query(c.bigquery, f"ALTER TABLE `{table_id}` ADD COLUMN IF NOT EXISTS "
                                      f"`{f.name}` {_SQL_TYPES.get(f.field_type, f.field_type)}")
            if still := missing():  # the emulator's table metadata does not follow its DDL
                table = c.bigquery.get_table(table_id)
                table.schema = [*table.schema, *still]
                c.bigquery.update_table(table, ["schema"])

        def create() -> None:
            t = bigquery.Table(table_id, schema=load_schema(spec.schema))
            if not s.bq_endpoint:  # real BigQuery: partition by day, cluster by the key
                t.time_partitioning = bigquery.TimePartitioning(field=spec.partition_by)
                t.clustering_fields = list(spec.cluster_by) or None
            c.bigquery.create_table(t)

        return Resource(
            "table", table_id,
            exists=lambda: missing() is not None,
            create=create,
            delete=lambda: c.bigquery.delete_table(table_id, not_found_ok=True),
            outdated=lambda: bool(missing()), update=add,
        )

    def create_dataset() -> None:
        ds = bigquery.Dataset(dataset_id)
        ds.location = s.bq_location
        c.bigquery.create_dataset(ds)

    def views() -> Resource:
        from pipeline.bigquery import sql as bigquery_sql
        from pipeline.bigquery import views as bigquery_views

        ids = view_ids(s)
        return Resource(
            "views", f"{dataset_id}: " + (", ".join(v.rsplit(".", 1)[1] for v in ids) or "none defined"),
            exists=lambda: all(_found(lambda v=v: c.bigquery.get_table(v)) for v in ids),
            create=lambda: bigquery_views.create_views(s, c.bigquery),
            # DDL, dependents first: bqemulator's tables.delete cannot drop a view.
            delete=lambda: [bigquery_sql.run_query(c.bigquery, f"DROP VIEW IF EXISTS `{v}`")
                            for v in reversed(ids)],
        )

    return [
        Resource(
            "bucket", s.bucket,
            exists=lambda: c.storage.lookup_bucket(s.bucket) is not None,
            create=lambda: _create_bucket(c, s),
            delete=_ignore_missing(lambda: _delete_bucket(c, s.bucket)),
        ),
        topic(s.topic_path),
        topic(s.dead_letter_topic_path),
        topic(s.alert_topic_path),  # subscribers make their own subscriptions
        subscription(s.dead_letter_subscription_path, {"topic": s.dead_letter_topic_path}),
        subscription(s.subscription_path, subscription_request(
            s, pubsub_emulator=bool(s.pubsub_emulator_host))),
        Resource(
            "dataset", dataset_id,
            exists=lambda: _found(lambda: c.bigquery.get_dataset(dataset_id)),
            create=create_dataset,
            delete=lambda: c.bigquery.delete_dataset(dataset_id, delete_contents=True,
                                                     not_found_ok=True),
        ),
        *(table(table_id, spec) for table_id, spec in tables(s).items()),
        views(),
    ]


_SQL_TYPES = {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL"}  # legacy → GoogleSQL


def _iam_not_ready(exc: BaseException) -> bool:
    """IAM has not heard of a just-created service account yet (eventual consistency)."""
    return isinstance(exc, BadRequest | iam.GcloudError) and "does not exist" in str(exc)


def _retry_propagation(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

        return Retrying(retry=retry_if_exception(_iam_not_ready), reraise=True,
                        stop=stop_after_delay(IAM_PROPAGATION_SECONDS),
                        wait=wait_exponential(multiplier=1, max=15))(fn)

    return run


def iam_resources(settings: Settings, c: _Clients, *, skip: str = "") -> list[Resource]:
    """The job's service account, then every row of ``iam.ROLES`` as one grant."""
    s = settings
    email = iam.service_account_email(s.service_account, s.project)
    members: dict[str, Callable[[], str]] = {
        iam.JOB: lambda: f"serviceAccount:{email}",
        iam.GCS_AGENT: lambda: f"serviceAccount:{c.storage.get_service_account_email(project=s.project)}",
        iam.PUBSUB_AGENT: lambda: iam.pubsub_service_agent(c.iam.project_number()),
    }
    stores: dict[str, Callable[[str], iam.PolicyStore]] = {
        "bucket": lambda name: iam.BucketPolicy(c.storage.bucket(name)),
        "jsonl_output": lambda name: iam.prefix_policy(c.storage, name),
        "topic": lambda name: iam.PubSubPolicy(c.publisher, name),
        "dead_letter_topic": lambda name: iam.PubSubPolicy(c.publisher, name),
        "alert_topic": lambda name: iam.PubSubPolicy(c.publisher, name),
        "subscription": lambda name: iam.PubSubPolicy(c.subscriber, name),
        "dataset": lambda name: iam.DatasetAccess(c.bigquery, name),
        "project": lambda name: c.iam.project_policy(),
    }

    def grant(g: iam.Grant) -> Resource:
        store = lambda: stores[g.kind](g.target)  # noqa: E731 — made when used, not when planned
        member = members[g.principal]
        label = email if g.principal == iam.JOB else g.principal
        return Resource(
            "iam", f"{g.role} → {label} on {g.kind} {g.target}",
            exists=lambda: _holds(lambda: member() in store().members(g.role)),
            create=_retry_propagation(lambda: store().add(g.role, member())),
            delete=_ignore_missing(lambda: store().remove(g.role, member())),
            skip=skip,
        )

    account = Resource(
        "service-account", email,
        exists=lambda: c.iam.service_account_exists(email),
        create=lambda: c.iam.create_service_account(s.service_account,
                                                    "bucketlens streaming job"),
        delete=lambda: c.iam.delete_service_account(email),
        skip=skip,
    )
    return [account, *(grant(g) for g in iam.grants(targets(s)))]


def notification_resource(settings: Settings, c: _Clients, *, skip: str = "") -> Resource:
    """The bucket's events → topic config (needs the GCS agent's publisher grant first)."""
    s = settings

    def matching() -> list:
        return [n for n in c.storage.bucket(s.bucket).list_notifications()
                if notification_matches(n, s)]

    def create() -> None:
        c.storage.bucket(s.bucket).notification(
            topic_name=s.topic, topic_project=s.project, event_types=NOTIFICATION_EVENTS,
            payload_format=NOTIFICATION_FORMAT, blob_name_prefix=s.prefix or None).create()

    return Resource(
        "notification", f"gs://{s.bucket}/{s.prefix}* → {s.topic_path}",
        exists=lambda: _holds(matching),
        create=create,
        delete=_ignore_missing(lambda: [n.delete() for n in matching()]),
        skip=skip,
    )


def resources(settings: Settings, c: _Clients | None = None, *, emulator: bool | None = None,
              deployment: Mapping[str, str] | None = None) -> list[Resource]:
    """Every resource bucketlens needs, in creation order (destroy walks it backwards).

    ``deployment``: the Dataproc scripts' own variables (BUCKETLENS_NETWORK, ...), which are no
    Settings fields; by default the process environment, as the scripts read it."""
    c = c or _Clients(settings)
    deployment = os.environ if deployment is None else deployment
    no_gcs_api = on_emulator(settings) if emulator is None else emulator
    no_iam = emulated(settings) if emulator is None else emulator
    return [
        *core_resources(settings, c),
        *iam_resources(settings, c, skip=EMULATOR_IAM if no_iam else ""),
        notification_resource(settings, c, skip=EMULATOR_NOTIFICATION if no_gcs_api else ""),
        *([] if no_iam else [egress_resource(settings, deployment),
                             firewall_resource(deployment)]),
    ]


def egress_resource(settings: Settings, env: Mapping[str, str] = os.environ) -> Resource:
    """How the cluster reaches PyPI (image 2.2+ VMs have internal IPs only), shown by ``plan``;
    ``deploy/dataproc/create_cluster.sh`` makes it, from the same variables."""
    if env.get("BUCKETLENS_PUBLIC_IP_ADDRESS") == "yes":
        name, note = "external IPs on the cluster's VMs", "create_cluster.sh --public-ip-address yes"
    else:
        name = (f"Cloud NAT on router {env.get('BUCKETLENS_NAT_ROUTER') or 'bucketlens-nat'}, network "
                f"{env.get('BUCKETLENS_NETWORK') or 'default'}, region {settings.region or '(unset)'}")
        note = "create_cluster.sh creates it if missing; --public-ip-address yes instead skips it"
    return Resource("egress", name, exists=lambda: False, create=lambda: None, delete=lambda: None,
                    skip=note)


def firewall_resource(env: Mapping[str, str] = os.environ) -> Resource:
    """The ingress rule between the cluster's VMs that any network but ``default`` lacks,
    shown by ``plan``; ``deploy/dataproc/create_cluster.sh`` makes it, from the same variables."""
    name = (f"{env.get('BUCKETLENS_FIREWALL_RULE') or 'bucketlens-internal'} on network "
            f"{env.get('BUCKETLENS_NETWORK') or 'default'}: tcp, udp, icmp between the VMs "
            f"tagged {FIREWALL_TAG}")
    return Resource("firewall", name, exists=lambda: False, create=lambda: None,
                    delete=lambda: None, skip="create_cluster.sh creates it if missing")


FIREWALL_TAG = "bucketlens"  # deploy/dataproc/common.sh NETWORK_TAG (a test keeps them equal)


def plan_resources(rs: Sequence[Resource]) -> list[Action]:
    return [Action("skip", r.kind, r.name, r.skip) if r.skip
            else Action(("update" if r.outdated() else "exists") if r.exists() else "create",
                        r.kind, r.name) for r in rs]


def apply_resources(rs: Sequence[Resource]) -> list[Action]:
    actions = []
    for r in rs:
        if r.skip:
            actions.append(Action("skip", r.kind, r.name, r.skip))
        elif r.exists():
            if r.outdated():
                r.update()
                actions.append(Action("update", r.kind, r.name))
            else:
                actions.append(Action("exists", r.kind, r.name))
        else:
            r.create()
            actions.append(Action("create", r.kind, r.name))
    return actions


def destroy_resources(rs: Sequence[Resource]) -> list[Action]:
    actions = []
    for r in reversed(rs):
        if r.skip:
            actions.append(Action("skip", r.kind, r.name, r.skip))
        elif r.exists():
            r.delete()
            actions.append(Action("delete", r.kind, r.name))
        else:
            actions.append(Action("absent", r.kind, r.name))
    return actions


def plan(settings: Settings, **kw: Any) -> list[Action]:
    """What ``apply`` would do; changes nothing. ``kw`` goes to ``resources``."""
    return plan_resources(resources(settings, **kw))


def apply(settings: Settings, **kw: Any) -> list[Action]:
    """Create whatever is missing; a second run reports only ``exists`` (and ``skip``)."""
    return apply_resources(resources(settings, **kw))


def destroy(settings: Settings, **kw: Any) -> list[Action]:
    """Delete everything ``apply`` creates, in reverse order."""
    return destroy_resources(resources(settings, **kw))
