"""The per-process cache of base networks: each is built (its weights read) once per Python
worker, whichever handlers and bundle heads use it, and counted, so tests and the stream's
metrics can tell how often a process really loaded a model.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import Settings
from pipeline.model.specs import WeightsSource
from pipeline.model.weights import build_model

_BASE_LOCK = threading.Lock()  # guards _BASES
_COUNT_LOCK = threading.Lock()  # guards _LOADS
_BASES: dict[tuple[Any, ...], Base] = {}
_LOADS = 0


@dataclass(frozen=True)
class Base:
    """A base model split before its last Linear layer: ``backbone`` gives the penultimate
    features (the embedding), ``head`` maps them to the base's own classes."""

    backbone: torch.nn.Module
    head: torch.nn.Linear | None


def split_head(model: torch.nn.Module) -> Base:
    """Replace the last ``nn.Linear`` (in definition order: the classifier of every torchvision
    and EfficientNet model) with ``Identity``; a model without one keeps its output as is."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            last = name
    if last is None:
        return Base(model, None)
    parent_name, _, attr = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    head = getattr(parent, attr)
    setattr(parent, attr, torch.nn.Identity())
    return Base(model, head)


def shared_base(name: str, source: WeightsSource, settings: Settings, device: torch.device) -> Base:
    """The base model, built once per Python worker whichever heads use it, so swapping a
    bundle's version loads a head of a few kB, not the network."""
    global _LOADS
    key = (name, source, device.type)
    with _BASE_LOCK:
        base = _BASES.get(key)
        if base is None:
            model = build_model(name, source, settings)
            model = model.eval().to(device, memory_format=torch.channels_last)
            base = _BASES[key] = split_head(model)
            with _COUNT_LOCK:
                _LOADS += 1
        return base


def model_load_count() -> int:
    """How many times ``load_model`` ran in this process (a forked child starts at zero)."""
    return _LOADS


def forget_bases() -> None:
    """Drop every cached base, so the next use builds it afresh (changed weights, tests)."""
    with _BASE_LOCK:
        _BASES.clear()


def _forget_parent_bases() -> None:
    """A forked child loads its own bases and counts from zero; the parent's stay referenced
    (freeing a CUDA model in the child would touch a CUDA context it does not own)."""
    global _LOADS, _BASE_LOCK, _COUNT_LOCK, _BASES
    _INHERITED.append(_BASES)
    _BASE_LOCK, _COUNT_LOCK = threading.Lock(), threading.Lock()
    _BASES, _LOADS = {}, 0


_INHERITED: list[dict] = []


os.register_at_fork(after_in_child=_forget_parent_bases)
