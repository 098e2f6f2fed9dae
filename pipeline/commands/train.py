"""``bucketlens train``: a linear head on a frozen base model's features → a versioned bundle.

    bucketlens train --dataset gs://my-bucket/flowers --out gs://my-bucket/models/flowers \\
        --base efficientnet_lite0 --val-fraction 0.2 --seed 0

Transfer learning as batch pipelines do it ("batch features", then a small classifier): Spark
extracts every image's penultimate-layer features with the stream's own handler, decoder and
preprocessing (so training sees exactly what serving will), the driver fits a multinomial
logistic-regression head on them with torch (``pipeline.model.heads``), and the result is a
bundle (``pipeline.model.bundles``) that any ``--model`` accepts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.commands.flags import TRAIN_SETTINGS, settings_from_args
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.model import bundles, heads
from pipeline.model.classfolders import DatasetError, check_classes, list_images
from pipeline.model.handler import Prediction, get_handler
from pipeline.model.specs import EFFICIENTNET_LITE0
from pipeline.names import describe, split_gs

FEATURES_SCHEMA = "i long, status string, reason string, features array<float>"


@dataclass(frozen=True)
class Example:
    location: str  # a path or gs:// URI
    label: str
    generation: int | None = None


# --------------------------------------------------------------------------- pure core


def stratified_split(labels: Sequence[str], val_fraction: float, seed: int
                     ) -> tuple[list[int], list[int]]:
    """Indices (train, validation): per class, a seeded shuffle, then round(n·fraction) — at
    least one and at most n − 1 — to validation, so every class is in both."""
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1, got {val_fraction}.")
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_label):
        members = by_label[label][:]
        rng.shuffle(members)
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction)))
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return sorted(train), sorted(val)


# --------------------------------------------------------------------------- features (Spark)


def _read(example: tuple[str, int | None], settings: Settings, client) -> bytes | str:
    """The image's bytes, or why it could not be read."""
    location, generation = example
    if not location.startswith("gs://"):
        try:
            return Path(location).read_bytes()
        except OSError as exc:
            return f"cannot read: {exc.strerror}"
    from pipeline.notifications import ObjectKey
    from pipeline.stream.fetch import fetch_one

    bucket, name = split_gs(location, object_name=True)
    got = fetch_one(client, ObjectKey(bucket, name, generation or 0), settings.max_bytes)
    return got.data if got.ok else f"{got.status}: {got.reason}"


