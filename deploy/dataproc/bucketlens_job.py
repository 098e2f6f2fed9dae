"""Dataproc entry point: ``bucketlens <job command> ...`` inside the cluster's Python.

``submit_job.sh`` submits this file with ``gcloud dataproc jobs submit pyspark``; the
deployment rehearsal (tests/test_rehearsal.py) runs the same file through ``spark-submit``.
It imports only ``pipeline``, which the init action installed from the wheel.
"""

import sys

from pipeline.commands.cli import main

sys.exit(main(sys.argv[1:]))
