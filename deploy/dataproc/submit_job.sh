#!/usr/bin/env bash
# Submit `bucketlens run` to the Dataproc cluster as a restartable streaming job.
#
# The driver runs in YARN cluster mode, so its environment comes from Spark properties: the
# BUCKETLENS_* variables of this shell that name a Settings field (and the flags below) are
# forwarded to the driver and the executors, which is how `bucketlens run` finds its project,
# subscription and dataset; no other variable leaves this shell. The
# checkpoint lives on GCS, so a restarted driver (Dataproc restarts it up to
# --max-failures-per-hour times) resumes where the last committed batch ended.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: submit_job.sh --project P --region R [flags] [-- extra `bucketlens run` flags]

  --project          GCP project (BUCKETLENS_PROJECT)                  required
  --region           Dataproc region (BUCKETLENS_REGION)               required
  --cluster          cluster name (default bucketlens)
  --checkpoint       gs:// checkpoint directory (default
                     gs://<staging-bucket>/checkpoints/<table>); never inside the watched
                     bucket's notified prefix, or the job would notify itself
  --staging-bucket   default <project>-bucketlens-dataproc
  --bucket, --prefix, --subscription, --dataset, --table, --model, --weights
                     forwarded to the job like every other Settings field's BUCKETLENS_* variable
  --max-failures-per-hour  driver restarts Dataproc allows (default 5)

Example: submit_job.sh --project my-proj --region us-central1 -- --trigger-seconds 5
EOF
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

parse_flags "project region cluster checkpoint staging-bucket bucket prefix subscription dataset
  table model weights max-failures-per-hour" "$@"
require project region
refuse_emulator
apply_defaults
: "${BUCKETLENS_MAX_FAILURES_PER_HOUR:=5}"
: "${BUCKETLENS_CHECKPOINT:=gs://$BUCKETLENS_STAGING_BUCKET/checkpoints/${BUCKETLENS_TABLE:-predictions}}"
# No master is passed: under spark-submit the job keeps the one Dataproc chose (YARN), which
# is also what Serverless requires (pipeline.spark.session).

[[ $BUCKETLENS_CHECKPOINT == gs://* ]] ||
  die "--checkpoint must be a gs:// URI (got '$BUCKETLENS_CHECKPOINT'): a cluster restart must find it"
if [[ -n ${BUCKETLENS_BUCKET:-} && $BUCKETLENS_CHECKPOINT/ == "gs://$BUCKETLENS_BUCKET/${BUCKETLENS_PREFIX:-}"* ]]; then
  die "--checkpoint $BUCKETLENS_CHECKPOINT is inside gs://$BUCKETLENS_BUCKET/${BUCKETLENS_PREFIX:-}, whose uploads are notified: the job would classify its own checkpoint files"
fi

# Forward the job's settings (SETTINGS_VARS: the Settings fields, nothing else) to the driver
# (YARN application master) and executors. Properties are joined with '|' (gcloud's ^|^
# delimiter syntax) so values may hold commas. Region and service account configure the
# deployment, not the job, and stay here.
properties=(spark.submit.deployMode=cluster)
for name in "${SETTINGS_VARS[@]}"; do
  [[ $name != REGION && $name != SERVICE_ACCOUNT ]] || continue
  name=BUCKETLENS_$name
  value=${!name:-}
  [[ -n $value ]] || continue
  [[ $value != *'|'* ]] || die "$name contains '|', which cannot be forwarded"
  properties+=("spark.yarn.appMasterEnv.$name=$value" "spark.executorEnv.$name=$value")
done
joined=$(IFS='|'; echo "${properties[*]}")

# bucketlens_job.py, next to this script, is the `bucketlens` command as a file Dataproc can run.
gcloud dataproc jobs submit pyspark "$here/bucketlens_job.py" \
  --project "$BUCKETLENS_PROJECT" --region "$BUCKETLENS_REGION" --cluster "$BUCKETLENS_CLUSTER" \
  --max-failures-per-hour "$BUCKETLENS_MAX_FAILURES_PER_HOUR" \
  --properties "^|^$joined" \
  --labels app=bucketlens \
  --async \
  -- run --checkpoint "$BUCKETLENS_CHECKPOINT" "${EXTRA_ARGS[@]}"

echo "submitted; follow it with: gcloud dataproc jobs list --cluster $BUCKETLENS_CLUSTER --region $BUCKETLENS_REGION --project $BUCKETLENS_PROJECT" >&2