def feature_partitions(settings: Settings) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The executor side: read and embed each image with the stream's handler (model cached
    per Python worker); an unreadable image is a row with its reason, never a failed task."""

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        handler = get_handler(settings)
        client = None
        for frame in frames:
            if client is None and frame["location"].str.startswith("gs://").any():
                from pipeline.clients import shared_storage_client

                client = shared_storage_client(settings)
            payloads = [_read((loc, None if pd.isna(g) else int(g)), settings, client)
                        for loc, g in zip(frame["location"], frame["generation"], strict=True)]
            readable = [p for p in payloads if isinstance(p, bytes)]
            embedded = iter(handler.embed(readable))
            rows = []
            for i, payload in zip(frame["i"], payloads, strict=True):
                result = next(embedded) if isinstance(payload, bytes) else payload
                if isinstance(result, str):
                    rows.append((int(i), "unreadable", result, None))
                elif isinstance(result, Prediction):
                    rows.append((int(i), result.status, result.reason, None))
                else:  # the features, a tensor
                    rows.append((int(i), "ok", "", result.tolist()))
            yield pd.DataFrame(rows, columns=["i", "status", "reason", "features"])

    return run


def extract_features(spark, examples: Sequence[Example], settings: Settings,
                     say: Callable[[str], None]) -> dict[int, Any]:
    """Index → features (list of floats) or (status, reason), for every example."""
    from rich.progress import Progress

    cores = settings.num_partitions or spark.sparkContext.defaultParallelism
    parts = max(1, min(len(examples), max(cores, len(examples) // 64)))
    rows = spark.sparkContext.parallelize(
        [(i, e.location, e.generation) for i, e in enumerate(examples)], parts)
    frame = (spark.createDataFrame(rows, "i long, location string, generation long")
             .mapInPandas(feature_partitions(settings), FEATURES_SCHEMA))
    out: dict[int, Any] = {}
    with Progress(transient=True, console=_stderr_console()) as progress:
        task = progress.add_task("features", total=len(examples))
        for r in frame.toLocalIterator(prefetchPartitions=True):
            out[r.i] = list(r.features) if r.status == "ok" else (r.status, r.reason)
            progress.advance(task)
    say(f"features: {sum(isinstance(v, list) for v in out.values())} of {len(examples)} images")
    return out


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


# --------------------------------------------------------------------------- the command


def train(dataset: str, out: str, settings: Settings, *, val_fraction: float = 0.2, seed: int = 0,
          name: str | None = None, spark=None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Extract, split, fit, evaluate, write; returns the command's summary line as a dict."""
    started = time.monotonic()
    if bundles.is_reference(settings.model):
        raise UserError(f"--base must be a model name (e.g. {EFFICIENTNET_LITE0}), "
                        f"not a bundle: {settings.model}.")
    examples = [Example(loc, label, gen) for loc, label, gen in list_images(dataset, settings)]
    check_classes(e.label for e in examples)
    handler = get_handler(settings)  # the base loads here, or fails in one sentence
    if not handler.has_linear_head:
        raise UserError(f"Base model {settings.model} has no final Linear layer to train a head for.")
    say(f"training a head for {len(set(e.label for e in examples))} classes on "
        f"{settings.model} features of {len(examples)} images from {dataset}")
    if spark is None:
        from pipeline.stream.spark import session

        spark = session(settings.spark_master, app="bucketlens-train", log_file=settings.spark_log)
    features = extract_features(spark, examples, settings, say)
    skipped = [{"path": examples[i].location, "status": v[0], "reason": v[1]}
               for i, v in sorted(features.items()) if not isinstance(v, list)]
    usable = [i for i in range(len(examples)) if isinstance(features.get(i), list)]
    for s in skipped:
        say(f"skipped {s['path']}: {s['status']} ({s['reason']})")
    kept = [examples[i] for i in usable]
    labels = check_classes(e.label for e in kept)
    index = {label: c for c, label in enumerate(labels)}
    train_at, val_at = stratified_split([e.label for e in kept], val_fraction, seed)
    say(f"fitting the head on {len(train_at)} images, validating on {len(val_at)}")
    fitted = heads.fit_and_score([features[i] for i in usable], [index[e.label] for e in kept],
                                 labels, train_at, val_at, seed)
    validation, weights = fitted.validation, fitted.weights
    root = dataset.rstrip("/")
    manifest = bundles.build_manifest(
        name=name or Path(out.rstrip("/")).name or "bundle",
        base={"model": settings.model, "weights": settings.weights},
        preprocess=bundles.preprocess_to_json(handler.spec.preprocess),
        labels=labels, head=weights,
        extra={
            "embedding_dim": fitted.embedding_dim,
            "dataset": {
                "root": root, "images": len(examples), "classes": dict(Counter(e.label for e in kept)),
                "skipped": skipped,
                "validation_files": [_relative(kept[i].location, root) for i in val_at],
            },
            "training": {"images": len(train_at), "seed": seed, "val_fraction": val_fraction,
                         "optimizer": "L-BFGS (strong Wolfe), full batch", "max_iter": heads.MAX_ITER,
                         "l2": heads.L2, "train_top1": fitted.training_top1},
            "validation": validation,
        })
    before = bundles.list_versions(out, settings)
    current = bundles.current_version(out, settings)
    uri = bundles.save(out, manifest, weights, settings)
    version = manifest["version"]
    if version in before:
        say(f"{out} already holds version {version} (identical content): rewritten in place")
    elif before:
        say(f"{out} already holds version(s) {', '.join(before)}; kept them (current: {current}) "
            f"and wrote {version} beside them — switch with: bucketlens models promote {out} {version}")
    return {"classes": len(labels), "train_images": len(train_at), "val_images": len(val_at),
            "val_top1": round(validation["top1"], 6), "val_top5": round(validation["top5"], 6),
            "bundle": uri, "version": version, "seconds": round(time.monotonic() - started, 3)}


def _relative(location: str, root: str) -> str:
    return location[len(root):].lstrip("/") if location.startswith(root) else location


def run_train(args: argparse.Namespace) -> int:
    """0 trained; 2 unusable input (one sentence on stderr)."""
    if not args.dataset:
        raise UserError("Say which images to train on: --dataset DIR|gs://BUCKET/PREFIX.")
    settings = settings_from_args(args, TRAIN_SETTINGS, spark_log="" if args.verbose else None)

    def say(line: str) -> None:
        print(f"bucketlens train: {line}", file=sys.stderr, flush=True)

    try:
        summary = train(args.dataset, args.out, settings, val_fraction=args.val_fraction,
                        seed=args.seed, name=args.name, say=say)
    except DatasetError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot use {args.dataset}: {describe(exc)}") from None
    say(f"validation top-1 {summary['val_top1']:.3f}, top-5 {summary['val_top5']:.3f} "
        f"on {summary['val_images']} images; bundle {summary['bundle']}")
    print(json.dumps(summary), flush=True)
    return 0
