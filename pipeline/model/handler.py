"""The classify stage: bytes in, top-k predictions out, one handler per settings per process.

The contract mirrors Apache Beam RunInference's ``ModelHandler`` (load once, preprocess, run a
batch) so the Spark side only needs :func:`get_handler` and :meth:`run_inference`. Bad input
never raises: it comes back as a :class:`Prediction` whose status says what was wrong, because
one broken upload must not fail (and endlessly replay) a whole micro-batch. What a model is
(labels, version) comes from ``pipeline.model.specs``; its weights from ``weights``, built once
per worker by ``cache``. The driver, which records rows but classifies nothing, asks
:func:`model_info` (or :func:`check_model`) and never loads the network.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from pipeline.config import Settings
from pipeline.labels import IMAGENET, OWN_LABELS, ModelInfo
from pipeline.model import allocator, bundles, cache, images, weights
from pipeline.model.specs import (
    ModelSpec,
    WeightsSource,
    model_spec,
    parse_weights,
    weights_version,
)
from pipeline.names import describe
from pipeline.status import Status

OK, LOW_CONFIDENCE = Status.OK, Status.LOW_CONFIDENCE


THREADS_ENV = "BUCKETLENS_TORCH_THREADS"
# Set by Spark for the Python workers it forks (pyspark/daemon.py, worker_util.py).
_SPARK_WORKER_ENV = ("PYTHON_WORKER_FACTORY_SECRET", "SPARK_REUSE_WORKER")


R = TypeVar("R")


@dataclass(frozen=True)
class Prediction:
    """One input's result; error statuses carry an empty ``topk``."""

    status: str
    reason: str
    topk: tuple[tuple[int, str, float], ...]
    embedding: tuple[float, ...] = ()  # L2-normalised penultimate features, when asked for


class ModelHandler(Protocol):
    """What the stream needs from a model, in the spirit of Beam RunInference."""

    name: str

    def load_model(self) -> torch.nn.Module: ...

    def preprocess(self, data: bytes) -> torch.Tensor: ...

    def run_inference(self, batch: Sequence[bytes]) -> list[Prediction]: ...


# --------------------------------------------------------------------------- pure helpers


def torch_threads(
    env: Mapping[str, str], cpu_count: int | None, task_cpus: int | None = None
) -> int:
    """Intra-op threads: explicit setting, else the Spark task's cores, else 1 inside a Spark
    Python worker (Spark already runs one worker per core), else every core."""
    raw = env.get(THREADS_ENV, "").strip()
    if raw:
        return max(1, int(raw))
    if task_cpus:
        return task_cpus
    if any(name in env for name in _SPARK_WORKER_ENV):
        return 1
    return max(1, cpu_count or 1)


def to_predictions(
    probs: torch.Tensor, labels: Sequence[str], top_k: int, min_confidence: float
) -> list[Prediction]:
    """Softmax rows → predictions; a top-1 below ``min_confidence`` is marked, not dropped."""
    values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
    predictions = []
    for row_probs, row_ids in zip(values.tolist(), indices.tolist(), strict=True):
        topk = tuple(
            (i, labels[i] if i < len(labels) else str(i), p)
            for i, p in zip(row_ids, row_probs, strict=True)
        )
        if topk[0][2] < min_confidence:
            reason = f"top-1 probability {topk[0][2]:.3f} < min_confidence {min_confidence}"
            predictions.append(Prediction(LOW_CONFIDENCE, reason, topk))
        else:
            predictions.append(Prediction(OK, "", topk))
    return predictions


def _spark_task_cpus() -> int | None:
    """Cores Spark gave the current task, when running inside one (never imports pyspark)."""
    if "pyspark" not in sys.modules:
        return None
    from pyspark import TaskContext

    context = TaskContext.get()
    return context.cpus() if context is not None else None


# --------------------------------------------------------------------------- what a model is


@dataclass(frozen=True)
class Described:
    """A model as known without its network: what rows record (``info``), how inputs are
    prepared (``spec``), and the base whose weights an executor will load."""

    info: ModelInfo
    spec: ModelSpec
    base_name: str
    source: WeightsSource
    bundle: bundles.Bundle | None  # its head is a few kB, read and checked here


