"""The job's commands — ``run``, ``classify``, ``backfill``, ``report`` — as a cluster runs them.

    python -m pipeline.cli run --subscription uploads --table predictions

``bucketlens`` (``deploy.cli``) is this plus the local stack, the demo and the producer; this
module imports nothing outside ``pipeline`` so the job runs from the wheel alone.

Every flag defaults to its ``BUCKETLENS_*`` environment variable (see ``pipeline.config``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from pipeline.config import Settings


class UserError(Exception):
    """An error whose message is the whole story: printed as one line, exit code 2."""


def _run(args: argparse.Namespace) -> int:
    from pipeline import classify, stream

    settings = Settings.from_env(
        subscription=args.subscription, table=args.table, checkpoint=args.checkpoint,
        model=args.model, weights=args.weights, trigger_seconds=args.trigger_seconds,
        max_messages_per_batch=args.max_messages_per_batch, spark_master=args.master,
        prefix=args.prefix, min_confidence=args.min_confidence, batch_size=args.batch_size,
        sink=args.sink, metrics_port=args.metrics_port, sink_mode=args.sink_mode,
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


def add_job_commands(sub: argparse._SubParsersAction) -> None:
    """The commands the job itself needs (what a cluster runs): run, classify, backfill, report.

    The application CLI (``deploy.cli``) adds the local stack, the demo and the producer.
    """
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
    run.add_argument("--sink-mode", choices=["append", "merge"],
                     help="BigQuery writes: Storage Write API appends (default) or staging table "
                          "+ MERGE per batch (BUCKETLENS_SINK_MODE)")
    run.add_argument("--metrics-port", type=int,
                     help="serve Prometheus metrics on 127.0.0.1:PORT/metrics")
    run.set_defaults(func=_run)

    for name, module, adder, runner in (
        ("classify", "pipeline.classify", "add_classify_parser", "run_classify"),
        ("backfill", "pipeline.backfill", "add_backfill_parser", "run_backfill"),
        ("report", "pipeline.report", "add_report_parser", "run_report"),
        ("compact", "pipeline.compact", "add_compact_parser", "run_compact"),
    ):
        add_lazy_command(sub, name, module, adder, runner)


def add_lazy_command(sub: argparse._SubParsersAction, name: str, module: str, adder: str,
                     runner: str) -> None:
    """A command whose parser and runner live in ``module``; an import failure is said plainly."""
    try:
        mod = __import__(module, fromlist=[adder])
    except ImportError as exc:  # pragma: no cover - an install problem, said plainly
        sub.add_parser(name, help=f"unavailable: {exc}")
        return
    getattr(mod, adder)(sub)
    sub.choices[name].set_defaults(func=getattr(mod, runner))


def build_parser(prog: str = "bucketlens") -> argparse.ArgumentParser:
    """The parser of ``python -m pipeline.cli``: the job's commands only."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Classify images as they land in Google Cloud Storage.",
        epilog="Flags default to BUCKETLENS_* variables.")
    p.add_argument("-v", "--verbose", action="store_true", help="log every batch")
    add_job_commands(p.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return p


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if verbose:
        logging.getLogger("bucketlens").setLevel(logging.INFO)


def dispatch(args: argparse.Namespace, user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run the chosen command; errors whose message is the whole story are one line, exit 2."""
    configure_logging(args.verbose)
    try:
        return args.func(args)
    except (UserError, *user_errors) as exc:
        print(f"bucketlens: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from pipeline.classify import ModelUnavailableError

        if isinstance(exc, ModelUnavailableError):
            print(f"bucketlens: {exc}", file=sys.stderr)
            return 2
        raise


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
