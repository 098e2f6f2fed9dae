#!/usr/bin/env bash
# Dataproc initialization action, run as root on every node: installs torch, torchvision and
# bucketlens into the Python interpreter the image's Spark runs PySpark with. Configured by
# cluster metadata (create_cluster.sh):
#   bucketlens-package  a gs:// wheel or a pip requirement            required
#   torch-index-url     index for torch/torchvision (default: PyTorch's CPU-only wheels,
#                       a fraction of the size of the CUDA builds on PyPI)
# The interpreter is the one Spark is configured with, because image 3.0 manages Python with
# Pixi (3.0.0-RC1: micromamba) where 2.x had conda: PYSPARK_PYTHON from spark-env.sh, else
# spark.pyspark.python from spark-defaults.conf. Nothing else: the system python3 is not the
# one Spark runs, and on Debian 13 it is externally managed (PEP 668) without pip, so a node
# whose Spark names no interpreter fails here, in one sentence, rather than at the first task.
# pyspark is deliberately NEVER installed: the image's Spark provides it, and a second copy from
# PyPI could disagree with the cluster's JVM side. The smoke test imports the job's modules with
# the image's pyspark and fails the node if that pyspark is outside bucketlens' supported range.
set -euo pipefail

# bucketlens' pyspark requirement, pyproject.toml "pyspark>=4.0,<5" (a test keeps them equal).
PYSPARK_MIN=4.0
PYSPARK_BELOW=5

die() {
  echo "bucketlens init action: $*" >&2
  exit 1
}

# Dataproc's metadata reader; appended to PATH so a stand-in earlier on PATH wins in tests.
PATH=$PATH:/usr/share/google
metadata() {
  get_metadata_value "attributes/$1" 2>/dev/null || true
}

spark_home=${SPARK_HOME:-/usr/lib/spark}
spark_conf=${SPARK_CONF_DIR:-/etc/spark/conf}

# spark_python: the interpreter Spark's configuration names, or nothing.
spark_python() {
  local found=
  if [[ -f $spark_conf/spark-env.sh ]]; then # shell: let it expand its own ${...:-defaults}
    # shellcheck disable=SC1091 # the image's file, read as Spark itself reads it
    found=$(unset PYSPARK_PYTHON; set +eu; . "$spark_conf/spark-env.sh" >/dev/null 2>&1
      printf '%s' "${PYSPARK_PYTHON:-}") || true
  fi
  if [[ -z $found && -f $spark_conf/spark-defaults.conf ]]; then # "key value" or "key=value"
    found=$(awk -F '[[:space:]=]+' '$1 == "spark.pyspark.python" { v = $2 } END { print v }' \
      "$spark_conf/spark-defaults.conf")
  fi
  printf '%s' "$found"
}

package=$(metadata bucketlens-package)
torch_index=$(metadata torch-index-url)
: "${torch_index:=https://download.pytorch.org/whl/cpu}"
[[ -n $package ]] || die "cluster metadata bucketlens-package is not set (see create_cluster.sh)"

python=$(spark_python)
[[ -n $python ]] ||
  die "Spark's configuration ($spark_conf) names no Python (PYSPARK_PYTHON in spark-env.sh or spark.pyspark.python in spark-defaults.conf), so the Pixi environment Spark runs cannot be found; use Dataproc image 3.x"
resolved=$(command -v "$python" || true)
[[ -n $resolved && -x $resolved ]] ||
  die "Spark's configuration ($spark_conf) names Python '$python', which is not an executable"
python=$resolved
echo "bucketlens init action: installing into $python" >&2

spark_release=$(head -n 1 "$spark_home/RELEASE" 2>/dev/null || true)
if [[ $spark_release =~ Spark\ ([0-9]+)\. ]] && ((BASH_REMATCH[1] < ${PYSPARK_MIN%%.*} || BASH_REMATCH[1] >= PYSPARK_BELOW)); then
  die "this image has ${spark_release%% built*}; bucketlens needs Spark >=$PYSPARK_MIN,<$PYSPARK_BELOW (image 3.x)"
fi

"$python" -m pip --version >/dev/null 2>&1 || die "$python has no pip; bucketlens cannot be installed into it"

if [[ $package == gs://* ]]; then
  local_copy=/tmp/${package##*/}
  gcloud storage cp "$package" "$local_copy"
  package=$local_copy
fi

pip=("$python" -m pip install --no-cache-dir --quiet --disable-pip-version-check)

# bucketlens' own requirements (deploy/requirements.py, from the wheel just installed): torch
# and torchvision apart so that they come from their own index; pyspark never (the image's
# Spark 4 provides it). The Serverless Dockerfile installs the same lists.
"${pip[@]}" --no-deps "$package"
mapfile -t torch_requirements < <("$python" -m deploy.requirements torch)
mapfile -t other_requirements < <("$python" -m deploy.requirements rest)
((${#torch_requirements[@]} && ${#other_requirements[@]})) ||
  die "the installed bucketlens lists no requirements (deploy.requirements); is $package a bucketlens wheel?"
"${pip[@]}" --index-url "$torch_index" "${torch_requirements[@]}"
"${pip[@]}" "${other_requirements[@]}"

# Smoke test with the image's pyspark, on the path Spark gives its Python workers.
py4j=("$spark_home"/python/lib/py4j-*-src.zip)
PYTHONPATH=$spark_home/python:${py4j[0]}${PYTHONPATH:+:$PYTHONPATH} \
  "$python" - "$PYSPARK_MIN" "$PYSPARK_BELOW" <<'PY' || exit 1
import sys

import pyspark

low, below = (tuple(int(p) for p in v.split(".")) for v in sys.argv[1:])
version = tuple(int(p) for p in pyspark.__version__.split(".")[:2] if p.isdigit())
if not low <= version < below:
    sys.exit(f"bucketlens init action: this node's pyspark {pyspark.__version__} is outside "
             f"bucketlens' supported range >={sys.argv[1]},<{sys.argv[2]}; use Dataproc image 3.x")

import pipeline.stream.source  # the Python streaming data source: pyspark 4's API
import pipeline.stream.job
import torch
import torchvision
from google.cloud.bigquery_storage_v1 import types, writer  # noqa: F401 — the sink's append path

if not hasattr(types.AppendRowsRequest, "ArrowData"):
    sys.exit("bucketlens init action: this node's google-cloud-bigquery-storage has no Arrow "
             "AppendRows (types.AppendRowsRequest.ArrowData), which the sink writes with")

print("bucketlens ready: pyspark", pyspark.__version__, "torch", torch.__version__,
      "torchvision", torchvision.__version__)
PY
