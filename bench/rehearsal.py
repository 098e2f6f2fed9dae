"""The field rehearsal's pure parts: what users upload, and what a million images cost.

``run.py --field`` uses these; bench/README.md "Field rehearsal" cites every price and latency.
"""

from __future__ import annotations

import io
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Camera sizes (pixels) of the mix's big JPEGs: phones upload 3–12 MP.
CAMERA_SIZES = ((2048, 1536), (3264, 2448), (4032, 3024))  # 3.1, 8.0, 12.2 MP
CAMERA_QUALITY = 90


def field_mix(dest: Path, sample: Path) -> Path:
    """A class-folder directory for the producer: every sample photo (flower-like: 384–741 px,
    39–131 KB) and, for each, one camera-sized JPEG made from it (upscaled, bicubic, quality
    90), the sizes cycling through CAMERA_SIZES: a 1:1 mix of uploads."""
    from PIL import Image

    photos = sorted(sample.glob("*/*.jpg"))
    if not photos:
        raise FileNotFoundError(f"no sample photos under {sample}")
    for i, photo in enumerate(photos):
        target = dest / photo.parent.name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo, target / photo.name)
        size = CAMERA_SIZES[i % len(CAMERA_SIZES)]
        big = Image.open(photo).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        big.save(buf, "JPEG", quality=CAMERA_QUALITY)
        (target / f"{photo.stem}-{size[0]}x{size[1]}.jpg").write_bytes(buf.getvalue())
    return dest


# --- prices (us-central1, on demand, list prices; bench/README.md links each page) -----------

N2_VCPU_HOUR_USD = 0.194236 / 4  # n2-standard-4 $0.194236/h ÷ 4 vCPU (Compute Engine)
N2_8_HOUR_USD = 0.388472  # n2-standard-8 (Compute Engine)
DATAPROC_VCPU_HOUR_USD = 0.010  # Dataproc's fee per vCPU-hour
PUBSUB_TIB_USD = 40.0  # message delivery, per TiB after the first 10 GiB a month
NOTIFICATION_BYTES = 1300  # a JSON_API_V1 notification, attributes included
GCS_CLASS_B_USD = 0.0004 / 1000  # per GET (Class B operation), Standard storage
BQ_WRITE_GIB_USD = 0.025  # Storage Write API ingestion, per GiB (after 2 TiB a month free)
ROW_BYTES = 600  # one predictions row as appended
BQ_QUERY_TIB_USD = 6.25  # on-demand query, per TiB billed
BQ_MIN_BILLED = 10 * 1024 * 1024  # bytes billed at least, per table a query references
KEY_BYTES = 90  # bucket, name, generation, object_created of one row (BigQuery's sizes)


@dataclass(frozen=True)
class Cost:
    """Variable cost per million images at one upload rate, by item (USD)."""

    compute: float
    pubsub: float
    gcs: float
    bq_writes: float
    bq_queries: float

    @property
    def total(self) -> float:
        return self.compute + self.pubsub + self.gcs + self.bq_writes + self.bq_queries


def batches_per_image(uploads_s: float, trigger_s: float) -> float:
    """Micro-batches per image at a steady ``uploads_s`` (Poisson arrivals): a trigger runs a
    batch when at least one upload arrived since the last (1 − e^(−λT) of them)."""
    per_trigger = uploads_s * trigger_s
    return (1 - math.exp(-per_trigger)) / per_trigger


def billed_per_query(uploads_s: float) -> int:
    """Bytes one partition-bounded key lookup bills: the key columns of the current day's
    partition (half full on average), at least the 10 MB minimum."""
    return max(BQ_MIN_BILLED, int(KEY_BYTES * uploads_s * 86_400 / 2))


def cost_per_million(cpu_s_per_image: float, uploads_s: float, trigger_s: float,
                     queries_per_batch: float, gcs_gets_per_image: float = 1.0) -> Cost:
    """What a million images cost beyond the cluster's fixed cost: the product's CPU-seconds
    priced as n2 vCPU-hours plus Dataproc's fee, one notification published and delivered,
    the GETs, the appended rows and the query jobs per batch."""
    m = 1_000_000
    batches = m * batches_per_image(uploads_s, trigger_s)
    return Cost(
        compute=cpu_s_per_image * m / 3600 * (N2_VCPU_HOUR_USD + DATAPROC_VCPU_HOUR_USD),
        pubsub=2 * NOTIFICATION_BYTES * m / 2**40 * PUBSUB_TIB_USD,
        gcs=gcs_gets_per_image * m * GCS_CLASS_B_USD,
        bq_writes=ROW_BYTES * m / 2**30 * BQ_WRITE_GIB_USD,
        bq_queries=queries_per_batch * batches * billed_per_query(uploads_s) / 2**40
        * BQ_QUERY_TIB_USD,
    )


# --- the producer in a process of its own ------------------------------------------------------

def _produce(items: list, settings: Any, commands: Any, out: Any, counter: Any, stop: Any
             ) -> None:
    """The producer process's loop: one replay per command; uploads counted in ``counter``."""
    import os
    import queue

    from producer.replay import replay

    parent = os.getppid()

    def on_result(result: Any) -> None:
        if result.status == "uploaded":
            with counter.get_lock():
                counter.value += 1

    while os.getppid() == parent:  # the bench gone (killed): so are we
        try:
            cmd = commands.get(timeout=1)
        except queue.Empty:
            continue
        if cmd is None:
            return
        try:
            s = replay(items, settings.replace(prefix=cmd["prefix"]),
                       rate=cmd["rate"], loop=True, seed=cmd["seed"], duration=cmd["seconds"],
                       on_result=on_result, stop=stop, progress=False)
            out.put({"uploaded": s.uploaded, "seconds": s.seconds, "failed": s.failed,
                     "errors": s.errors[:3]})
        except Exception as exc:  # noqa: BLE001 — reported to the bench, which raises it
            out.put({"error": f"{type(exc).__name__}: {exc}"})


class ProducerProcess:
    """Steady-rate uploads from a spawned process, so that the product's CPU (the driver's
    process, Spark's JVM and Python workers) can be measured without the producer's."""

    def __init__(self, items: list, settings: Any) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.commands, self.out = ctx.Queue(), ctx.Queue()
        self.counter, self.stop = ctx.Value("q", 0), ctx.Event()
        self.process = ctx.Process(target=_produce, daemon=True, name="bench-producer", args=(
            items, settings, self.commands, self.out, self.counter, self.stop))
        self.process.start()

    @property
    def uploaded(self) -> int:
        return int(self.counter.value)

    def run(self, prefix: str, rate: float, seconds: float, seed: int) -> dict:
        """Upload at ``rate`` for ``seconds`` (or until ``stop``); blocks; the summary."""
        import queue

        self.stop.clear()
        with self.counter.get_lock():
            self.counter.value = 0
        self.commands.put({"prefix": prefix, "rate": rate, "seconds": seconds, "seed": seed})
        while True:
            try:
                result = self.out.get(timeout=5)
                break
            except queue.Empty:
                if not self.process.is_alive():
                    raise RuntimeError("the producer process died") from None
        if "error" in result:
            raise RuntimeError(f"the producer failed: {result['error']}")
        return result

    def close(self) -> None:
        self.commands.put(None)
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