def describe_model(settings: Settings) -> Described:
    """``settings.model`` (a name, a bundle, or a location's current version) without building
    a network or reading base weights; an unknown name or a broken bundle is one sentence."""
    if bundles.is_reference(settings.model):
        bundle = bundles.load(bundles.resolve(settings.model, settings).uri, settings)
        base_name, source = bundle.base_model, parse_weights(bundle.base_weights)
        model_spec(base_name, source)  # fails fast on an unknown base
        spec = ModelSpec(bundle.name, bundle.labels, bundle.preprocess)
        return Described(ModelInfo(spec.name, bundle.version, OWN_LABELS, spec.labels), spec,
                         base_name, source, bundle)
    base_name, source = settings.model, parse_weights(settings.weights)
    spec = model_spec(base_name, source)  # fails fast on an unknown name
    info = ModelInfo(spec.name, weights_version(base_name, source), IMAGENET, spec.labels)
    return Described(info, spec, base_name, source, None)


def model_info(settings: Settings) -> ModelInfo:
    """The :attr:`TorchModelHandler.info` these settings give, for the driver, which records
    rows but classifies nothing: no network is built and no base weights are read."""
    return describe_model(settings).info


def check_model(settings: Settings) -> ModelInfo:
    """:func:`model_info`, after refusing in one sentence what is certainly missing (a weights
    file or object, the offline model's package, torchvision weights neither cached nor
    downloadable: fetched into torch.hub's cache) or wrong (a bundle's head that does not fit
    its base), without reading any weights: the driver's fail-fast before executors load."""
    described = describe_model(settings)
    weights.check_available(described.base_name, described.source, settings)
    if described.bundle is not None:
        check_head_fits(described.bundle, described.base_name,
                        weights.feature_size(described.base_name))
    return described.info


def check_head_fits(bundle: bundles.Bundle, base_name: str, features: int | None) -> None:
    """Refuse a bundle whose head does not take the ``features`` its base gives (None: the
    base ends in no Linear layer, so no head fits)."""
    if features != bundle.weight.shape[1]:
        raise bundles.BundleError(
            f"{bundle.uri}: its head takes {bundle.weight.shape[1]} features but "
            f"base model {base_name} gives {'no' if features is None else features}.")


# --------------------------------------------------------------------------- the handler

_STATE_LOCK = threading.Lock()  # guards _HANDLERS
_HANDLERS: dict[tuple[Any, ...], TorchModelHandler] = {}


