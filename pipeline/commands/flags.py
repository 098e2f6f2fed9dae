"""Flags that set one Settings field each, generated from the field, for every command.

A table per command names the fields (field → help); the flag's name, type, choices
(``names.CHOICES``) and the ``BUCKETLENS_*`` variable in its help come from ``Settings``, and
``settings_from_args`` reads them back, a flag not given being its variable. Light (the usage
checks import it before torch or Spark).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any, get_type_hints

from pipeline.config import ENV_PREFIX, Settings
from pipeline.names import CHOICES

SettingsFlags = Mapping[str, str]  # field → the flag's help
RUN_SETTINGS: SettingsFlags = {
    "subscription": "Pub/Sub subscription",
    "table": "BigQuery table in the dataset",
    "checkpoint": "Spark checkpoint directory",
    "model": "torchvision model name, efficientnet_lite0, or a bundle / model location "
             "(path or gs:// URI)",
    "model_refresh_seconds": "how often to look for a newly promoted version of a model location",
    "weights": "weights file or gs:// URI",
    "trigger_seconds": "micro-batch interval",
    "max_messages_per_batch": "admission control per batch",
    "batch_size": "images per inference batch",
    "min_confidence": "mark rows whose top-1 probability is lower",
    "prefix": "only classify objects under this prefix",
    "spark_master": "Spark master (default local[2]; spark-submit's wins)",
    "sink": "where rows go (jsonl writes to BUCKETLENS_JSONL_URI)",
    "sink_mode": "BigQuery write path",
    "metrics_port": "serve Prometheus metrics on 127.0.0.1:PORT/metrics",
    "embeddings": "also store each image's embedding, from the same forward pass, for "
                  "`similar` and the report's map",
    "alerts": "alert rule file (JSON, path or gs:// URI): matching rows and drift go to the "
              "alert topic",
    "alert_topic": "Pub/Sub topic alerts are published to",
    "drift_window": "drift window: minute, hour, day or seconds",
    "drift_baseline": "a time inside the drift baseline window (default: the second window)",
}
CLASSIFY_SETTINGS: SettingsFlags = {
    "model": "torchvision model, efficientnet_lite0, or a bundle / model location "
             "(path or gs:// URI)",
    "weights": "torchvision weights name (IMAGENET1K_V1), state-dict PATH, or gs://...",
    "batch_size": "images per forward pass",
    "min_confidence": "mark top-1 below this",
}
BACKFILL_SETTINGS: SettingsFlags = {
    "bucket": "the bucket whose objects to classify",
    "prefix": "only objects under this prefix",
    "embeddings": "also store each image's embedding; objects classified without one are "
                  "classified again to add it",
}
REPORT_SETTINGS: SettingsFlags = {
    "dataset": "BigQuery dataset",
    "table": "predictions table the views read",
}
SIMILAR_SETTINGS: SettingsFlags = {"dataset": "BigQuery dataset"}
TRAIN_SETTINGS: SettingsFlags = {"model": "base model whose penultimate features are used"}
FLAG_ALIASES = {"spark_master": ("--master",)}


def add_settings_flags(parser: argparse.ArgumentParser, fields: SettingsFlags, *,
                       required: tuple[str, ...] = (),
                       flag_names: Mapping[str, str] | None = None) -> None:
    """One ``--field-name`` per Settings field (``flag_names`` may name it otherwise), typed
    like the field; unset = the variable, unless the flag is ``required``."""
    hints = get_type_hints(Settings)
    for name, help_ in fields.items():
        flag = (flag_names or {}).get(name, f"--{name.replace('_', '-')}")
        variable = f"{ENV_PREFIX}{name.upper()}"
        if hints[name] is bool:  # a switch: given = True, absent = the variable
            parser.add_argument(flag, dest=name, action="store_const", const=True,
                                help=f"{help_} ({variable}=1)")
            continue
        parser.add_argument(flag, *FLAG_ALIASES.get(name, ()), dest=name,
                            type=hints[name] if hints[name] in (int, float) else None,
                            choices=CHOICES.get(name), required=name in required,
                            help=help_ if name in required else f"{help_} ({variable})")


def settings_from_args(args: argparse.Namespace, fields: SettingsFlags, **overrides: Any
                       ) -> Settings:
    """The Settings a command's generated flags make: a flag not given is its variable."""
    return Settings.from_env(**{name: getattr(args, name, None) for name in fields}, **overrides)
