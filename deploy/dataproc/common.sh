# shellcheck shell=bash disable=SC2034 # EXTRA_ARGS, SETTINGS_VARS, defaults are read by the scripts sourcing this file
# Shared by the deploy/dataproc scripts (sourced, not run): flags, required values, defaults.
#
# Every flag --foo-bar VALUE (or --foo-bar=VALUE) sets BUCKETLENS_FOO_BAR, and every such
# variable may come from the environment instead: the scripts read the same BUCKETLENS_*
# names as `python -m deploy` and `bucketlens run`, so one env file configures them all.
# Arguments after `--` are kept in EXTRA_ARGS for the script to pass on.

EXTRA_ARGS=()
DRY_RUN=
# With --dry-run, what a lookup (describe, list) answers: 1 = "not found", as in a fresh project
# (create_cluster.sh shows everything it would create); 0 = "found" (teardown.sh shows what it
# would delete). Lookups print nothing either way.
DRY_RUN_LOOKUP=1
exec 3>&1 # --dry-run prints the gcloud lines here, even from inside $(...) and >/dev/null

# The cluster create_cluster.sh makes unless told otherwise; submit_job.sh sizes the stream
# from the real cluster, and from these under --dry-run.
DEFAULT_NUM_WORKERS=2
DEFAULT_WORKER_MACHINE_TYPE=n2-standard-8
DEFAULT_MASTER_MACHINE_TYPE=n2-standard-4
# Network tag of the cluster's VMs: the intra-cluster firewall rule admits traffic between them.
NETWORK_TAG=bucketlens

# The fields of pipeline.config.Settings, as BUCKETLENS_<NAME> suffixes: the only variables
# submit_job.sh forwards to the job (tests/test_deploy.py keeps this list equal to the fields),
# so an unrelated BUCKETLENS_* secret in the deployer's shell never reaches the cluster.
SETTINGS_VARS=(
  PROJECT BUCKET PREFIX TOPIC SUBSCRIPTION DEAD_LETTER_TOPIC DATASET TABLE DEAD_LETTER_TABLE
  EVENTS_TABLE BQ_ENDPOINT PUBSUB_EMULATOR_HOST STORAGE_EMULATOR_HOST BQ_STORAGE_ENDPOINT SINK_MODE BQ_QUOTA_PATIENCE_SECONDS BQ_LOCATION
  REGION SERVICE_ACCOUNT MODEL WEIGHTS MODEL_REFRESH_SECONDS EMBEDDINGS BATCH_SIZE TORCH_THREADS MALLOC_KEEP_MB TOP_K MIN_CONFIDENCE CHECKPOINT
  TRIGGER_SECONDS MAX_MESSAGES_PER_BATCH MAX_BUFFERED_BYTES NUM_PARTITIONS ACK_DEADLINE_SECONDS
  MAX_DELIVERY_ATTEMPTS FETCH_THREADS FETCH_TIMEOUT_SECONDS MAX_BYTES MAX_PIXELS SPARK_MASTER
  SPARK_LOG SINK METRICS_PORT JSONL_URI ALERTS ALERT_TOPIC DRIFT_WINDOW DRIFT_BASELINE
)

die() {
  printf '%s: %s\n' "${0##*/}" "$*" >&2
  exit 2
}

