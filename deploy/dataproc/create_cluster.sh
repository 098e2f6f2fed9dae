#!/usr/bin/env bash
# Create the fixed-size Dataproc cluster the streaming job runs on: Spark 4 image, the job's
# service account, an init action that installs torch, torchvision and bucketlens on every node,
# and a way out to PyPI (Cloud NAT, or external IPs with --public-ip-address yes). No
# autoscaling policy: Dataproc autoscaling does not support Spark Structured Streaming, so the
# cluster is resized by hand (deploy/README.md). Safe to re-run: the staging bucket, its grant,
# the router, the NAT and the firewall rule are created only if missing, the cluster only if it
# does not exist. --dry-run prints the gcloud lines it would run in a fresh project, one per line.
set -euo pipefail

usage() {
  cat <<'EOF_USAGE'
usage: create_cluster.sh --project P --region R --package WHEEL|gs://...|PIP-SPEC [flags] [--dry-run]

  --project              GCP project (BUCKETLENS_PROJECT)                       required
  --region               Dataproc region, e.g. us-central1 (BUCKETLENS_REGION)  required
  --package              bucketlens to install: a local wheel (uploaded), a gs:// wheel or
                         a pip requirement (BUCKETLENS_PACKAGE)                 required
  --cluster              cluster name (default bucketlens)
  --image-version        Dataproc image (default 3.0.2-debian13: Spark 4.1.2, Pixi Python 3.12)
  --staging-bucket       Dataproc staging and temp bucket, also holds the init action, the
                         wheel and the checkpoints (default <project>-bucketlens-dataproc)
  --service-account      the job's identity (default bucketlens-job, as made by
                         `python -m deploy apply`)
  --master-machine-type  default n2-standard-4
  --worker-machine-type  default n2-standard-8
  --num-workers          workers, fixed (default 2; resize: deploy/README.md section 3)
  --torch-index-url      where torch/torchvision wheels come from (default: PyTorch's CPU index)
  --public-ip-address    yes = give the VMs external IPs; no (default) = internal IPs only,
                         reaching PyPI through Cloud NAT on --network, created if missing
  --network              VPC network of the cluster and the NAT (default default)
  --subnet               its subnet in --region (default: the network's name, as in the
                         auto-mode default network); Private Google Access is turned on
                         there for internal-IP VMs
  --nat-router           Cloud Router holding the NAT (default bucketlens-nat); a router that
                         has a NAT already is used as it is
  --firewall-rule        ingress rule letting the cluster's VMs (network tag bucketlens) reach
                         each other on --network, created if missing (default bucketlens-internal)
  --dry-run              print the gcloud command lines, one per line, and run none

Every flag can be given as its BUCKETLENS_* variable instead (--image-version → BUCKETLENS_IMAGE_VERSION).
EOF_USAGE
}

# Image 3.0 has Spark 4: the Python streaming data source API needs Spark >= 4. Pinned to a
# subminor release (GA 3.0.0-3.0.2: Spark 4.1.2, Pixi with Python 3.12, Java 21; Dataproc's
# image-release-3.0 page), so a re-created cluster runs what was tested; 3.0-debian12 was only
# ever the 3.0.0-RC1 preview (Spark 4.0.0, micromamba).
DEFAULT_IMAGE_VERSION=3.0.2-debian13
STAGING_BUCKET_ROLE=roles/storage.objectUser # deploy/iam.py STAGING_BUCKET_ROLE (a test keeps them equal)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

parse_flags "project region package cluster image-version staging-bucket service-account
  master-machine-type worker-machine-type num-workers torch-index-url public-ip-address
  network subnet nat-router firewall-rule" "$@"
require project region package
apply_defaults
yes_no public-ip-address no
: "${BUCKETLENS_IMAGE_VERSION:=$DEFAULT_IMAGE_VERSION}"
: "${BUCKETLENS_MASTER_MACHINE_TYPE:=$DEFAULT_MASTER_MACHINE_TYPE}"
: "${BUCKETLENS_WORKER_MACHINE_TYPE:=$DEFAULT_WORKER_MACHINE_TYPE}"
: "${BUCKETLENS_NUM_WORKERS:=$DEFAULT_NUM_WORKERS}"
: "${BUCKETLENS_FIREWALL_RULE:=bucketlens-internal}"
: "${BUCKETLENS_TORCH_INDEX_URL:=https://download.pytorch.org/whl/cpu}"
: "${BUCKETLENS_NETWORK:=default}"
: "${BUCKETLENS_SUBNET:=$BUCKETLENS_NETWORK}"

metadata_safe package torch-index-url
[[ $BUCKETLENS_IMAGE_VERSION == [3-9].* ]] ||
  die "--image-version $BUCKETLENS_IMAGE_VERSION has Spark < 4; bucketlens needs Spark 4 (use $DEFAULT_IMAGE_VERSION or newer)"

