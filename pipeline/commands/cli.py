"""The job's commands — ``run``, ``classify``, ``backfill``, ``report`` — as a cluster runs them.

    python -m pipeline.commands.cli run --subscription uploads --table predictions

``bucketlens`` (``deploy.cli``) is this plus the local stack, the demo and the producer; this
module imports nothing outside ``pipeline`` so the job runs from the wheel alone.

Every flag defaults to its ``BUCKETLENS_*`` environment variable (see ``pipeline.config``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from datetime import date, datetime
from typing import NoReturn

from pipeline.commands.flags import (
    BACKFILL_SETTINGS,
    CLASSIFY_SETTINGS,
    REPORT_SETTINGS,
    RUN_SETTINGS,
    SIMILAR_SETTINGS,
    TRAIN_SETTINGS,
    add_settings_flags,
    settings_from_args,
)
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.names import printable
from pipeline.times import parse_since


def run_stream(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, RUN_SETTINGS, spark_log="" if args.verbose else None)
    from pipeline.model import handler as model_handler  # heavy: only once the names are known good
    from pipeline.stream import job as stream

    model_handler.check_model(settings)  # fail fast, in one sentence; executors load it
    query, _ = stream.start(settings)
    if settings.metrics_port:
        print(f"Prometheus metrics on http://127.0.0.1:{settings.metrics_port}/metrics",
              file=sys.stderr)
    print(f"streaming {settings.subscription_path} → {settings.table_id} "
          f"(model {settings.model}, checkpoint {settings.checkpoint}); Ctrl-C stops"
          + (f"; Spark's own log: {settings.spark_log} (-v shows it here)"
             if settings.spark_log else ""), file=sys.stderr)

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


def runner(target: str, command: str = "") -> Callable[[argparse.Namespace], int]:
    """``module:function``, imported only when the command runs: building the parser imports
    nothing heavy (torch, Spark, the Google clients), so ``--help`` answers at once. The
    command's usage checks (``pipeline.commands.usage``) run first, so mistakes are told before torch
    or Spark load."""
    module, _, name = target.partition(":")

    def run(args: argparse.Namespace) -> int:
        if command:
            from pipeline.commands.usage import CHECKS

            if check := CHECKS.get(command):
                check(args)
        return getattr(importlib.import_module(module), name)(args)

    run.target = target  # type: ignore[attr-defined]
    return run


def positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {raw}")
    return value


def positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {raw}")
    return value


positive_float.__name__ = "number"


def since(raw: str) -> datetime:
    try:
        return parse_since(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


since.__name__ = "time"  # argparse names the type in its error messages


def since_day(raw: str) -> date:
    """The UTC day of ``since``: compact works on whole day partitions."""
    return since(raw).date()


since_day.__name__ = "date"


class Parser(argparse.ArgumentParser):
    """A usage mistake is one line with a hint, exit 2 (argparse's own prints the whole usage
    first); subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def add_global_flags(parser: argparse.ArgumentParser) -> None:
    """``--version``, and ``-v`` before or after the subcommand (after it, the subcommand's
    parser sets it; SUPPRESS keeps its default from hiding the top-level value)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("bucketlens")
    except PackageNotFoundError:  # pragma: no cover - run from a bare source tree
        ours = "unknown"
    parser.add_argument("--version", action="version", version=f"%(prog)s {ours}")
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for sub in dict.fromkeys(getattr(action, "choices", {}).values()):
            if "--verbose" not in sub._option_string_actions:
                sub.add_argument("-v", "--verbose", action="store_true",
                                 default=argparse.SUPPRESS, help="log every batch")


EXIT_CODES = ("exit status: 0 done; 1 the stream failed, or some objects got error rows; "
              "2 a usage or configuration error (one line on stderr); 130 interrupted")

def add_run_arguments(run: argparse.ArgumentParser) -> None:
    add_settings_flags(run, RUN_SETTINGS)


def add_classify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or directories")
    add_settings_flags(p, CLASSIFY_SETTINGS)
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def add_backfill_arguments(p: argparse.ArgumentParser) -> None:
    add_settings_flags(p, BACKFILL_SETTINGS, required=("bucket",))
    p.add_argument("--since", type=since, metavar="TIME",
                   help="only objects created or updated since TIME: ISO 8601 "
                        "(naive = UTC) or an age like 90m, 6h, 2d")
    p.add_argument("--batch", type=positive_int, default=500, metavar="N",
                   help="objects per chunk: one BigQuery check, Spark job and write "
                        "(default: %(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="list and check BigQuery only: classify and write nothing")


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="report", help="output directory (default: %(default)s)")
    add_settings_flags(p, REPORT_SETTINGS)
    p.add_argument("--top", type=int, default=15, help="classes in the top-1 ranking (default %(default)s)")
    p.add_argument("--max-rows", type=int, default=30, help="rows per terminal table (report.md has all)")
    p.add_argument("--create-views", action="store_true",
                   help="(re)create the views first (CREATE OR REPLACE: safe to repeat)")
    p.add_argument("--map-sample", type=positive_int, default=1000, metavar="N",
                   help="embeddings in the embedding map's PCA at most (default %(default)s)")


def add_similar_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri", metavar="gs://BUCKET/NAME", help="the object whose neighbours to find")
    p.add_argument("--k", type=positive_int, default=10, help="neighbours (default %(default)s)")
    p.add_argument("--json", action="store_true",
                   help='one {"bucket", "name", "generation", "distance", "label"} per line, '
                        "nearest first")
    p.add_argument("--model-version", metavar="VERSION",
                   help="compare with this model version's embeddings (default: the version of "
                        "the object's own embedding)")
    p.add_argument("--sql", choices=("auto", "vector_search", "portable"), default="auto",
                   help="VECTOR_SEARCH (real BigQuery) or portable COSINE_DISTANCE SQL (any); "
                        "auto: portable on an emulator (BUCKETLENS_BQ_ENDPOINT), else "
                        "VECTOR_SEARCH")
    add_settings_flags(p, SIMILAR_SETTINGS)


def add_compact_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", type=since_day, metavar="DATE",
                   help="first UTC day (partition) to compact: a date, or an age like 2d "
                        "(default: 7 days ago)")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", metavar="DIR|gs://BUCKET/PREFIX",
                   help="class-folder dataset: <dataset>/<class>/<image>")
    p.add_argument("--out", required=True, metavar="DIR|gs://BUCKET/PREFIX",
                   help="model location: the bundle is written to OUT/<version>/ and OUT/CURRENT "
                        "names it if OUT has no current version yet")
    add_settings_flags(p, TRAIN_SETTINGS, flag_names={"model": "--base"})
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of each class held out for validation (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="split and training seed (default 0)")
    p.add_argument("--name", help="the bundle's name in rows and reports (default: OUT's last part)")


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "promote"],
                   help="list: the versions in LOCATION; promote: make VERSION the current one")
    p.add_argument("location", metavar="LOCATION", help="model location (DIR or gs://BUCKET/PREFIX)")
    p.add_argument("version", nargs="?", metavar="VERSION", help="the version to promote")
    p.add_argument("--json", action="store_true", help="list as one JSON object per line")


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="one JSON object: backlog, oldest_unacked_s, last_batch_at, "
                        "rows_last_minute, dead_letters_last_hour, model_version")
    p.add_argument("--max-lag", type=positive_float, default=30.0, metavar="SECONDS",
                   help="exit 1 when a message has waited unread this long (default %(default)s)")


def add_sql_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", metavar="SQL", help='the query, e.g. "SELECT * FROM predictions LIMIT 5"')
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--max-rows", type=int, default=100, metavar="N",
                   help="rows to print at most (default %(default)s; 0 = all)")


def run_models(args: argparse.Namespace) -> int:
    """``models list|promote``: the versions of a model location and its CURRENT pointer."""
    from pipeline.model import bundles

    settings = Settings.from_env()
    if args.action == "promote":
        if not args.version:
            raise UserError("promote needs the VERSION to make current (see `models list`).")
        bundle = bundles.promote(args.location, args.version, settings)
        print(f"{printable(args.location)}: current version is now {bundle.version} "
              f"({printable(bundle.name)}, "
              f"{len(bundle.labels)} labels); running streams switch within "
              f"{settings.model_refresh_seconds:g} s", file=sys.stderr)
        return 0
    versions = bundles.list_versions(args.location, settings)
    if not versions:
        raise UserError(f"{printable(args.location)} holds no model versions.")
    try:
        current = bundles.current_version(args.location, settings)
    except bundles.BundleError as exc:  # still list the versions: this is how to pick one
        print(f"bucketlens: {exc}", file=sys.stderr)
        current = None
    for version in versions:
        row = models_row(args.location, version, current, settings)
        if args.json:
            print(json.dumps(row))
        else:
            mark = "*" if row["current"] else " "
            detail = row["error"] or (f"{row['name']}  {row['labels']} labels  created "
                                      f"{row['created']}  val top-1 {row['val_top1']}")
            print(printable(f"{mark} {version}  {detail}", 1000))
    return 0


def models_row(location: str, version: str, current: str | None,
               settings: Settings) -> dict[str, object]:
    """One version of ``models list``: what its manifest says, or why it cannot be used. The
    fields only shown here (created, validation) are the manifest's own: taken only when of
    the right type, so a hand-edited manifest lists rather than crashes."""
    from pipeline.model import bundles

    try:
        m = bundles.load_version(location, version, settings).manifest
    except bundles.BundleError as exc:
        return {"version": version, "current": version == current, "error": str(exc)}
    validation = m.get("validation")
    top1 = validation.get("top1") if isinstance(validation, dict) else None
    created = m.get("created")
    return {"version": version, "current": version == current, "name": m["name"],
            "created": created if isinstance(created, str) else None, "labels": len(m["labels"]),
            "val_top1": top1 if isinstance(top1, int | float) and not isinstance(top1, bool)
            and math.isfinite(top1) else None, "error": None}


# name, help, description, arguments, implementation: one row per job command.
JOB_COMMANDS: tuple[tuple[str, str, str, Callable[[argparse.ArgumentParser], None], str], ...] = (
    ("run", "run the streaming classifier",
     "Read GCS notifications from Pub/Sub, classify, write to BigQuery.",
     add_run_arguments, "pipeline.commands.cli:run_stream"),
    ("classify", "classify local image files",
     "Classify image files (directories are walked) with the pipeline's model.",
     add_classify_arguments, "pipeline.commands.classify:run_classify"),
    ("backfill", "classify the objects already in the bucket",
     "List the bucket and classify every object BigQuery has no row for, with the stream's code "
     "and rows. Safe to re-run, also while the stream runs.",
     add_backfill_arguments, "pipeline.commands.backfill:run_backfill"),
    ("report", "tables and plots from the BigQuery analytics views",
     "Query the analytics views, print them, and write PNG plots and report.md.",
     add_report_arguments, "pipeline.commands.report:run_report"),
    ("train", "train a head for your own classes into a model bundle",
     "Extract base-model features of a class-folder dataset with Spark, fit a linear head, and "
     "write a versioned model bundle that --model accepts. Last stdout line: one JSON summary.",
     add_train_arguments, "pipeline.commands.train:run_train"),
    ("models", "list a model location's versions, or promote one",
     "A model location holds bundle versions and CURRENT, the one in use; a stream given the "
     "location switches to a promoted version between micro-batches.",
     add_models_arguments, "pipeline.commands.cli:run_models"),
    ("similar", "the objects whose images look most like one object's",
     "The k nearest objects (newest generations) by cosine distance between embeddings, "
     "excluding the object itself, with their labels; needs rows written with --embeddings.",
     add_similar_arguments, "pipeline.commands.similar:run_similar"),
    ("compact", "remove duplicate rows left by racing writers",
     "Keep one row per key in the predictions, dead-letter and event tables, reading only the "
     "partitions since DATE (one MERGE per table that has duplicates). Safe to run at any time, "
     "also while the stream runs.",
     add_compact_arguments, "pipeline.bigquery.compact:run_compact"),
    ("status", "is the stream keeping up: backlog, last batch, rows, dead letters, model",
     "Peek at the subscription's backlog and read the last minute and hour of rows and dead "
     "letters (partition-bounded). Exit 1 when messages have waited longer than --max-lag.",
     add_status_arguments,
     "pipeline.commands.status_report:run_status"),
    ("sql", "run your own SQL against the configured project (local stack included)",
     "Run one query; tables resolve in BUCKETLENS_DATASET. Prints a table, or JSON lines.",
     add_sql_arguments, "pipeline.commands.sqlcmd:run_sql"),
)


def add_job_commands(sub: argparse._SubParsersAction,
                     extend: Mapping[str, Callable[[argparse.ArgumentParser], None]] | None = None
                     ) -> None:
    """The commands the job itself needs (what a cluster runs): run, classify, backfill, ….

    The application CLI (``deploy.cli``) adds the local stack, the demo and the producer, and
    may ``extend`` a job command's parser (flags, or a ``func`` wrapping the job's own).
    """
    for name, help_, description, add_arguments, target in JOB_COMMANDS:
        parser = sub.add_parser(name, help=help_, description=description)
        add_arguments(parser)
        parser.set_defaults(func=runner(target, name))
        if extend and name in extend:
            extend[name](parser)


def add_lazy_command(sub: argparse._SubParsersAction, name: str, module: str, adder: str,
                     runner_name: str) -> None:
    """A command whose parser and runner live in ``module`` (keep such modules light to
    import); an import failure is said plainly."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - an install problem, said plainly
        sub.add_parser(name, help=f"unavailable: {exc}")
        return
    getattr(mod, adder)(sub)
    sub.choices[name].set_defaults(func=getattr(mod, runner_name))


def build_parser(prog: str = "bucketlens") -> argparse.ArgumentParser:
    """The parser of ``python -m pipeline.commands.cli``: the job's commands only."""
    p = Parser(
        prog=prog,
        description="Classify images as they land in Google Cloud Storage.",
        epilog="Flags default to BUCKETLENS_* variables; " + EXIT_CODES)
    p.add_argument("-v", "--verbose", action="store_true", help="log every batch")
    add_job_commands(p.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    add_global_flags(p)
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
        if no_credentials(exc):
            print("bucketlens: no Google credentials found: run `gcloud auth "
                  "application-default login` for a real project, or point this shell at the "
                  'local stack with `eval "$(bucketlens local env)"`.', file=sys.stderr)
            return 2
        from pipeline.model.bundles import BundleError
        from pipeline.model.specs import ModelUnavailableError

        if isinstance(exc, ModelUnavailableError | BundleError):
            print(f"bucketlens: {exc}", file=sys.stderr)
            return 2
        raise


def no_credentials(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is google-auth's "no default credentials"."""
    auth = sys.modules.get("google.auth.exceptions")  # loaded by whatever raised it
    seen: BaseException | None = exc
    while auth is not None and seen is not None:
        if isinstance(seen, auth.DefaultCredentialsError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
