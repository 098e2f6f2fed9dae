"""The bucketlens benchmark: ceiling, pipeline, naive baseline, latency and memory in one run.

    .venv/bin/python bench/run.py [--images 400] [--json]

Starts its own local stack (``deploy.localstack.up`` in a temporary run directory; or, with
``--stack DIR``, uses the one already running there, e.g. ``bucketlens local up``'s, with a
bucket, subscription and dataset of its own) and one Spark session, then measures on the same
images (the bundled sample photos, replayed with
``loop`` until N uploads):

a. ceiling   decode + preprocess + model in a tight loop on the same JPEG bytes, one process
             per Spark task slot, each with the torch threads an executor's Python worker uses
             (measured twice: before Spark starts and right after (b));
b. pipeline  producer at full speed → GCS → Pub/Sub → stream → BigQuery rows, steady state;
c. baseline  the naive approach of earlier implementations: a scalar-iterator pandas UDF, PIL
             preprocessing, one image per forward pass, the model loaded per Arrow batch,
             over the same fetched bytes in a DataFrame column, in the same Spark session;
d. latency   uploads at a steady 2 images/s: GCS event time → processed_at (from the rows),
             and upload → row visible in BigQuery (by polling);
e. memory    executor Python worker RSS (/proc/<pid>/status VmRSS) before and after
             ``--rss-images`` more images through the stream's executor function;
f. sustained the highest steady upload rate kept up with for ``--sustain-seconds`` (p95
             latency under 5 s, backlog bounded), found by a short search over producer
             rates, for bucketlens and for a seed-style stream (``bench/seed_style.py``) on the
             same source and sink; and a pre-uploaded backlog (``--drain-images``) drained.

Plus a small-batch anatomy (what one Spark job costs) and the same classifiers on 12-megapixel
camera JPEGs. bench/README.md defines every figure. Progress and tables go to stderr; the
last stdout line is one JSON object (``--json``: the only stdout line).

Stream settings come from the usual ``BUCKETLENS_*`` variables, e.g.
``BUCKETLENS_TRIGGER_SECONDS=0.5 python bench/run.py``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import classify_bench  # bench/ is sys.path[0]: `python bench/run.py`
import fieldproxy
import rehearsal
import seed_style
from pyspark import cloudpickle
from rich.console import Console
from rich.table import Table
from seed_style import SeedStyleBatches, naive_classifier

from pipeline.config import Settings

# bench/ is not on the executors' path: ship seed_style's functions with the UDFs that use them
cloudpickle.register_pickle_by_value(seed_style)
console = Console(stderr=True)

KEYS = ("ceiling_img_s", "max_sustained_img_s", "seed_style_max_sustained_img_s",
        "ratio_to_seed_style", "ratio_to_ceiling", "drain_img_s", "drain_ratio_to_ceiling",
        "pipeline_img_s", "baseline_img_s", "ratio_to_baseline", "latency_p50_s",
        "latency_p95_s", "cpu_s_per_image", "rss_growth_mb")
TARGETS = {  # figure → (comparison, target): the performance goals; figures, not tests
    "ratio_to_seed_style": (">=", 3.0),
    "ratio_to_ceiling": (">=", 0.8),
    "latency_p50_s": ("<", 1.0),
    "latency_p95_s": ("<", 2.0),
    "rss_growth_mb": ("<", 50.0),
}
RSS_JOB_IMAGES = 128  # images per Spark job in the memory phase (~ one loaded micro-batch)
SMALL_BATCH = 4  # images in the anatomy's small job: one trigger's worth at 2 images/s


# --- small helpers ----------------------------------------------------------------------------

def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def vmrss_mb(pid: int, field_: str = "VmRSS") -> float | None:
    """Resident set size (or another /proc status field, e.g. VmHWM: the peak) in MiB; None
    when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_ + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler:
    """Samples VmRSS of some pids every ``every`` seconds on a thread, tagged with a phase
    counter the caller advances (images done)."""

    def __init__(self, pids: Sequence[int], every: float = 0.2) -> None:
        self.pids, self.every = list(pids), every
        self.done = 0
        self.samples: list[tuple[int, dict[int, float | None]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append((self.done, {p: vmrss_mb(p) for p in self.pids}))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, pid: int, lo: float, hi: float) -> float | None:
        """Highest sample of ``pid`` while ``lo <= images done < hi``."""
        values = [s[pid] for done, s in self.samples if lo <= done < hi and s.get(pid)]
        return max(values) if values else None


def _proc_stats() -> dict[int, tuple[int, int]]:
    """pid → (parent pid, CPU ticks used: user + system), for every live process."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            out[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
        except (OSError, IndexError, ValueError):
            continue
    return out


def tree_cpu_seconds(stats: dict[int, tuple[int, int]], roots: set[int]) -> float:
    """CPU seconds of ``roots`` and all their live descendants."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    todo, seen = [r for r in roots if r in stats], set()
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return sum(stats[p][1] for p in seen) / os.sysconf("SC_CLK_TCK")


class CpuShare:
    """Shares of the machine's cores used by the emulators, by this process (driver Python and
    producer) and by its descendants (Spark's JVM and Python workers), from /proc.

    ``others``: helper processes of the bench (the field rehearsal's proxy and producer) whose
    trees are neither the product nor the emulators; with them apart, ``product`` is the
    driver's Python (foreachBatch), Spark's JVM and its Python workers only."""

    def __init__(self, emulator_pids: set[int], cores: int) -> None:
        self.emulators, self.cores = emulator_pids, cores
        self.others: set[int] = set()

    def snapshot(self) -> tuple[float, ...]:
        stats, me = _proc_stats(), os.getpid()
        return (time.monotonic(), tree_cpu_seconds(stats, self.emulators),
                tree_cpu_seconds(stats, {me}), stats.get(me, (0, 0))[1] / os.sysconf("SC_CLK_TCK"),
                tree_cpu_seconds(stats, self.others))

    def seconds(self, before: tuple[float, ...]) -> dict[str, float]:
        """CPU seconds per group since ``before``, and the wall seconds (``wall``)."""
        after = self.snapshot()
        emu, tree, own, others = (after[i] - before[i] for i in (1, 2, 3, 4))
        out = {"emulators": emu,  # they are our children too
               "driver_and_producer": own,
               "spark_jvm_and_workers": tree - own - emu - others, "wall": after[0] - before[0]}
        if self.others:  # the producer runs apart: this process is the driver alone
            out.update(bench_helpers=others, product=tree - emu - others)
        return out

    def since(self, before: tuple[float, ...]) -> dict[str, float]:
        used = self.seconds(before)
        capacity = used.pop("wall") * self.cores
        return {k: round(v / capacity, 3) for k, v in used.items()}


def task_slots(master: str) -> int:
    """Concurrent Spark tasks (= Python workers) of a local master: local[N] → N."""
    m = re.fullmatch(r"local\[(\d+|\*)(?:,\d+)?\]", master.strip())
    if m:
        return (os.cpu_count() or 1) if m.group(1) == "*" else int(m.group(1))
    m = re.fullmatch(r"local-cluster\[(\d+),(\d+),\d+\]", master.strip())
    if m:
        return int(m.group(1)) * int(m.group(2))
    return 1 if master.strip() == "local" else (os.cpu_count() or 1)


def executor_threads(settings: Settings) -> int:
    """The torch threads a Spark Python worker uses (one task CPU, Spark's default)."""
    from pipeline.model import handler as model_handler

    env = {**os.environ, "SPARK_REUSE_WORKER": "1"}
    if settings.torch_threads:
        env[model_handler.THREADS_ENV] = str(settings.torch_threads)
    return model_handler.torch_threads(env, os.cpu_count(), task_cpus=1)


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gb": round(mem_gb, 1),
            "python": platform.python_version(), "torch": torch.__version__}


