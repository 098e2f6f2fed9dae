"""A standalone streaming query used by the crash test: records every message it sees.

    python -m tests.helpers.consume SUBSCRIPTION CHECKPOINT OUT_FILE

The Pub/Sub emulator comes from the environment, through ``Settings.from_env``.
Each micro-batch appends its messages' ``idx`` attributes to OUT_FILE (fsync'd) before the
batch returns, i.e. before Spark commits it and the source acknowledges the messages.
"""

from __future__ import annotations

import os
import sys

from pipeline.config import Settings
from pipeline.stream.spark import session
from tests.helpers import jvm


def main(subscription: str, checkpoint: str, out: str) -> None:
    spark = session("local[2]", app="consume", conf=jvm.PLAIN_DAEMON)  # it classifies nothing

    def handle(df, batch_id: int) -> None:
        rows = df.select("attributes").collect()
        with open(out, "a") as fh:
            for r in rows:
                fh.write(f"{batch_id} {r.attributes.get('idx')}\n")
            fh.flush()
            os.fsync(fh.fileno())

    q = (spark.readStream.format("pubsub").option("subscription", subscription)
         .option("maxMessagesPerBatch", 20).option("ackDeadlineSeconds", 10)
         .option("emulatorHost", Settings.from_env().pubsub_emulator_host)
         .load().writeStream.foreachBatch(handle).option("checkpointLocation", checkpoint)
         .trigger(processingTime="1 second").start())
    print("started", flush=True)
    q.awaitTermination()


if __name__ == "__main__":
    main(*sys.argv[1:4])
