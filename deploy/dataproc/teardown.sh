#!/usr/bin/env bash
# Stop what create_cluster.sh and submit_job.sh started: running bucketlens jobs (killed first,
# so the driver's stop() hands unacked messages back to Pub/Sub), the cluster, the autoscaling
# policy and, with --delete-staging-bucket yes, the staging bucket with its checkpoints.
# Idempotent: whatever is already gone is skipped. `python -m deploy destroy` removes the rest
# (bucket, topics, subscriptions, dataset, service account, IAM).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: teardown.sh --project P --region R [flags]

  --project                GCP project (BUCKETLENS_PROJECT)     required
  --region                 Dataproc region (BUCKETLENS_REGION)  required
  --cluster                default bucketlens
  --autoscaling-policy     default bucketlens-streaming
  --staging-bucket         default <project>-bucketlens-dataproc
  --delete-staging-bucket  yes = also delete the staging bucket and the checkpoints in it
                           (the next job then starts from the subscription's backlog)
EOF
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

parse_flags "project region cluster autoscaling-policy staging-bucket delete-staging-bucket" "$@"
require project region
apply_defaults
case ${BUCKETLENS_DELETE_STAGING_BUCKET:=no} in
  yes | no) ;;
  *) die "--delete-staging-bucket takes yes or no, not '$BUCKETLENS_DELETE_STAGING_BUCKET'" ;;
esac

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

if gcloud dataproc autoscaling-policies describe "$BUCKETLENS_AUTOSCALING_POLICY" "${where[@]}" >/dev/null 2>&1; then
  gcloud dataproc autoscaling-policies delete "$BUCKETLENS_AUTOSCALING_POLICY" "${where[@]}" --quiet
fi

if [[ $BUCKETLENS_DELETE_STAGING_BUCKET == yes ]]; then
  staging=gs://$BUCKETLENS_STAGING_BUCKET
  if gcloud storage buckets describe "$staging" "${project[@]}" >/dev/null 2>&1; then
    gcloud storage rm --recursive "$staging" "${project[@]}"
  fi
fi
