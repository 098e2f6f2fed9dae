"""``bucketlens classify``: local image files through the pipeline's own model handler, as a
table or (``--json``) one JSON line per file."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pipeline.commands.flags import CLASSIFY_SETTINGS, settings_from_args
from pipeline.model.handler import Prediction, get_handler
from pipeline.model.specs import ModelUnavailableError

T = TypeVar("T")


def chunked(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def expand_paths(paths: Iterable[str]) -> Iterator[Path]:
    """Files as given, directories as their files (recursively, sorted)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def prediction_row(path: str, prediction: Prediction) -> dict[str, Any]:
    """The ``--json`` record; label and probability are null when there is no prediction."""
    top = prediction.topk[0] if prediction.topk else None
    return {
        "path": path,
        "top1_label": top[1] if top else None,
        "top1_prob": top[2] if top else None,
        "top5": [[label, prob] for _, label, prob in prediction.topk],
        "status": prediction.status,
        "reason": prediction.reason,
    }


def run_classify(args: argparse.Namespace) -> int:
    """0 when every file was read, 1 when some could not be, 2 when the model is unavailable."""
    settings = settings_from_args(args, CLASSIFY_SETTINGS)
    rows: list[dict[str, Any]] = []
    exit_code = 0
    # Under --json stdout carries our JSON lines only: whatever a library prints while the
    # model loads or runs (torch's "Downloading: …" line, for one) goes to stderr instead.
    out = sys.stdout
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet:
        try:
            handler = get_handler(settings)
            for paths in chunked(list(expand_paths(args.paths)), settings.batch_size):
                readable: list[tuple[Path, bytes]] = []
                for path in paths:
                    try:
                        readable.append((path, path.read_bytes()))
                    except OSError as exc:
                        print(f"bucketlens: cannot read {path}: {exc.strerror}", file=sys.stderr)
                        exit_code = 1
                predictions = handler.run_inference([data for _, data in readable])
                for (path, _), prediction in zip(readable, predictions, strict=True):
                    row = prediction_row(str(path), prediction)
                    if args.json:
                        print(json.dumps(row), file=out, flush=True)
                    rows.append(row)
        except ModelUnavailableError as exc:
            print(f"bucketlens: {exc}", file=sys.stderr)
            return 2
    if not args.json:
        _print_table(rows)
    return exit_code


def _print_table(rows: Sequence[Mapping[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Column, Table

    from pipeline.display import terminal  # file names and a bundle's labels, shown as they are

    table = Table(Column("path", overflow="fold"), "status", "top-1", "prob", "runners-up / reason")
    for row in rows:
        prob = f"{row['top1_prob']:.3f}" if row["top1_prob"] is not None else ""
        others = ", ".join(f"{label} {p:.2f}" for label, p in row["top5"][1:3])
        table.add_row(*map(terminal, (row["path"], row["status"], row["top1_label"] or "", prob,
                                      row["reason"] or others)))
    Console().print(table)

