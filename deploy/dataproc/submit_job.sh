#!/usr/bin/env bash
# Submit `bucketlens run` to the Dataproc cluster as a restartable streaming job.
#
# The driver runs in YARN cluster mode, so its environment comes from Spark properties: the
# BUCKETLENS_* variables of this shell that name a Settings field (and the flags below) are
# forwarded to the driver and the executors, which is how `bucketlens run` finds its project,
# subscription and dataset; no other variable leaves this shell. The
# checkpoint lives on GCS, so a restarted driver (Dataproc restarts it up to
# --max-failures-per-hour times) resumes where the last committed batch ended.
#
# Parallelism follows the cluster: the stream runs one executor per worker holding all of its
# vCPUs, with dynamic allocation off (Dataproc autoscaling and YARN's dynamic allocation do not
# fit a query that never ends: an executor it released would take its cached model with it and
# the partitions would not follow), and BUCKETLENS_NUM_PARTITIONS = workers x vCPUs, read from
# the cluster. After a resize, submit again (deploy/README.md section 3).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: submit_job.sh --project P --region R [flags] [--dry-run] [-- extra `bucketlens run` flags]

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
  --num-partitions   tasks per micro-batch (default: the cluster's workers x vCPUs per worker)
  --dry-run          print the gcloud command lines, one per line, and run none (the cluster's
                     shape is then create_cluster.sh's default unless --num-partitions is given)

Example: submit_job.sh --project my-proj --region us-central1 -- --trigger-seconds 5
EOF
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

parse_flags "project region cluster checkpoint staging-bucket bucket prefix subscription dataset
  table model weights max-failures-per-hour num-partitions" "$@"
require project region
refuse_emulator
apply_defaults
: "${BUCKETLENS_MAX_FAILURES_PER_HOUR:=5}"
: "${BUCKETLENS_CHECKPOINT:=gs://$BUCKETLENS_STAGING_BUCKET/checkpoints/${BUCKETLENS_TABLE:-predictions}}"
# No master is passed: under spark-submit the job keeps the one Dataproc chose (YARN), which
# is also what Serverless requires (pipeline.stream.spark.session).

[[ $BUCKETLENS_CHECKPOINT == gs://* ]] ||
  die "--checkpoint must be a gs:// URI (got '$BUCKETLENS_CHECKPOINT'): a cluster restart must find it"
if [[ -n ${BUCKETLENS_BUCKET:-} && $BUCKETLENS_CHECKPOINT/ == "gs://$BUCKETLENS_BUCKET/${BUCKETLENS_PREFIX:-}"* ]]; then
  die "--checkpoint $BUCKETLENS_CHECKPOINT is inside gs://$BUCKETLENS_BUCKET/${BUCKETLENS_PREFIX:-}, whose uploads are notified: the job would classify its own checkpoint files"
fi

# The cluster's shape: workers and the vCPUs of each (one executor per worker, all its cores).
shape=$(gc dataproc clusters describe "$BUCKETLENS_CLUSTER" --project "$BUCKETLENS_PROJECT" \
  --region "$BUCKETLENS_REGION" \
  --format 'value(config.workerConfig.numInstances,config.workerConfig.machineTypeUri)') || true
read -r workers machine_type <<<"$shape" || true
if [[ -z $shape && -n $DRY_RUN ]]; then
  workers=$DEFAULT_NUM_WORKERS machine_type=$DEFAULT_WORKER_MACHINE_TYPE
  note "--dry-run: sized for create_cluster.sh's default cluster ($workers x $machine_type)"
fi
vcpus=$(vcpus_of "${machine_type:-}")
[[ ${workers:-} =~ ^[1-9][0-9]*$ && -n $vcpus ]] ||
  die "cannot tell the workers and vCPUs of cluster $BUCKETLENS_CLUSTER (got '${shape//$'\t'/ }'); is it up? (--num-partitions N sets the parallelism by hand)"
: "${BUCKETLENS_NUM_PARTITIONS:=$((workers * vcpus))}"
[[ $BUCKETLENS_NUM_PARTITIONS =~ ^[1-9][0-9]*$ ]] || die "--num-partitions takes a positive integer, not '$BUCKETLENS_NUM_PARTITIONS'"

# Forward the job's settings (SETTINGS_VARS: the Settings fields, nothing else) to the driver
# (YARN application master) and executors. Properties are joined with '|' (gcloud's ^|^
# delimiter syntax) so values may hold commas. Region and service account configure the
# deployment, not the job, and stay here.
properties=(spark.submit.deployMode=cluster spark.dynamicAllocation.enabled=false
  "spark.executor.instances=$workers" "spark.executor.cores=$vcpus")
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
gc dataproc jobs submit pyspark "$here/bucketlens_job.py" \
  --project "$BUCKETLENS_PROJECT" --region "$BUCKETLENS_REGION" --cluster "$BUCKETLENS_CLUSTER" \
  --max-failures-per-hour "$BUCKETLENS_MAX_FAILURES_PER_HOUR" \
  --properties "^|^$joined" \
  --labels app=bucketlens \
  --async \
  -- run --checkpoint "$BUCKETLENS_CHECKPOINT" "${EXTRA_ARGS[@]}"

[[ -n $DRY_RUN ]] || note "submitted ($BUCKETLENS_NUM_PARTITIONS partitions: $workers workers x $vcpus vCPUs); follow it with: gcloud dataproc jobs list --cluster $BUCKETLENS_CLUSTER --region $BUCKETLENS_REGION --project $BUCKETLENS_PROJECT"