def rate(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


def r3(x: float | None) -> float | None:
    return None if x is None else round(float(x), 3)


def sample_blobs(mix: Path | None = None) -> tuple[list, list[bytes]]:
    """The bundled sample photos — or, with ``mix`` (a directory to write), the field mix: those
    photos and as many camera-sized JPEGs made from them — as replay items and their JPEG bytes
    (what GCS will serve)."""
    from pipeline.model.classfolders import discover
    from producer.datasets import sample_dataset

    items = discover(rehearsal.field_mix(mix, sample_dataset()) if mix else sample_dataset())
    return items, [i.path.read_bytes() for i in items]


def camera_jpeg() -> bytes:
    """One 4032x3024 JPEG (a phone camera's size), as classify_bench makes it."""
    return classify_bench.jpeg(classify_bench.sample_jpegs()["camera 4032x3024"][0])


def cycle(blobs: Sequence[bytes], n: int) -> list[bytes]:
    return [blobs[i % len(blobs)] for i in range(n)]


# --- (a) ceiling ------------------------------------------------------------------------------

def _ceiling_worker(index: int, settings: Settings, blobs: list[bytes], barrier: Any,
                    commands: Any, out: Any) -> None:
    """One "executor slot": the pipeline's handler (same decoder, batch size, threads) looping
    over one CHUNK of bytes, as a partition does, on command; also the decode-only share.
    Afterwards, alone, process 0 measures the reference layout when asked: one process with
    every core as torch threads (what `bucketlens classify` uses outside Spark)."""
    import torch

    from pipeline.model import handler as model_handler

    handler = model_handler.TorchModelHandler(settings)
    handler.run_inference(blobs)  # loads the model, warms the allocator
    threads = torch.get_num_threads()
    out.put({"ready": index})
    while (cmd := commands.get()) is not None:
        barrier.wait()
        started, cpu = time.perf_counter(), time.process_time()
        n = 0
        while time.perf_counter() - started < cmd["seconds"]:
            handler.run_inference(blobs)
            n += len(blobs)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        decode = classify_bench.per_call(lambda: [handler.preprocess(b) for b in blobs], 1.0,
                                         rounds=1)
        result = {"index": index, "img_s": n / elapsed, "threads": threads, "n": n, "cpu_s": cpu,
                  "decode_ms": 1000 * decode / len(blobs)}
        barrier.wait()  # every slot has finished measuring
        if index == 0 and cmd["single"]:
            torch.set_num_threads(os.cpu_count() or 1)
            one = blobs[: settings.batch_size]  # one forward pass per call: bounded if it crawls
            per = classify_bench.per_call(lambda one=one: handler.run_inference(one),
                                          max(2.0, cmd["seconds"] / 2), rounds=1)
            result.update(single_img_s=len(one) / per, single_threads=torch.get_num_threads())
            torch.set_num_threads(threads)
        out.put(result)


class Ceiling:
    """``slots`` spawned processes that stay loaded, so the ceiling can be taken more than once
    (the background load of a shared machine changes during a run)."""

    def __init__(self, settings: Settings, blobs: list[bytes], slots: int) -> None:
        from pipeline.stream.executor import CHUNK

        ctx = mp.get_context("spawn")  # fresh interpreters: no inherited torch thread pools
        self.threads = executor_threads(settings)
        self.out = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(slots)]
        self.barrier = ctx.Barrier(slots)  # referenced until the children have it
        chunk = cycle(blobs, CHUNK)
        self.procs = [ctx.Process(target=_ceiling_worker, daemon=True, args=(
            i, settings.replace(torch_threads=self.threads), chunk, self.barrier, self.commands[i],
            self.out)) for i in range(slots)]
        for p in self.procs:
            p.start()
        self.ready = self.closed = False

    def _get(self, timeout: float) -> dict[str, Any]:
        import queue

        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.out.get(timeout=2)
            except queue.Empty:
                dead = [p.exitcode for p in self.procs if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"a ceiling process failed or hung (exit codes {dead})"
                                       ) from None

    def measure(self, seconds: float, single: bool = False) -> dict[str, Any]:
        if not self.ready:
            for _ in self.procs:
                self._get(600)
            self.ready = True
        for q in self.commands:
            q.put({"seconds": seconds, "single": single})
        results = sorted((self._get(seconds + 600) for _ in self.procs),
                         key=lambda r: r["index"])
        out = {
            "img_s": sum(r["img_s"] for r in results),
            "per_process_img_s": [round(r["img_s"], 2) for r in results],
            "decode_ms": sum(r["decode_ms"] for r in results) / len(results),
            # CPU of decode + preprocess + model per image (process time: all its threads)
            "cpu_s_per_image": sum(r["cpu_s"] for r in results) / sum(r["n"] for r in results),
            "threads": results[0]["threads"], "processes": len(results), "loadavg": loadavg(),
        }
        if single:
            out.update(single_img_s=results[0]["single_img_s"],
                       single_threads=results[0]["single_threads"])
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for q in self.commands:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


# --- the stream, instrumented -----------------------------------------------------------------

class TimedSink:
    """Wraps the real sink: times the driver's BigQuery round trips per batch."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._lookup = 0.0
        self.by_batch: dict[int, dict[str, float]] = {}

    def existing_keys(self, keys: Sequence[Any], **kwargs: Any) -> set:
        started = time.perf_counter()
        try:
            return self.inner.existing_keys(keys, **kwargs)
        finally:
            self._lookup = time.perf_counter() - started

    def write(self, rows: Sequence[dict], batch_id: int, **kwargs: Any) -> int:
        started = time.perf_counter()
        try:
            return self.inner.write(rows, batch_id, **kwargs)
        finally:
            self.by_batch[batch_id] = {"lookup_s": self._lookup,
                                       "merge_s": time.perf_counter() - started}
            self._lookup = 0.0

    def __getattr__(self, name: str) -> Any:
        """Every other call of the sink (dead letters, events, …) goes to the real one."""
        return getattr(self.inner, name)


class TimedBatches:
    """The foreachBatch function: the pipeline's BatchProcessor, with the wall time each batch
    returned (its write has completed: its rows are visible)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.finished: dict[int, float] = {}  # batch id → wall clock
        self.inserted = 0  # rows inserted over all batches

    def __call__(self, batch_df: Any, batch_id: int) -> None:
        report = self.processor.process(batch_df, batch_id)
        self.finished[batch_id] = time.time()
        self.inserted += report.inserted

    @property
    def reports(self) -> list:
        return self.processor.reports


@dataclass
class Seen:
    """Rows of one phase as polled from BigQuery, with when each key first became visible."""

    rows: dict[tuple[str, int], dict] = field(default_factory=dict)
    visible: dict[tuple[str, int], float] = field(default_factory=dict)  # wall clock


class Poller:
    """Reads a phase's rows (by name prefix) from BigQuery."""

    SQL = ("SELECT name, generation, status, event_time, publish_time, processed_at, batch_id "
           "FROM `{table}` WHERE name LIKE @pattern")

    def __init__(self, settings: Settings) -> None:
        from pipeline import clients

        self.settings = settings
        self.bq = clients.bigquery_client(settings)

    def poll(self, prefix: str, seen: Seen) -> None:
        from google.cloud import bigquery

        from pipeline.bigquery.sql import run_query

        cfg = bigquery.QueryJobConfig(query_parameters=[
            bigquery.ScalarQueryParameter("pattern", "STRING", f"{prefix}/%")])
        asked = time.time()
        # run_query retries what bqemulator refuses under a concurrent append, like the sink
        _, rows = run_query(self.bq, self.SQL.format(table=self.settings.table_id), cfg)
        for r in rows:
            key = (r["name"], int(r["generation"]))
            if key not in seen.rows:
                seen.rows[key] = dict(r.items())
                seen.visible[key] = asked

    def wait(self, prefix: str, seen: Seen, n: int, query: Any, batches: TimedBatches,
             since: int, timeout: float, label: str = "") -> None:
        """Until ``n`` rows under ``prefix`` are in BigQuery. BigQuery is asked only once the
        stream's own reports count enough inserted rows (``since``: the count before the
        phase), or every 10 s: polling costs the emulator CPU the pipeline would miss."""
        deadline = time.monotonic() + timeout
        asked = time.monotonic()
        with console.status(f"{label}: waiting for rows …") as status:
            while len(seen.rows) < n:
                if query.exception():
                    raise RuntimeError(f"the stream failed: {query.exception()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{label}: only {len(seen.rows)} of {n} rows after "
                                       f"{timeout:.0f}s")
                if batches.inserted - since >= n or time.monotonic() - asked > 10:
                    self.poll(prefix, seen)
                    asked = time.monotonic()
                status.update(f"{label}: {batches.inserted - since}/{n} rows inserted")
                if len(seen.rows) < n:
                    time.sleep(0.1)


def upload(items: list, settings: Settings, prefix: str, *, limit: int | None = None,
           rate_: float, duration: float | None = None, seed: int = 0,
           on_result: Callable[[Any], None] | None = None,
           stop: threading.Event | None = None) -> Any:
    from producer.replay import replay

    summary = replay(items, settings.replace(prefix=prefix), rate=rate_, limit=limit, loop=True,
                     seed=seed, duration=duration, on_result=on_result, stop=stop,
                     progress=False)
    if summary.failed:
        raise RuntimeError(f"{summary.failed} uploads failed: {summary.errors[:3]}")
    return summary


def progress_by_batch(query: Any) -> dict[int, dict[str, Any]]:
    out = {}
    for p in query.recentProgress:
        out[int(p.batchId)] = {"timestamp": p.timestamp, "ms": dict(p.durationMs or {}),
                               "rows": int(p.numInputRows)}
    return out


def _dt(value: Any) -> datetime | None:
    from pipeline.stream.metrics import _time

    return _time(value)


# --- (b) pipeline -----------------------------------------------------------------------------

def pipeline_figures(seen: Seen, first_upload: float, batches: TimedBatches) -> dict[str, Any]:
    """Steady state = rows of batches 2..k / (processed_at of batch k - of batch 1);
    wall = rows / (last row visible - first upload started)."""
    by_batch: dict[int, list[dict]] = {}
    for r in seen.rows.values():
        by_batch.setdefault(int(r["batch_id"]), []).append(r)
    stamps = sorted((min(_dt(r["processed_at"]) for r in rows), len(rows), b)
                    for b, rows in by_batch.items())
    n = len(seen.rows)
    wall = rate(n, max(batches.finished[b] for b in by_batch) - first_upload)
    if len(stamps) >= 2:
        span = (stamps[-1][0] - stamps[0][0]).total_seconds()
        steady, method = rate(sum(s[1] for s in stamps[1:]), span), "batches 2..k"
    else:
        steady, method = None, "single batch"
    return {"steady_img_s": steady, "wall_img_s": wall, "method": method,
            "batches": [(b, k) for _, k, b in stamps]}