project=(--project "$BUCKETLENS_PROJECT")
where=("${project[@]}" --region "$BUCKETLENS_REGION")
staging=gs://$BUCKETLENS_STAGING_BUCKET
artifacts=$staging/bucketlens

if ! gc storage buckets describe "$staging" "${project[@]}" >/dev/null 2>&1; then
  gc storage buckets create "$staging" "${project[@]}" --location "$BUCKETLENS_REGION" \
    --uniform-bucket-level-access
fi
# The job's project-wide worker role cannot write objects (deploy/iam.py): Dataproc's staging
# and temp files, driver output and the checkpoints are written here, under this grant only.
gc storage buckets add-iam-policy-binding "$staging" "${project[@]}" \
  --member "serviceAccount:$BUCKETLENS_SERVICE_ACCOUNT" --role "$STAGING_BUCKET_ROLE" >/dev/null

gc storage cp "$here/init_action.sh" "$artifacts/init_action.sh"
package=$BUCKETLENS_PACKAGE
if [[ -f $package ]]; then
  gc storage cp "$package" "$artifacts/${package##*/}"
  package=$artifacts/${package##*/}
fi

# Image 2.2+ VMs get internal IPs only: the init action's PyPI and PyTorch downloads then go
# through Cloud NAT, and Dataproc itself needs Private Google Access on the subnet.
if [[ $BUCKETLENS_PUBLIC_IP_ADDRESS == yes ]]; then
  egress=(--public-ip-address)
else
  egress=()
  router=$BUCKETLENS_NAT_ROUTER
  if ! gc compute routers describe "$router" "${where[@]}" >/dev/null 2>&1; then
    gc compute routers create "$router" "${where[@]}" --network "$BUCKETLENS_NETWORK"
  fi
  if [[ -z $(gc compute routers nats list --router "$router" "${where[@]}" --format 'value(name)') ]]; then
    gc compute routers nats create "$router" --router "$router" "${where[@]}" \
      --auto-allocate-nat-external-ips --nat-all-subnet-ip-ranges
  fi
  if [[ $(gc compute networks subnets describe "$BUCKETLENS_SUBNET" "${where[@]}" \
    --format 'value(privateIpGoogleAccess)') != True ]]; then
    gc compute networks subnets update "$BUCKETLENS_SUBNET" "${where[@]}" \
      --enable-private-ip-google-access
  fi
fi

# The intra-cluster traffic (YARN, HDFS, Spark's shuffle and RPC) Dataproc needs on every
# port between the cluster's VMs: the default network's default-allow-internal rule allows it,
# any other network needs its own (Dataproc cluster network configuration docs). One rule for
# the VMs tagged bucketlens, on whatever network the cluster uses.
if ! gc compute firewall-rules describe "$BUCKETLENS_FIREWALL_RULE" "${project[@]}" >/dev/null 2>&1; then
  gc compute firewall-rules create "$BUCKETLENS_FIREWALL_RULE" "${project[@]}" \
    --network "$BUCKETLENS_NETWORK" --direction INGRESS --allow tcp,udp,icmp \
    --source-tags "$NETWORK_TAG" --target-tags "$NETWORK_TAG" \
    --description "bucketlens: traffic between the Dataproc cluster VMs"
fi

if gc dataproc clusters describe "$BUCKETLENS_CLUSTER" "${where[@]}" >/dev/null 2>&1; then
  echo "cluster $BUCKETLENS_CLUSTER exists already; delete it with teardown.sh to recreate it" >&2
  exit 0
fi

gc dataproc clusters create "$BUCKETLENS_CLUSTER" "${where[@]}" \
  --image-version "$BUCKETLENS_IMAGE_VERSION" \
  --service-account "$BUCKETLENS_SERVICE_ACCOUNT" --scopes cloud-platform \
  --bucket "$BUCKETLENS_STAGING_BUCKET" --temp-bucket "$BUCKETLENS_STAGING_BUCKET" \
  --subnet "$BUCKETLENS_SUBNET" --tags "$NETWORK_TAG" "${egress[@]}" \
  --master-machine-type "$BUCKETLENS_MASTER_MACHINE_TYPE" \
  --worker-machine-type "$BUCKETLENS_WORKER_MACHINE_TYPE" \
  --num-workers "$BUCKETLENS_NUM_WORKERS" \
  --initialization-actions "$artifacts/init_action.sh" \
  --initialization-action-timeout 20m \
  --metadata "bucketlens-package=$package,torch-index-url=$BUCKETLENS_TORCH_INDEX_URL" \
  --enable-component-gateway \
  --labels app=bucketlens
