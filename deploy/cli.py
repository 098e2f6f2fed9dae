"""``bucketlens`` — one command, one sub-command per job.

    bucketlens demo                     # the whole flow on the embedded local stack
    bucketlens local up && eval "$(bucketlens local env)"
    bucketlens produce --sample --rate 5 --limit 50 &
    bucketlens run

The application layer: the job's own commands (``pipeline.commands.cli``) plus the local emulator
stack, the demo and the producer. Every flag defaults to its ``BUCKETLENS_*`` variable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline.commands import cli as job_cli


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


def _demo(args: argparse.Namespace) -> int:
    from deploy import demo

    summary = demo.run(images=args.images, rate=args.rate, timeout=args.timeout,
                       run_dir=Path(args.run_dir), model=args.model, keep=args.keep)
    print(json.dumps(summary))
    return 0 if summary["rows"] == summary["distinct_keys"] == summary["uploaded"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = job_cli.Parser(
        prog="bucketlens",
        description="Classify images as they land in Google Cloud Storage.",
        epilog='Quick start: `bucketlens demo`. Flags default to BUCKETLENS_* variables; '
               '`eval "$(bucketlens local env)"` sets them for the local stack; ' + job_cli.EXIT_CODES)
    p.add_argument("-v", "--verbose", action="store_true", help="log every batch")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    loc = sub.add_parser("local", help="start/stop the embedded emulator stack",
                         description="Pub/Sub emulator, fake-gcs-server and bqemulator on 127.0.0.1.")
    loc.add_argument("action", choices=["up", "down", "env", "status"])
    loc.add_argument("--run-dir", default=os.environ.get("BUCKETLENS_RUN_DIR", ".bucketlens/local"),
                     help="where ports, PIDs, logs and data live (BUCKETLENS_RUN_DIR; "
                          "default: %(default)s)")
    loc.set_defaults(func=_local)

    demo = sub.add_parser("demo", help="the whole flow on the local stack, end to end",
                          description="local up → replay sample photos → stream → SQL → local down "
                                      "(or, with --keep, what to run next).")
    demo.add_argument("--images", type=int, default=60, help="uploads to make (default %(default)s)")
    demo.add_argument("--rate", type=float, default=10.0, help="uploads per second")
    demo.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for rows")
    demo.add_argument("--run-dir", default=".bucketlens/demo", help="stack state directory")
    demo.add_argument("--model", help="model name, bundle or model location (default: the "
                                      "offline efficientnet_lite0)")
    demo.add_argument("--keep", action="store_true",
                      help="leave the stack and its rows up afterwards, for status, sql, "
                           "dashboard and report (stop it with `bucketlens local down --run-dir DIR`)")
    demo.set_defaults(func=_demo)

    job_cli.add_lazy_command(sub, "produce", "producer.cli", "add_produce_parser", "run_produce")
    job_cli.add_job_commands(sub, extend={"train": _add_train_download})

    dash = sub.add_parser("dashboard", help="a live web page of the newest predictions",
                          description="Newest uploads with thumbnails, labels and confidence, "
                                      "throughput and latency, class mix, dead letters and a "
                                      "low-confidence review list, over the configured tables; "
                                      "the page updates itself.")
    dash.add_argument("--port", type=_port, default=8000, help="(default %(default)s)")
    dash.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (default %(default)s: this machine only)")
    dash.add_argument("--since", default="24h", metavar="AGE",
                      type=lambda raw: (job_cli.since(raw), raw)[1],
                      help="show objects created within this age (the partition bound of every "
                           "query; default %(default)s)")
    dash.add_argument("--minutes", type=job_cli.positive_int, default=15,
                      help="minutes in the throughput chart (default %(default)s)")
    dash.add_argument("--review-below", type=float, default=0.5, metavar="P",
                      help="list classified images whose top-1 confidence is below P "
                           "(default %(default)s)")
    dash.set_defaults(func=job_cli.runner("pipeline.commands.dashboard:run_dashboard"))
    job_cli.add_global_flags(p)
    return p


def _port(raw: str) -> int:
    port = int(raw)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"a TCP port is 1-65535, got {raw}")
    return port


def _add_train_download(parser: argparse.ArgumentParser) -> None:
    """``train --download flowers``: the producer's download (cached), then the job's train."""
    parser.add_argument("--download", choices=["flowers"],
                        help="download (once, then cached) the TF flower_photos set and train on it")
    train = parser.get_default("func")

    def run(args: argparse.Namespace) -> int:
        if args.download and args.dataset:
            raise job_cli.UserError("give --dataset or --download, not both")
        if args.download:
            from producer import datasets

            try:
                args.dataset = str(datasets.download_flowers(
                    log=lambda line: print(f"bucketlens train: {line}", file=sys.stderr)))
            except datasets.DatasetError as exc:
                raise job_cli.UserError(str(exc)) from None
        return train(args)

    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    from deploy.localstack import StackError

    return job_cli.dispatch(build_parser().parse_args(argv), user_errors=(StackError,))


if __name__ == "__main__":
    sys.exit(main())
