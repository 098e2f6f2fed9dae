#!/usr/bin/env bash
# Submit `bucketlens run` to Serverless for Apache Spark (runtime 3.0) as a batch: no cluster,
# billed per DCU-hour while it runs.
#
# What Serverless needs that a cluster does not:
# - a custom container (deploy/dataproc/Dockerfile): runtime 3.0 installs nothing at start, so
#   the image holds the wheel, its dependencies and the model weights (Spark is mounted in);
# - the job's settings as Spark properties: every BUCKETLENS_* variable of this shell that names
#   a Settings field (SETTINGS_VARS) goes to the driver (spark.dataproc.driverEnv.*) and the
#   executors (spark.executorEnv.*); without BUCKETLENS_BUCKET every notification would be
#   "another bucket", acked and never classified. No other variable leaves this shell;
# - --user-workload-authentication-type SERVICE_ACCOUNT: runtime 3.0 otherwise runs the workload
#   with the submitter's own credentials, not the job's service account (Serverless service
#   accounts docs), and the Dataproc Resource Manager API (dataprocrm.googleapis.com) enabled;
# - a fixed size: dynamic allocation off, --executors x --executor-cores tasks per micro-batch
#   (BUCKETLENS_NUM_PARTITIONS), as on the cluster (submit_job.sh).
# A batch ends at its --ttl (at most 14 days): submit it again with the same checkpoint and it
# resumes where the last one stopped.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: submit_batch.sh --project P --region R --container-image IMAGE [flags] [--dry-run]
                       [-- extra `bucketlens run` flags]

  --project          GCP project (BUCKETLENS_PROJECT)                  required
  --region           Serverless region (BUCKETLENS_REGION)             required
  --container-image  the image deploy/dataproc/Dockerfile builds, in Artifact Registry, e.g.
                     us-central1-docker.pkg.dev/P/bucketlens/job:0.1.0  required
  --runtime-version  Serverless runtime (default 3.0: Spark 4.0, Python 3.12)
  --service-account  the job's identity (default bucketlens-job, as made by `python -m deploy apply`)
  --staging-bucket   where gcloud uploads bucketlens_job.py and the checkpoints live
                     (default <project>-bucketlens-dataproc, made by create_cluster.sh or by hand)
  --checkpoint       gs:// checkpoint directory (default gs://<staging-bucket>/checkpoints/<table>)
  --executors        executors, fixed (default 2, Serverless' minimum)
  --executor-cores   cores per executor: 4, 8 or 16 (default 4)
  --num-partitions   tasks per micro-batch (default executors x executor-cores)
  --ttl              the batch ends after this long (default 14d, the maximum)
  --network, --subnet  at most one: where the batch's VMs live (the subnet needs Private Google
                     Access; default: the default network)
  --batch            batch ID (default: one gcloud makes up)
  --bucket, --prefix, --subscription, --dataset, --table, --model, --weights
                     forwarded to the job like every other Settings field's BUCKETLENS_* variable
  --dry-run          print the gcloud command line and run nothing

Every flag can be given as its BUCKETLENS_* variable instead (--container-image → BUCKETLENS_CONTAINER_IMAGE).
EOF
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

parse_flags "project region container-image runtime-version service-account staging-bucket
  checkpoint executors executor-cores num-partitions ttl network subnet batch bucket prefix
  subscription dataset table model weights" "$@"
require project region container-image
refuse_emulator
apply_defaults
: "${BUCKETLENS_RUNTIME_VERSION:=3.0}"
: "${BUCKETLENS_EXECUTORS:=2}"
: "${BUCKETLENS_EXECUTOR_CORES:=4}"
: "${BUCKETLENS_TTL:=14d}"
: "${BUCKETLENS_CHECKPOINT:=gs://$BUCKETLENS_STAGING_BUCKET/checkpoints/${BUCKETLENS_TABLE:-predictions}}"

