#!/usr/bin/env bash
# Dataproc initialization action, run as root on every node: installs torch, torchvision and
# bucketlens into the cluster's Python. Configured by cluster metadata (create_cluster.sh):
#   bucketlens-package  a gs:// wheel or a pip requirement            required
#   torch-index-url     index for torch/torchvision (default: PyTorch's CPU-only wheels,
#                       a fraction of the size of the CUDA builds on PyPI)
#   bucketlens-python   interpreter to install into (default: the image's conda Python)
# pyspark is deliberately NOT installed: the image's Spark 4 provides it, and a second copy from
# PyPI could disagree with the cluster's JVM side.
set -euo pipefail

die() {
  echo "bucketlens init action: $*" >&2
  exit 1
}

# Dataproc's metadata reader; appended to PATH so a stand-in earlier on PATH wins in tests.
PATH=$PATH:/usr/share/google
metadata() {
  get_metadata_value "attributes/$1" 2>/dev/null || true
}

package=$(metadata bucketlens-package)
torch_index=$(metadata torch-index-url)
python=$(metadata bucketlens-python)
: "${torch_index:=https://download.pytorch.org/whl/cpu}"
: "${python:=/opt/conda/default/bin/python}"
[[ -n $package ]] || die "cluster metadata bucketlens-package is not set (see create_cluster.sh)"
[[ -x $python ]] || python=$(command -v python3) || die "no Python interpreter found"

spark_release=$(head -n 1 "${SPARK_HOME:-/usr/lib/spark}/RELEASE" 2>/dev/null || true)
if [[ $spark_release =~ Spark\ ([0-9]+)\. ]] && ((BASH_REMATCH[1] < 4)); then
  die "this image has ${spark_release%% built*}; bucketlens needs Spark 4 (image 3.0 or newer)"
fi

if [[ $package == gs://* ]]; then
  local_copy=/tmp/${package##*/}
  gcloud storage cp "$package" "$local_copy"
  package=$local_copy
fi

pip=("$python" -m pip install --no-cache-dir --quiet --disable-pip-version-check)

# requirements torch|rest: bucketlens' own requirements, torch/torchvision apart so that they
# come from their own index; pyspark never (the image's Spark 4 provides it).
requirements() {
  "$python" - "$1" <<'PY'
import re
import sys
from importlib.metadata import requires

for req in requires("bucketlens") or []:
    name = re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower()
    if "extra ==" in req or name == "pyspark":
        continue
    if (name in {"torch", "torchvision"}) == (sys.argv[1] == "torch"):
        print(req.split(";")[0].replace(" ", ""))
PY
}

"${pip[@]}" --no-deps "$package"
mapfile -t torch_requirements < <(requirements torch)
mapfile -t other_requirements < <(requirements rest)
"${pip[@]}" --index-url "$torch_index" "${torch_requirements[@]}"
"${pip[@]}" "${other_requirements[@]}"
"$python" -c "import torch, torchvision, pipeline.config; print('bucketlens ready, torch', torch.__version__)"
