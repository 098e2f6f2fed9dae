"""Run the executor side on a real two-executor cluster and report model loads per worker.

    python -m tests.helpers.executors BUCKET NAME#GEN [NAME#GEN ...]

Prints one JSON object: {"pid": loads, ...} over all the partitions' results.
"""

from __future__ import annotations

import json
import sys

from pipeline.config import Settings
from pipeline.stream.executor import RESULT_SCHEMA, WORK_SCHEMA, classify_partitions
from pipeline.stream.spark import session


def main(bucket: str, objects: list[str]) -> None:
    spark = session("local-cluster[2,1,1024]", app="executors",
                    conf={"spark.executor.memory": "1024m"})
    settings = Settings.from_env()
    work = [(bucket, o.split("#")[0], int(o.split("#")[1]), None) for o in objects]
    seen: dict[int, int] = {}
    statuses: list[str] = []
    for _ in range(3):  # several jobs, many partitions each: loads must not grow with them
        df = spark.createDataFrame(work * 2, WORK_SCHEMA).repartition(8)
        for r in df.mapInPandas(classify_partitions(settings), RESULT_SCHEMA).collect():
            seen[int(r.worker_pid)] = max(seen.get(int(r.worker_pid), 0), int(r.model_loads))
            statuses.append(r.status)
    executors = spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size() - 1  # minus the driver
    print(json.dumps({"loads": seen, "statuses": sorted(set(statuses)), "executors": executors}))
    spark.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
