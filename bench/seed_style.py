"""A SEED-STYLE STREAM, FOR COMPARISON ONLY — not the product, never imported by it.

    batches = SeedStyleBatches(settings, spark)
    query = stream.messages(spark, settings).writeStream.foreachBatch(batches).start()

The shape earlier implementations of this pipeline had, on the same Pub/Sub source and the
same BigQuery sink as bucketlens, so that ``bench/run.py`` can compare the two on the same
images in the same run:

* ``foreachBatch`` collects the micro-batch's messages to the driver (a Spark job), parses
  them there, and builds a DataFrame of (bucket, name, generation), repartitioned to the task
  slots (a second job, with a shuffle);
* a per-row scalar ``@pandas_udf`` does the work: for every call (an Arrow batch: once per
  partition per micro-batch) it builds a storage client and **loads the model**, then for each
  row downloads the object, decodes it with PIL (no ``draft``), preprocesses with torchvision
  v1 transforms and runs **one image per forward pass**;
* the labels come back to the driver and go to the same sink as bucketlens's rows (same
  ``build_row``, same idempotent write), so what differs is the executor design and the two
  jobs per batch, not BigQuery.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from pipeline.config import Settings


def naive_classifier(model: str, threads: int) -> Callable[[Iterable[bytes]], list[str]]:
    """Load the model now (the seed's per-call cost) and return a one-image-at-a-time
    classifier: PIL decode (no draft), torchvision v1 transforms, a forward pass per image."""
    import io

    import torch
    from PIL import Image
    from torchvision import transforms

    from pipeline.model import specs, weights

    torch.set_num_threads(threads)
    source = specs.WeightsSource("default")
    spec = specs.model_spec(model, source)
    p = spec.preprocess
    prep = transforms.Compose([transforms.Resize(p.resize), transforms.CenterCrop(p.crop),
                               transforms.ToTensor(), transforms.Normalize(p.mean, p.std)])
    net = weights.build_model(model, source, Settings()).eval()

    def run(blobs: Iterable[bytes]) -> list[str]:
        labels = []
        for data in blobs:
            x = prep(Image.open(io.BytesIO(data)).convert("RGB")).unsqueeze(0)
            with torch.no_grad():
                labels.append(spec.labels[int(net(x).softmax(dim=1).argmax())])
        return labels

    return run


def seed_udf(settings: Settings, threads: int):
    """The per-row UDF: (bucket, name, generation) → label, model loaded per call."""
    import pandas as pd
    from pyspark.sql.functions import pandas_udf

    def classify_objects(bucket: pd.Series, name: pd.Series, generation: pd.Series) -> pd.Series:
        from pipeline import clients

        client = clients.storage_client(settings)  # per call, as the seed did
        classify_one = naive_classifier(settings.model, threads)  # per call: the model load
        labels = []
        for b, n, g in zip(bucket, name, generation, strict=True):
            data = client.bucket(b).blob(n, generation=int(g)).download_as_bytes()
            labels.extend(classify_one([data]))
        return pd.Series(labels)

    # real types, not the postponed strings: Spark infers the UDF kind from them
    classify_objects.__annotations__ = {"bucket": pd.Series, "name": pd.Series,
                                        "generation": pd.Series, "return": pd.Series}
    return pandas_udf("string")(classify_objects)


class SeedStyleBatches:
    """The seed-style ``foreachBatch`` function; counts what it inserted, like the bench's
    wrapper of bucketlens's processor, and when each batch returned."""

    def __init__(self, settings: Settings, slots: int, threads: int, sink: Any = None) -> None:
        from pipeline.bigquery.sinks import make_sink

        self.settings, self.slots = settings, slots
        self.udf = seed_udf(settings, threads)
        self.sink = sink if sink is not None else make_sink(settings.sink, settings)
        self.inserted = 0
        self.finished: dict[int, float] = {}

    def __call__(self, batch_df: Any, batch_id: int) -> None:
        from pipeline.bigquery.rows import build_row
        from pipeline.notifications import parse
        from pipeline.status import Status

        spark = batch_df.sparkSession
        notes = []
        for r in batch_df.collect():  # job 1: the messages to the driver
            n = parse(r[0], r[2] or {}, r[3], r[1])
            if n.is_finalize and n.key.bucket == self.settings.bucket:
                notes.append(n)
        if notes:
            work = (spark.createDataFrame([(n.key.bucket, n.key.name, n.key.generation)
                                           for n in notes], "bucket string, name string, "
                                          "generation long").repartition(self.slots))
            out = work.select("bucket", "name", "generation",  # job 2: shuffle + the UDF
                              self.udf("bucket", "name", "generation").alias("label")).collect()
            labels = {(r.bucket, r.name, r.generation): r.label for r in out}
            now = datetime.now(UTC)
            rows = [build_row(n, status=Status.OK, model=self.settings.model,
                              topk=[(0, labels[(n.key.bucket, n.key.name, n.key.generation)],
                                     1.0)],
                              batch_id=batch_id, processed_at=now) for n in notes]
            self.inserted += self.sink.write(rows, batch_id)
        self.finished[batch_id] = time.time()


class NoDedupeSink:
    """The seeds' write, for the field rehearsal: the batch's rows appended to the predictions
    table's default stream as they are — no key lookup, no re-check, no query job — over one
    kept-open connection: the cheapest write possible, so the comparison is conservative."""

    def __init__(self, settings: Settings) -> None:
        from pipeline import clients
        from pipeline.bigquery.bqwrite import StorageWriter
        from pipeline.bigquery.catalog import schema_json

        self.table_id = settings.table_id
        self.fields = schema_json("predictions")
        self.writer = StorageWriter(clients.bigquery_write_client(settings))

    def write(self, rows: list[dict], batch_id: int) -> int:
        return self.writer.append(self.table_id, rows, self.fields)
