# shellcheck shell=bash disable=SC2034 # EXTRA_ARGS is read by the scripts sourcing this file
# Shared by the deploy/dataproc scripts (sourced, not run): flags, required values, defaults.
#
# Every flag --foo-bar VALUE (or --foo-bar=VALUE) sets BUCKETLENS_FOO_BAR, and every such
# variable may come from the environment instead: the scripts read the same BUCKETLENS_*
# names as `python -m deploy` and `bucketlens run`, so one env file configures them all.
# Arguments after `--` are kept in EXTRA_ARGS for the script to pass on.

EXTRA_ARGS=()

die() {
  printf '%s: %s\n' "${0##*/}" "$*" >&2
  exit 2
}

# parse_flags "name1 name2 ..." "$@": only the listed flag names are accepted.
parse_flags() {
  local allowed=" $1 " name value
  shift
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --) shift; EXTRA_ARGS=("$@"); return 0 ;;
      --*=*) name=${1%%=*} value=${1#*=}; shift ;;
      --*) (($# >= 2)) || die "$1 needs a value (see --help)"; name=$1 value=$2; shift 2 ;;
      *) die "unexpected argument '$1' (see --help)" ;;
    esac
    name=${name#--}
    [[ $allowed == *" $name "* ]] || die "unknown flag --$name (see --help)"
    name=${name//-/_}
    printf -v "BUCKETLENS_${name^^}" '%s' "$value"
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

# Defaults derived from the project, shared so create/submit/teardown agree on names.
apply_defaults() {
  : "${BUCKETLENS_CLUSTER:=bucketlens}"
  : "${BUCKETLENS_STAGING_BUCKET:=${BUCKETLENS_PROJECT}-bucketlens-dataproc}"
  : "${BUCKETLENS_AUTOSCALING_POLICY:=bucketlens-streaming}"
  : "${BUCKETLENS_SERVICE_ACCOUNT:=bucketlens-job}"
  if [[ $BUCKETLENS_SERVICE_ACCOUNT != *@* ]]; then
    BUCKETLENS_SERVICE_ACCOUNT=$BUCKETLENS_SERVICE_ACCOUNT@$BUCKETLENS_PROJECT.iam.gserviceaccount.com
  fi
}

# The job must not inherit a shell pointed at the local emulator stack.
refuse_emulator() {
  local var
  for var in STORAGE_EMULATOR_HOST PUBSUB_EMULATOR_HOST BUCKETLENS_BQ_ENDPOINT; do
    [[ -z ${!var:-} ]] || die "$var is set: this shell points at the local stack; unset it (or open a fresh shell) to deploy to GCP"
  done
}
