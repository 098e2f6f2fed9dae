#!/usr/bin/env bash
# Create the Dataproc cluster the streaming job runs on: Spark 4 image, the job's service
# account, an init action that installs torch, torchvision and bucketlens on every node, and
# an autoscaling policy for secondary workers. Safe to re-run: the staging bucket and the
# policy are created or updated, the cluster is created only if it does not exist.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: create_cluster.sh --project P --region R --package WHEEL|gs://...|PIP-SPEC [flags]

  --project              GCP project (BUCKETLENS_PROJECT)                       required
  --region               Dataproc region, e.g. us-central1 (BUCKETLENS_REGION)  required
  --package              bucketlens to install: a local wheel (uploaded), a gs:// wheel or
                         a pip requirement (BUCKETLENS_PACKAGE)                 required
  --cluster              cluster name (default bucketlens)
  --image-version        Dataproc image (default 3.0-debian12: Spark 4.0, Python 3.11)
  --staging-bucket       Dataproc staging bucket, also holds the init action, the wheel and
                         the checkpoints (default <project>-bucketlens-dataproc)
  --service-account      the job's identity (default bucketlens-job, as made by
                         `python -m deploy apply`)
  --autoscaling-policy   policy id imported from autoscaling.yaml (default bucketlens-streaming)
  --master-machine-type  default n2-standard-4
  --worker-machine-type  default n2-standard-8
  --num-workers          primary workers (default 2; secondary workers come from the policy)
  --torch-index-url      where torch/torchvision wheels come from (default: PyTorch's CPU index)

Every flag can be given as its BUCKETLENS_* variable instead (--image-version → BUCKETLENS_IMAGE_VERSION).
EOF
}

# The Dataproc image with Spark 4.0: the Python streaming data source API needs Spark >= 4.
DEFAULT_IMAGE_VERSION=3.0-debian12

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

parse_flags "project region package cluster image-version staging-bucket service-account
  autoscaling-policy master-machine-type worker-machine-type num-workers torch-index-url" "$@"
require project region package
apply_defaults
: "${BUCKETLENS_IMAGE_VERSION:=$DEFAULT_IMAGE_VERSION}"
: "${BUCKETLENS_MASTER_MACHINE_TYPE:=n2-standard-4}"
: "${BUCKETLENS_WORKER_MACHINE_TYPE:=n2-standard-8}"
: "${BUCKETLENS_NUM_WORKERS:=2}"
: "${BUCKETLENS_TORCH_INDEX_URL:=https://download.pytorch.org/whl/cpu}"

[[ $BUCKETLENS_PACKAGE != *,* ]] ||
  die "--package '$BUCKETLENS_PACKAGE' contains a comma, which cluster metadata cannot carry"
[[ $BUCKETLENS_IMAGE_VERSION == [3-9].* ]] ||
  die "--image-version $BUCKETLENS_IMAGE_VERSION has Spark < 4; bucketlens needs Spark 4 (use $DEFAULT_IMAGE_VERSION or newer)"

project=(--project "$BUCKETLENS_PROJECT")
where=("${project[@]}" --region "$BUCKETLENS_REGION")
staging=gs://$BUCKETLENS_STAGING_BUCKET
artifacts=$staging/bucketlens

if ! gcloud storage buckets describe "$staging" "${project[@]}" >/dev/null 2>&1; then
  gcloud storage buckets create "$staging" "${project[@]}" --location "$BUCKETLENS_REGION" \
    --uniform-bucket-level-access
fi

gcloud storage cp "$here/init_action.sh" "$artifacts/init_action.sh"
package=$BUCKETLENS_PACKAGE
if [[ -f $package ]]; then
  gcloud storage cp "$package" "$artifacts/${package##*/}"
  package=$artifacts/${package##*/}
fi

gcloud dataproc autoscaling-policies import "$BUCKETLENS_AUTOSCALING_POLICY" \
  --source "$here/autoscaling.yaml" "${where[@]}" --quiet

if gcloud dataproc clusters describe "$BUCKETLENS_CLUSTER" "${where[@]}" >/dev/null 2>&1; then
  echo "cluster $BUCKETLENS_CLUSTER exists already; delete it with teardown.sh to recreate it" >&2
  exit 0
fi

gcloud dataproc clusters create "$BUCKETLENS_CLUSTER" "${where[@]}" \
  --image-version "$BUCKETLENS_IMAGE_VERSION" \
  --service-account "$BUCKETLENS_SERVICE_ACCOUNT" --scopes cloud-platform \
  --bucket "$BUCKETLENS_STAGING_BUCKET" \
  --master-machine-type "$BUCKETLENS_MASTER_MACHINE_TYPE" \
  --worker-machine-type "$BUCKETLENS_WORKER_MACHINE_TYPE" \
  --num-workers "$BUCKETLENS_NUM_WORKERS" \
  --autoscaling-policy "$BUCKETLENS_AUTOSCALING_POLICY" \
  --initialization-actions "$artifacts/init_action.sh" \
  --initialization-action-timeout 20m \
  --metadata "bucketlens-package=$package,torch-index-url=$BUCKETLENS_TORCH_INDEX_URL" \
  --enable-component-gateway \
  --labels app=bucketlens
