"""What ``--embeddings`` costs: images/s with and without, on the same images in the same run.

Two figures, each measured in alternating rounds (off/on, then on/off, ...) so that load from
other processes falls on both modes alike, as wall-clock images/s (the best round of each mode,
as in ``bench/classify_bench.py``) and as CPU seconds per image (the least of each mode): on a
shared machine the wall clock mostly measures the neighbours, while the CPU time is the work
itself, and a saturated executor's images/s is its cores divided by that work.

* model: ``TorchModelHandler.run_inference`` on the bundled photos (decode + forward pass, and
  with embeddings the normalised features copied out of the same pass); ``predict`` alone on one
  decoded batch, many times, the least CPU of each mode (the decoder's noise taken out); and
  what ``predict`` adds with embeddings on the features of that batch (normalise, copy to
  Python), timed by itself;
* pipeline: ``pipeline.stream.job.classify_and_write`` (what a micro-batch and a backfill chunk run)
  on the local stack: generation-pinned downloads and classification on ``local[2]`` Spark
  executors, the result rows (with embeddings: 1280 more floats each) collected to the driver,
  and the sink's key lookups and Storage Write API appends to bqemulator, each round into a
  fresh dataset. CPU time is that of every process involved (this driver, Spark's JVM and
  Python workers, the emulators: all descendants of this process); the sink's wall seconds
  are reported apart.

    .venv/bin/python bench/embeddings.py [--images 96] [--rounds 3] [--json]

Starts its own local stack and Spark session and stops them at the end. Progress goes to
stderr; the last stdout line is one JSON object. Not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from run import _proc_stats, tree_cpu_seconds  # bench/ is sys.path[0]: `python bench/embeddings.py`

from pipeline.config import Settings

PREDICT_CALLS = 15  # predict() calls per mode on one batch


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def photos() -> list[bytes]:
    from producer.datasets import sample_dataset

    return [p.read_bytes() for p in sorted(sample_dataset().glob("*/*.jpg"))]


Round = tuple[float, float]  # (images/s by the wall clock, CPU milliseconds per image)


def alternating(rounds: int, measure: Callable[[bool, int], Round]) -> dict[bool, list[Round]]:
    """``measure(embeddings, round)`` for both modes each round, the order swapped every round."""
    out: dict[bool, list[Round]] = {False: [], True: []}
    for i in range(rounds):
        for mode in ((False, True) if i % 2 == 0 else (True, False)):
            out[mode].append(measure(mode, i))
    return out


def overhead(rounds: dict[bool, list[Round]]) -> dict[str, Any]:
    """Best wall rate and least CPU per image of each mode, and what embeddings cost in each."""
    off, on = (max(r for r, _ in rounds[m]) for m in (False, True))
    cpu_off, cpu_on = (min(c for _, c in rounds[m]) for m in (False, True))
    med_off, med_on = (statistics.median(r for r, _ in rounds[m]) for m in (False, True))
    return {"img_s_off": round(off, 2), "img_s_on": round(on, 2),
            "fewer_img_s_pct": round(100 * (1 - on / off), 1),
            "median_img_s_off": round(med_off, 2), "median_img_s_on": round(med_on, 2),
            "median_fewer_img_s_pct": round(100 * (1 - med_on / med_off), 1),
            "cpu_ms_per_image_off": round(cpu_off, 2), "cpu_ms_per_image_on": round(cpu_on, 2),
            "more_cpu_pct": round(100 * (cpu_on / cpu_off - 1), 1),
            "rounds_off": [(round(r, 2), round(c, 2)) for r, c in rounds[False]],
            "rounds_on": [(round(r, 2), round(c, 2)) for r, c in rounds[True]]}


def tree_cpu() -> float:
    """CPU seconds used so far by this process and all its descendants."""
    return tree_cpu_seconds(_proc_stats(), {os.getpid()})


def bench_model(blobs: Sequence[bytes], rounds: int) -> dict[str, Any]:
    from pipeline.model import handler as model_handler
    from pipeline.model import specs

    handlers = {mode: model_handler.TorchModelHandler(Settings(model=specs.EFFICIENTNET_LITE0,
                                                          embeddings=mode))
                for mode in (False, True)}
    for handler in handlers.values():  # load (the base is shared) and warm up
        handler.run_inference(list(blobs[:4]))

    def measure(mode: bool, _: int) -> Round:
        started, cpu = time.perf_counter(), time.process_time()
        out = handlers[mode].run_inference(list(blobs))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        assert all(bool(p.embedding) == mode for p in out)
        return len(blobs) / seconds, 1000 * cpu / len(blobs)

    out = overhead(alternating(rounds, measure))
    inputs = [handlers[False].preprocess(b) for b in blobs[:handlers[False].settings.batch_size]]
    least = {False: math.inf, True: math.inf}
    for _ in range(PREDICT_CALLS):  # alternating; the least CPU is the least disturbed call
        for mode in (False, True):
            cpu = time.process_time()
            handlers[mode].predict(inputs)
            least[mode] = min(least[mode], time.process_time() - cpu)
    import torch

    features = torch.stack(handlers[True].features(inputs))
    copy = math.inf
    for _ in range(PREDICT_CALLS * 10):  # what predict adds: torch.nn.functional.normalize(...).tolist()
        cpu = time.process_time()
        [tuple(e) for e in torch.nn.functional.normalize(features, dim=1).tolist()]
        copy = min(copy, time.process_time() - cpu)
    out |= {"embedding_copy_ms_per_image": round(1000 * copy / len(inputs), 4),
            "predict_cpu_ms_per_image_off": round(1000 * least[False] / len(inputs), 3),
            "predict_cpu_ms_per_image_on": round(1000 * least[True] / len(inputs), 3),
            "predict_more_cpu_pct": round(100 * (least[True] / least[False] - 1), 1)}
    return out


class TimedSink:
    """The BigQuery sink, with the seconds its calls take summed."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.seconds = inner, 0.0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


