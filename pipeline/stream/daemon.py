"""Spark's Python daemon, with the executor's libraries imported before it forks any worker.

    spark.python.daemon.module = pipeline.stream.daemon      # set by pipeline.stream.spark

Spark starts one daemon per executor (``python -m <daemon module> <worker module>``) and forks a
Python worker from it for each task slot. With ``pyspark.daemon`` every worker then imports
torch, torchvision and the storage client itself: about 8 CPU-seconds per worker (measured on
this project's 2-core machine), paid again whenever a worker is replaced. Importing them here
once, before the fork, lets each worker start with them already in memory (copy-on-write pages).
Only the classifying workers' daemon preloads: Spark 4 also starts daemons for data-source
planning (``pyspark.sql.worker.*``), which never classify.

Importing is fork-safe here: no thread pool, client or channel exists until a task runs.
"""

from __future__ import annotations

import sys

PRELOAD_FOR = "pyspark.worker"  # the worker module Spark passes for tasks (UDFs, mapInPandas)


def preloads(argv: list[str]) -> bool:
    """Whether the daemon started with ``argv`` forks classifying workers (no argument is the
    older spelling of the same)."""
    return len(argv) < 2 or argv[1] == PRELOAD_FOR


if __name__ == "__main__":
    if preloads(sys.argv):
        import pipeline.stream.executor  # noqa: F401 — torch, torchvision, the storage client
    from pyspark import daemon

    daemon.manager()
