#!/usr/bin/env bash
# Stop what create_cluster.sh and submit_job.sh started: running bucketlens jobs (killed first,
# so the driver's stop() hands unacked messages back to Pub/Sub), the cluster and, when asked,
# the staging bucket with its checkpoints and the Cloud Router with its NAT.
# Idempotent: whatever is already gone is skipped. `python -m deploy destroy` removes the rest
# (bucket, topics, subscriptions, dataset, service account, IAM).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: teardown.sh --project P --region R [flags]

  --project                GCP project (BUCKETLENS_PROJECT)     required
  --region                 Dataproc region (BUCKETLENS_REGION)  required
  --cluster                default bucketlens
  --staging-bucket         default <project>-bucketlens-dataproc
  --delete-staging-bucket  yes = also delete the staging bucket and the checkpoints in it
                           (the next job then starts from the subscription's backlog)
  --nat-router             default bucketlens-nat
  --delete-nat-router      yes = also delete the Cloud Router and its NAT (billed while they
                           exist; other internal-IP VMs of the network may rely on them)
EOF
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

parse_flags "project region cluster staging-bucket delete-staging-bucket nat-router
  delete-nat-router" "$@"
require project region
apply_defaults
yes_no delete-staging-bucket no
yes_no delete-nat-router no

project=(--project "$BUCKETLENS_PROJECT")
where=("${project[@]}" --region "$BUCKETLENS_REGION")

if gcloud dataproc clusters describe "$BUCKETLENS_CLUSTER" "${where[@]}" >/dev/null 2>&1; then
  while IFS= read -r job; do
    [[ -z $job ]] || gcloud dataproc jobs kill "$job" "${where[@]}" --quiet
  done < <(gcloud dataproc jobs list "${where[@]}" --cluster "$BUCKETLENS_CLUSTER" \
    --state-filter active --filter 'labels.app=bucketlens' --format 'value(reference.jobId)')
  gcloud dataproc clusters delete "$BUCKETLENS_CLUSTER" "${where[@]}" --quiet
else
  echo "cluster $BUCKETLENS_CLUSTER: absent" >&2
fi

if [[ $BUCKETLENS_DELETE_NAT_ROUTER == yes ]] &&
  gcloud compute routers describe "$BUCKETLENS_NAT_ROUTER" "${where[@]}" >/dev/null 2>&1; then
  gcloud compute routers delete "$BUCKETLENS_NAT_ROUTER" "${where[@]}" --quiet
fi

if [[ $BUCKETLENS_DELETE_STAGING_BUCKET == yes ]]; then
  staging=gs://$BUCKETLENS_STAGING_BUCKET
  if gcloud storage buckets describe "$staging" "${project[@]}" >/dev/null 2>&1; then
    gcloud storage rm --recursive "$staging" "${project[@]}"
  fi
fi