[[ $BUCKETLENS_RUNTIME_VERSION == [3-9].* ]] ||
  die "--runtime-version $BUCKETLENS_RUNTIME_VERSION has Spark < 4; bucketlens needs Spark 4 (runtime 3.0 or newer)"
[[ $BUCKETLENS_EXECUTORS =~ ^([2-9]|[1-9][0-9]+)$ ]] ||
  die "--executors takes an integer of at least 2 (Serverless' minimum), not '$BUCKETLENS_EXECUTORS'"
[[ $BUCKETLENS_EXECUTOR_CORES =~ ^(4|8|16)$ ]] ||
  die "--executor-cores takes 4, 8 or 16 (what Serverless allows), not '$BUCKETLENS_EXECUTOR_CORES'"
: "${BUCKETLENS_NUM_PARTITIONS:=$((BUCKETLENS_EXECUTORS * BUCKETLENS_EXECUTOR_CORES))}"
[[ -z ${BUCKETLENS_NETWORK:-} || -z ${BUCKETLENS_SUBNET:-} ]] ||
  die "give --network or --subnet, not both (gcloud takes at most one)"
[[ $BUCKETLENS_CHECKPOINT == gs://* ]] ||
  die "--checkpoint must be a gs:// URI (got '$BUCKETLENS_CHECKPOINT'): the next batch must find it"
if [[ -n ${BUCKETLENS_BUCKET:-} && $BUCKETLENS_CHECKPOINT/ == "gs://$BUCKETLENS_BUCKET/${BUCKETLENS_PREFIX:-}"* ]]; then
  die "--checkpoint $BUCKETLENS_CHECKPOINT is inside gs://$BUCKETLENS_BUCKET/${BUCKETLENS_PREFIX:-}, whose uploads are notified: the job would classify its own checkpoint files"
fi

# Every Settings field set here, to the driver and to each executor; '|' joins them (gcloud's
# ^|^ delimiter syntax) so values may hold commas.
properties=(spark.dynamicAllocation.enabled=false "spark.executor.instances=$BUCKETLENS_EXECUTORS"
  "spark.executor.cores=$BUCKETLENS_EXECUTOR_CORES")
for name in "${SETTINGS_VARS[@]}"; do
  name=BUCKETLENS_$name
  value=${!name:-}
  [[ -n $value ]] || continue
  [[ $value != *'|'* ]] || die "$name contains '|', which cannot be forwarded"
  properties+=("spark.dataproc.driverEnv.$name=$value" "spark.executorEnv.$name=$value")
done
joined=$(IFS='|'; echo "${properties[*]}")

where=()
[[ -z ${BUCKETLENS_NETWORK:-} ]] || where=(--network "$BUCKETLENS_NETWORK")
[[ -z ${BUCKETLENS_SUBNET:-} ]] || where=(--subnet "$BUCKETLENS_SUBNET")
[[ -z ${BUCKETLENS_BATCH:-} ]] || where+=(--batch "$BUCKETLENS_BATCH")

gc dataproc batches submit pyspark "$here/bucketlens_job.py" \
  --project "$BUCKETLENS_PROJECT" --region "$BUCKETLENS_REGION" \
  --version "$BUCKETLENS_RUNTIME_VERSION" --container-image "$BUCKETLENS_CONTAINER_IMAGE" \
  --service-account "$BUCKETLENS_SERVICE_ACCOUNT" \
  --user-workload-authentication-type SERVICE_ACCOUNT \
  --deps-bucket "gs://$BUCKETLENS_STAGING_BUCKET" --ttl "$BUCKETLENS_TTL" "${where[@]}" \
  --properties "^|^$joined" \
  --labels app=bucketlens \
  --async \
  -- run --checkpoint "$BUCKETLENS_CHECKPOINT" "${EXTRA_ARGS[@]}"

[[ -n $DRY_RUN ]] || note "submitted; follow it with: gcloud dataproc batches list --region $BUCKETLENS_REGION --project $BUCKETLENS_PROJECT --filter labels.app=bucketlens"