def batch_profile(batch_ids: Sequence[int], batches: TimedBatches, sink: TimedSink,
                  progress: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    reports = {r.batch_id: r for r in batches.reports}
    out = []
    for b in sorted(batch_ids):
        rep, times, prog = reports.get(b), sink.by_batch.get(b, {}), progress.get(b, {})
        ms = prog.get("ms", {})
        seconds = rep.seconds if rep else 0.0
        lookup, merge = times.get("lookup_s", 0.0), times.get("merge_s", 0.0)
        trigger = ms.get("triggerExecution", 0) / 1000
        add = ms.get("addBatch", 0) / 1000
        out.append({
            "batch_id": b, "images": rep.classified if rep else 0,
            "trigger_s": trigger,  # Spark: offsets + planning + foreachBatch + commit
            "spark_other_s": max(0.0, trigger - add),  # latestOffset, planning, WAL, commit
            "foreach_s": seconds,
            "lookup_s": lookup,  # existing_keys query
            "classify_s": max(0.0, seconds - lookup - merge),  # the batch's one Spark job
            "merge_s": merge,  # staging load + MERGE + drop (after processed_at)
            "timestamp": prog.get("timestamp"),
            "spark_ms": ms,
        })
    return out


def summarize_profile(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over a phase's batches: where the trigger time went."""
    keys = ("trigger_s", "spark_other_s", "lookup_s", "classify_s", "merge_s")
    total = {k: round(sum(b[k] for b in batches), 2) for k in keys}
    images = sum(b["images"] for b in batches)
    total.update({"batches": len(batches), "images": images,
                  "classify_img_s": r3(rate(images, total["classify_s"]))})
    names = sorted({k for b in batches for k in b["spark_ms"]})
    total["spark_ms_mean"] = {k: round(statistics.mean(b["spark_ms"].get(k, 0) for b in batches))
                              for k in names} if batches else {}
    return total


# --- (d) latency ------------------------------------------------------------------------------

def measure_latency(items: list, settings: Settings, poller: Poller, query: Any,
                    batches: TimedBatches, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.stream.metrics import percentile

    uploaded: dict[tuple[str, int], float] = {}  # key → wall time the upload finished

    def on_result(result: Any) -> None:
        if result.status == "uploaded":
            wall = time.time() - (time.monotonic() - result.finished)
            uploaded[(result.planned.name, int(result.generation))] = wall

    done = threading.Event()
    box: dict[str, Any] = {}

    def produce() -> None:
        try:
            box["summary"] = upload(items, settings, "latency", rate_=args.latency_rate,
                                    duration=args.latency_seconds, seed=3, on_result=on_result)
        except BaseException as exc:  # noqa: BLE001 — re-raised in the caller
            box["error"] = exc
        finally:
            done.set()

    seen = Seen()
    threading.Thread(target=produce, name="bench-latency-producer", daemon=True).start()
    deadline = time.monotonic() + args.latency_seconds + args.timeout
    with console.status("(d) latency: uploading and polling …") as status:
        while not (done.is_set() and len(seen.rows) >= len(uploaded)):
            if "error" in box:
                raise box["error"]
            if query.exception():
                raise RuntimeError(f"the stream failed: {query.exception()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"(d) latency: {len(seen.rows)} of {len(uploaded)} rows")
            poller.poll("latency", seen)
            status.update(f"(d) latency: {len(uploaded)} uploaded, {len(seen.rows)} rows")
            time.sleep(args.poll_seconds)
    rows = list(seen.rows.values())
    # the figure: GCS event time → the row's batch write returned (the row is visible)
    event = [batches.finished[int(x["batch_id"])] - _dt(x["event_time"]).timestamp()
             for x in rows if x["event_time"] is not None]
    classified = [(_dt(x["processed_at"]) - _dt(x["event_time"])).total_seconds()
                  for x in rows if x["event_time"] is not None]
    publish = [(_dt(x["processed_at"]) - _dt(x["publish_time"])).total_seconds()
               for x in rows if x["publish_time"] is not None]
    visible = [batches.finished[int(x["batch_id"])] - uploaded[k]
               for k, x in seen.rows.items() if k in uploaded]
    polled = [seen.visible[k] - uploaded[k] for k in seen.rows if k in uploaded]
    progress = progress_by_batch(query)
    wait, in_batch = [], []
    for x in rows:
        stamp = progress.get(int(x["batch_id"]), {}).get("timestamp")
        if stamp and x["event_time"] is not None:
            begun = _dt(stamp)
            wait.append((begun - _dt(x["event_time"])).total_seconds())
            in_batch.append((_dt(x["processed_at"]) - begun).total_seconds())
    return {"n": len(rows), "p50": percentile(event, 50), "p95": percentile(event, 95),
            "classified_p50": percentile(classified, 50),
            "classified_p95": percentile(classified, 95),
            "max": max(event) if event else None,
            "publish_p50": percentile(publish, 50),
            "visible_p50": percentile(visible, 50), "visible_p95": percentile(visible, 95),
            "polled_p50": percentile(polled, 50), "polled_p95": percentile(polled, 95),
            "wait_p50": percentile(wait, 50), "in_batch_p50": percentile(in_batch, 50),
            "seen": seen}


# --- (f) sustained rate and backlog drain ----------------------------------------------------

P95_BOUND_S = 5.0  # a rate is sustained if p95 latency (event → processed_at) stays under this
BEHIND_S = 10.0  # a probe stops early once the backlog holds this many seconds of uploads
QUIET_S = 6.0  # after a query stops: its reader's last pull (5 s long-poll) has returned


def event_latencies(seen: Seen) -> list[float]:
    return [(_dt(x["processed_at"]) - _dt(x["event_time"])).total_seconds()
            for x in seen.rows.values() if x["event_time"] is not None]


def probe_rate(items: list, settings: Settings, poller: Poller, query: Any, batches: Any,
               cpu: CpuShare, rate_: float, seconds: float, prefix: str, timeout: float,
               producer: rehearsal.ProducerProcess | None = None,
               proxy: fieldproxy.FieldProxy | None = None) -> dict[str, Any]:
    """Upload at ``rate_`` for ``seconds``; kept up = p95 latency < P95_BOUND_S and the backlog
    (uploaded − inserted) never passed BEHIND_S seconds of uploads (the probe then stops).
    With ``producer`` the uploads come from that process (the CPU of this one is then the
    driver's alone); with ``proxy`` its call counts over the probe are reported."""
    from pipeline.stream.metrics import percentile

    since, stop, done = batches.inserted, threading.Event(), threading.Event()
    uploaded, box = [0], {}

    def on_result(result: Any) -> None:
        if result.status == "uploaded":
            uploaded[0] += 1

    def produce() -> None:
        try:
            if producer is not None:
                box["summary"] = producer.run(prefix, rate_, seconds, seed=7)
            else:
                s = upload(items, settings, prefix, rate_=rate_, duration=seconds, seed=7,
                           on_result=on_result, stop=stop)
                box["summary"] = {"uploaded": s.uploaded, "seconds": s.seconds}
        except BaseException as exc:  # noqa: BLE001 — re-raised below
            box["error"] = exc
        finally:
            done.set()

    def count() -> int:
        return producer.uploaded if producer is not None else uploaded[0]

    before, max_backlog = cpu.snapshot(), 0
    calls_before = proxy.counts() if proxy else {}
    threading.Thread(target=produce, name="bench-sustain-producer", daemon=True).start()
    while not done.wait(0.2):
        backlog = count() - (batches.inserted - since)
        max_backlog = max(max_backlog, backlog)
        if backlog > rate_ * BEHIND_S:
            stop.set()
            if producer is not None:
                producer.stop.set()
    if "error" in box:
        raise box["error"]
    summary, seen = box["summary"], Seen()
    poller.wait(prefix, seen, summary["uploaded"], query, batches, since, timeout, label=prefix)
    used = cpu.seconds(before)
    lat = event_latencies(seen)
    p95 = percentile(lat, 95)
    offered = rate(summary["uploaded"], min(seconds, max(1e-9, summary["seconds"])))
    kept = (not stop.is_set() and p95 is not None and p95 < P95_BOUND_S
            and summary["uploaded"] >= 0.9 * rate_ * seconds)
    out = {"rate": round(rate_, 2), "kept_up": kept, "uploaded": summary["uploaded"],
           "offered_img_s": r3(offered), "p50_s": r3(percentile(lat, 50)), "p95_s": r3(p95),
           "max_backlog": max_backlog, "stopped_early": stop.is_set(),
           "cpu_s": {k: round(v, 2) for k, v in used.items()}}
    if proxy is not None:  # calls the stream made while this probe's rows went through
        out["batches"] = len({int(r["batch_id"]) for r in seen.rows.values()})
        out["calls"] = fieldproxy.diff(proxy.counts(), calls_before)
    return out


def find_sustained(probe: Callable[[float], dict[str, Any]], estimate: float, probes: int
                   ) -> tuple[float, list[dict[str, Any]]]:
    """The highest probed rate kept up with: first 0.85 × ``estimate`` (a drain rate: no
    stream keeps up with all of its capacity, a batch's fixed cost needs headroom), then up
    by 12 % or down by 25 % until a pass and a fail bracket it, then bisect. At least two
    probes, more (up to ``probes``) only while nothing passed."""
    best, lowest_fail, results = 0.0, None, []
    r = 0.85 * estimate
    while len(results) < max(1, probes) and (len(results) < 2 or not best):
        out = probe(r)
        results.append(out)
        console.log(f"    {r:.1f} uploads/s: {'kept up' if out['kept_up'] else 'fell behind'} "
                    f"(p95 {out['p95_s']}s, max backlog {out['max_backlog']})")
        if out["kept_up"]:
            best = max(best, r)
        else:
            lowest_fail = r if lowest_fail is None else min(lowest_fail, r)
        if best and lowest_fail:
            r = (best + lowest_fail) / 2
        else:
            r = r * 1.12 if out["kept_up"] else r * 0.75
    return best, results


# --- Spark-side measurements ------------------------------------------------------------------

def _passthrough(frames: Iterator[Any]) -> Iterator[Any]:
    yield from frames


def anatomy(spark: Any, settings: Settings, objects: Sequence[tuple[str, int]], slots: int,
            repeats: int = 3) -> dict[str, float]:
    """What one micro-batch's classify job costs when the batch is small (median of repeats)."""
    from pipeline.stream.executor import RESULT_SCHEMA, WORK_SCHEMA, classify_partitions

    rows = [(settings.bucket, n, g, None) for n, g in objects[:SMALL_BATCH]]
    fn = classify_partitions(settings)

    def median(job: Callable[[], object]) -> float:
        job()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            job()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    return {
        "job_repartition_s": median(lambda: spark.createDataFrame(rows, WORK_SCHEMA)
                                    .repartition(slots).mapInPandas(_passthrough, WORK_SCHEMA)
                                    .collect()),
        "job_parallelize_s": median(lambda: spark.createDataFrame(
            spark.sparkContext.parallelize(rows, slots), WORK_SCHEMA)
            .mapInPandas(_passthrough, WORK_SCHEMA).collect()),
        "classify_small_s": median(lambda: spark.createDataFrame(
            spark.sparkContext.parallelize(rows, slots), WORK_SCHEMA)
            .mapInPandas(fn, RESULT_SCHEMA).collect()),
    }


def naive_udf(model: str, threads: int):
    """The prior implementations' shape: Iterator[pd.Series] pandas UDF, model per Arrow batch,
    PIL decode (no draft) + torchvision v1 transforms, one image per forward pass."""
    import pandas as pd
    from pyspark.sql.functions import pandas_udf

    def naive(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        for batch in batches:
            yield pd.Series(naive_classifier(model, threads)(batch))  # model per Arrow batch

    # real types, not the postponed strings: Spark infers the UDF kind from them
    naive.__annotations__ = {"batches": Iterator[pd.Series], "return": Iterator[pd.Series]}
    return pandas_udf("string")(naive)


def handler_in_spark(settings: Settings):
    """The pipeline's classify stage on a bytes column (mapInPandas, cached handler)."""
    import pandas as pd

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from pipeline.model import handler as model_handler

        handler = model_handler.get_handler(settings)
        for frame in frames:
            preds = handler.run_inference(list(frame["data"]))
            yield pd.DataFrame({"label": [p.topk[0][1] if p.topk else p.status for p in preds]})

    return run


def compare_classifiers(spark: Any, settings: Settings, blobs: list[bytes], slots: int,
                        threads: int, rounds: int) -> dict[str, Any]:
    """Naive UDF vs the pipeline's handler on one cached bytes column, alternated, best round
    of each (other processes on a shared machine only ever make a round slower)."""
    df = (spark.createDataFrame([(i, b) for i, b in enumerate(blobs)], "id long, data binary")
          .repartition(slots).cache())
    df.count()  # materialise: the timings below are the classify stage only
    naive, ours = naive_udf(settings.model, threads), handler_in_spark(settings)
    best = {"naive": 0.0, "ours": 0.0}
    labels: dict[str, list] = {}
    for _ in range(rounds):
        for name, job in (("naive", lambda: df.select(naive("data")).collect()),
                          ("ours", lambda: df.mapInPandas(ours, "label string").collect())):
            started = time.perf_counter()
            labels[name] = [r[0] for r in job()]
            best[name] = max(best[name], rate(len(labels[name]), time.perf_counter() - started))
    df.unpersist()
    agree = sum(a == b for a, b in zip(labels["naive"], labels["ours"], strict=True))
    return {"naive_img_s": best["naive"], "ours_img_s": best["ours"],
            "top1_agreement": rate(agree, len(blobs))}


def probe_threads(spark: Any, settings: Settings, slots: int) -> list[int]:
    """torch.get_num_threads() inside the executors' Python workers, after get_handler."""
    import pandas as pd

    def fn(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import torch

        from pipeline.model import handler as model_handler

        model_handler.get_handler(settings)
        for _ in frames:
            pass
        yield pd.DataFrame({"threads": [torch.get_num_threads()]})

    df = spark.range(slots).repartition(slots)
    return sorted({int(r.threads) for r in df.mapInPandas(fn, "threads int").collect()})


# --- (e) memory -------------------------------------------------------------------------------

def measure_rss(spark: Any, settings: Settings, objects: Sequence[tuple[str, int]],
                sizes: dict[str, int], images: int, slots: int) -> dict[str, Any]:
    """Worker RSS over ``images`` images (after a warm-up job), in jobs of RSS_JOB_IMAGES.

    Growth = peak VmRSS while the last quarter of the images ran - peak while the first
    quarter ran (max over workers). A single before/after pair is not used as the figure: the
    allocator swings a worker's RSS by tens of MB from one batch to the next (see the curve), so
    a pair measures where in that swing each snapshot fell. The pair is reported too.
    """
    from pipeline.stream.executor import RESULT_SCHEMA, WORK_SCHEMA, classify_partitions

    fn = classify_partitions(settings)
    work = [(settings.bucket, name, gen, sizes.get(name)) for name, gen in objects]

    def job(n: int, offset: int) -> list:
        rows = [work[(offset + i) % len(work)] for i in range(n)]
        df = spark.createDataFrame(spark.sparkContext.parallelize(rows, min(slots, n)), WORK_SCHEMA)
        return df.mapInPandas(fn, RESULT_SCHEMA).collect()

    warm = job(RSS_JOB_IMAGES, 0)  # model loaded and one chunk done in every worker
    pids = sorted({int(r.worker_pid) for r in warm})
    before = {p: vmrss_mb(p) for p in pids}
    hwm_before = {p: vmrss_mb(p, "VmHWM") for p in pids}
    curve, loads, statuses = [], {}, {}
    started = time.perf_counter()
    with console.status("(e) memory: classifying …") as status, RssSampler(pids) as sampler:
        while sampler.done < images:
            n = min(RSS_JOB_IMAGES, images - sampler.done)
            for r in job(n, RSS_JOB_IMAGES + sampler.done):
                loads[int(r.worker_pid)] = int(r.model_loads)
                statuses[r.status] = statuses.get(r.status, 0) + 1
            sampler.done += n
            curve.append((sampler.done, {str(p): r3(vmrss_mb(p)) for p in pids}))
            status.update(f"(e) memory: {sampler.done}/{images} images")
    seconds = time.perf_counter() - started
    after = {p: vmrss_mb(p) for p in pids}
    hwm_after = {p: vmrss_mb(p, "VmHWM") for p in pids}
    quarter = max(1, images // 4)
    first = {p: sampler.peak(p, 0, quarter) for p in pids}
    last = {p: sampler.peak(p, images - quarter, images + 1) for p in pids}
    if any(v is None for v in (*first.values(), *last.values())):  # too few samples (tiny runs)
        first, last = before, after

    def growth(a: dict, b: dict) -> float | None:
        pairs = [b[p] - a[p] for p in pids if a.get(p) is not None and b.get(p) is not None]
        return max(pairs) if pairs else None

    return {
        "growth_mb": growth(first, last),
        "raw_growth_mb": growth(before, after),
        "hwm_growth_mb": growth(hwm_before, hwm_after),
        "first_quarter_peak_mb": {str(p): r3(v) for p, v in first.items()},
        "last_quarter_peak_mb": {str(p): r3(v) for p, v in last.items()},
        "before_mb": {str(p): r3(v) for p, v in before.items()},
        "after_mb": {str(p): r3(v) for p, v in after.items()},
        "samples": len(sampler.samples),
        "new_workers": sorted(set(loads) - set(pids)),
        "model_loads": {str(p): v for p, v in loads.items()},
        "statuses": statuses, "seconds": seconds, "img_s": rate(images, seconds),
        "curve": curve[:: max(1, len(curve) // 8)] + curve[-1:],
    }


# --- the run ----------------------------------------------------------------------------------

@dataclass
class Run:
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def phase(self, name: str, began: float, **extra: Any) -> None:
        self.phases[name] = {"seconds": round(time.monotonic() - began, 1), "loadavg": loadavg(),
                             **extra}
        console.log(f"[bold]{name}[/] done in {self.phases[name]['seconds']}s "
                    f"(load {self.phases[name]['loadavg']})")


@dataclass
class FetchedBytes:
    """The (b) objects' bytes, fetched as a partition would: (c)'s input, (e)'s sizes."""

    data: list[bytes] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    img_s: float = 0.0


@dataclass
class Figures:
    """What the phases measured, filled in the order they run."""

    ceiling: dict[str, Any] = field(default_factory=dict)  # (a), before Spark starts
    rounds: list[dict[str, Any]] = field(default_factory=list)  # (b), every round
    pipeline: dict[str, Any] = field(default_factory=dict)  # (b), the best round
    ceiling_again: dict[str, Any] = field(default_factory=dict)  # (a), right after (b)
    latency: dict[str, Any] = field(default_factory=dict)  # (d)
    profile_pipeline: list[dict[str, Any]] = field(default_factory=list)
    profile_latency: list[dict[str, Any]] = field(default_factory=list)
    stream_worker_pids: list[int] = field(default_factory=list)
    anatomy: dict[str, float] = field(default_factory=dict)
    fetched: FetchedBytes = field(default_factory=FetchedBytes)
    memory: dict[str, Any] = field(default_factory=dict)  # (e)
    baseline: dict[str, Any] = field(default_factory=dict)  # (c)
    camera: dict[str, Any] | None = None  # (c) on camera-sized JPEGs
    executor_threads: list[int] = field(default_factory=list)
    drain: dict[str, Any] = field(default_factory=dict)  # (f) bucketlens on a backlog
    sustained: float = 0.0  # (f) bucketlens, highest rate kept up with
    probes: list[dict[str, Any]] = field(default_factory=list)
    seed_drain: dict[str, Any] = field(default_factory=dict)  # (f) the seed-style stream
    seed_sustained: float = 0.0
    seed_probes: list[dict[str, Any]] = field(default_factory=list)


def running_stack(run_dir: Path) -> Any:
    """The local stack running in ``run_dir``; one sentence when there is none."""
    from deploy import localstack

    stack = localstack.StackState.load(run_dir)
    dead = [name for name, info in localstack.status(run_dir).items() if not info["alive"]]
    if dead:
        raise SystemExit(f"--stack {run_dir}: {', '.join(dead)} not running "
                         f"(`bucketlens local up --run-dir {run_dir}` starts them)")
    return stack


def own_resources(work_dir: Path) -> dict[str, str]:
    """Variables naming a bucket, subscription, topics and dataset of this run's own, and its
    checkpoints under ``work_dir``: on a shared stack the defaults may hold another's data."""
    uid = os.urandom(4).hex()
    return {"BUCKETLENS_BUCKET": f"bench-{uid}", "BUCKETLENS_SUBSCRIPTION": f"bench-{uid}",
            "BUCKETLENS_DEAD_LETTER_TOPIC": f"bench-dlq-{uid}",
            "BUCKETLENS_ALERT_TOPIC": f"bench-alerts-{uid}", "BUCKETLENS_DATASET": f"bench_{uid}",
            "BUCKETLENS_CHECKPOINT": str(work_dir / "checkpoints" / "predictions")}


def drop_subscription(settings: Settings) -> None:
    """Delete the run's subscription from a stack that keeps running (best effort)."""
    from pipeline import clients

    try:
        clients.subscriber_client(settings).delete_subscription(
            subscription=settings.subscription_path)
    except Exception as exc:  # noqa: BLE001 — the figures are taken; say so and go on
        console.log(f"could not delete {settings.subscription_path}: {exc!r}")


class Bench:
    """What the phases share: the local stack, the ceiling's processes, Spark and the stream.
    Leaving the ``with`` block stops all of them (a ``--stack`` stack runs on) and removes
    what the run made."""

    def __init__(self, args: argparse.Namespace) -> None:
        from deploy import localstack

        self.args, self.r = args, Run()
        self.o: dict[str, Any] = {"loadavg_start": loadavg(), "machine": machine(),
                                  "images": args.images}
        self.own_dir = not args.run_dir  # a temporary directory of ours is removed at the end
        self.run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="bucketlens-bench-"))
        # the stack's directory: ours (started and stopped here), or --stack's running one
        self.own_stack = not args.stack
        self.stack_dir = Path(args.stack).resolve() if args.stack else self.run_dir
        console.rule("[bold]bucketlens bench")
        console.log(f"machine: {self.o['machine']}; load {self.o['loadavg_start']}")
        self.items, self.blobs = sample_blobs(self.run_dir / "field-mix" if args.field else None)
        self.settings = Settings.from_env()
        self.stream_settings = self.settings  # the stream's endpoints (the proxy's, in --field)
        if args.field:
            camera = [len(b) for i, b in zip(self.items, self.blobs, strict=True)
                      if re.search(r"-\d+x\d+$", i.path.stem)]
            self.o["field_mix"] = {
                "uploads": len(self.items), "camera_sized": len(camera),
                "camera_sizes": [f"{w}x{h}" for w, h in rehearsal.CAMERA_SIZES],
                "camera_kb": [round(min(camera) / 1024), round(max(camera) / 1024)]}
        self.proxy: fieldproxy.FieldProxy | None = None
        self.producer: rehearsal.ProducerProcess | None = None
        self.slots = task_slots(self.settings.spark_master)
        # The ceiling's processes import torch while the emulators start.
        s = self.settings
        model = localstack.LOCAL_MODEL if s.model == Settings.model else s.model
        self.ceiling = Ceiling(s.replace(model=model), self.blobs, self.slots)  # as StackState.settings
        self.environment = ExitStack()  # the stack's variables, for Spark and its workers
        self.cpu: CpuShare | None = None
        self.spark: Any = None
        self.query: Any = None
        self.sink: TimedSink | None = None
        self.batches: Any = None  # TimedBatches, once the stream runs
        self.poller: Any = None  # Poller, once the stream runs

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        from deploy import localstack

        self.ceiling.close()
        self.stop_query()
        if self.spark is not None:
            self.spark.stop()
        for helper in (self.producer, self.proxy):
            if helper is not None:
                helper.close()
        if self.own_stack:
            localstack.down(self.stack_dir)
        elif self.cpu is not None:  # the stack runs on: stop fanning its uploads out to us
            drop_subscription(self.settings)
        if self.own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.environment.close()

    def stop_query(self) -> None:
        if self.query is not None:
            self.query.stop()
            self.query = None

    def start_stack(self) -> None:
        from deploy import localstack

        t = time.monotonic()
        if self.own_stack:
            console.log(f"starting the local stack in {self.stack_dir} …")
            stack = localstack.up(self.stack_dir, self.settings)  # stops what it started if it fails
            env = stack.env()
        else:
            stack = running_stack(self.stack_dir)
            console.log(f"using the local stack running in {self.stack_dir}")
            env = {**stack.env(), **own_resources(self.run_dir)}
        self.environment.enter_context(localstack.environment(env))
        self.settings = self.stream_settings = Settings.from_env()
        if not self.own_stack:
            from deploy import provision

            # what `local up` provisions, but the analytics views: the bench reads none
            provision.apply_resources([r for r in provision.resources(self.settings)
                                       if r.kind != "views"])
        self.cpu = CpuShare({svc.pid for svc in stack.services.values()}, os.cpu_count() or 1)
        if self.args.field:
            self.start_field()
        self.r.phase("stack", t)
        self.o["model"] = self.settings.model
        self.o["settings"] = {k: getattr(self.settings, k) for k in (
            "spark_master", "trigger_seconds", "max_messages_per_batch", "batch_size",
            "fetch_threads", "num_partitions", "torch_threads")}

    def start_field(self) -> None:
        """The field rehearsal's helpers: the latency proxy in front of fake-gcs-server and
        bqemulator (REST and Storage Write), whose ports the stream's settings then name, and
        the producer's own process. The producer and the poller keep the direct endpoints."""
        from urllib.parse import urlsplit

        s = self.settings
        gcs, bq = urlsplit(s.storage_emulator_host), urlsplit(s.bq_endpoint)
        grpc_host, _, grpc_port = s.bq_storage_endpoint.rpartition(":")
        self.proxy = fieldproxy.FieldProxy({"gcs": (gcs.hostname, gcs.port),
                                            "bq": (bq.hostname, bq.port),
                                            "grpc": (grpc_host, int(grpc_port))},
                                           {**fieldproxy.LATENCY, **self.args.field_latency}
                                           ).start()
        ports = self.proxy.ports
        self.stream_settings = s.replace(
            storage_emulator_host=f"http://127.0.0.1:{ports['gcs']}",
            bq_endpoint=f"http://127.0.0.1:{ports['bq']}",
            bq_storage_endpoint=f"127.0.0.1:{ports['grpc']}")
        self.producer = rehearsal.ProducerProcess(self.items, s)
        self.cpu.others = {self.proxy.process.pid, self.producer.process.pid}
        self.o["field_latency_added_s"] = self.proxy.latency
        console.log(f"field proxy on {ports} (latency per call {self.proxy.latency})")

    def ceiling_before_spark(self) -> dict[str, Any]:
        """(a) the ceiling, first taken before any JVM of ours runs."""
        t = time.monotonic()
        console.log(f"(a) ceiling: {self.slots} processes x {self.ceiling.threads} torch "
                    f"thread(s), {self.args.ceiling_seconds:g}s …")
        ceil = self.ceiling.measure(self.args.ceiling_seconds, single=True)
        self.r.phase("ceiling", t, img_s=r3(ceil["img_s"]))
        return ceil

    def start_stream(self) -> None:
        """Spark and the stream, warmed up (Python workers started, model loaded in each)."""
        from pipeline.bigquery.sinks import make_sink
        from pipeline.stream import job as stream
        from pipeline.stream.spark import session

        t = time.monotonic()
        console.log("starting Spark and the stream …")
        s = self.stream_settings
        self.spark = session(s.spark_master, app="bucketlens-bench",
                             conf={"spark.sql.streaming.numRecentProgressUpdates": "1000",
                                   "spark.ui.showConsoleProgress": "false"})
        self.sink = TimedSink(make_sink(s.sink, s))
        self.batches = TimedBatches(stream.BatchProcessor(s, sink=self.sink))
        self.query, _ = stream.start(s, spark=self.spark, processor=self.batches)
        s = self.settings  # uploads and polls go straight to the emulators
        self.poller = Poller(s)
        warm = max(2 * self.slots, min(len(self.items), 10))
        upload(self.items, s, "warmup", limit=warm, rate_=1000, seed=1)
        self.poller.wait("warmup", Seen(), warm, self.query, self.batches, 0, self.args.timeout,
                         label="warm-up")
        # A micro-batch's task holds two Python workers (the source's reader and the classify
        # function), taken from a FIFO pool, so the classify role rotates over 2 x slots
        # workers and each loads the model the first time it gets it. Single-image batches,
        # one after another, walk the rotation so no later phase pays a load.
        for i in range(2 * self.slots + 2):
            since = self.batches.inserted
            upload(self.items, s, f"warmup{i}", limit=1, rate_=1000, seed=10 + i)
            self.poller.wait(f"warmup{i}", Seen(), 1, self.query, self.batches, since,
                             self.args.timeout, label="warm-up")
        self.o["warmup_workers"] = {
            str(pid): loads for rep in self.batches.reports for pid, loads in rep.workers.items()}
        self.r.phase("spark+warmup", t)

    def pipeline_rounds(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(b) the pipeline at full producer speed, ``--pipeline-rounds`` times: every round's
        figures, and the best round (its steady state) that counts."""
        t = time.monotonic()
        rounds: list[dict[str, Any]] = []
        for i in range(self.args.pipeline_rounds):
            console.log(f"(b) pipeline round {i + 1}: {self.args.images} uploads at full speed …")
            since = self.batches.inserted
            cpu_before = self.cpu.snapshot()
            first_upload = time.time()
            summary = upload(self.items, self.settings, f"e2e{i}", limit=self.args.images,
                             rate_=10_000, seed=2 + i)
            upload_s = time.time() - first_upload
            seen = Seen()
            self.poller.wait(f"e2e{i}", seen, summary.uploaded, self.query, self.batches, since,
                             self.args.timeout, label=f"(b) pipeline round {i + 1}")
            fig = pipeline_figures(seen, first_upload, self.batches)
            fig.update(summary=summary, seen=seen, upload_img_s=rate(summary.uploaded, upload_s),
                       loadavg=loadavg(), cpu_share=self.cpu.since(cpu_before))
            rounds.append(fig)
            console.log(f"(b) round {i + 1}: {fig['steady_img_s'] or fig['wall_img_s']:.1f} "
                        f"images/s steady, {fig['wall_img_s']:.1f} wall (load {fig['loadavg']}; "
                        f"share of the cores {fig['cpu_share']})")
        best = max(rounds, key=lambda f: f["steady_img_s"] or f["wall_img_s"])
        self.r.phase("pipeline", t, upload_img_s=round(best["upload_img_s"], 1))
        return rounds, best

    def ceiling_after_pipeline(self) -> dict[str, Any]:
        """(a) again, next to (b) in time: the same background load."""
        t = time.monotonic()
        ceil = self.ceiling.measure(self.args.ceiling_seconds)
        self.ceiling.close()
        self.r.phase("ceiling-again", t, img_s=r3(ceil["img_s"]))
        return ceil

    def latency(self) -> dict[str, Any]:
        """(d) latency at a steady upload rate."""
        t = time.monotonic()
        console.log(f"(d) latency: {self.args.latency_rate:g} images/s for "
                    f"{self.args.latency_seconds:g}s …")
        lat = measure_latency(self.items, self.settings, self.poller, self.query, self.batches,
                              self.args)
        self.r.phase("latency", t)
        return lat

    def stop_stream(self, pipeline: Seen, latency: Seen
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]:
        """The batch profiles of (b) and (d) from the query's progress and the stream's Python
        workers; then the query stops."""
        progress = progress_by_batch(self.query)
        pipeline_b, latency_b = (
            batch_profile({int(x["batch_id"]) for x in seen.rows.values()}, self.batches,
                          self.sink, progress) for seen in (pipeline, latency))
        workers = sorted({p for rep in self.batches.reports for p in rep.workers})
        self.stop_query()
        return pipeline_b, latency_b, workers

    def restart(self, name: str, foreach: Any) -> Any:
        """A new query on the same subscription with ``foreach`` as its ``foreachBatch`` and a
        checkpoint of its own (the previous query stops first: one reader at a time)."""
        from pipeline.stream import job as stream

        self.stop_query()
        s = self.stream_settings
        self.query = (stream.messages(self.spark, s).writeStream.foreachBatch(foreach)
                      .option("checkpointLocation", str(self.run_dir / f"checkpoint-{name}"))
                      .trigger(processingTime=f"{s.trigger_seconds} seconds")
                      .queryName(f"bench-{name}").start())
        return self.query

    def drain(self, name: str, foreach: Any, n: int) -> dict[str, Any]:
        """(f) ``n`` uploads while no query reads, then a query started on the backlog:
        images / (last of their batches returned − query started)."""
        t = time.monotonic()
        self.stop_query()
        time.sleep(QUIET_S)
        console.log(f"(f) {name}: draining a backlog of {n} uploads …")
        summary = upload(self.items, self.settings, f"drain-{name}", limit=n, rate_=10_000,
                         seed=5)
        since, before, started = foreach.inserted, self.cpu.snapshot(), time.time()
        query, seen = self.restart(name, foreach), Seen()
        self.poller.wait(f"drain-{name}", seen, summary.uploaded, query, foreach, since,
                         self.args.timeout + n / 10, label=f"(f) drain {name}")
        batch_ids = {int(r["batch_id"]) for r in seen.rows.values()}
        seconds = max(foreach.finished[b] for b in batch_ids) - started
        used = self.cpu.seconds(before)
        self.r.phase(f"drain-{name}", t, img_s=r3(rate(summary.uploaded, seconds)))
        return {"images": summary.uploaded, "seconds": round(seconds, 2), "batches": len(batch_ids),
                "img_s": rate(summary.uploaded, seconds),
                "cpu_s": {k: round(v, 2) for k, v in used.items()}}

    def sustained(self, name: str, foreach: Any, estimate: float
                  ) -> tuple[float, list[dict[str, Any]]]:
        """(f) the highest upload rate ``name``'s running query keeps up with."""
        t = time.monotonic()
        console.log(f"(f) {name}: the highest rate kept up with for "
                    f"{self.args.sustain_seconds:g}s (from its drain rate {estimate:.1f}/s) …")
        count = iter(range(1000))

        def probe(rate_: float) -> dict[str, Any]:
            return probe_rate(self.items, self.settings, self.poller, self.query, foreach,
                              self.cpu, rate_, self.args.sustain_seconds,
                              f"sustain-{name}-{next(count)}", self.args.timeout,
                              producer=self.producer, proxy=self.proxy)

        best, probes = find_sustained(probe, estimate, self.args.sustain_probes)
        self.r.phase(f"sustained-{name}", t, img_s=r3(best))
        return best, probes

    def seed_style(self) -> SeedStyleBatches:
        """The seed-style stream's foreachBatch; also times its per-call model load here (the
        median of 3, after one that warms the file cache), which it pays per partition per
        micro-batch."""
        times = []
        for _ in range(4):
            started = time.perf_counter()
            naive_classifier(self.settings.model, self.ceiling.threads)
            times.append(time.perf_counter() - started)
        self.o["seed_style_model_load_s"] = r3(statistics.median(times[1:]))
        s = self.stream_settings
        # in the field the seeds' write is what they had: an append, no dedupe, no query
        sink = seed_style.NoDedupeSink(s) if self.args.field else self.sink
        return SeedStyleBatches(s, self.slots, self.ceiling.threads, sink=sink)

    def small_batch_anatomy(self, objects: Sequence[tuple[str, int]]) -> dict[str, float]:
        t = time.monotonic()
        small = anatomy(self.spark, self.settings, objects, self.slots)
        self.r.phase("anatomy", t)
        return small

    def fetch(self, objects: Sequence[tuple[str, int]]) -> FetchedBytes:
        from pipeline.notifications import ObjectKey
        from pipeline.stream import fetch

        keys = [ObjectKey(self.settings.bucket, n, g) for n, g in objects]
        started = time.perf_counter()
        fetched = fetch.fetch_all(keys, self.settings)
        seconds = time.perf_counter() - started
        ok = [f for f in fetched if f.ok]
        return FetchedBytes(data=[f.data for f in ok], sizes={f.key.name: len(f.data) for f in ok},
                            img_s=rate(len(keys), seconds))

    def memory(self, objects: Sequence[tuple[str, int]], sizes: dict[str, int]) -> dict[str, Any]:
        """(e) memory, before (c) runs other code in the same Python workers."""
        t = time.monotonic()
        console.log(f"(e) memory: {self.args.rss_images} images through the executor function …")
        rss = measure_rss(self.spark, self.settings, objects, sizes, self.args.rss_images,
                          self.slots)
        self.r.phase("memory", t)
        return rss

    def baseline(self, data: list[bytes]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(c) the naive baseline on the same fetched bytes, then on camera-sized JPEGs."""
        t = time.monotonic()
        args, threads = self.args, self.ceiling.threads
        console.log(f"(c) baseline: naive pandas UDF vs the pipeline's handler, "
                    f"{len(data)} fetched images, best of {args.baseline_rounds} …")
        base = compare_classifiers(self.spark, self.settings, data, self.slots, threads,
                                   args.baseline_rounds)
        camera = None
        if args.camera_images:
            console.log(f"(c) the same on {args.camera_images} camera-sized (4032x3024) JPEGs …")
            camera = compare_classifiers(self.spark, self.settings,
                                         [camera_jpeg()] * args.camera_images, self.slots,
                                         threads, 1)
        self.r.phase("baseline", t)
        return base, camera

    def probe_executor_threads(self) -> list[int]:
        return probe_threads(self.spark, self.settings, self.slots)


def run(args: argparse.Namespace) -> dict[str, Any]:
    f = Figures()
    with Bench(args) as bench:
        bench.start_stack()
        f.ceiling = bench.ceiling_before_spark()
        bench.start_stream()
        f.rounds, f.pipeline = bench.pipeline_rounds()
        f.ceiling_again = bench.ceiling_after_pipeline()
        f.latency = bench.latency()
        f.profile_pipeline, f.profile_latency, f.stream_worker_pids = bench.stop_stream(
            f.pipeline["seen"], f.latency["seen"])
        f.drain = bench.drain("bucketlens", bench.batches, args.drain_images)
        f.sustained, f.probes = bench.sustained("bucketlens", bench.batches, f.drain["img_s"])
        seed = bench.seed_style()
        f.seed_drain = bench.drain("seed-style", seed, args.seed_drain_images)
        f.seed_sustained, f.seed_probes = bench.sustained("seed-style", seed,
                                                          f.seed_drain["img_s"])
        bench.stop_query()
        objects = f.pipeline["summary"].objects
        f.anatomy = bench.small_batch_anatomy(objects)
        f.fetched = bench.fetch(objects)
        f.memory = bench.memory(objects, f.fetched.sizes)
        f.baseline, f.camera = bench.baseline(f.fetched.data)
        f.executor_threads = bench.probe_executor_threads()
    o = report(bench.o, bench.r, args, f)
    show(o, f.profile_pipeline, f.profile_latency)
    return o


def run_field(args: argparse.Namespace) -> dict[str, Any]:
    """The field rehearsal: the stream behind the latency proxy, on the field mix — the model's
    CPU per image, bucketlens's backlog drain and sustained-rate search, latency at a steady
    2 uploads/s, then the seed-style stream's drain and search."""
    f = Figures()
    with Bench(args) as bench:
        bench.start_stack()
        t = time.monotonic()
        console.log(f"(a) model CPU on the field mix: {bench.slots} processes, "
                    f"{args.ceiling_seconds:g}s …")
        f.ceiling = bench.ceiling.measure(args.ceiling_seconds)
        bench.ceiling.close()
        bench.r.phase("ceiling", t, img_s=r3(f.ceiling["img_s"]))
        bench.start_stream()
        f.drain = bench.drain("bucketlens", bench.batches, args.drain_images)
        f.sustained, f.probes = bench.sustained("bucketlens", bench.batches, f.drain["img_s"])
        # latency last: the stream's first 2 x ack deadline + 2 x trigger after a start verify
        # every batch with BigQuery (pipeline/stream/recent.py); a user's stream runs long past them
        calls = bench.proxy.counts()
        f.latency = bench.latency()
        bench.o["field_latency_calls"] = fieldproxy.diff(bench.proxy.counts(), calls)
        f.profile_pipeline, f.profile_latency, _ = bench.stop_stream(Seen(), f.latency["seen"])
        seed = bench.seed_style()
        f.seed_drain = bench.drain("seed-style", seed, args.seed_drain_images)
        f.seed_sustained, f.seed_probes = bench.sustained("seed-style", seed,
                                                          f.seed_drain["img_s"])
        bench.stop_query()
        bench.o["field_calls_total"] = bench.proxy.counts()
    o = report_field(bench.o, bench.r, args, f)
    show_field(o)
    return o


FIELD_KEYS = ("field_max_sustained_img_s", "field_seed_style_max_sustained_img_s",
              "field_ratio_to_seed_style", "field_latency_p50_s", "field_latency_p95_s",
              "queries_per_batch", "product_cpu_s_per_image", "model_cpu_s_per_image",
              "cost_per_million_usd_27", "cost_per_million_usd_1")
FIELD_TARGETS = {
    "field_ratio_to_seed_style": (">=", 3.0),
    "field_latency_p50_s": ("<", 1.0),
    "field_latency_p95_s": ("<", 2.0),
    "queries_per_batch": ("<", 1e-9),
    "cost_per_million_usd_27": ("<=", 2.0),
    "cost_per_million_usd_1": ("<=", 2.0),
}


def highest_kept(probes: list[dict[str, Any]], best: float) -> dict[str, Any] | None:
    """The probe at the sustained rate (the highest kept up with), else None."""
    kept = [p for p in probes if p["kept_up"] and p["rate"] == round(best, 2)]
    return kept[0] if kept else None


def report_field(o: dict[str, Any], r: Run, args: argparse.Namespace, f: Figures
                 ) -> dict[str, Any]:
    """The field rehearsal's figures (bench/README.md "Field rehearsal" defines each)."""
    lat = f.latency
    at = highest_kept(f.probes, f.sustained)
    steady = at or (f.probes[-1] if f.probes else None)  # the calls of a steady stretch
    calls = steady["calls"] if steady else {}
    batches = steady["batches"] if steady else 0
    queries = rate(calls.get("bq_query", 0), batches) if batches else None
    product = rate(at["cpu_s"]["product"], at["uploaded"]) if at else None
    model = f.ceiling["cpu_s_per_image"]
    gets = rate(calls.get("gcs_get", 0) + calls.get("gcs_other", 0), steady["uploaded"]
                ) if steady and steady["uploaded"] else 1.0
    trigger = o["settings"]["trigger_seconds"]
    costs = {u: rehearsal.cost_per_million(product, u, trigger, queries or 0.0, gets)
             for u in (27, 1)} if product is not None else {}
    o.update({
        "field": True,
        "field_max_sustained_img_s": r3(f.sustained),
        "field_seed_style_max_sustained_img_s": r3(f.seed_sustained),
        "field_ratio_to_seed_style": r3(rate(f.sustained, f.seed_sustained))
        if f.seed_sustained else None,
        "field_latency_p50_s": r3(lat["p50"]),
        "field_latency_p95_s": r3(lat["p95"]),
        "queries_per_batch": r3(queries),
        "product_cpu_s_per_image": r3(product),
        "model_cpu_s_per_image": r3(model),
        "cost_per_million_usd_27": r3(costs[27].total) if costs else None,
        "cost_per_million_usd_1": r3(costs[1].total) if costs else None,
        # detail
        "product_to_model_cpu": r3(rate(product, model)) if product else None,
        "cost_breakdown_27": {k: r3(v) for k, v in vars(costs[27]).items()} if costs else None,
        "cost_breakdown_1": {k: r3(v) for k, v in vars(costs[1]).items()} if costs else None,
        "appends_per_batch": r3(rate(calls.get("append_rows", 0), batches)) if batches else None,
        "append_calls_per_batch": r3(rate(calls.get("append_calls", 0), batches))
        if batches else None,
        "gcs_calls_per_image": r3(gets),
        "field_model_img_s": r3(f.ceiling["img_s"]),
        "field_drain_img_s": r3(f.drain["img_s"]),
        "field_seed_style_drain_img_s": r3(f.seed_drain["img_s"]),
        "field_sustained_probes": f.probes,
        "field_seed_style_probes": f.seed_probes,
        "field_latency_images": lat["n"],
        "field_classified_latency_p50_s": r3(lat["classified_p50"]),
        "field_classified_latency_p95_s": r3(lat["classified_p95"]),
        "field_latency_in_batch_p50_s": r3(lat["in_batch_p50"]),
        "profile_field_latency": summarize_profile(f.profile_latency),
        "sustain_seconds": args.sustain_seconds,
        "sustain_p95_bound_s": P95_BOUND_S,
        "phases": r.phases,
        "seconds": round(time.monotonic() - r.started, 1),
        "loadavg_end": loadavg(),
    })
    return o


def show_field(o: dict[str, Any]) -> None:
    table = Table(title=f"bucketlens field rehearsal — {o['model']}, {o['machine']['cores']} "
                        f"cores, added latency {o['field_latency_added_s']}")
    for col in ("figure", "value", "target"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for k in FIELD_KEYS:
        target, mark = FIELD_TARGETS.get(k), ""
        if target and o[k] is not None:
            ok = {">=": o[k] >= target[1], "<": o[k] < target[1], "<=": o[k] <= target[1]
                  }[target[0]]
            mark = f"{target[0]} {target[1]:g} " + ("[green]met[/]" if ok else "[red]missed[/]")
        table.add_row(k, f"{o[k]}", mark)
    console.print(table)
    t = Table(title=f"(f) field: steady upload rates, {o['sustain_seconds']:g}s each")
    for c in ("stream", "rate", "kept_up", "p50_s", "p95_s", "uploaded", "batches", "calls"):
        t.add_column(c, justify="right")
    for name, probes in (("bucketlens", o["field_sustained_probes"]),
                         ("seed-style", o["field_seed_style_probes"])):
        for pr in probes:
            t.add_row(name, *(str(pr.get(c)) for c in ("rate", "kept_up", "p50_s", "p95_s",
                                                       "uploaded", "batches", "calls")))
    console.print(t)
    console.log(f"load average: start {o['loadavg_start']}, end {o['loadavg_end']}; "
                f"{o['seconds']}s in all")


def report(o: dict[str, Any], r: Run, args: argparse.Namespace, f: Figures) -> dict[str, Any]:
    """The run's figures, as the JSON line prints them (bench/README.md defines each)."""
    ceil1, ceil2, pipe, lat, rss = f.ceiling, f.ceiling_again, f.pipeline, f.latency, f.memory
    base, camera = f.baseline, f.camera
    steady = pipe["steady_img_s"] if pipe["steady_img_s"] is not None else pipe["wall_img_s"]
    ceiling_img_s = max(ceil1["img_s"], ceil2["img_s"])
    kept = [p for p in f.probes if p["kept_up"] and p["rate"] == round(f.sustained, 2)]
    cpu = kept[0]["cpu_s"] if kept else None
    o.update({
        "ceiling_img_s": r3(ceiling_img_s),
        # (f)
        "max_sustained_img_s": r3(f.sustained),
        "seed_style_max_sustained_img_s": r3(f.seed_sustained),
        "ratio_to_seed_style": r3(rate(f.sustained, f.seed_sustained)) if f.seed_sustained
        else None,
        "ratio_to_ceiling": r3(rate(f.sustained, ceiling_img_s)),
        "drain_img_s": r3(f.drain["img_s"]),
        "drain_ratio_to_ceiling": r3(rate(f.drain["img_s"], ceiling_img_s)),
        "drain_images": f.drain["images"],
        "drain_batches": f.drain["batches"],
        "drain_cpu_s": f.drain["cpu_s"],
        "seed_style_drain_img_s": r3(f.seed_drain["img_s"]),
        "seed_style_drain_images": f.seed_drain["images"],
        "sustain_seconds": args.sustain_seconds,
        "sustain_p95_bound_s": P95_BOUND_S,
        "sustained_probes": f.probes,
        "seed_style_probes": f.seed_probes,
        # CPU seconds per image at the sustained rate: Spark's JVM and Python workers and the
        # driver (its producer threads included), i.e. what a cluster runs; emulators apart
        "cpu_s_per_image": r3((cpu["spark_jvm_and_workers"] + cpu["driver_and_producer"])
                              / kept[0]["uploaded"]) if cpu else None,
        "cpu_s_per_image_emulators": r3(cpu["emulators"] / kept[0]["uploaded"]) if cpu else None,
        # (b) and (c)
        "pipeline_img_s": r3(steady),
        "burst_ratio_to_ceiling": r3(rate(steady, ceiling_img_s)),
        "baseline_img_s": r3(base["naive_img_s"]),
        "ratio_to_baseline": r3(rate(steady, base["naive_img_s"])),
        "latency_p50_s": r3(lat["p50"]),
        "latency_p95_s": r3(lat["p95"]),
        "rss_growth_mb": r3(rss["growth_mb"]),
        # (a)
        "ceiling_layout": f"{ceil1['processes']} processes x {ceil1['threads']} torch threads",
        "ratio_to_adjacent_ceiling": r3(rate(steady, ceil2["img_s"])),
        "ceiling_before_spark_img_s": r3(ceil1["img_s"]),
        "ceiling_after_pipeline_img_s": r3(ceil2["img_s"]),
        "ceiling_loadavg": [ceil1["loadavg"], ceil2["loadavg"]],
        "ceiling_per_process_img_s": ceil1["per_process_img_s"],
        "ceiling_single_process_img_s": r3(ceil1["single_img_s"]),
        "ceiling_single_process_threads": ceil1["single_threads"],
        "decode_ms": r3(ceil1["decode_ms"]),
        "executor_torch_threads": f.executor_threads,
        # (b)
        "pipeline_rounds_img_s": [r3(x["steady_img_s"] or x["wall_img_s"]) for x in f.rounds],
        "pipeline_rounds_loadavg": [x["loadavg"] for x in f.rounds],
        "pipeline_method": pipe["method"],
        "pipeline_batches": pipe["batches"],
        "pipeline_wall_img_s": r3(pipe["wall_img_s"]),
        "pipeline_cpu_share": pipe["cpu_share"],  # of all cores, first upload → last row
        "upload_img_s": r.phases["pipeline"]["upload_img_s"],
        "fetch_img_s": r3(f.fetched.img_s),
        "profile_pipeline": summarize_profile(f.profile_pipeline),
        # (c)
        "spark_classify_img_s": r3(base["ours_img_s"]),
        "classify_ratio_to_baseline": r3(rate(base["ours_img_s"], base["naive_img_s"])),
        "baseline_top1_agreement": r3(base["top1_agreement"]),
        "camera_images": args.camera_images,
        "baseline_camera_img_s": r3(camera["naive_img_s"]) if camera else None,
        "spark_classify_camera_img_s": r3(camera["ours_img_s"]) if camera else None,
        "camera_ratio_to_baseline": r3(rate(camera["ours_img_s"], camera["naive_img_s"]))
        if camera else None,
        # (d)
        "latency_images": lat["n"],
        "latency_max_s": r3(lat["max"]),
        "classified_latency_p50_s": r3(lat["classified_p50"]),
        "classified_latency_p95_s": r3(lat["classified_p95"]),
        "latency_wait_p50_s": r3(lat["wait_p50"]),
        "latency_in_batch_p50_s": r3(lat["in_batch_p50"]),
        "publish_latency_p50_s": r3(lat["publish_p50"]),
        "visible_latency_p50_s": r3(lat["visible_p50"]),
        "visible_latency_p95_s": r3(lat["visible_p95"]),
        "visible_polled_latency_p50_s": r3(lat["polled_p50"]),
        "visible_polled_latency_p95_s": r3(lat["polled_p95"]),
        "poll_seconds": args.poll_seconds,
        "profile_latency": summarize_profile(f.profile_latency),
        "anatomy": {k: r3(v) for k, v in f.anatomy.items()},
        # (e)
        "rss_images": args.rss_images,
        "rss_seconds": r3(rss["seconds"]),
        "rss_img_s": r3(rss["img_s"]),
        "rss_growth_raw_mb": r3(rss["raw_growth_mb"]),
        "rss_growth_hwm_mb": r3(rss["hwm_growth_mb"]),
        "rss_first_quarter_peak_mb": rss["first_quarter_peak_mb"],
        "rss_last_quarter_peak_mb": rss["last_quarter_peak_mb"],
        "rss_before_mb": rss["before_mb"],
        "rss_after_mb": rss["after_mb"],
        "rss_samples": rss["samples"],
        "rss_new_workers": rss["new_workers"],
        "rss_curve": rss["curve"],
        "model_loads": rss["model_loads"],
        "stream_worker_pids": f.stream_worker_pids,
        "phases": r.phases,
        "seconds": round(time.monotonic() - r.started, 1),
        "loadavg_end": loadavg(),
    })
    return o


def show(o: dict[str, Any], profile_b: list[dict], profile_d: list[dict]) -> None:
    table = Table(title=f"bucketlens bench — {o['model']}, {o['images']} images, "
                        f"{o['machine']['cores']} cores")
    for col in ("figure", "value", "target"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for k in KEYS:
        target = TARGETS.get(k)
        mark = ""
        if target and o[k] is not None:
            ok = o[k] >= target[1] if target[0] == ">=" else o[k] < target[1]
            mark = f"{target[0]} {target[1]:g} " + ("[green]met[/]" if ok else "[red]missed[/]")
        table.add_row(k, f"{o[k]}", mark)
    for k in ("ceiling_before_spark_img_s", "ceiling_after_pipeline_img_s",
              "ceiling_single_process_img_s", "pipeline_wall_img_s", "spark_classify_img_s",
              "baseline_camera_img_s", "spark_classify_camera_img_s", "fetch_img_s", "decode_ms",
              "latency_wait_p50_s", "latency_in_batch_p50_s", "classified_latency_p50_s",
              "classified_latency_p95_s", "visible_latency_p50_s",
              "visible_latency_p95_s", "rss_growth_raw_mb", "rss_growth_hwm_mb", "rss_seconds"):
        table.add_row(f"[dim]{k}", f"[dim]{o[k]}", "")
    for k, v in o["anatomy"].items():
        table.add_row(f"[dim]anatomy.{k}", f"[dim]{v}", "")
    for k, v in (o.get("pipeline_cpu_share") or {}).items():
        table.add_row(f"[dim]pipeline_cpu_share.{k}", f"[dim]{v}", "")
    console.print(table)
    cols = ("batch_id", "images", "trigger_s", "spark_other_s", "lookup_s",
            "classify_s", "merge_s")
    for title, rows in (("(b) pipeline batches", profile_b), ("(d) latency batches", profile_d)):
        t = Table(title=title)
        for c in cols:
            t.add_column(c, justify="right")
        for b in rows[:12]:
            t.add_row(*(f"{b[c]:.2f}" if isinstance(b[c], float) else str(b[c]) for c in cols))
        console.print(t)
    t = Table(title=f"(f) steady upload rates, {o['sustain_seconds']:g}s each "
                    f"(kept up: p95 < {o['sustain_p95_bound_s']:g}s, backlog bounded)")
    for c in ("stream", "rate", "kept_up", "p50_s", "p95_s", "max_backlog", "uploaded"):
        t.add_column(c, justify="right")
    for name, probes in (("bucketlens", o["sustained_probes"]),
                         ("seed-style", o["seed_style_probes"])):
        for pr in probes:
            t.add_row(name, *(str(pr[c]) for c in ("rate", "kept_up", "p50_s", "p95_s",
                                                   "max_backlog", "uploaded")))
    console.print(t)
    console.log(f"load average: start {o['loadavg_start']}, end {o['loadavg_end']}; "
                f"{o['seconds']}s in all")


def field_latency(text: str) -> dict[str, float]:
    """``KIND=SECONDS,…`` → {kind: seconds}, for the proxy's per-call latency."""
    out = {}
    for part in filter(None, text.split(",")):
        kind, _, value = part.partition("=")
        if kind.strip() not in fieldproxy.LATENCY:
            raise argparse.ArgumentTypeError(f"unknown call kind {kind.strip()!r}; one of "
                                             + ", ".join(fieldproxy.LATENCY))
        try:
            out[kind.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: the seconds are not a number") from None
    return out


FIELD_DEFAULTS = {"latency_seconds": 30, "sustain_seconds": 30, "sustain_probes": 2,
                  "drain_images": 400, "seed_drain_images": 60}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400,
                   help="uploads for (b), and images for (c) (default 400)")
    p.add_argument("--json", action="store_true", help="stdout is only the JSON line")
    p.add_argument("--pipeline-rounds", type=int, default=2,
                   help="(b) rounds of --images uploads; the best steady state counts")
    p.add_argument("--ceiling-seconds", type=float, default=8.0, help="(a) time per measurement")
    p.add_argument("--latency-rate", type=float, default=2.0, help="(d) uploads per second")
    p.add_argument("--latency-seconds", type=float, default=45.0, help="(d) duration")
    p.add_argument("--rss-images", type=int, default=2000, help="(e) images after the warm-up")
    p.add_argument("--baseline-rounds", type=int, default=2,
                   help="(c) alternated rounds; the best of each classifier counts")
    p.add_argument("--camera-images", type=int, default=16,
                   help="(c) 12 MP JPEGs for the camera-size comparison (0 = skip)")
    p.add_argument("--poll-seconds", type=float, default=1.0,
                   help="(d) BigQuery polling period of the visibility cross-check")
    p.add_argument("--timeout", type=float, default=300.0, help="max wait for a phase's rows")
    p.add_argument("--sustain-seconds", type=float, default=60.0,
                   help="(f) length of each probe of a steady upload rate")
    p.add_argument("--sustain-probes", type=int, default=3,
                   help="(f) most probes per implementation (2 when the first passes)")
    p.add_argument("--drain-images", type=int, default=3000,
                   help="(f) backlog bucketlens drains (the flower set's size)")
    p.add_argument("--seed-drain-images", type=int, default=300,
                   help="(f) backlog the seed-style stream drains (its probes start from it)")
    p.add_argument("--run-dir", help="the run's directory, and its local stack's "
                                      "(default: a new temporary one)")
    p.add_argument("--stack", metavar="DIR",
                   help="use the local stack already running in DIR (`bucketlens local up "
                        "--run-dir DIR`) with resources of the run's own, and leave it running")
    p.add_argument("--field", action="store_true",
                   help="the field rehearsal instead: the stream behind a latency-injecting "
                        "proxy, on photos + camera-sized JPEGs; shorter (f) defaults: "
                        + ", ".join(f"--{k.replace('_', '-')} {v:g}"
                                    for k, v in FIELD_DEFAULTS.items()))
    p.add_argument("--field-latency", type=field_latency, default={}, metavar="KIND=S,…",
                   help="--field: seconds added per call, overriding "
                        + ", ".join(f"{k}={v:g}" for k, v in fieldproxy.LATENCY.items()))
    args = p.parse_args(argv)
    if args.field:  # fewer, shorter probes: the rehearsal must fit next to the lab run
        for k, v in FIELD_DEFAULTS.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, type(p.get_default(k))(v))
    if (args.images < 2 or args.rss_images < 1 or args.latency_seconds <= 0
            or args.baseline_rounds < 1 or args.pipeline_rounds < 1 or args.camera_images < 0
            or args.sustain_seconds <= 0 or args.sustain_probes < 1 or args.drain_images < 1
            or args.seed_drain_images < 1):
        p.error("need --images >= 2, --rss-images >= 1, --latency-seconds > 0, "
                "--baseline-rounds >= 1, --pipeline-rounds >= 1, --camera-images >= 0, "
                "--sustain-seconds > 0, --sustain-probes >= 1, --drain-images >= 1, "
                "--seed-drain-images >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = run_field(args) if args.field else run(args)
    if not args.json:
        print(json.dumps({k: out[k] for k in (FIELD_KEYS if args.field else KEYS)}, indent=2))
    print(json.dumps(out, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
