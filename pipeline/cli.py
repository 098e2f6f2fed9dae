"""``bucketlens`` — one command, one sub-command per job.

    eval "$(bucketlens local env)"     # after `bucketlens local up`
    bucketlens produce --sample --rate 5 --limit 50 &
    bucketlens run

Every flag defaults to its ``BUCKETLENS_*`` environment variable (see ``pipeline.config``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from pipeline.config import Settings


class UserError(Exception):
    """An error whose message is the whole story: printed as one line, exit code 2."""


def _local(args: argparse.Namespace) -> int:
    from deploy import localstack

    run_dir = Path(args.run_dir)
    if args.action == "up":
        state = localstack.up(run_dir)
        print(f"local stack up in {state.run_dir}: "
              + ", ".join(f"{n} on :{s.port}" for n, s in state.services.items()),
              file=sys.stderr)
        print('point your shell at it with: eval "$(bucketlens local env)"', file=sys.stderr)
    elif args.action == "down":
        stopped = localstack.down(run_dir)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}", file=sys.stderr)
    elif args.action == "env":
        print(localstack.render_env(localstack.StackState.load(run_dir).env()))
    elif args.action == "status":
        for name, info in localstack.status(run_dir).items():
            print(f"{name:<9} port {info['port']:<6} pid {info['pid']:<8} "
                  f"{'up' if info['alive'] else 'DOWN'}  log {info['log']}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from pipeline import classify, stream

    settings = Settings.from_env(
        subscription=args.subscription, table=args.table, checkpoint=args.checkpoint,
        model=args.model, weights=args.weights, trigger_seconds=args.trigger_seconds,
        max_messages_per_batch=args.max_messages_per_batch, spark_master=args.master,
        prefix=args.prefix, min_confidence=args.min_confidence, batch_size=args.batch_size,
        sink=args.sink, metrics_port=args.metrics_port,
    )
    classify.get_handler(settings)  # fail fast, in one sentence, if the model cannot load
    query, _ = stream.start(settings)
    if settings.metrics_port:
        print(f"Prometheus metrics on http://127.0.0.1:{settings.metrics_port}/metrics",
              file=sys.stderr)
    print(f"streaming {settings.subscription_path} → {settings.table_id} "
          f"(model {settings.model}, checkpoint {settings.checkpoint}); Ctrl-C stops",
          file=sys.stderr)

    return _serve(query)


def _serve(query) -> int:
    """Wait for the query; on SIGTERM or Ctrl-C stop it and Spark gracefully (unacked messages
    go back at once).

    The signal handler only sets a flag: calling into Py4J from inside a handler that
    interrupted another Py4J call corrupts the gateway connection ("reentrant call").
    """
    from py4j.protocol import Py4JError

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        while not stopping.is_set() and not query.awaitTermination(1):
            pass
    except KeyboardInterrupt:
        stopping.set()
    try:
        if stopping.is_set():
            query.stop()
        failure = query.exception()
        # Stopping Spark delivers the queued listener events (our metrics listener is a Py4J
        # callback) while this process can still answer them.
        from pyspark.sql import SparkSession

        if (spark := SparkSession.getActiveSession()) is not None:
            spark.stop()
    except Py4JError as exc:  # the JVM got the signal too (a process-group kill) and is gone
        print(f"Spark exited before a graceful stop ({type(exc).__name__}); messages it held "
              "come back after their ack deadline", file=sys.stderr)
        return 0 if stopping.is_set() else 1
    if failure:
        raise UserError(f"the stream failed: {failure}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pipeline import demo

    summary = demo.run(images=args.images, rate=args.rate, timeout=args.timeout,
                       run_dir=Path(args.run_dir))
    print(json.dumps(summary))
    return 0 if summary["rows"] == summary["distinct_keys"] == summary["uploaded"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bucketlens",
        description="Classify images as they land in Google Cloud Storage.",
        epilog='Quick start: `bucketlens demo`. Flags default to BUCKETLENS_* variables; '
               '`eval "$(bucketlens local env)"` sets them for the local stack.')
    p.add_argument("-v", "--verbose", action="store_true", help="log every batch")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    loc = sub.add_parser("local", help="start/stop the embedded emulator stack",
                         description="Pub/Sub emulator, fake-gcs-server and bqemulator on 127.0.0.1.")
    loc.add_argument("action", choices=["up", "down", "env", "status"])
    loc.add_argument("--run-dir", default=os.environ.get("BUCKETLENS_RUN_DIR", ".bucketlens/local"),
                     help="where ports, PIDs, logs and data live (BUCKETLENS_RUN_DIR; "
                          "default: %(default)s)")
    loc.set_defaults(func=_local)

    run = sub.add_parser("run", help="run the streaming classifier",
                         description="Read GCS notifications from Pub/Sub, classify, write to BigQuery.")
    run.add_argument("--subscription", help="Pub/Sub subscription (BUCKETLENS_SUBSCRIPTION)")
    run.add_argument("--table", help="BigQuery table in the dataset (BUCKETLENS_TABLE)")
    run.add_argument("--checkpoint", help="Spark checkpoint directory (BUCKETLENS_CHECKPOINT)")
    run.add_argument("--model", help="torchvision model name or efficientnet_lite0 (BUCKETLENS_MODEL)")
    run.add_argument("--weights", help="weights file or gs:// URI (BUCKETLENS_WEIGHTS)")
    run.add_argument("--trigger-seconds", type=float, help="micro-batch interval")
    run.add_argument("--max-messages-per-batch", type=int, help="admission control per batch")
    run.add_argument("--batch-size", type=int, help="images per inference batch")
    run.add_argument("--min-confidence", type=float, help="mark rows whose top-1 prob is lower")
    run.add_argument("--prefix", help="only classify objects under this prefix")
    run.add_argument("--master", help="Spark master (default local[2])")
    run.add_argument("--sink", choices=["bigquery", "jsonl", "console"],
                     help="where rows go (default bigquery; jsonl writes to BUCKETLENS_JSONL_URI)")
    run.add_argument("--metrics-port", type=int,
                     help="serve Prometheus metrics on 127.0.0.1:PORT/metrics")
    run.set_defaults(func=_run)

    demo = sub.add_parser("demo", help="the whole flow on the local stack, end to end",
                          description="local up → replay sample photos → stream → SQL → local down.")
    demo.add_argument("--images", type=int, default=60, help="uploads to make (default %(default)s)")
    demo.add_argument("--rate", type=float, default=10.0, help="uploads per second")
    demo.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for rows")
    demo.add_argument("--run-dir", default=".bucketlens/demo", help="stack state directory")
    demo.set_defaults(func=_demo)

    for name, module, adder, runner in (
        ("produce", "producer.cli", "add_produce_parser", "run_produce"),
        ("classify", "pipeline.classify", "add_classify_parser", "run_classify"),
        ("backfill", "pipeline.backfill", "add_backfill_parser", "run_backfill"),
        ("report", "pipeline.report", "add_report_parser", "run_report"),
    ):
        try:
            mod = __import__(module, fromlist=[adder])
        except ImportError as exc:  # pragma: no cover - an install problem, said plainly
            sub.add_parser(name, help=f"unavailable: {exc}")
            continue
        getattr(mod, adder)(sub)
        sub.choices[name].set_defaults(func=getattr(mod, runner))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.verbose:
        logging.getLogger("bucketlens").setLevel(logging.INFO)
    from deploy.localstack import StackError

    try:
        return args.func(args)
    except (UserError, StackError) as exc:
        print(f"bucketlens: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from pipeline.classify import ModelUnavailableError

        if isinstance(exc, ModelUnavailableError):
            print(f"bucketlens: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