class Classifier(torch.nn.Module):
    """``head(backbone(x))``: the base's own output for a model, a trained head's for a bundle."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class TorchModelHandler:
    """:class:`ModelHandler` for torchvision classifiers, the bundled EfficientNet-Lite0, and
    bundles (``settings.model`` a bundle or location path: a trained head on one of those)."""

    def __init__(self, settings: Settings, decoder: str = images.DEFAULT_DECODER) -> None:
        if settings.batch_size < 1 or settings.top_k < 1:
            raise ValueError("batch_size and top_k must be >= 1")
        self.settings = settings
        self.decoder = decoder
        described = describe_model(settings)
        self.bundle, self.spec, self.info = described.bundle, described.spec, described.info
        self.base_name, self.source = described.base_name, described.source
        self.name, self.version, self.label_set = self.info.name, self.info.version, self.info.label_set
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._model: Classifier | None = None
        self._lock = threading.Lock()

    def load_model(self) -> Classifier:
        """The base (shared per worker: eval mode, on the device, ``channels_last``) and a head."""
        spark_markers = {k: os.environ[k] for k in _SPARK_WORKER_ENV if k in os.environ}
        explicit = {THREADS_ENV: str(self.settings.torch_threads)} if self.settings.torch_threads else {}
        torch.set_num_threads(torch_threads({**spark_markers, **explicit}, os.cpu_count(),
                                            _spark_task_cpus()))
        allocator.keep_freed_memory(self.settings.malloc_keep_mb)  # 1.67x the images per CPU-s
        base = cache.shared_base(self.base_name, self.source, self.settings, self.device)
        if self.bundle is None:
            return Classifier(base.backbone, base.head or torch.nn.Identity())
        check_head_fits(self.bundle, self.base_name,
                        base.head.in_features if base.head is not None else None)
        head = torch.nn.Linear(*reversed(self.bundle.weight.shape))
        with torch.no_grad():
            head.weight.copy_(self.bundle.weight)
            head.bias.copy_(self.bundle.bias)
        return Classifier(base.backbone, head.eval().to(self.device))

    @property
    def model(self) -> Classifier:
        """The loaded model, built on first use (and only once) in this process."""
        with self._lock:
            if self._model is None:
                self._model = self.load_model()
            return self._model

    @property
    def has_linear_head(self) -> bool:
        """Whether the model ends in a Linear layer (the one a trained head replaces)."""
        return isinstance(self.model.head, torch.nn.Linear)

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Bytes → model input (3, crop, crop); raises :class:`images.ImageError`."""
        return images.load(
            data,
            self.spec.preprocess,
            max_bytes=self.settings.max_bytes,
            max_pixels=self.settings.max_pixels,
            decoder=self.decoder,
        )

    def _forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass: (penultimate features, class probabilities), both on the CPU."""
        model = self.model
        batch = torch.stack(list(inputs)).to(self.device, memory_format=torch.channels_last)
        with torch.inference_mode():
            features = model.backbone(batch)
            probs = model.head(features).float().softmax(dim=1)
        return features.float().cpu(), probs.cpu()

    def predict(self, inputs: Sequence[torch.Tensor]) -> list[Prediction]:
        """One forward pass over preprocessed inputs; embeddings too when the settings ask."""
        features, probs = self._forward(inputs)
        s = self.settings
        predictions = to_predictions(probs, self.spec.labels, s.top_k, s.min_confidence)
        if not s.embeddings:
            return predictions
        unit = torch.nn.functional.normalize(features, dim=1).tolist()
        return [dataclasses.replace(p, embedding=tuple(e)) for p, e in zip(predictions, unit, strict=True)]

    def features(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The penultimate features (what a head is trained on), one row per input."""
        return list(self._forward(inputs)[0])

    def _try_preprocess(self, data: bytes) -> torch.Tensor | Prediction:
        try:
            return self.preprocess(data)
        except images.ImageError as exc:
            return Prediction(exc.status, exc.reason, ())
        except Exception as exc:  # a decoder bug on hostile bytes must not fail the batch
            return Prediction(images.CORRUPT, f"preprocessing failed: {describe(exc)}", ())

    def run_inference(self, batch: Sequence[bytes]) -> list[Prediction]:
        """One prediction per input, in order; decodes lazily so memory stays one batch."""
        return self.map_batches(batch, self.predict)

    def embed(self, batch: Sequence[bytes]) -> list[torch.Tensor | Prediction]:
        """Per input its features, or the error :class:`Prediction` that says why there are none."""
        return self.map_batches(batch, self.features)

    def map_batches(self, batch: Sequence[bytes], compute: Callable[[Sequence[torch.Tensor]], list[R]]
                    ) -> list[R | Prediction]:
        """``compute`` over the decodable inputs, ``batch_size`` at a time; the others get the
        error :class:`Prediction` that says why."""
        results: list[R | Prediction | None] = [None] * len(batch)
        pending: list[tuple[int, torch.Tensor]] = []

        def flush() -> None:
            positions, inputs = zip(*pending, strict=True)
            for position, result in zip(positions, compute(inputs), strict=True):
                results[position] = result
            pending.clear()

        for position, data in enumerate(batch):
            outcome = self._try_preprocess(data)
            if isinstance(outcome, Prediction):
                results[position] = outcome
                continue
            pending.append((position, outcome))
            if len(pending) == self.settings.batch_size:
                flush()
        if pending:
            flush()
        done = [r for r in results if r is not None]
        assert len(done) == len(batch), "every input gets exactly one result"
        return done


def _handler_key(settings: Settings) -> tuple[Any, ...]:
    # A bundle's settings.model is its version's URI (content-addressed), never a location:
    # the driver resolves locations (bundles.Watcher) before executors see the settings.
    return (
        settings.model,
        settings.weights,
        settings.batch_size,
        settings.top_k,
        settings.min_confidence,
        settings.max_bytes,
        settings.max_pixels,
        settings.torch_threads,
        settings.embeddings,
    )


def get_handler(settings: Settings) -> ModelHandler:
    """The process-wide handler for these settings, its model loaded: once per Python worker.

    Loading here rather than on first use makes a missing model fail where the caller can say
    so (the driver, the CLI) instead of inside a Spark task; a failed load is not cached.
    """
    key = _handler_key(settings)
    with _STATE_LOCK:  # held while loading, so concurrent callers never load twice
        handler = _HANDLERS.get(key)
        if handler is None:
            handler = TorchModelHandler(settings)
            _ = handler.model
            _HANDLERS[key] = handler
    return handler


def forget_handlers() -> None:
    """Drop every cached handler and base, so the next ``get_handler`` loads afresh (changed
    weights, tests)."""
    with _STATE_LOCK:
        _HANDLERS.clear()
        cache.forget_bases()


def _forget_parent_handlers() -> None:
    """A forked child builds its own handlers (``cache`` forgets the bases and the count).

    The parent's handlers are kept referenced, not freed: releasing a CUDA model in a forked
    child would touch a CUDA context the child does not own.
    """
    global _STATE_LOCK, _HANDLERS
    _INHERITED.append(_HANDLERS)
    _STATE_LOCK, _HANDLERS = threading.Lock(), {}


_INHERITED: list[dict] = []


os.register_at_fork(after_in_child=_forget_parent_handlers)