def fresh_dataset(settings: Settings, client: Any) -> Settings:
    """A new dataset with the job's tables (no views: the sink needs none)."""
    from google.cloud import bigquery

    from pipeline.bigquery import catalog

    s = settings.replace(dataset=f"bench_{uuid.uuid4().hex[:8]}")
    client.create_dataset(bigquery.Dataset(f"{s.project}.{s.dataset}"))
    for table_id, spec in catalog.tables(s).items():
        client.create_table(bigquery.Table(table_id, schema=catalog.load_schema(spec.schema)))
    return s


def bench_pipeline(blobs: Sequence[bytes], n: int, rounds: int) -> dict[str, Any]:
    from deploy import localstack, provision
    from pipeline import clients
    from pipeline.bigquery.sinks import BigQuerySink
    from pipeline.commands import backfill
    from pipeline.stream.job import classify_and_write
    from pipeline.stream.spark import session

    run_dir = Path(tempfile.mkdtemp(prefix="bucketlens-bench-embeddings-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, run_dir, ignore_errors=True)
        log(f"starting the local stack in {run_dir} …")
        state = localstack.up(run_dir, Settings())
        stack.callback(localstack.down, run_dir)
        stack.enter_context(localstack.environment(state.env()))
        settings = state.settings(Settings()).replace(bucket=f"bench-{uuid.uuid4().hex[:8]}")
        provision.apply(settings)
        bucket = clients.storage_client(settings).bucket(settings.bucket)
        for i in range(n):  # the photos again and again, each copy its own object
            bucket.blob(f"bench/{i:04d}.jpg").upload_from_string(blobs[i % len(blobs)],
                                                                 content_type="image/jpeg")
        todo = [backfill.notification(b) for b in bucket.list_blobs(prefix="bench/")]
        bq = clients.bigquery_client(settings)
        log("starting Spark local[2] …")
        spark = session("local[2]", app="bucketlens-bench-embeddings",
                        log_file=str(run_dir / "spark.log"))
        stack.callback(spark.stop)
        for mode in (False, True):  # model loads in the Python workers, both handlers
            s = fresh_dataset(settings, bq).replace(embeddings=mode)
            classify_and_write(spark, todo[:16], s, BigQuerySink(s), -1)
        sink_seconds: dict[bool, list[float]] = {False: [], True: []}

        def measure(mode: bool, i: int) -> Round:
            s = fresh_dataset(settings, bq).replace(embeddings=mode)
            sink = TimedSink(BigQuerySink(s))
            started, cpu = time.perf_counter(), tree_cpu()
            done = classify_and_write(spark, todo, s, sink, -2 - i)
            seconds, cpu = time.perf_counter() - started, tree_cpu() - cpu
            assert done.inserted == len(todo), done
            sink_seconds[mode].append(round(sink.seconds, 2))
            log(f"round {i}: embeddings {'on ' if mode else 'off'} {len(todo) / seconds:6.2f} "
                f"images/s, {1000 * cpu / len(todo):6.1f} CPU ms/image ({seconds:.1f} s, "
                f"sink {sink.seconds:.2f} s)")
            return len(todo) / seconds, 1000 * cpu / len(todo)

        out = overhead(alternating(rounds, measure))
        out |= {"sink_s_off": sink_seconds[False], "sink_s_on": sink_seconds[True]}
        return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="objects per pipeline round")
    parser.add_argument("--model-images", type=int, default=48, help="images per model round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each mode")
    parser.add_argument("--skip-pipeline", action="store_true", help="the model figure only")
    parser.add_argument("--json", action="store_true", help="stdout is only the JSON line")
    args = parser.parse_args(argv)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    blobs = photos()
    load_start = [round(x, 2) for x in os.getloadavg()]
    model_blobs = [blobs[i % len(blobs)] for i in range(args.model_images)]
    log(f"model: run_inference on {len(model_blobs)} photos, {args.rounds} rounds per mode …")
    out: dict[str, Any] = {"model": bench_model(model_blobs, args.rounds)}
    log(f"model: {out['model']}")
    if not args.skip_pipeline:
        out["pipeline"] = bench_pipeline(blobs, args.images, args.rounds)
        log(f"pipeline: {out['pipeline']}")
    out |= {"images": args.images, "model_images": args.model_images, "rounds": args.rounds,
            "cores": os.cpu_count(), "loadavg_start": load_start,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    if not args.json:
        for level in ("model", "pipeline"):
            if level in out:
                o = out[level]
                log(f"{level:<9} off {o['img_s_off']:7.2f} img/s {o['cpu_ms_per_image_off']:7.2f} "
                    f"CPU ms/img   on {o['img_s_on']:7.2f} img/s {o['cpu_ms_per_image_on']:7.2f} "
                    f"CPU ms/img   embeddings: {o['fewer_img_s_pct']:+.1f} % images/s, "
                    f"{o['more_cpu_pct']:+.1f} % CPU")
        m = out["model"]
        log(f"predict   off {m['predict_cpu_ms_per_image_off']:7.3f} CPU ms/img   on "
            f"{m['predict_cpu_ms_per_image_on']:7.3f} CPU ms/img   {m['predict_more_cpu_pct']:+.1f} %; "
            f"of which normalise + copy {m['embedding_copy_ms_per_image']:.4f} ms/img")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
