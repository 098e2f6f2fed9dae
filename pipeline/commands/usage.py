"""Usage checks that run before a command imports torch or Spark (10–15 s), so a missing file, an
unknown model or a flat dataset folder is refused in one sentence at once.

Each ``check_<command>(args)`` raises ``UserError`` (one line, exit 2) or returns; it does no
network I/O: ``gs://`` locations are left to the command itself. Kept light: only ``pipeline``
modules that import nothing heavy.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib.util
import re
from pathlib import Path

from pipeline.commands.flags import (
    BACKFILL_SETTINGS,
    CLASSIFY_SETTINGS,
    RUN_SETTINGS,
    TRAIN_SETTINGS,
    settings_from_args,
)
from pipeline.errors import UserError
from pipeline.model.bundles import is_reference
from pipeline.model.classfolders import DatasetError, check_classes, discover, is_image
from pipeline.names import printable, split_gs

EFFICIENTNET_LITE0 = "efficientnet_lite0"  # pipeline.model.specs's name; that module imports torch
_REGISTERED = re.compile(r"@register_model\([^)]*\)\s*(?:@[^\n]*\n\s*)*def\s+(\w+)")


@functools.cache
def torchvision_classifiers() -> frozenset[str]:
    """The names ``torchvision.models.list_models(module=torchvision.models)`` returns, read
    from torchvision's source instead of importing it (which imports torch): the classifiers
    are the ``@register_model()`` functions of the top-level ``torchvision/models/*.py``."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    return frozenset(name for f in models.glob("*.py")
                     for name in _REGISTERED.findall(f.read_text(encoding="utf-8")))


def check_model(model: str) -> None:
    """A model name torchvision or the offline model knows, or a bundle/location that exists."""
    if model.startswith("gs://"):
        return
    if is_reference(model):
        if not Path(model).exists():
            raise UserError(f"no model bundle or location at {printable(model)}: give an existing "
                            "directory, a gs:// URI, or a model name such as efficientnet_lite0.")
        return
    known = torchvision_classifiers()
    if model != EFFICIENTNET_LITE0 and known and model not in known:
        near = difflib.get_close_matches(model, sorted(known), n=4)
        raise UserError(f"unknown model {printable(model)!r}: choose a torchvision classifier "
                        f"({', '.join(near) or 'mobilenet_v2, resnet50, …'}), {EFFICIENTNET_LITE0} "
                        "(works offline), or a bundle directory / gs:// location.")


def check_weights(weights: str | None) -> None:
    """A weights file must exist; names like IMAGENET1K_V2 and gs:// URIs are checked on load."""
    if weights and not weights.startswith("gs://") and ("/" in weights or "." in weights) \
            and not Path(weights).is_file():
        raise UserError(f"no weights file at {printable(weights)}: give a state-dict file, a "
                        "gs:// URI, or a torchvision weights name such as IMAGENET1K_V1.")


def check_classify(args: argparse.Namespace) -> None:
    for raw in args.paths:
        if not Path(raw).exists():
            raise UserError(f"no such file or directory: {printable(raw)} (classify takes local "
                            "image files or folders).")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be 1 or more, got {args.batch_size}.")
    settings = settings_from_args(args, CLASSIFY_SETTINGS)
    check_model(settings.model)
    check_weights(settings.weights)


def check_run(args: argparse.Namespace) -> None:
    settings = settings_from_args(args, RUN_SETTINGS)
    check_model(settings.model)
    check_weights(settings.weights)
    if settings.alerts and not settings.alerts.startswith("gs://"):
        from pipeline.stream.alerts import check_fits, load_rules

        check_fits(load_rules(settings.alerts), settings)


def check_backfill(args: argparse.Namespace) -> None:
    settings = settings_from_args(args, BACKFILL_SETTINGS)  # the bucket name, by GCS's rules
    check_model(settings.model)


def check_train(args: argparse.Namespace) -> None:
    if not args.dataset:
        raise UserError("say which images to train on: --dataset DIR|gs://BUCKET/PREFIX "
                        "(images in <dataset>/<class>/).")
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}.")
    check_model(settings_from_args(args, TRAIN_SETTINGS).model)
    if args.dataset.startswith("gs://"):
        return
    root = Path(args.dataset)
    if not root.is_dir():
        raise UserError(f"no dataset folder at {printable(args.dataset)}: train reads "
                        "<dataset>/<class>/<image> from a folder or gs:// prefix.")
    items = discover(root)
    if items:
        try:  # the same sentence training would say, before torch loads
            check_classes(item.class_name for item in items)
        except DatasetError as exc:
            raise UserError(str(exc)) from None
        return
    loose = any(is_image(p) for p in root.iterdir() if p.is_file())
    raise UserError(f"{printable(args.dataset)} has no images in class folders"
                    + (" (its images lie directly in it)" if loose else "")
                    + f": put them in {printable(args.dataset.rstrip('/'))}/<class>/, one folder "
                    "per class.")


def check_models(args: argparse.Namespace) -> None:
    if args.action == "promote" and not args.version:
        raise UserError("promote needs the VERSION to make current (see `bucketlens models list "
                        "LOCATION`).")
    if not args.location.startswith("gs://") and not Path(args.location).is_dir():
        raise UserError(f"no model location at {printable(args.location)}: give the folder or "
                        "gs:// prefix `train --out` wrote.")


def check_similar(args: argparse.Namespace) -> None:
    split_gs(args.uri, object_name=True)


# command → check, run by pipeline.commands.cli before the command's module is imported
CHECKS = {"classify": check_classify, "run": check_run, "backfill": check_backfill,
          "train": check_train, "models": check_models, "similar": check_similar}