# parse_flags "name1 name2 ..." "$@": only the listed flag names are accepted (any whitespace,
# newlines included, separates them). Values, from flags or from the environment alike, must
# not start with '-': one would become a gcloud flag (--cluster=--zone=x).
parse_flags() {
  local -a allowed
  local name value known var
  read -r -d '' -a allowed <<<"$1" || true
  shift
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift; continue ;;
      --) shift; EXTRA_ARGS=("$@"); break ;;
      --*=*) name=${1%%=*} value=${1#*=}; shift ;;
      --*) (($# >= 2)) || die "$1 needs a value (see --help)"; name=$1 value=$2; shift 2 ;;
      *) die "unexpected argument '$1' (see --help)" ;;
    esac
    name=${name#--}
    known=
    for var in "${allowed[@]}"; do [[ $name != "$var" ]] || known=1; done
    [[ -n $known ]] || die "unknown flag --$name (see --help)"
    var=${name//-/_}
    printf -v "BUCKETLENS_${var^^}" '%s' "$value"
  done
  for name in "${allowed[@]}"; do
    var=${name//-/_}
    var=BUCKETLENS_${var^^}
    [[ ${!var:-} != -* ]] || die "--$name ${!var@Q} starts with '-', which gcloud would read as a flag; refused"
  done
}

# require flag-name...: each must be set, by flag or by its BUCKETLENS_* variable.
require() {
  local flag var
  for flag; do
    var=${flag//-/_}
    var=BUCKETLENS_${var^^}
    [[ -n ${!var:-} ]] || die "missing --$flag (or $var); see --help"
  done
}

# metadata_safe flag-name...: each value goes into gcloud's --metadata KEY=VALUE,... list, which
# the init action reads as root: a comma would smuggle in another key, whitespace or a control
# character another argument.
metadata_safe() {
  local flag var
  for flag; do
    var=${flag//-/_}
    var=BUCKETLENS_${var^^}
    [[ ${!var:-} != *[,[:space:][:cntrl:]]* ]] ||
      die "--$flag ${!var@Q} contains a comma, whitespace or a control character, which cluster metadata cannot carry; refused"
  done
}

# Defaults derived from the project, shared so create/submit/teardown agree on names.
apply_defaults() {
  : "${BUCKETLENS_CLUSTER:=bucketlens}"
  : "${BUCKETLENS_STAGING_BUCKET:=${BUCKETLENS_PROJECT}-bucketlens-dataproc}"
  : "${BUCKETLENS_SERVICE_ACCOUNT:=bucketlens-job}"
  : "${BUCKETLENS_NAT_ROUTER:=bucketlens-nat}"
  if [[ $BUCKETLENS_SERVICE_ACCOUNT != *@* ]]; then
    BUCKETLENS_SERVICE_ACCOUNT=$BUCKETLENS_SERVICE_ACCOUNT@$BUCKETLENS_PROJECT.iam.gserviceaccount.com
  fi
}

# yes_no flag-name default: the flag's value, checked to be yes or no.
yes_no() {
  local var=${1//-/_}
  var=BUCKETLENS_${var^^}
  printf -v "$var" '%s' "${!var:-$2}"
  [[ ${!var} == yes || ${!var} == no ]] || die "--$1 takes yes or no, not '${!var}'"
}

# The job must not inherit a shell pointed at the local emulator stack.
refuse_emulator() {
  local var
  for var in STORAGE_EMULATOR_HOST PUBSUB_EMULATOR_HOST BUCKETLENS_BQ_ENDPOINT BUCKETLENS_BQ_STORAGE_ENDPOINT; do
    [[ -z ${!var:-} ]] || die "$var is set: this shell points at the local stack; unset it (or open a fresh shell) to deploy to GCP"
  done
}

# quote WORD...: the words as one shell line, quoted only where a shell needs it, so a printed
# line can be pasted as it is.
quote() {
  local word out=()
  for word; do
    if [[ $word =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=("$word"); else out+=("${word@Q}"); fi
  done
  printf '%s\n' "${out[*]}"
}

# gc ARGS...: gcloud ARGS, or under --dry-run the exact line, printed on stdout (fd 3), one per
# line; nothing runs, so no credentials or network are needed. A lookup then answers
# DRY_RUN_LOOKUP with no output.
gc() {
  if [[ -n $DRY_RUN ]]; then
    quote gcloud "$@" >&3
    case " $* " in
      *" describe "* | *" list "*) return "$DRY_RUN_LOOKUP" ;;
    esac
    return 0
  fi
  gcloud "$@"
}

# note TEXT: a remark for the operator (stderr), so --dry-run's stdout holds gcloud lines only.
note() {
  printf '%s: %s\n' "${0##*/}" "$*" >&2
}

# vcpus_of MACHINE_TYPE: the vCPUs of a Compute Engine machine type, from its name (predefined
# types end in their vCPU count, custom ones are FAMILY-custom-VCPUS-MEMORY, the shared-core e2
# types have 2), or nothing when the name does not say.
# https://cloud.google.com/compute/docs/machine-resource
vcpus_of() {
  local type=${1##*/}
  if [[ $type =~ -custom-([0-9]+)-[0-9]+(-ext)?$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
  elif [[ $type =~ ^e2-(micro|small|medium)$ ]]; then
    printf '2'
  elif [[ $type =~ ^[a-z0-9]+-[a-z]+-([0-9]+)(-[a-z]+)?$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
  fi
}
