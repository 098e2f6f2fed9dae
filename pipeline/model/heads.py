"""Fitting and scoring a linear head on frozen features (``bucketlens train``'s torch part):
multinomial logistic regression, folded into a Linear layer that takes the raw features."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.model import bundles

L2 = 1e-3  # weight decay of the head, on standardised features
MAX_ITER = 500  # L-BFGS iterations: the loss is convex, this reaches its optimum (see fit_head)


def fit_head(x: torch.Tensor, y: torch.Tensor, classes: int, seed: int) -> torch.nn.Linear:
    """Multinomial logistic regression on fixed features, returned as a Linear layer that takes
    the raw features (the standardisation is folded into its weights).

    Why this schedule: with frozen features and an L2 penalty the loss is strictly convex, so
    full-batch L-BFGS to convergence reaches the one optimum whatever the start. No early
    stopping: choosing the stopping point on the validation split would bias the validation
    figure the bundle reports.
    """
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    head = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=MAX_ITER,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(z), y) + L2 * head.weight.square().sum() / 2
        loss.backward()
        return loss

    optimizer.step(closure)
    folded = torch.nn.Linear(x.shape[1], classes)
    with torch.no_grad():
        folded.weight.copy_(head.weight / std)
        folded.bias.copy_(head.bias - (head.weight * mean / std).sum(1))
    return folded


def evaluate(logits: torch.Tensor, y: torch.Tensor, labels: Sequence[str]) -> dict[str, Any]:
    """Top-1/top-5 overall and per class, and confusion counts (rows true, columns predicted)."""
    k = min(5, len(labels))
    top = logits.topk(k, dim=1).indices
    hit1 = top[:, 0] == y
    hit5 = (top == y[:, None]).any(1)
    confusion = torch.zeros(len(labels), len(labels), dtype=torch.long)
    for t, p in zip(y.tolist(), top[:, 0].tolist(), strict=True):
        confusion[t, p] += 1
    per_class = {}
    for c, label in enumerate(labels):
        mask = y == c
        n = int(mask.sum())
        per_class[label] = {"images": n,
                            "top1": float(hit1[mask].float().mean()) if n else None,
                            "top5": float(hit5[mask].float().mean()) if n else None}
    return {"images": len(y), "top1": float(hit1.float().mean()), "top5": float(hit5.float().mean()),
            "top1_correct": int(hit1.sum()), "per_class": per_class,
            "confusion": {"labels": list(labels), "counts": confusion.tolist()}}



@dataclass(frozen=True)
class FittedHead:
    """A trained head as a bundle stores it, with what the manifest says of its training."""

    weights: bytes  # safetensors, ``bundles.head_bytes``
    embedding_dim: int
    validation: dict[str, Any]  # ``evaluate`` on the validation split
    training_top1: float


def fit_and_score(features: Sequence[Sequence[float]], classes: Sequence[int],
                  labels: Sequence[str], train_at: Sequence[int], val_at: Sequence[int],
                  seed: int) -> FittedHead:
    """Fit on the ``train_at`` rows, score on ``val_at`` (and on the training rows)."""
    x = torch.tensor(features, dtype=torch.float32)
    y = torch.tensor(classes)
    head = fit_head(x[train_at], y[train_at], len(labels), seed)
    with torch.no_grad():
        validation = evaluate(head(x[val_at]), y[val_at], labels)
        training_top1 = evaluate(head(x[train_at]), y[train_at], labels)["top1"]
    return FittedHead(bundles.head_bytes(head.weight, head.bias), int(x.shape[1]), validation,
                      training_top1)
