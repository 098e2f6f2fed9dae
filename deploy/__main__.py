"""``python -m deploy plan | apply | destroy``: provision bucketlens on GCP or the local stack.

The same code ``bucketlens local up`` runs. Every ``Settings`` field that names or shapes a
provisioned resource is a flag (``--dead-letter-topic`` …, ``PROVISIONING``), and so are the
Dataproc scripts' network variables ``plan`` shows (``NETWORK_FLAGS``); each defaults to its
``BUCKETLENS_*`` variable, so a shell set up with ``eval "$(bucketlens local env)"`` provisions
the emulators and a clean one provisions GCP. Stream tuning stays with ``bucketlens run``.

    python -m deploy plan --project my-proj --region us-central1 --bucket my-images
    python -m deploy apply --project my-proj --region us-central1 --bucket my-images
    python -m deploy destroy --project my-proj --bucket my-images --yes
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import fields
from typing import get_type_hints

from deploy.localstack import StackError, check_emulators
from pipeline.config import ENV_PREFIX, Settings
from pipeline.names import InvalidSetting

COMMANDS = ("plan", "apply", "destroy")  # functions of deploy.provision
# The Settings fields provisioning reads: resource names and places, the subscription's
# policy, the JSONL sink's grant, the emulators. The stream's tuning is `bucketlens run`'s.
PROVISIONING = ("project", "region", "bucket", "prefix", "topic", "subscription",
                "dead_letter_topic", "alert_topic", "drift_window", "drift_baseline", "dataset",
                "table", "dead_letter_table", "events_table",
                "bq_location", "service_account", "ack_deadline_seconds", "max_delivery_attempts",
                "sink", "jsonl_uri", "bq_endpoint", "bq_storage_endpoint", "pubsub_emulator_host",
                "storage_emulator_host")
# create_cluster.sh's network variables, not Settings fields: `plan` shows what they make.
NETWORK_FLAGS = {"public_ip_address": "yes: external IPs instead of Cloud NAT",
                 "network": "VPC network (default default)", "nat_router": "Cloud Router of the NAT",
                 "firewall_rule": "the intra-cluster ingress rule"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deploy",
        description="Provision bucketlens: bucket, notification, topics, subscriptions, dataset, "
                    "tables, views, service account and IAM. Idempotent; plan changes nothing.",
        epilog="Every flag defaults to its BUCKETLENS_* environment variable. Emulator variables "
               "(STORAGE_EMULATOR_HOST, PUBSUB_EMULATOR_HOST, --bq-endpoint) select the local stack.")
    p.add_argument("command", choices=list(COMMANDS), help="plan: show; apply: create; destroy: delete")
    p.add_argument("--yes", action="store_true", help="confirm destroy (it deletes data)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds the whole command may take (default %(default)s)")
    hints = get_type_hints(Settings)
    for f in fields(Settings):
        if f.name in PROVISIONING:
            p.add_argument(_flag(f.name), dest=f.name, type=hints[f.name], default=None,
                           help=f"{ENV_PREFIX}{f.name.upper()} (default {f.default!r})")
    for name, help_ in NETWORK_FLAGS.items():
        p.add_argument(_flag(name), dest=name, default=None,
                       help=f"{help_} ({ENV_PREFIX}{name.upper()}; read by create_cluster.sh)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # names are checked before any client, credential or request
        settings = Settings.from_env(**{f: getattr(args, f) for f in PROVISIONING})
    except InvalidSetting as exc:
        print(f"python -m deploy: {exc}", file=sys.stderr)
        return 2
    if args.command == "destroy" and not args.yes:
        print("python -m deploy: destroy deletes the bucket, topics, subscriptions, dataset and "
              f"IAM grants of project {settings.project!r}; add --yes to confirm",
              file=sys.stderr)
        return 2
    from deploy import provision  # the Google clients, once the names are known to be good
    from pipeline.stream.fetch import CommandTimeout, deadline

    try:
        with deadline(args.timeout, f"{args.command} (limit set by --timeout)"):
            check_emulators(settings)
            flags = {ENV_PREFIX + n.upper(): getattr(args, n) for n in NETWORK_FLAGS
                     if getattr(args, n) is not None}
            actions = getattr(provision, args.command)(settings, deployment={**os.environ, **flags})
    except Exception as exc:  # one line for what a user can fix; a traceback for the rest
        from google.auth.exceptions import DefaultCredentialsError

        from deploy.iam import GcloudError

        if isinstance(exc, DefaultCredentialsError | GcloudError | CommandTimeout | StackError):
            print(f"python -m deploy: {exc}", file=sys.stderr)
            return 2
        raise
    for action in actions:
        print(action)
    counts = Counter(a.verb for a in actions)
    print(f"{args.command}: " + ", ".join(f"{n} {verb}" for verb, n in sorted(counts.items()))
          + f" (project {settings.project})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
