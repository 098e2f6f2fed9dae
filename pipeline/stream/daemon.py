"""Spark's Python daemon, with the executor's libraries imported before it forks any worker.

    spark.python.daemon.module = pipeline.stream.daemon      # set by pipeline.stream.spark

Spark starts one daemon per executor (``python -m <daemon module> <worker module>``) and forks a
Python worker from it for each task slot. With ``pyspark.daemon`` every worker then imports
torch, torchvision, pandas and the storage client itself: about 4 CPU-seconds per worker from
bytecode, 15 where none was written (measured on this project's 2-core machine), paid again
whenever a worker is replaced. Importing them here
once, before the fork, lets each worker start with them already in memory (copy-on-write pages).
Only the classifying workers' daemon preloads: Spark 4 also starts daemons for data-source
planning (``pyspark.sql.worker.*``), which never classify.

Importing is fork-safe here: no thread pool, client or channel exists until a task runs.
Where many short applications start on one machine (the test suite), ``pipeline.stream.forkserver``
keeps one warm copy of these imports that each daemon is forked from instead.
"""

from __future__ import annotations

import os
import sys

PRELOAD_FOR = "pyspark.worker"  # the worker module Spark passes for tasks (UDFs, mapInPandas)


def preloads(argv: list[str]) -> bool:
    """Whether the daemon started with ``argv`` forks classifying workers (no argument is the
    older spelling of the same)."""
    return len(argv) < 2 or argv[1] == PRELOAD_FOR


def main(argv: list[str]) -> None:
    if preloads(argv):
        from pipeline.stream import forkserver

        server = os.environ.get(forkserver.ENV)  # a warm process that imported all this already
        code = forkserver.handoff(server, argv) if server else None
        if code is not None:
            sys.exit(code)
        forkserver.preload()
    from pyspark import daemon

    daemon.manager()


if __name__ == "__main__":
    main(sys.argv)
