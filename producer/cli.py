"""``bucketlens produce`` / ``python -m producer``: one parser, two entry points.

Stdout carries data only (dry-run names, then one JSON summary as the last line) so scripts can
parse it; the progress bar and messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from pipeline.commands.flags import add_settings_flags, settings_from_args
from pipeline.names import printable

PROG = "bucketlens produce"
PRODUCE_SETTINGS = {"bucket": "target bucket", "prefix": "object name prefix"}


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(raw: str) -> int | float:
        value = kind(raw)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {raw}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", type=Path, metavar="DIR",
                        help="class-folder directory DIR/<class>/<image>")
    source.add_argument("--download", choices=["flowers"],
                        help="download (once, then cached) the TF flower_photos set")
    source.add_argument("--sample", nargs="?", const="photos", choices=["photos", "digits"],
                        help="a set that ships with the installed packages (works offline): "
                             "photos (default: 10 real photos) or digits (scikit-learn's 1,797 "
                             "handwritten digit scans as PNGs, 10 classes)")
    add_settings_flags(parser, PRODUCE_SETTINGS)
    parser.add_argument("--rate", type=_positive(float), default=5.0,
                        help="images per second (default: 5)")
    parser.add_argument("--burst", type=_positive(float),
                        help="most images sent at once to catch up after a stall "
                             "(default: a quarter second's worth)")
    parser.add_argument("--concurrency", type=_positive(int), default=4,
                        help="uploads in flight (default: 4)")
    parser.add_argument("--limit", type=_positive(int), metavar="N", help="stop after N uploads")
    parser.add_argument("--loop", action="store_true",
                        help="replay the dataset again and again (new object names each cycle)")
    parser.add_argument("--duration", type=_positive(float), metavar="SECONDS",
                        help="stop starting uploads after SECONDS")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default: 0)")
    parser.add_argument("--if-not-exists", action="store_true",
                        help="never overwrite: an existing object is skipped")
    parser.add_argument("--manifest", type=Path, metavar="FILE",
                        help="JSON lines of uploads; a re-run skips what it lists")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the object names that would be uploaded; upload nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or messages")


def add_produce_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``produce`` on the top-level CLI; dispatch with ``args.func(args)``."""
    parser = subparsers.add_parser(
        "produce", help="replay an image dataset into the bucket at a steady rate",
        description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.set_defaults(func=run_produce)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m producer",
                                     description="Replay an image dataset into a GCS bucket.")
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_produce(build_parser().parse_args(argv))


def _dataset_root(args: argparse.Namespace, say: Callable[[str], None]) -> Path:
    from producer import datasets

    if args.dataset is not None:
        return args.dataset
    if args.download == "flowers":
        return datasets.download_flowers(log=say)
    if args.sample == "digits":
        return datasets.digits_dataset()
    return datasets.sample_dataset()


def run_produce(args: argparse.Namespace) -> int:
    """Exit status: 0 all uploaded, 1 some failed, 2 unusable input, 130 interrupted."""
    from pipeline.model.classfolders import discover
    from producer import datasets
    from producer.replay import preview, replay

    def say(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr)

    def fail(message: str) -> int:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2

    if args.dry_run and args.loop and args.limit is None:
        return fail("--dry-run with --loop needs --limit.")
    settings = settings_from_args(args, PRODUCE_SETTINGS)
    try:
        root = _dataset_root(args, say)
        items = discover(root)
    except datasets.DatasetError as exc:
        return fail(str(exc))
    if not items:
        return fail(f"No images under {root} (expected {root}/<class>/<image>).")
    opts = {"limit": args.limit, "loop": args.loop, "seed": args.seed, "manifest": args.manifest}

    if args.dry_run:
        planned = preview(items, settings, **opts)
        for p in planned:
            print(printable(p.name))
        print(json.dumps({"uploaded": 0, "failed": 0, "seconds": 0.0, "rate": 0.0,
                          "planned": len(planned)}))
        return 0

    say(f"replaying {len(items)} images from {root} into gs://{settings.bucket}/{settings.prefix}")
    stop = threading.Event()
    with _stop_on_sigint(stop):
        summary = replay(items, settings, rate=args.rate, concurrency=args.concurrency,
                         duration=args.duration, burst=args.burst,
                         if_not_exists=args.if_not_exists, stop=stop,
                         progress=not args.quiet and sys.stderr.isatty(), **opts)
    for name, error in summary.errors[:5]:
        print(f"{PROG}: failed {printable(name)}: {printable(str(error))}", file=sys.stderr)
    if len(summary.errors) > 5:
        print(f"{PROG}: ... and {len(summary.errors) - 5} more failures", file=sys.stderr)
    print(json.dumps(summary.as_json()), flush=True)
    if summary.interrupted:
        return 130
    return 1 if summary.failed else 0


@contextmanager
def _stop_on_sigint(stop: threading.Event) -> Iterator[None]:
    """First Ctrl-C: finish in-flight uploads and print the summary; second: abort."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(f"\n{PROG}: stopping after the uploads in flight (Ctrl-C again to abort)",
              file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
