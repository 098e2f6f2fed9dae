#!/usr/bin/env bash
# Stop what create_cluster.sh and submit_job.sh started: running bucketlens jobs (killed first,
# so the driver's stop() hands unacked messages back to Pub/Sub), the cluster and, when asked,
# the staging bucket with its checkpoints, the Cloud Router with its NAT and the cluster's
# firewall rule. Idempotent: whatever is already gone is skipped. --dry-run prints the gcloud
# lines it would run if everything existed (each active job listed is then killed). `python -m deploy destroy` removes the rest
# (bucket, topics, subscriptions, dataset, service account, IAM).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: teardown.sh --project P --region R [flags] [--dry-run]

  --project                GCP project (BUCKETLENS_PROJECT)     required
  --region                 Dataproc region (BUCKETLENS_REGION)  required
  --cluster                default bucketlens
  --staging-bucket         default <project>-bucketlens-dataproc
  --delete-staging-bucket  yes = also delete the staging bucket and the checkpoints in it
                           (the next job then starts from the subscription's backlog)
  --nat-router             default bucketlens-nat
  --delete-nat-router      yes = also delete the Cloud Router and its NAT (billed while they
                           exist; other internal-IP VMs of the network may rely on them)
  --firewall-rule          default bucketlens-internal
  --delete-firewall-rule   yes = also delete that rule (create_cluster.sh makes it again)
  --dry-run                print the gcloud command lines, one per line, and run none
EOF
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

DRY_RUN_LOOKUP=0 # --dry-run shows the deletions: every lookup "finds" its resource
parse_flags "project region cluster staging-bucket delete-staging-bucket nat-router
  delete-nat-router firewall-rule delete-firewall-rule" "$@"
require project region
apply_defaults
yes_no delete-staging-bucket no
yes_no delete-nat-router no
yes_no delete-firewall-rule no
: "${BUCKETLENS_FIREWALL_RULE:=bucketlens-internal}"

project=(--project "$BUCKETLENS_PROJECT")
where=("${project[@]}" --region "$BUCKETLENS_REGION")

if gc dataproc clusters describe "$BUCKETLENS_CLUSTER" "${where[@]}" >/dev/null 2>&1; then
  while IFS= read -r job; do
    [[ -z $job ]] || gc dataproc jobs kill "$job" "${where[@]}" --quiet
  done < <(gc dataproc jobs list "${where[@]}" --cluster "$BUCKETLENS_CLUSTER" \
    --state-filter active --filter 'labels.app=bucketlens' --format 'value(reference.jobId)')
  gc dataproc clusters delete "$BUCKETLENS_CLUSTER" "${where[@]}" --quiet
else
  note "cluster $BUCKETLENS_CLUSTER: absent"
fi

if [[ $BUCKETLENS_DELETE_NAT_ROUTER == yes ]] &&
  gc compute routers describe "$BUCKETLENS_NAT_ROUTER" "${where[@]}" >/dev/null 2>&1; then
  gc compute routers delete "$BUCKETLENS_NAT_ROUTER" "${where[@]}" --quiet
fi

if [[ $BUCKETLENS_DELETE_FIREWALL_RULE == yes ]] &&
  gc compute firewall-rules describe "$BUCKETLENS_FIREWALL_RULE" "${project[@]}" >/dev/null 2>&1; then
  gc compute firewall-rules delete "$BUCKETLENS_FIREWALL_RULE" "${project[@]}" --quiet
fi

if [[ $BUCKETLENS_DELETE_STAGING_BUCKET == yes ]]; then
  staging=gs://$BUCKETLENS_STAGING_BUCKET
  if gc storage buckets describe "$staging" "${project[@]}" >/dev/null 2>&1; then
    gc storage rm --recursive "$staging" "${project[@]}"
  fi
fi
